"""One chat turn under a session's ``Settings``: the runtime's specs, the stream, the readout.

``generate`` checks the request before anything runs (a bad spec raises there), then returns an
iterator of ``Step``s: the reply so far, the unsteered reply beside it, the reply under the lead
persona's own system prompt (``Settings.prompted``), and with the last step the ``Readout`` of
the exchange. The settings' numbers go to the runtime's specs as they are
(``{layer: strength}``, ``(layer, index)`` pairs); the oldest turns are left out when the
conversation would not fit the model's context. A direction read from another kind of vector
(``Settings.direction_from``) joins the engine's vectors under its own name for this request;
so does the model's assistant axis when it is held (``Settings.cap``) or read out
(``personachat.app.calibration``, which also calibrates the last step's readout).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from personachat.app.calibration import Calibrator, read_vectors
from personachat.app.capping import cap_spec
from personachat.app.catalog import Catalog
from personachat.app.hold import Hold
from personachat.app.limits import BOUNDS, check_prompt_tokens
from personachat.app.prompted import NO_PROMPT, persona_prompt, prompted_stream, together
from personachat.app.readout import Readout
from personachat.app.settings import LAST_PROMPT_TOKEN, InputError, Settings
from personachat.app.space import reference

MAX_READOUT_PERSONAS = 12


@dataclass(frozen=True)
class Step:
    """The reply so far; ``readout``, ``warnings`` (interference in the blend) and
    ``render_warnings`` (vectors read from prompts rendered otherwise) come with the last step."""

    text: str
    side_text: str | None = None
    prompted_text: str | None = None  # the reply under the lead persona's own system prompt
    done: bool = False
    stopped: bool = False
    readout: Readout | None = None
    warnings: tuple[str, ...] = field(default=())
    render_warnings: tuple[str, ...] = field(default=())
    dropped: int = 0  # oldest turns left out so the conversation fits the model's context


def generate(
    catalog: Catalog,
    model_id: str,
    settings: Settings,
    messages: Sequence[dict[str, Any]],
    stop: threading.Event | None = None,
    hold: bool = False,
) -> Iterator[Step]:
    """Check the request now (raising before anything runs), then return an iterator that
    streams the reply to ``messages`` under ``settings``. With ``hold`` the reply waits after
    its first tokens until ``stop`` is set (``personachat.app.hold``)."""
    from personachat.chat import GenerationSettings

    engine = catalog.engine(model_id, settings.vectors_from)
    lm = engine.lm
    system = settings.system_prompt
    conversation, dropped = fit_context(lm, messages, settings.max_new_tokens, system)
    steering = steering_spec(settings)
    readout = list(settings.personas) or sorted(engine.vectors)[:MAX_READOUT_PERSONAS]
    if not engine.reads_out:  # an engine that cannot read out says so in its last update
        readout = []
    engine, direction = direction_spec(catalog, model_id, engine, settings)
    engine, cap = cap_spec(catalog, model_id, engine, settings)
    readout, calibrate = read_vectors(catalog, model_id, engine, readout, lm, conversation)
    ablation, extra = ablation_specs(lm, engine.neuron_sets, settings)
    if hold and stop is not None:
        extra.append(Hold(stop))
    generation = GenerationSettings(
        max_new_tokens=settings.max_new_tokens,
        temperature=settings.temperature,
        seed=settings.seed,
    )
    updates = engine.stream(
        conversation,
        generation,
        steering=steering,
        ablation=ablation,
        direction=direction,
        readout=readout,
        side_by_side=settings.side_by_side,
        stop=stop,
        handlers=extra,
        cap=cap,
    )
    prompted, note = None, None
    if settings.prompted:
        prompt = persona_prompt(catalog.store(), settings.lead) if settings.lead else None
        if prompt is None:
            note = NO_PROMPT
        else:
            prompted = prompted_stream(engine, conversation, prompt, generation, stop)
    levels = reference(catalog, model_id, readout, settings.vectors_from)
    streams = together(updates, prompted)
    return _steps(model_id, lm.tokenizer, streams, levels, dropped, settings, note, calibrate)


def steering_spec(settings: Settings) -> Any:
    """The runtime's ``SteeringSpec`` of the blend, or None when nothing steers."""
    from personachat.interventions import SteeringSpec

    if not settings.steering:
        return None
    return SteeringSpec(
        blend=settings.blend(),
        layers=dict(settings.layer_strengths),
        units=unit_name(settings.units),  # type: ignore[arg-type]
        positions=settings.positions,  # type: ignore[arg-type]
        last_n=settings.last_n,
    )


