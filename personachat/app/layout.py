"""The page's layout: the settings in a drawer (open beside the chat on a wide screen, a
full-screen drawer behind a button on a phone; holding a persona last), the conversation first
in the main column, then its views (the drift beside the tokens).

``layout`` builds the panels inside the current ``gr.Blocks`` and returns them as one ``Page``,
with the session's ``Readout`` state; ``personachat.app.wiring`` connects their events.
"""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from personachat.app.calib_panels import CapPanel, DriftPanel, cap_panel, drift_panel
from personachat.app.models import last_layer
from personachat.app.panels import (
    DirectionPanel,
    GenerationPanel,
    ModelPanel,
    NeuronPanel,
    PersonaPanel,
    RecipePanel,
    direction_panel,
    generation_panel,
    glossary_panel,
    model_panel,
    neuron_panel,
    persona_panel,
    recipe_panel,
)
from personachat.app.readout import Readout
from personachat.app.view_panels import (
    AnalysisPanel,
    ChatPanel,
    PlotPanel,
    SharePanel,
    StorePanel,
    TokensPanel,
    analysis_panel,
    chat_panel,
    layers_panel,
    map_panel,
    share_panel,
    store_panel,
    tokens_panel,
)

INTRO = (
    "# PersonaChat\nSteer a language model with persona vectors, remove personas by ablating "
    "their neurons, and watch each token's persona inside the model."
)
SIDEBAR_WIDTH = 400


@dataclass(frozen=True)
class Page:
    """Every panel of the page, and the session's last readout (``gr.State``)."""

    readout: gr.State
    model: ModelPanel
    recipes: RecipePanel
    persona: PersonaPanel
    generation: GenerationPanel
    neurons: NeuronPanel
    direction: DirectionPanel
    chat: ChatPanel
    share: SharePanel
    tokens: TokensPanel
    layers: PlotPanel
    map: PlotPanel
    store: StorePanel
    analysis: AnalysisPanel
    cap: CapPanel
    drift: DriftPanel


def layout(default_model: str, demo_model: bool, public: bool = False) -> Page:
    """The panels, in place; ``demo_model`` shows the recipes and puts the plain reply beside
    the steered one from the start; ``public`` shows the admin token's box."""
    readout = gr.State(Readout())
    with gr.Sidebar(open=True, width=SIDEBAR_WIDTH, elem_id="settings"):
        gr.Markdown("## Settings")
        model = model_panel(default_model, public)
        persona = persona_panel()
        recipes = recipe_panel(demo_model)
        generation = generation_panel()
        neurons = neuron_panel()
        direction = direction_panel()
        cap = cap_panel()
        glossary_panel()
    gr.Markdown(INTRO, elem_id="intro")
    chat = chat_panel(side_by_side=demo_model)
    share = share_panel()
    with gr.Tabs(elem_id="views"):
        tokens = tokens_panel(last_layer(default_model))
        drift = drift_panel()
        layers = layers_panel()
        persona_map = map_panel()
        store = store_panel()
        analysis = analysis_panel()
    return Page(
        readout,
        model,
        recipes,
        persona,
        generation,
        neurons,
        direction,
        chat,
        share,
        tokens,
        layers,
        persona_map,
        store,
        analysis,
        cap,
        drift,
    )
