"""The page's settings drawer, one builder per panel: model and store, recipes, personas and
strength, generation, neurons, directional ablation, glossary.

Each ``*_panel`` builds its accordion inside the current Gradio layout and returns its
components in a small dataclass; ``personachat.app.wiring`` connects their events. Every control
carries a line of help (``personachat.app.help.INFO``). Nothing loads here: the built-in
datasets are read as plain JSON (their documented format) and the demo model's personas and
topics arrive with the model's view (``Handlers.load``), so building the page imports no torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from personachat.app.help import GLOSSARY, INFO
from personachat.app.recipes import RECIPES
from personachat.app.settings import (
    ABLATION_MODES,
    ABLATION_POSITIONS,
    DIRECTION_MODES,
    DIRECTION_POSITIONS,
    LAST_PROMPT_TOKEN,
    NO_DIRECTION,
    POSITIONS,
    PRESETS,
    UNITS,
)
from personachat.app.strength import DEFAULT_RAW_MAX, hint

DATA_DIR = Path(__file__).resolve().parents[1] / "prompts" / "data"
EXTRACT_POSITIONS = ["question_span", "prompt_last", "prompt_avg", "response_avg"]
MAX_WEIGHTS = 4  # weight sliders: one per picked persona, up to this many
DEFAULT_STRENGTH = 2.0


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
    admin_token: gr.Textbox


def model_panel(default_model: str, public: bool = False) -> ModelPanel:
    """The model, the vectors it steers with, and extraction when the store has none;
    ``public``: the box for the admin token that store writes need on a public server."""
    with gr.Accordion("Model and store", open=False):
        model = gr.Dropdown(
            choices=[default_model],
            value=default_model,
            allow_custom_value=True,
            label="Model (hub name or local path)",
            info=INFO["model"],
        )
        model_info = gr.Markdown("Loading the model…", label="Model", elem_id="model-info")
        vectors_from = gr.Dropdown(
            [],
            value=None,
            allow_custom_value=True,
            label="Steer with vectors read from",
            info=INFO["vectors_from"],
            elem_id="vectors-from",
        )
        with gr.Group(visible=False) as extract_box:
            gr.Markdown("This model has no persona vectors in the store yet.")
            with gr.Row():
                dataset = gr.Dropdown(
                    dataset_names(), value="personas", label="Dataset", info=INFO["dataset"]
                )
                extract_positions = gr.Dropdown(
                    EXTRACT_POSITIONS,
                    value="question_span",
                    label="Read from",
                    info=INFO["extract_positions"],
                )
            extract_personas = gr.Dropdown(
                dataset_personas("personas"),
                multiselect=True,
                allow_custom_value=True,  # choices follow the dataset picked
                elem_id="extract-personas",
                label="Only these personas (empty: all; quicker with few)",
                info=INFO["extract_personas"],
            )
            extract_neurons = gr.Checkbox(
                value=False,
                label="Also find persona neurons (patching, top 32 per pair)",
                info=INFO["extract_neurons"],
                elem_id="extract-neurons",
            )
            extract_btn = gr.Button("Extract and register", elem_id="extract")
        refresh_btn = gr.Button("Refresh from the store", size="sm")
        admin_token = gr.Textbox(
            "",
            type="password",
            label="Admin token",
            info=INFO["admin_token"],
            visible=public,
            elem_id="admin-token",
        )
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
        admin_token,
    )


@dataclass(frozen=True)
class RecipePanel:
    box: gr.Accordion
    buttons: dict[str, gr.Button]


def recipe_panel(demo_model: bool) -> RecipePanel:
    """One-click settings that reproduce the demo model's measured results."""
    with gr.Accordion("Recipes (measured on the demo model)", open=True, visible=demo_model) as box:
        buttons = {}
        for recipe in RECIPES:
            buttons[recipe.key] = gr.Button(recipe.label, size="sm", elem_id=f"recipe-{recipe.key}")
            gr.Markdown(recipe.explains, elem_classes=["pc-caption"])
    return RecipePanel(box, buttons)


@dataclass(frozen=True)
class PersonaPanel:
    personas: gr.Dropdown
    weight_sliders: list[gr.Slider]
    blend: gr.Markdown
    strength: gr.Slider
    preset: gr.Radio
    units: gr.Radio
    positions: gr.Radio
    last_n: gr.Number
    weights: gr.Textbox
    layer_spec: gr.Textbox