def direction_spec(
    catalog: Catalog, model_id: str, engine: Any, settings: Settings
) -> tuple[Any, Any]:
    """The engine to generate with and the runtime's ``DirectionSpec`` (None when no direction
    is ablated). A direction read from another kind of vector than the steering joins the
    engine's vectors as ``"<persona> (<kind>)"``, in an engine for this request."""
    from personachat.interventions import DirectionSpec

    if not settings.projecting:
        return engine, None
    name = settings.direction
    if settings.direction_from:
        other = catalog.engine(model_id, settings.direction_from)
        if other is not engine:
            vector = other.vectors.get(name)
            if vector is None:
                known = ", ".join(sorted(other.vectors)) or "none"
                raise InputError(
                    f"no {settings.direction_from} vector of {name!r} to ablate; known: {known}."
                )
            name = f"{name} ({settings.direction_from})"
            engine = engine.with_vectors({name: vector})
    where, last_n = _window(settings.direction_positions)
    spec = DirectionSpec(
        name,
        settings.direction_layers,
        mode=settings.direction_mode,
        positions=where,  # type: ignore[arg-type]
        last_n=last_n,
    )
    return engine, spec


def ablation_specs(lm: Any, neuron_sets: Any, settings: Settings) -> tuple[Any, list[Any]]:
    """The ``AblationSpec`` of the first set with the typed neurons, and one extra handler per
    further set (their position window takes the prompt's length from its first forward, the
    prefill, as the engine's own handlers do); (None, []) when nothing is ablated."""
    from personachat.interventions import AblationSpec, build_ablation

    if not settings.ablating:
        return None, []
    mode, (where, last_n) = settings.ablation, _window(settings.ablation_positions)
    first = settings.neuron_sets[0] if settings.neuron_sets else None
    ablation = AblationSpec(
        first,
        list(settings.neurons),
        mode,  # type: ignore[arg-type]
        positions=where,  # type: ignore[arg-type]
        last_n=last_n,
    )
    rows = [False, True] if settings.side_by_side else None
    extra = []
    for label in settings.neuron_sets[1:]:
        spec = AblationSpec(
            label,
            mode=mode,  # type: ignore[arg-type]
            positions=where,  # type: ignore[arg-type]
            last_n=last_n,
        )
        extra.append(build_ablation(lm, spec, neuron_sets, rows=rows))
    return ablation, extra


def _steps(
    model_id: str,
    tokenizer: Any,
    updates: Iterator[tuple[Any, Any, bool]],
    levels: np.ndarray | None,
    dropped: int,
    settings: Settings,
    note: str | None,
    calibrate: Calibrator,
) -> Iterator[Step]:
    def decode(token: int) -> str:
        return str(tokenizer.decode([token]))

    for update, prompted, finished in updates:
        warnings = tuple(update.interference.warnings) if update.interference else ()
        readout = None
        if finished and update.readout is not None:
            steered = steered_tokens(
                settings, update.readout.prompt_len, len(update.readout.tokens)
            )
            readout = Readout.from_reply(
                model_id, update.readout, decode, levels, settings.personas, steered
            )
            readout = calibrate(readout, update.readout)
        yield Step(
            text=update.text,
            side_text=update.baseline_text,
            prompted_text=prompted.text if prompted is not None else note,
            done=finished,
            stopped=update.stopped,
            readout=readout,
            warnings=warnings,
            render_warnings=tuple(update.warnings),
            dropped=dropped,
        )


