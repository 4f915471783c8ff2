"""The page's calibration actions: the drift chart and its numbers (from the session's
``Readout``, no model needed), the hold panel's choices and words, and registering the model's
assistant axis."""

from __future__ import annotations

import logging
from typing import Any

import gradio as gr
from gradio.components.plot import PlotData

from personachat.app import figures
from personachat.app.capping import cap_words, parse_cap
from personachat.app.handler_base import HandlerBase
from personachat.app.public import bearer
from personachat.app.readout import AXIS, Readout
from personachat.app.settings import NO_DIRECTION, ChatInputs

log = logging.getLogger(__name__)


class CalibrationHandlers(HandlerBase):
    """The drift, the hold panel, the assistant axis."""

    def drift_plot(self, readout: Readout | None) -> PlotData:
        """The conversation's drift so far (the tracked vectors' turns; empty at first)."""
        drift = readout.drift if readout is not None else Readout().drift
        fig = figures.drift_figure(drift)
        return PlotData(type="plotly", plot=figures.plot_json(fig))

    def drift_numbers(self, readout: Readout | None) -> dict[str, Any]:
        """The conversation's drift as numbers: per tracked vector its layer, pooling,
        reference and band, and per turn the raw, scaled and percentile values (at that layer
        and at every layer)."""
        return (readout or Readout()).drift.numbers()

    def cap_choices(self, model_id: str | None, vectors_from: str | None = None) -> tuple[Any, Any]:
        """What the hold panel offers for the model (nothing held, the assistant axis when the
        store has it, the personas), and the Store tab's line on the axis."""
        model_id = self.model_id(model_id)
        try:
            personas = self.backend.persona_names(model_id, vectors_from or "")
            axis = self.backend.axis(model_id)
        except Exception as err:  # a model that cannot load: its load says why
            log.debug("no hold choices for %s: %s", model_id, err)
            return gr.update(), gr.update()
        offered = [AXIS] if axis is not None else []
        choices = [NO_DIRECTION, *offered, *[p for p in personas if p != AXIS]]
        return gr.update(choices=choices), axis_line(axis)

    def cap_info(self, model_id: str | None, vectors_from: str | None, *values: Any) -> str:
        """What the hold panel's settings do, in words (``values``: the ``cap*`` settings in
        ``ChatInputs`` order), or what is wrong with them."""
        model_id = self.model_id(model_id)
        names = ("cap", "cap_side", "cap_by", "cap_level", "cap_layers", "cap_positions")
        inputs = ChatInputs(model_id, **dict(zip(names, values, strict=True)))
        try:
            cap = parse_cap(self.backend.limits(model_id, vectors_from or ""), inputs)
        except Exception as err:  # bad input, or a model that cannot load
            return f"⚠ {err}"
        return "Nothing held." if cap is None else cap_words(cap)

    def register_axis(
        self,
        model_id: str | None,
        dataset: str | None = None,
        vectors_from: str | None = None,
        admin_token: str = "",
        progress: gr.Progress = gr.Progress(track_tqdm=True),  # noqa: B008 - Gradio's idiom
        request: gr.Request | None = None,
    ) -> tuple[Any, Any, str]:
        """Read the model's assistant axis from a built-in dataset (the one the extraction box
        offers) and register it; a progress bar shows while it runs. Returns (the Store tab's
        line on the axis, the hold panel's choices, status). On a public server it needs the admin
        token (``admin_token`` or the request's bearer)."""
        model_id = self.model_id(model_id)
        name = dataset or ("demo" if self.backend.is_demo(model_id) else "personas")
        try:
            self.backend.access.check_admin(
                bearer(request) or admin_token, "Registering the assistant axis"
            )
            summary = self.backend.register_axis(model_id, name)
        except Exception as err:
            log.exception("registering the assistant axis failed")
            text = self.backend.access.error(err)
            gr.Warning(f"Registering the assistant axis failed: {text}")
            return gr.update(), gr.update(), f"⚠ Registering the assistant axis failed: {text}"
        choices, line = self.cap_choices(model_id, vectors_from)
        return line, choices, summary


def axis_line(axis: Any) -> str:
    """The Store tab's line on the model's assistant axis."""
    if axis is None:
        return (
            "**Assistant axis**: not in the store for this model. Register it to hold the "
            "assistant and to follow the conversation's drift along it."
        )
    calibrated = "with" if axis.quantiles is not None else "without"
    return (
        f"**Assistant axis**: registered ({axis.method}, read from {axis.positions}, dataset "
        f"`{axis.dataset}`, {calibrated} its reference distribution). Registering again "
        "replaces it."
    )
