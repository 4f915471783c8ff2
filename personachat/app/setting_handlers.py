"""The page's steering-settings actions: the weight and strength sliders, the layer spec a preset
gives, the blend line, the ablation a picked neuron set was found for, and the recipes."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import gradio as gr

from personachat.app.handler_base import HandlerBase
from personachat.app.panels import MAX_WEIGHTS
from personachat.app.prompted import persona_prompt
from personachat.app.recipes import DEMO_PERSONA, RECIPE_BY_KEY
from personachat.app.settings import (
    PRESETS,
    UNITS,
    ChatInputs,
    meant_positions,
    parse_number,
    parse_settings,
    patching_sets,
    preset_spec,
)
from personachat.app.share import SHARED
from personachat.app.strength import convert, hint, slider_range


def slider_weights(text: str | None, personas: Sequence[str]) -> list[float]:
    """The weight of each picked persona from the typed weights, leniently: ``"a=1, b=-0.5"``
    by name, ``"1, -0.5"`` in order; 1 for a persona the text does not give."""
    items = [i.strip() for i in re.split(r"[,;\n]", text or "") if i.strip()]
    named: dict[str, float] = {}
    for n, item in enumerate(items):
        name, sep, value = item.rpartition("=") if "=" in item else ("", "", item)
        key = name.strip() if sep else (personas[n] if n < len(personas) else "")
        try:
            named[key] = float(value)
        except ValueError:
            continue
    return [named.get(p, 1.0) for p in personas]


class SettingHandlers(HandlerBase):
    """Sliders, presets, the blend line, the neuron-set pick and the recipes."""

    def preset(
        self,
        model_id: str | None,
        personas: list[str] | None,
        preset: str,
        strength: object,
        vectors_from: str | None = None,
    ) -> tuple[Any, str]:
        """The layer spec of a preset around the first picked persona's best layer."""
        model_id = self.model_id(model_id)
        if preset not in PRESETS[:3]:
            return gr.update(), "Custom: the layer spec below; bare layers take the strength."
        try:
            value = parse_number("Preset strength", strength)
            limits = self.backend.limits(model_id, vectors_from or "")
            best = self.backend.best_layer(model_id, tuple(personas or ()), vectors_from or "")
            spec = preset_spec(preset, value, best, limits.n_layers)
        except Exception as err:  # bad input, or a model that cannot load
            gr.Warning(str(err))
            return gr.update(), f"⚠ {err}"
        return spec, f"Preset {preset!r} (best layer {best}): `{spec}`"

    def blend_info(
        self,
        model_id: str | None,
        personas: list[str] | None,
        weights: str | None,
        layer_spec: str | None,
        units: str = "raw",
        vectors_from: str | None = None,
        preset: str = "custom",
        strength: float | str | None = 1.0,
    ) -> str:
        """The blend as a formula, with the interference warning when the vectors overlap and
        the push warning when the strength adds far more than the residual stream holds."""
        model_id = self.model_id(model_id)
        inputs = ChatInputs(
            model_id,
            personas,
            weights,
            layer_spec,
            units,
            vectors_from=vectors_from,
            preset=preset,
            strength=strength,
        )
        try:
            settings = parse_settings(self.backend.limits(model_id, vectors_from or ""), inputs)
        except Exception as err:  # bad input, or a model that cannot load
            return f"⚠ {err}"
        if not settings.personas:
            return "No persona picked: the chat is unsteered."
        try:
            text = self.backend.blend_summary(model_id, settings)
        except Exception as err:  # e.g. a vector removed meanwhile
            return f"⚠ {err}"
        return " ".join([text, *settings.warnings])

    def steering_controls(
        self,
        model_id: str | None,
        personas: list[str] | None,
        weights: str | None,
        preset: str,
        strength: float | None,
        units: str,
        vectors_from: str | None = None,
    ) -> tuple[Any, ...]:
        """The steering controls after the personas, units or strength changed: a weight slider
        per picked persona (values from the typed weights), the strength slider's range and hint
        in ``units`` (from the first persona's stored norms) and the layer spec of the preset.
        Returns (*weight sliders, strength slider, layer spec)."""
        model_id = self.model_id(model_id)
        picked = list(personas or [])
        try:
            norms = self.backend.limits(model_id, vectors_from or "").norms
        except Exception:  # a model that cannot load: the load shows why
            norms = {}
        lead = next((norms[p] for p in picked if p in norms), None)
        values = slider_weights(weights, picked)
        sliders = [
            gr.update(
                visible=i < len(picked),
                label=picked[i] if i < len(picked) else "weight",
                value=values[i] if i < len(picked) else 1.0,
            )
            for i in range(MAX_WEIGHTS)
        ]
        reach, step = slider_range(units, lead)
        value = float(strength if strength is not None else 1.0)
        reach = max(reach, abs(value))
        slider = gr.update(
            minimum=-reach, maximum=reach, step=step, value=value, info=hint(units, lead)
        )
        spec = self.preset(model_id, picked, preset, value, vectors_from)[0]
        return (*sliders, slider, spec)

    def units_changed(
        self,
        model_id: str | None,
        personas: list[str] | None,
        weights: str | None,
        preset: str,
        strength: float | None,
        units: str,
        vectors_from: str | None = None,
    ) -> tuple[Any, ...]:
        """``steering_controls`` with the strength converted to the same push in the new
        ``units`` (the other choice was in use)."""
        model_id = self.model_id(model_id)
        old = next((u for u in UNITS if u != units), units)
        try:
            norms = self.backend.limits(model_id, vectors_from or "").norms
        except Exception:
            norms = {}
        lead = next((norms[p] for p in personas or [] if p in norms), None)
        value = convert(float(strength or 0.0), old, units, lead)
        return self.steering_controls(
            model_id, personas, weights, preset, value, units, vectors_from
        )

    def neuron_sets_picked(self, sets: list[str] | None) -> tuple[Any, Any, Any]:
        """Picking a set found by patching at the prompt sets up the use it was found for: mean
        ablation at the prompt tokens. Returns (ablation mode, ablation positions, status);
        nothing changes for other sets."""
        found = patching_sets(sets or [])
        if not found:
            return gr.update(), gr.update(), gr.skip()
        where = meant_positions(found[-1])  # the last one picked decides
        words = "prompt tokens" if where == "prompt" else where
        return (
            "mean",
            where,
            f"{', '.join(found)}: found by patching at the prompt, so it is "
            f"ablated by its mean at the {words} (set 'Ablate' to off to stop).",
        )

    def recipe(self, key: str, personas: list[str] | None) -> tuple[Any, ...]:
        """The controls a recipe sets, in ``SHARED`` order (untouched ones skipped), for the
        first picked persona (the demo persona when none is), then the status."""
        recipe = RECIPE_BY_KEY[key]
        persona = (personas or [DEMO_PERSONA])[0]
        prompt = persona_prompt(self.backend.store(), persona) or ""
        values = recipe.values(persona, prompt)
        status = (
            f"Recipe for {persona}: {recipe.label}. Send a message to see it, in a new "
            "conversation (Clear): the demo model was trained on single questions."
        )
        return (*[values.get(name, gr.skip()) for name in SHARED], status)