def persona_panel() -> PersonaPanel:
    """The personas to blend with a weight slider each, one strength slider, where it acts; the
    typed weights and layer spec under 'Advanced'."""
    with gr.Accordion("Personas and strength", open=True):
        personas = gr.Dropdown(
            choices=[],
            multiselect=True,
            allow_custom_value=True,  # checked against the store by the handlers
            label="Personas to blend",
            info=INFO["personas"],
            elem_id="personas",
        )
        weight_sliders = [
            gr.Slider(
                -2,
                2,
                value=1.0,
                step=0.05,
                label="weight",
                info=INFO["weight"],
                visible=False,
                elem_id=f"weight-{i}",
            )
            for i in range(MAX_WEIGHTS)
        ]
        strength = gr.Slider(
            -DEFAULT_RAW_MAX,
            DEFAULT_RAW_MAX,
            value=DEFAULT_STRENGTH,
            step=0.1,
            label="Strength",
            info=hint("raw", None),
            elem_id="strength",
        )
        blend = gr.Markdown(
            "No persona picked: the chat is unsteered.", label="Blend", elem_id="blend"
        )
        preset = gr.Radio(
            list(PRESETS), value="band", label="Layers", info=INFO["preset"], elem_id="preset"
        )
        units = gr.Radio(list(UNITS), value="raw", label="Units", info=INFO["units"])
        with gr.Row():
            # prompt positions steer the demo model fully with its content kept
            positions = gr.Radio(
                list(POSITIONS),
                value="prompt",
                label="Add at tokens",
                info=INFO["positions"],
                elem_id="positions",
            )
            last_n = gr.Number(
                value=0, label="Last n prompt tokens", info=INFO["last_n"], elem_id="last-n"
            )
        with gr.Accordion("Advanced: typed weights and layer spec", open=False):
            weights = gr.Textbox(
                label="Blend weights",
                info=INFO["weights"],
                elem_id="weights",
                placeholder="1, -0.5   or   pirate=1, cynic=-0.5   (empty: 1 each)",
            )
            layer_spec = gr.Textbox(
                label="Strength per layer",
                info=INFO["layer_spec"],
                elem_id="layer-spec",
                placeholder="layer or range : strength, e.g. 1-3:4, 5:2 (or all:2)",
            )
    return PersonaPanel(
        personas,
        weight_sliders,
        blend,
        strength,
        preset,
        units,
        positions,
        last_n,
        weights,
        layer_spec,
    )


@dataclass(frozen=True)
class GenerationPanel:
    system_prompt: gr.Textbox
    temperature: gr.Number
    max_tokens: gr.Number
    seed: gr.Number


def generation_panel() -> GenerationPanel:
    """The system prompt and sampling."""
    with gr.Accordion("Generation", open=False):
        system_prompt = gr.Textbox(
            label="System prompt", lines=2, info=INFO["system_prompt"], elem_id="system"
        )
        with gr.Row():
            temperature = gr.Number(value=0.0, label="Temperature", info=INFO["temperature"])
            max_tokens = gr.Number(
                value=64,
                label="Max tokens",
                precision=0,
                info=INFO["max_tokens"],
                elem_id="max-tokens",
            )
            seed = gr.Number(value=0, label="Seed", precision=0, info=INFO["seed"])
    return GenerationPanel(system_prompt, temperature, max_tokens, seed)


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
            info=INFO["neuron_sets"],
            elem_id="neuron-sets",
        )
        neurons = gr.Textbox(
            label="Or type neurons",
            placeholder="layer:index, e.g. 1:12, 1:40-45",
            info=INFO["neurons"],
            elem_id="neurons",
        )
        ablation = gr.Radio(
            list(ABLATION_MODES),
            value="off",
            label="Ablate",
            info=INFO["ablation"],
            elem_id="ablation",
        )
        # sets found by patching switch this (and 'mean') to where they act
        ablation_positions = gr.Radio(
            list(ABLATION_POSITIONS),
            value="all",
            label="Ablate at tokens",
            info=INFO["ablation_positions"],
            elem_id="ablation-positions",
        )
    return NeuronPanel(neuron_sets, neurons, ablation, ablation_positions)


@dataclass(frozen=True)
class DirectionPanel:
    direction: gr.Dropdown
    direction_from: gr.Dropdown
    direction_layers: gr.Textbox
    direction_mode: gr.Radio
    direction_positions: gr.Radio


def direction_panel() -> DirectionPanel:
    """A persona's direction ablated in the residual stream: read from which vector, at which
    layers, how, where. The defaults are the setting that removes a persona on the demo model:
    the last prompt token's direction moved to the baseline's level there, at layer 0."""
    with gr.Accordion("Directional ablation", open=False):
        with gr.Row():
            direction = gr.Dropdown(
                choices=[NO_DIRECTION],
                value=NO_DIRECTION,
                allow_custom_value=True,  # checked against the store by the runtime
                label="Ablate the direction of",
                info=INFO["direction"],
                elem_id="direction",
            )
            direction_from = gr.Dropdown(
                [],
                value=None,
                allow_custom_value=True,
                label="Direction read from",
                info=INFO["direction_from"],
                elem_id="direction-from",
            )
        direction_layers = gr.Textbox(
            value="0",
            label="Direction layers",
            placeholder="all, or layers and ranges, e.g. 0-2, 5",
            info=INFO["direction_layers"],
            elem_id="direction-layers",
        )
        direction_mode = gr.Radio(
            [(words, mode) for mode, words in DIRECTION_MODES.items()],
            value="mean",
            label="Move its component",
            info=INFO["direction_mode"],
            elem_id="direction-mode",
        )
        direction_positions = gr.Radio(
            list(DIRECTION_POSITIONS),
            value=LAST_PROMPT_TOKEN,
            label="At tokens",
            info=INFO["direction_positions"],
            elem_id="direction-positions",
        )
    return DirectionPanel(
        direction, direction_from, direction_layers, direction_mode, direction_positions
    )


def glossary_panel() -> None:
    """The terms the controls use, in a sentence each."""
    with gr.Accordion("Glossary", open=False, elem_id="glossary"):
        gr.Markdown(GLOSSARY)
