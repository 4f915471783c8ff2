"""The page's layout: the settings column on the left, the chat and its views on the right.

``layout`` builds the panels inside the current ``gr.Blocks`` and returns them as one ``Page``,
with the session's ``Readout`` state; ``personachat.app.wiring`` connects their events.
"""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from personachat.app.panels import (
    DirectionPanel,
    GenerationPanel,
    ModelPanel,
    NeuronPanel,
    PersonaPanel,
    direction_panel,
    generation_panel,
    model_panel,
    neuron_panel,
    persona_panel,
)
from personachat.app.readout import Readout
from personachat.app.view_panels import (
    AnalysisPanel,
    ChatPanel,
    PlotPanel,
    StorePanel,
    TokensPanel,
    analysis_panel,
    chat_panel,
    layers_panel,
    map_panel,
    store_panel,
    tokens_panel,
)

INTRO = (
    "# PersonaChat\nChat with a model while steering it with persona vectors, "
    "ablating persona neurons and watching the personas inside it."
)


@dataclass(frozen=True)
class Page:
    """Every panel of the page, and the session's last readout (``gr.State``)."""

    readout: gr.State
    model: ModelPanel
    persona: PersonaPanel
    generation: GenerationPanel
    neurons: NeuronPanel
    direction: DirectionPanel
    chat: ChatPanel
    tokens: TokensPanel
    layers: PlotPanel
    map: PlotPanel
    store: StorePanel
    analysis: AnalysisPanel


def layout(default_model: str, demo_model: bool) -> Page:
    """The panels, in place; ``demo_model`` picks the analysis tab's persona choices."""
    readout = gr.State(Readout())
    gr.Markdown(INTRO)
    with gr.Row():
        with gr.Column(scale=2, min_width=340):
            model = model_panel(default_model)
            persona = persona_panel()
            generation = generation_panel()
            neurons = neuron_panel()
            direction = direction_panel()
        with gr.Column(scale=3, min_width=420):
            chat = chat_panel()
            with gr.Tabs():
                tokens = tokens_panel()
                layers = layers_panel()
                persona_map = map_panel()
                store = store_panel()
                analysis = analysis_panel(demo_model)
    return Page(
        readout,
        model,
        persona,
        generation,
        neurons,
        direction,
        chat,
        tokens,
        layers,
        persona_map,
        store,
        analysis,
    )
