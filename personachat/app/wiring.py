"""The page's events: which handler each control calls, with which inputs and outputs.

``wire`` connects them in four groups (model and store, steering settings, chat, views). Every
action with an ``api_name`` is a named endpoint that ``gradio_client`` can call; the others are
private. ``/chat`` and ``/retry`` get their inputs in the order of their endpoint's parameters
(``personachat.app.endpoints``), so the components and the parameters cannot drift apart.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import gradio as gr

from personachat.app.endpoints import chat_endpoint, retry_endpoint
from personachat.app.handlers import Handlers
from personachat.app.layout import Page
from personachat.app.panels import dataset_personas
from personachat.app.readout import Readout


def wire(page: Page, h: Handlers, demo: gr.Blocks, concurrency: int) -> None:
    """Connect every event of ``page`` to ``h``; at most ``concurrency`` generations at once."""
    wire_model(page, h, demo)
    wire_settings(page, h)
    wire_chat(page, h, concurrency)
    wire_views(page, h)


def load_outputs(page: Page) -> list[Any]:
    """What loading a model updates (``Handlers.load``'s results, in order)."""
    m = page.model
    return [
        m.model_info,
        page.persona.personas,
        page.neurons.neuron_sets,
        m.extract_box,
        page.tokens.view_layer,
        m.vectors_from,
        m.dataset,
        page.direction.direction,
        page.chat.status,
    ]


def wire_model(page: Page, h: Handlers, demo: gr.Blocks) -> None:
    """Load a model's view, re-read the store, extract vectors."""
    m, status = page.model, page.chat.status
    loaded = load_outputs(page)
    demo.load(h.load, [m.model], loaded, api_name="load_model")
    m.model.input(h.load, [m.model], loaded, api_visibility="private")
    refresh_in = [m.model, page.persona.personas, m.vectors_from, page.direction.direction]
    refresh_out = [page.persona.personas, page.neurons.neuron_sets, page.direction.direction]
    m.refresh_btn.click(h.refresh, refresh_in, [*refresh_out, status], api_name="refresh")
    m.extract_btn.click(
        h.extract,
        [m.model, m.dataset, m.extract_positions, m.extract_personas, m.extract_neurons],
        loaded,
        api_name="extract",
        concurrency_limit=1,
    )
    m.dataset.change(
        lambda name: gr.update(choices=dataset_personas(name), value=[]),
        m.dataset,
        m.extract_personas,
        api_visibility="private",
    )
    m.vectors_from.input(h.refresh, refresh_in, [*refresh_out, status], api_visibility="private")


def wire_settings(page: Page, h: Handlers) -> None:
    """Presets fill the layer spec; the blend line follows the personas, weights and spec."""
    p, model, vectors_from = page.persona, page.model.model, page.model.vectors_from
    preset_in = [model, p.personas, p.preset, p.strength, vectors_from]
    preset_out = [p.layer_spec, p.blend]
    p.preset.change(h.preset, preset_in, preset_out, api_name="preset")
    p.strength.submit(h.preset, preset_in, preset_out, api_visibility="private")
    blend_in = [model, p.personas, p.weights, p.layer_spec, p.units, vectors_from]
    # picking personas re-applies the preset around their best layer, then shows the blend
    p.personas.change(h.preset, preset_in, preset_out, api_visibility="private").then(
        h.blend_info, blend_in, p.blend, api_name="blend_info"
    )
    p.layer_spec.input(lambda: "custom", None, p.preset, api_visibility="private")
    for trigger in (p.weights.change, p.layer_spec.change, p.units.change):
        trigger(h.blend_info, blend_in, p.blend, api_visibility="private", show_progress="hidden")
    side_chat = page.chat.side_chat
    page.generation.side_by_side.change(
        _visible, page.generation.side_by_side, side_chat, api_visibility="private"
    )
    n = page.neurons
    n.neuron_sets.input(
        h.neuron_sets_picked,
        n.neuron_sets,
        [n.ablation, n.ablation_positions, page.chat.status],
        api_visibility="private",
    )


def endpoint_inputs(page: Page, endpoint: Callable[..., Any]) -> list[Any]:
    """The page's component for each parameter of ``endpoint`` (``/chat`` or ``/retry``)."""
    p, g, n, d, c = page.persona, page.generation, page.neurons, page.direction, page.chat
    controls = {
        "message": c.message,
        "history": c.chatbot,
        "side_history": c.side_chat,
        "model_id": page.model.model,
        "personas": p.personas,
        "weights": p.weights,
        "layer_spec": p.layer_spec,
        "units": p.units,
        "positions": p.positions,
        "system_prompt": g.system_prompt,
        "temperature": g.temperature,
        "max_new_tokens": g.max_tokens,
        "seed": g.seed,
        "neuron_sets": n.neuron_sets,
        "neurons": n.neurons,
        "ablation": n.ablation,
        "side_by_side": g.side_by_side,
        "vectors_from": page.model.vectors_from,
        "view_layer": page.tokens.view_layer,
        "readout": page.readout,
        "last_n": p.last_n,
        "direction": d.direction,
        "direction_layers": d.direction_layers,
        "direction_mode": d.direction_mode,
        "direction_positions": d.direction_positions,
        "ablation_positions": n.ablation_positions,
    }
    names = [name for name in inspect.signature(endpoint).parameters if name != "request"]
    return [controls[name] for name in names]


def wire_chat(page: Page, h: Handlers, concurrency: int) -> None:
    """Send, retry, stop, undo and clear; a reply's end redraws the heatmap."""
    c, t, readout = page.chat, page.tokens, page.readout
    chat, retry = chat_endpoint(h), retry_endpoint(h)
    out = [c.chatbot, c.side_chat, c.message, c.status, t.tokens, readout]
    run: dict[str, Any] = {"concurrency_limit": concurrency, "concurrency_id": "generate"}
    sent_in = endpoint_inputs(page, chat)
    sent = [
        c.send.click(chat, sent_in, out, api_name="chat", **run),
        c.message.submit(chat, sent_in, out, api_visibility="private", **run),
        c.retry.click(retry, endpoint_inputs(page, retry), out, api_name="retry", **run),
    ]
    t.view_persona.input(h.heatmap, [readout, t.view_persona], t.heatmap, api_name="heatmap")
    for event in sent:
        event.then(
            _persona_choices, [readout, t.view_persona], t.view_persona, api_visibility="private"
        ).then(h.heatmap, [readout, t.view_persona], t.heatmap, api_visibility="private")
    # the reply's own last update says "Stopped"; the stop result goes to a hidden box so it
    # cannot arrive after (and overwrite) that status
    stopped = gr.Textbox(visible=False, label="Stop")
    c.stop.click(h.stop, None, stopped, api_name="stop", concurrency_limit=None, queue=False)
    c.undo.click(
        h.undo,
        [c.chatbot, c.side_chat],
        [c.chatbot, c.side_chat, c.message, c.status],
        api_name="undo",
    )
    c.clear.click(
        h.clear, None, [c.chatbot, c.side_chat, c.status, t.tokens, readout], api_name="clear"
    )


def wire_views(page: Page, h: Handlers) -> None:
    """The views of the model's inside: tokens at a layer, plots, tables, analysis."""
    model, personas, vectors_from = page.model.model, page.persona.personas, page.model.vectors_from
    t, a = page.tokens, page.analysis
    t.view_layer.change(h.tokens, [page.readout, t.view_layer], t.tokens, api_name="tokens")
    page.layers.button.click(
        h.layer_plot, [model, personas, vectors_from], page.layers.plot, api_name="layer_plot"
    )
    page.map.button.click(
        h.persona_map,
        [model, page.chat.chatbot, t.view_layer, personas, vectors_from],
        page.map.plot,
        api_name="persona_map",
    )
    s = page.store
    s.button.click(
        h.store_tables,
        [model],
        [s.personas, s.models, s.metrics, s.neuron_sets],
        api_name="store_tables",
    )
    a.button.click(
        h.analysis,
        [model, a.personas],
        [a.text, *a.images],
        api_name="analysis",
        concurrency_limit=1,
        concurrency_id="analysis",
    )


def _visible(on: bool) -> Any:
    return gr.update(visible=bool(on))


def _persona_choices(readout: Readout | None, current: str | None) -> Any:
    names = list(readout.personas) if readout is not None else []
    return gr.update(
        choices=names, value=current if current in names else (names[0] if names else None)
    )
