"""The page's panels for calibration: holding a persona (in the settings drawer), the drift of
the conversation (a tab beside the tokens) and the assistant axis (in the Store tab).

Each ``*_panel`` builds its part inside the current Gradio layout and returns its components
in a small dataclass; ``personachat.app.wiring`` connects their events. The hold panel's
controls carry the ``cap*`` settings of ``ChatInputs``; their defaults are the demo model's
measured setting, so picking the assistant axis is all it takes.
"""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from personachat.app.capping import CAP_BY, CAP_SIDES
from personachat.app.drift import BAND
from personachat.app.help import INFO
from personachat.app.recipes import HOLD
from personachat.app.settings import ABLATION_POSITIONS, LAST_PROMPT_TOKEN, NO_DIRECTION

DRIFT_NOTE = (
    "Each assistant turn's projection on the picked personas and the assistant axis, pooled "
    "the way each vector was read (the question span, the last prompt token or the reply), "
    "at each vector's best layer: above as a percentile of its reference (the default "
    f"assistant's samples; the shaded band is their {BAND[0]}th-{BAND[1]}th percentile), "
    "below scaled (0 = baseline mean, 1 = persona mean). It follows the steered column."
)


@dataclass(frozen=True)
class CapPanel:
    cap: gr.Dropdown
    cap_side: gr.Radio
    cap_by: gr.Radio
    cap_level: gr.Number
    cap_layers: gr.Textbox
    cap_positions: gr.Radio
    info: gr.Markdown
    recipe: gr.Button


def cap_panel() -> CapPanel:
    """A direction held on one side of a level: which, which side, the level (a percentile of
    its reference or a raw threshold), where; what it does in words; the measured recipe."""
    with gr.Accordion("Hold the persona", open=False, elem_id="hold-panel"):
        cap = gr.Dropdown(
            choices=[NO_DIRECTION],
            value=NO_DIRECTION,
            allow_custom_value=True,  # checked against the store by the handlers
            label="Hold the projection on",
            info=INFO["cap"],
            elem_id="cap",
        )
        cap_side = gr.Radio(
            [(words, side) for side, words in CAP_SIDES.items()],
            value="above",
            label="Keep it",
            info=INFO["cap_side"],
            elem_id="cap-side",
        )
        with gr.Row():
            cap_by = gr.Radio(
                list(CAP_BY),
                value="percentile",
                label="Level as",
                info=INFO["cap_by"],
                elem_id="cap-by",
            )
            cap_level = gr.Number(
                value=5.0, label="Level", info=INFO["cap_level"], elem_id="cap-level"
            )
        cap_layers = gr.Textbox(
            value="0", label="Hold layers", info=INFO["cap_layers"], elem_id="cap-layers"
        )
        cap_positions = gr.Radio(
            list(ABLATION_POSITIONS),
            value=LAST_PROMPT_TOKEN,
            label="At tokens",
            info=INFO["cap_positions"],
            elem_id="cap-positions",
        )
        info = gr.Markdown("Nothing held.", elem_id="cap-info")
        recipe = gr.Button(HOLD.label, size="sm", elem_id="cap-recipe")
        gr.Markdown(HOLD.explains, elem_classes=["pc-caption"])
    return CapPanel(cap, cap_side, cap_by, cap_level, cap_layers, cap_positions, info, recipe)


@dataclass(frozen=True)
class DriftPanel:
    plot: gr.Plot
    numbers_btn: gr.Button
    numbers: gr.JSON


def drift_panel() -> DriftPanel:
    """The conversation's drift, turn by turn, and its numbers."""
    with gr.Tab("Drift"):
        gr.Markdown(DRIFT_NOTE, elem_classes=["pc-caption"])
        plot = gr.Plot(show_label=False, elem_id="drift")
        with gr.Accordion("The numbers (JSON)", open=False):
            numbers_btn = gr.Button("Show the numbers", size="sm", elem_id="show-drift")
            numbers = gr.JSON(label="Per turn and tracked vector", elem_id="drift-numbers")
    return DriftPanel(plot, numbers_btn, numbers)


@dataclass(frozen=True)
class AxisPanel:
    info: gr.Markdown
    button: gr.Button


def axis_panel() -> AxisPanel:
    """Whether the model has its assistant axis in the store, and a button to register it."""
    with gr.Group():
        info = gr.Markdown("**Assistant axis**: …", elem_id="axis-info")
        button = gr.Button("Register the assistant axis", size="sm", elem_id="register-axis")
        gr.Markdown(INFO["axis"], elem_classes=["pc-caption"])
    return AxisPanel(info, button)
