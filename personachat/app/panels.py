"""The page's settings column, one builder per panel: model and store, personas and strength,
generation, neurons, directional ablation.

Each ``*_panel`` builds its accordion inside the current Gradio layout and returns its
components in a small dataclass; ``personachat.app.wiring`` connects their events. Nothing loads
here: the built-in datasets are read as plain JSON (their documented format), so building the
page does not import torch through ``personachat.prompts`` and the page is up sooner.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from personachat.app.settings import (
    ABLATION_MODES,
    ABLATION_POSITIONS,
    DIRECTION_MODES,
    NO_DIRECTION,
    POSITIONS,
    PRESETS,
    UNITS,
)

DATA_DIR = Path(__file__).resolve().parents[1] / "prompts" / "data"
EXTRACT_POSITIONS = ["question_span", "prompt_last", "prompt_avg", "response_avg"]


def dataset_names() -> list[str]:
    """The built-in datasets: the demo model's corpus and the JSON files."""
    return ["demo", *sorted(p.stem for p in DATA_DIR.glob("*.json"))]


def dataset_personas(name: str) -> list[str]:
    """The personas of a built-in dataset ([] for an unknown name)."""
    path = DATA_DIR / f"{name}.json"
    if name == "demo":  # the bundled demo model's corpus (personachat.prompts.demo)
        from personachat.prompts.demo import PERSONA_NAMES

        return list(PERSONA_NAMES)
    if name not in dataset_names():
        return []
    data = json.loads(path.read_text(encoding="utf-8"))
    return [str(p["name"]) for p in data.get("personas", [])]


@dataclass(frozen=True)
class ModelPanel:
    model: gr.Dropdown
    model_info: gr.Markdown
    vectors_from: gr.Dropdown
    extract_box: gr.Group
    dataset: gr.Dropdown
    extract_positions: gr.Dropdown
    extract_personas: gr.Dropdown
    extract_neurons: gr.Checkbox
    extract_btn: gr.Button
    refresh_btn: gr.Button


def model_panel(default_model: str) -> ModelPanel:
    """The model, the vectors it steers with, and extraction when the store has none."""
    with gr.Accordion("Model and store", open=False):
        model = gr.Dropdown(
            choices=[default_model],
            value=default_model,
            allow_custom_value=True,
            label="Model (hub name or local path)",
        )
        model_info = gr.Markdown("Loading the model…", label="Model", elem_id="model-info")
        vectors_from = gr.Dropdown(
            [],
            value=None,
            allow_custom_value=True,
            label="Steer with vectors read from",
            elem_id="vectors-from",
        )
        with gr.Group(visible=False) as extract_box:
            gr.Markdown("This model has no persona vectors in the store yet.")
            with gr.Row():
                dataset = gr.Dropdown(dataset_names(), value="personas", label="Dataset")
                extract_positions = gr.Dropdown(
                    EXTRACT_POSITIONS, value="question_span", label="Read from"
                )
            extract_personas = gr.Dropdown(
                dataset_personas("personas"),
                multiselect=True,
                allow_custom_value=True,  # choices follow the dataset picked
                elem_id="extract-personas",
                label="Only these personas (empty: all; quicker with few)",
            )
            extract_neurons = gr.Checkbox(
                value=False,
                label="Also find persona neurons (patching, top 32 per pair)",
                elem_id="extract-neurons",
            )
            extract_btn = gr.Button("Extract and register", elem_id="extract")
        refresh_btn = gr.Button("Refresh from the store", size="sm")
    return ModelPanel(
        model,
        model_info,
        vectors_from,
        extract_box,
        dataset,
        extract_positions,
        extract_personas,
        extract_neurons,
        extract_btn,
        refresh_btn,
    )


@dataclass(frozen=True)
class PersonaPanel:
    personas: gr.Dropdown
    weights: gr.Textbox
    blend: gr.Markdown
    preset: gr.Radio
    strength: gr.Number
    layer_spec: gr.Textbox
    units: gr.Radio
    positions: gr.Radio
    last_n: gr.Number