def steered_tokens(settings: Settings, n_prompt: int, n_tokens: int) -> tuple[int, int] | None:
    """The tokens [first, last) the steering was added at; None when nothing was steered."""
    if not settings.steering:
        return None
    if settings.positions == "prompt":
        return (max(0, n_prompt - (settings.last_n or n_prompt)), n_prompt)
    if settings.positions == "generated":
        return (n_prompt, n_tokens)
    return (0, n_tokens)


def unit_name(units: str) -> str:
    """The runtime's name for the page's units."""
    return "calibrated" if units == "x residual norm" else "raw"


def _window(positions: str) -> tuple[str, int | None]:
    """The runtime's (positions, last_n) for a page choice of where to ablate neurons."""
    return ("prompt", 1) if positions == LAST_PROMPT_TOKEN else (positions, None)


def context_limit(lm: Any) -> int | None:
    """The model's context length (``max_position_embeddings``), when its config says."""
    from personachat.model import text_config

    value = getattr(text_config(lm.model.config), "max_position_embeddings", None)
    return int(value) if isinstance(value, int) and value > 0 else None


def prompt_length(lm: Any, messages: Sequence[dict[str, Any]]) -> int:
    """The tokens of ``messages`` as the model reads them (chat template, generation prompt)."""
    from personachat.prompts import format_chat

    text = format_chat(lm.tokenizer, messages, add_generation_prompt=True)
    return len(lm.tokenizer(text, add_special_tokens=False)["input_ids"])


def fit_context(
    lm: Any, messages: Sequence[dict[str, Any]], max_new_tokens: int, system: str = ""
) -> tuple[list[dict[str, Any]], int]:
    """``messages`` (after the ``system`` prompt, when given) without their oldest turns as far
    as needed (never the last message) so the prompt fits ``BOUNDS.prompt_tokens`` and, with
    ``max_new_tokens``, the model's context; returns them and how many turns went (the fewest
    that make it fit). Near linear in the conversation: each message is tokenized once for a
    first guess, then the prompt is counted a few times (doubling steps, then halving), each
    time near the budget's size. ``BoundError`` when the last message alone is past it."""
    from personachat.prompts import message_text

    head = [{"role": "system", "content": system}] if system else []
    kept = list(messages)
    limit = context_limit(lm)
    budget = BOUNDS.prompt_tokens
    if limit is not None:
        budget = min(budget, limit - max_new_tokens)
    n = prompt_length(lm, head + kept)
    if n <= budget or len(kept) <= 1:
        check_prompt_tokens(n, budget)
        return head + kept, 0
    texts = [message_text(m) for m in kept]
    sizes = [len(ids) for ids in lm.tokenizer(texts, add_special_tokens=False)["input_ids"]]
    most = len(kept) // 2  # turns that may go: the last message always stays

    def cut(k: int) -> list[dict[str, Any]]:  # without the k oldest turns (user + reply)
        return kept[min(2 * k, len(kept) - 1) :]

    def fits(k: int) -> bool:
        return prompt_length(lm, head + cut(k)) <= budget

    # a first guess from the messages' own tokens, then the fewest turns that make it fit:
    # forward while it does not fit, or back by doubling steps and halving (few counts, each
    # of a prompt near the budget's size)
    over, gone, guess = n - budget, 0, 0
    while guess < most and gone < over:
        gone += sum(sizes[2 * guess : 2 * guess + 2])
        guess += 1
    low, high = 0, max(guess, 1)  # fits(low) is False (n > budget)
    while high < most and not fits(high):
        low, high = high, high + 1
    step = 1
    while high - step > low and fits(high - step):
        high, step = high - step, step * 2
    low = max(low, high - step)
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if fits(middle) else (middle, high)
    dropped = high
    kept = cut(dropped)
    n = prompt_length(lm, head + kept)
    check_prompt_tokens(n, budget)
    return head + kept, dropped
