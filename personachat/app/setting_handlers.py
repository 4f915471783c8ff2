"""The page's steering-settings actions: fill the layer spec from a preset, show the blend, and
set up the ablation a picked neuron set was found for."""

from __future__ import annotations

from typing import Any

import gradio as gr

from personachat.app.handler_base import HandlerBase
from personachat.app.settings import (
    PRESETS,
    ChatInputs,
    meant_positions,
    parse_number,
    parse_settings,
    patching_sets,
    preset_spec,
)


class SettingHandlers(HandlerBase):
    """Presets, the blend line and the neuron-set pick."""

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
            return gr.update(), "Custom: type strengths per layer."
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
    ) -> str:
        """The blend as a formula, with the interference warning when the vectors overlap."""
        model_id = self.model_id(model_id)
        inputs = ChatInputs(
            model_id, personas, weights, layer_spec, units, vectors_from=vectors_from
        )
        try:
            settings = parse_settings(self.backend.limits(model_id, vectors_from or ""), inputs)
        except Exception as err:  # bad input, or a model that cannot load
            return f"⚠ {err}"
        if not settings.personas:
            return "No persona picked: the chat is unsteered."
        try:
            return self.backend.blend_summary(model_id, settings)
        except Exception as err:  # e.g. a vector removed meanwhile
            return f"⚠ {err}"

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