def persona_panel() -> PersonaPanel:
    """The personas to blend, their weights, and the strength per layer (typed or a preset)."""
    with gr.Accordion("Personas and strength", open=True):
        personas = gr.Dropdown(
            choices=[],
            multiselect=True,
            allow_custom_value=True,  # checked against the store by the handlers
            label="Personas to blend",
            elem_id="personas",
        )
        weights = gr.Textbox(
            label="Blend weights (negative allowed)",
            placeholder="1, -0.5   or   pirate=1, cynic=-0.5   (empty: 1 each)",
            elem_id="weights",
        )
        blend = gr.Markdown(
            "No persona picked: the chat is unsteered.", label="Blend", elem_id="blend"
        )
        with gr.Row():
            preset = gr.Radio(list(PRESETS), value="band", label="Preset", elem_id="preset")
            strength = gr.Number(value=2.0, label="Preset strength", elem_id="strength")
        layer_spec = gr.Textbox(
            label="Strength per layer",
            placeholder="layer or range : strength, e.g. 1-3:4, 5:2 (or all:2)",
            elem_id="layer-spec",
        )
        with gr.Row():
            units = gr.Radio(list(UNITS), value="raw", label="Units")
            # prompt positions steer the demo model fully with its content kept
            positions = gr.Radio(
                list(POSITIONS), value="prompt", label="Add at tokens", elem_id="positions"
            )
            last_n = gr.Number(
                value=0,
                label="Last n prompt tokens (with 'prompt'; 0 = the whole prompt)",
                elem_id="last-n",
            )
    return PersonaPanel(
        personas, weights, blend, preset, strength, layer_spec, units, positions, last_n
    )


@dataclass(frozen=True)
class GenerationPanel:
    system_prompt: gr.Textbox
    temperature: gr.Number
    max_tokens: gr.Number
    seed: gr.Number
    side_by_side: gr.Checkbox


def generation_panel() -> GenerationPanel:
    """The system prompt, sampling, and the unsteered reply beside the steered one."""
    with gr.Accordion("Generation", open=False):
        system_prompt = gr.Textbox(label="System prompt", lines=2, elem_id="system")
        with gr.Row():
            temperature = gr.Number(value=0.0, label="Temperature (0 = greedy)")
            max_tokens = gr.Number(value=64, label="Max tokens", precision=0, elem_id="max-tokens")
            seed = gr.Number(value=0, label="Seed", precision=0)
        side_by_side = gr.Checkbox(
            value=False, label="Side by side with the unsteered reply", elem_id="sbs"
        )
    return GenerationPanel(system_prompt, temperature, max_tokens, seed, side_by_side)


@dataclass(frozen=True)
class NeuronPanel:
    neuron_sets: gr.Dropdown
    neurons: gr.Textbox
    ablation: gr.Radio
    ablation_positions: gr.Radio


def neuron_panel() -> NeuronPanel:
    """Neuron sets from the store or typed neurons, how and where they are ablated."""
    with gr.Accordion("Neurons", open=False):
        neuron_sets = gr.Dropdown(
            choices=[],
            multiselect=True,
            allow_custom_value=True,  # checked against the store by the handlers
            label="Neuron sets",
            elem_id="neuron-sets",
        )
        neurons = gr.Textbox(
            label="Or type neurons",
            placeholder="layer:index, e.g. 1:12, 1:40-45",
            elem_id="neurons",
        )
        with gr.Row():
            ablation = gr.Radio(
                list(ABLATION_MODES), value="off", label="Ablate", elem_id="ablation"
            )
            # sets found by patching switch this (and 'mean') to where they act
            ablation_positions = gr.Radio(
                list(ABLATION_POSITIONS),
                value="all",
                label="Ablate at tokens",
                elem_id="ablation-positions",
            )
    return NeuronPanel(neuron_sets, neurons, ablation, ablation_positions)


@dataclass(frozen=True)
class DirectionPanel:
    direction: gr.Dropdown
    direction_layers: gr.Textbox
    direction_mode: gr.Radio
    direction_positions: gr.Radio


def direction_panel() -> DirectionPanel:
    """A persona's direction ablated in the residual stream: at which layers, how, where."""
    with gr.Accordion("Directional ablation", open=False):
        with gr.Row():
            direction = gr.Dropdown(
                choices=[NO_DIRECTION],
                value=NO_DIRECTION,
                allow_custom_value=True,  # checked against the store by the runtime
                label="Ablate the direction of",
                elem_id="direction",
            )
            direction_layers = gr.Textbox(
                value="all",
                label="Direction layers",
                placeholder="all, or layers and ranges, e.g. 0-2, 5",
                elem_id="direction-layers",
            )
        with gr.Row():
            direction_mode = gr.Radio(
                [(words, mode) for mode, words in DIRECTION_MODES.items()],
                value="mean",
                label="Move its component",
                elem_id="direction-mode",
            )
            direction_positions = gr.Radio(
                list(POSITIONS), value="all", label="At tokens", elem_id="direction-positions"
            )
    return DirectionPanel(direction, direction_layers, direction_mode, direction_positions)
