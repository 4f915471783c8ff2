"""The page's words for a model and for what a turn does to it: plain text from the chat engine
and the session's ``Settings``, shown in the model box and the status line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from personachat.app.capping import cap_words
from personachat.app.settings import (
    LAST_PROMPT_TOKEN,
    Settings,
    format_layer_spec,
    format_layers,
    meant_positions,
    patching_sets,
)


def describe(engine: Any, kinds: list[str], store_path: Path) -> str:
    """The model and the store in two Markdown lines."""
    info = engine.lm.info
    return (
        f"**Model** `{info.model_id}` · {info.architecture} · {info.n_layers} layers · "
        f"hidden {info.hidden_size} · MLP width {info.mlp_width} · on {engine.lm.device}  \n"
        f"**Store** `{store_path}` · {len(engine.vectors)} personas with vectors "
        f"(read from: {', '.join(kinds) or 'none'}) · {len(engine.neuron_sets)} neuron sets"
    )


def blend_summary(engine: Any, settings: Settings) -> str:
    """The blend as a formula plus the runtime's interference warnings."""
    from personachat.interventions import blend_interference

    pairs = list(zip(settings.personas, settings.weights, strict=True))
    terms = " ".join(f"{w:+g}·{p}" for p, w in pairs).lstrip("+")
    layers = [layer for layer, s in settings.layer_strengths if s != 0]
    spec = format_layer_spec(dict(settings.layer_strengths)) or "no layer (unsteered)"
    text = f"Blend {terms} at {spec} ({settings.units})."
    if len(pairs) > 1 and layers:
        terms_v = [(p, w, engine.vectors[p].vector) for p, w in pairs]
        report = blend_interference(terms_v, layers)
        if report.warnings:
            text += " ⚠ Interference: " + "; ".join(report.warnings) + "."
    return text


def settings_summary(engine: Any, settings: Settings) -> str:
    """What this turn does to the model: the blend (with interference), where it is added
    when only the last prompt tokens, the ablated direction, the neuron ablation (with a note
    when a patching set is ablated otherwise than by mean at the prompt) and the persona held."""
    parts = [blend_summary(engine, settings)] if settings.steering else []
    if settings.steering and settings.last_n is not None:
        n = settings.last_n
        parts.append(f"Added at the last {'prompt token' if n == 1 else f'{n} prompt tokens'}.")
    if settings.projecting:
        parts.append(direction_summary(engine, settings))
    if settings.ablating:
        parts.extend(ablation_summary(engine, settings))
    if settings.cap is not None:
        parts.append(cap_words(settings.cap))
    if settings.prompted:
        lead = settings.lead
        parts.append(f"Prompted column: {lead}'s own system prompt." if lead else "")
    return " ".join([*filter(None, parts), *settings.warnings])


def direction_summary(engine: Any, settings: Settings) -> str:
    """Which direction is ablated, how, at which layers and tokens."""
    layers = format_layers(settings.direction_layers)
    where = tokens_words(settings.direction_positions)
    read = f" (read from {settings.direction_from})" if settings.direction_from else ""
    name = f"{settings.direction}'s direction{read}"
    if settings.direction_mode == "zero":
        text = f"Projecting {name} out at layers {layers}"
    else:
        vector = engine.vectors.get(settings.direction)
        base = f"{vector.baseline}'s" if vector is not None else "the baseline's"
        text = f"Moving {name} to {base} level at layers {layers}"
    return f"{text}{where}."


def ablation_summary(engine: Any, settings: Settings) -> list[str]:
    """How many MLP units are ablated, from which sets, how and where; a warning for each set
    found by patching that is ablated otherwise than it was meant to be."""
    sets = engine.neuron_sets
    units = sum(len(sets[label]) for label in settings.neuron_sets) + len(settings.neurons)
    named = ", ".join([*settings.neuron_sets, *(["typed"] if settings.neurons else [])])
    where = tokens_words(settings.ablation_positions)
    parts = [f"Ablating {units} MLP units ({named}) by {settings.ablation}{where}."]
    for label in patching_sets(settings.neuron_sets):
        meant = meant_positions(label)
        if (settings.ablation, settings.ablation_positions) != ("mean", meant):
            parts.append(
                f"⚠ {label}: found by patching at the prompt, meant for mean ablation "
                f"at the {meant if meant != 'prompt' else 'prompt tokens'} "
                f"(ablate 'mean', at '{meant}')."
            )
    return parts


def tokens_words(positions: str) -> str:
    """The status' words for where an ablation acts: nothing for all tokens."""
    if positions == LAST_PROMPT_TOKEN:
        return f" ({positions})"
    return "" if positions == "all" else f" ({positions} tokens)"
