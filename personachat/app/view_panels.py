"""The page's main column, one builder per panel: the conversation (steered, unsteered and
prompted replies side by side, turn by turn), then one tab per view of the model's inside
(tokens, layers, persona map, store, analysis).

Each ``*_panel`` builds its part inside the current Gradio layout and returns its components in
a small dataclass; ``personachat.app.wiring`` connects their events. The chatbots hold the
conversations (the API's values) out of sight; the page shows them as one HTML view
(``views.compare_html``) so the replies of a turn stand side by side.
"""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from personachat.app import views
from personachat.app.analysis import ANALYSIS_FIGURES
from personachat.app.calib_panels import AxisPanel, axis_panel
from personachat.app.help import INFO

EXPORT_FORMATS = (".safetensors", ".gguf")


@dataclass(frozen=True)
class ChatPanel:
    note: gr.Markdown
    settings_button: gr.Button
    side_by_side: gr.Checkbox
    prompted: gr.Checkbox
    compare: gr.HTML
    chatbot: gr.Chatbot
    side_chat: gr.Chatbot
    prompted_chat: gr.State
    examples: gr.Dataset
    message: gr.Textbox
    send: gr.Button
    stop: gr.Button
    retry: gr.Button
    undo: gr.Button
    clear: gr.Button
    status: gr.Markdown
    api_chat: gr.Button
    api_retry: gr.Button
    api_strength: gr.Number


def chat_panel(side_by_side: bool) -> ChatPanel:
    """The conversation with its columns, example prompts, the message box, its buttons and the
    status line; hidden: the chatbots that hold the conversations and the API's triggers."""
    note = gr.Markdown("", elem_id="model-note")
    settings_button = gr.Button("⚙ Settings", size="sm", elem_id="open-settings")
    with gr.Row(elem_id="columns"):
        side = gr.Checkbox(
            value=side_by_side,
            label="Beside it: the plain reply",
            info=INFO["side_by_side"],
            elem_id="sbs",
        )
        prompted = gr.Checkbox(
            value=False,
            label="Beside it: the persona's own prompt",
            info=INFO["prompted"],
            elem_id="prompted",
        )
    compare = gr.HTML(views.compare_html([], [], []), elem_id="compare")
    chatbot = gr.Chatbot(label="Chat", visible=False, elem_id="chat")
    side_chat = gr.Chatbot(
        label="Unsteered (same conversation)", visible=False, elem_id="side-chat"
    )
    prompted_chat = gr.State([])
    examples = gr.Dataset(
        components=["textbox"],
        samples=[],
        label="Try",
        layout="gallery",
        samples_per_page=8,
        elem_id="examples",
    )
    message = gr.Textbox(
        placeholder="Type a message and press Enter",
        label="Message",
        show_label=False,
        elem_id="message",
    )
    with gr.Row(elem_id="chat-buttons"):
        send = gr.Button("Send", variant="primary", elem_id="send", min_width=60)
        stop = gr.Button("Stop", variant="stop", elem_id="stop", min_width=60, interactive=False)
        retry = gr.Button("Retry", elem_id="retry", min_width=60)
        undo = gr.Button("Undo", elem_id="undo", min_width=60)
        clear = gr.Button("Clear", elem_id="clear", min_width=60)
    status = gr.Markdown("", label="Status", elem_id="status")
    api_chat = gr.Button(visible=False)  # /chat and /retry for API clients: their own outputs
    api_retry = gr.Button(visible=False)
    api_strength = gr.Number(value=1.0, visible=False)  # the API's strength: any number
    return ChatPanel(
        note,
        settings_button,
        side,
        prompted,
        compare,
        chatbot,
        side_chat,
        prompted_chat,
        examples,
        message,
        send,
        stop,
        retry,
        undo,
        clear,
        status,
        api_chat,
        api_retry,
        api_strength,
    )


@dataclass(frozen=True)
class SharePanel:
    share: gr.Button
    link: gr.Textbox
    download: gr.DownloadButton


def share_panel() -> SharePanel:
    """A link to these settings, and the conversation as a file."""
    with gr.Row(elem_id="share-row"):
        share = gr.Button("Link to these settings", size="sm", elem_id="share", scale=1)
        download = gr.DownloadButton(
            "Download the conversation (JSON)",
            value=None,
            size="sm",
            interactive=False,
            elem_id="download-conversation",
            scale=1,
        )
    link = gr.Textbox(
        label="Open this link to restore the settings",
        buttons=["copy"],
        visible=False,
        elem_id="share-link",
    )
    return SharePanel(share, link, download)


@dataclass(frozen=True)
class TokensPanel:
    view_layer: gr.Slider
    view_persona: gr.Dropdown
    tokens: gr.HTML
    heatmap: gr.Plot
    numbers_btn: gr.Button
    numbers: gr.JSON


