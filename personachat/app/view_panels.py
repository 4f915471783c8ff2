"""The page's chat column, one builder per panel: the chat itself, then one tab per view of the
model's inside (tokens, layers, persona map, store, analysis).

Each ``*_panel`` builds its part inside the current Gradio layout and returns its components in
a small dataclass; ``personachat.app.wiring`` connects their events.
"""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from personachat.app import views
from personachat.app.analysis import ANALYSIS_FIGURES
from personachat.app.panels import dataset_personas


@dataclass(frozen=True)
class ChatPanel:
    chatbot: gr.Chatbot
    side_chat: gr.Chatbot
    message: gr.Textbox
    send: gr.Button
    stop: gr.Button
    retry: gr.Button
    undo: gr.Button
    clear: gr.Button
    status: gr.Markdown


def chat_panel() -> ChatPanel:
    """The conversation (and the unsteered one beside it), the message box, its buttons and the
    status line."""
    with gr.Row():
        chatbot = gr.Chatbot(label="Chat", height=380, elem_id="chat")
        side_chat = gr.Chatbot(
            label="Unsteered (same conversation)", height=380, visible=False, elem_id="side-chat"
        )
    message = gr.Textbox(
        placeholder="Type a message and press Enter",
        label="Message",
        show_label=False,
        elem_id="message",
    )
    with gr.Row():
        send = gr.Button("Send", variant="primary", elem_id="send", min_width=60)
        stop = gr.Button("Stop", variant="stop", elem_id="stop", min_width=60)
        retry = gr.Button("Retry", elem_id="retry", min_width=60)
        undo = gr.Button("Undo", elem_id="undo", min_width=60)
        clear = gr.Button("Clear", elem_id="clear", min_width=60)
    status = gr.Markdown("", label="Status", elem_id="status")
    return ChatPanel(chatbot, side_chat, message, send, stop, retry, undo, clear, status)


@dataclass(frozen=True)
class TokensPanel:
    view_layer: gr.Slider
    view_persona: gr.Dropdown
    tokens: gr.HTML
    heatmap: gr.Image


def tokens_panel() -> TokensPanel:
    """The last reply's per-token projections at a layer, and its token x layer heatmap."""
    with gr.Tab("Tokens"):
        with gr.Row():
            view_layer = gr.Slider(0, 1, value=0, step=1, label="Layer", elem_id="view-layer")
            view_persona = gr.Dropdown(choices=[], allow_custom_value=True, label="Heatmap persona")
        tokens = gr.HTML(
            views.empty_html("No reply yet."), label="Per-token projections", elem_id="tokens"
        )
        heatmap = gr.Image(
            label="Token x layer", interactive=False, type="numpy", elem_id="heatmap"
        )
    return TokensPanel(view_layer, view_persona, tokens, heatmap)


@dataclass(frozen=True)
class PlotPanel:
    button: gr.Button
    plot: gr.Image


def layers_panel() -> PlotPanel:
    """AUC and separation by layer of the picked personas."""
    with gr.Tab("Layers"):
        button = gr.Button("Plot AUC / separation by layer", size="sm")
        plot = gr.Image(label="Per-layer quality", interactive=False)
    return PlotPanel(button, plot)


def map_panel() -> PlotPanel:
    """The persona vectors' PCA map with this conversation's point."""
    with gr.Tab("Persona map"):
        button = gr.Button("Map this conversation", size="sm")
        plot = gr.Image(label="Persona space (PCA)", interactive=False)
    return PlotPanel(button, plot)


@dataclass(frozen=True)
class StorePanel:
    button: gr.Button
    personas: gr.Dataframe
    models: gr.Dataframe
    metrics: gr.Dataframe
    neuron_sets: gr.Dataframe


def store_panel() -> StorePanel:
    """The store browser's tables."""
    with gr.Tab("Store"):
        button = gr.Button("Load tables", size="sm")
        personas = gr.Dataframe(label="Personas", interactive=False)
        models = gr.Dataframe(label="Models", interactive=False)
        metrics = gr.Dataframe(label="Vectors (at best layer)", interactive=False)
        neuron_sets = gr.Dataframe(label="Neuron sets", interactive=False)
    return StorePanel(button, personas, models, metrics, neuron_sets)


@dataclass(frozen=True)
class AnalysisPanel:
    personas: gr.Dropdown
    button: gr.Button
    text: gr.Markdown
    images: list[gr.Image]


def analysis_panel(demo_model: bool) -> AnalysisPanel:
    """The persona analysis of the current model: findings, then one image per figure."""
    with gr.Tab("Analysis"):
        with gr.Row():
            personas = gr.Dropdown(
                dataset_personas("demo" if demo_model else "personas"),
                multiselect=True,
                allow_custom_value=True,  # checked by the analysis
                label="Only these personas (empty: all; quicker with few)",
                elem_id="analysis-personas",
                scale=3,
            )
            button = gr.Button("Run analysis", elem_id="run-analysis", scale=1)
        text = gr.Markdown(
            "Persona collapse, persona probe, activation patching and persona "
            "space of the current model (as `scripts/analyze.py` reports them). "
            "It runs once per model; later sessions see the same result.",
            elem_id="analysis",
        )
        images = [
            gr.Image(label=label, interactive=False, visible=False, type="numpy")
            for _, label in ANALYSIS_FIGURES
        ]
    return AnalysisPanel(personas, button, text, images)