def tokens_panel(last_layer: int = 1) -> TokensPanel:
    """The last reply's per-token projections at a layer (0 to ``last_layer``, the default
    model's, so a session that never loaded the model takes any of its layers), its token x
    layer heatmap and its numbers."""
    with gr.Tab("Tokens"):
        with gr.Row():
            view_layer = gr.Slider(
                0,
                max(last_layer, 1),
                value=0,
                step=1,
                label="Layer",
                info=INFO["view_layer"],
                elem_id="view-layer",
            )
            view_persona = gr.Dropdown(
                choices=[],
                value=None,
                allow_custom_value=True,
                label="Persona",
                info=INFO["view_persona"],
                elem_id="view-persona",
            )
        tokens = gr.HTML(
            views.empty_html("No reply yet."), label="Per-token projections", elem_id="tokens"
        )
        heatmap = gr.Plot(show_label=False, elem_id="heatmap")
        with gr.Accordion("The numbers (JSON)", open=False):
            numbers_btn = gr.Button("Show the numbers", size="sm", elem_id="show-numbers")
            numbers = gr.JSON(label="Per token, layer and persona", elem_id="numbers")
    return TokensPanel(view_layer, view_persona, tokens, heatmap, numbers_btn, numbers)


@dataclass(frozen=True)
class PlotPanel:
    button: gr.Button
    plot: gr.Plot


def layers_panel() -> PlotPanel:
    """AUC and separation by layer of the picked personas."""
    with gr.Tab("Layers"):
        button = gr.Button("Plot AUC / separation by layer", size="sm", elem_id="plot-layers")
        plot = gr.Plot(show_label=False, elem_id="layer-plot")
    return PlotPanel(button, plot)


def map_panel() -> PlotPanel:
    """The persona vectors' PCA map with this conversation's point."""
    with gr.Tab("Map"):
        button = gr.Button("Map this conversation", size="sm", elem_id="map-button")
        plot = gr.Plot(show_label=False, elem_id="persona-map")
    return PlotPanel(button, plot)


@dataclass(frozen=True)
class StorePanel:
    button: gr.Button
    personas: gr.Dataframe
    models: gr.Dataframe
    metrics: gr.Dataframe
    neuron_sets: gr.Dataframe
    vector_persona: gr.Dropdown
    vector_kind: gr.Dropdown
    vector_format: gr.Radio
    export: gr.Button
    vector_file: gr.File
    axis: AxisPanel


def store_panel() -> StorePanel:
    """The store browser's tables, a vector to download, and the model's assistant axis."""
    with gr.Tab("Store"):
        axis = axis_panel()
        with gr.Group():
            with gr.Row():
                vector_persona = gr.Dropdown(
                    [],
                    label="Download the vector of",
                    info=INFO["vector_persona"],
                    allow_custom_value=True,
                    elem_id="vector-persona",
                )
                vector_kind = gr.Dropdown(
                    [],
                    label="read from",
                    info=INFO["vector_kind"],
                    allow_custom_value=True,
                    elem_id="vector-kind",
                )
                vector_format = gr.Radio(
                    list(EXPORT_FORMATS),
                    value=".safetensors",
                    label="as",
                    info=INFO["vector_format"],
                    elem_id="vector-format",
                )
            export = gr.Button("Export the vector", size="sm", elem_id="export-vector")
            vector_file = gr.File(label="Vector file", interactive=False, elem_id="vector-file")
        button = gr.Button("Load tables", size="sm", elem_id="load-tables")
        personas = gr.Dataframe(label="Personas", interactive=False)
        models = gr.Dataframe(label="Models", interactive=False)
        metrics = gr.Dataframe(label="Vectors (at best layer)", interactive=False)
        neuron_sets = gr.Dataframe(label="Neuron sets", interactive=False)
    return StorePanel(
        button,
        personas,
        models,
        metrics,
        neuron_sets,
        vector_persona,
        vector_kind,
        vector_format,
        export,
        vector_file,
        axis,
    )


@dataclass(frozen=True)
class AnalysisPanel:
    personas: gr.Dropdown
    button: gr.Button
    text: gr.Markdown
    images: list[gr.Plot]


def analysis_panel() -> AnalysisPanel:
    """The persona analysis of the current model: findings in plain words (the technical ones
    folded), then one interactive plot per figure."""
    with gr.Tab("Analysis"):
        with gr.Row():
            personas = gr.Dropdown(
                [],
                multiselect=True,
                allow_custom_value=True,  # checked by the analysis
                label="Only these personas (empty: all; quicker with few)",
                info=INFO["analysis_personas"],
                elem_id="analysis-personas",
                scale=3,
            )
            button = gr.Button("Run analysis", elem_id="run-analysis", scale=1)
        text = gr.Markdown(
            "Do personas that are clearly different still give the same answers (persona "
            "collapse)? Is the persona still inside the model when they do, and where does it "
            "enter the answer? *Run analysis* answers for the current model (as "
            "`scripts/analyze.py` does); it runs once per model, later sessions see the same "
            "result.",
            elem_id="analysis",
        )
        with gr.Accordion("Figures", open=True):
            images = [
                gr.Plot(label=label, show_label=False, visible=False, elem_id=f"analysis-{key}")
                for key, label in ANALYSIS_FIGURES
            ]
    return AnalysisPanel(personas, button, text, images)
