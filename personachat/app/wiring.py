"""The page's events: which handler each control calls, with which inputs and outputs.

``wire`` connects them in six groups (model and store, steering settings, chat, views,
sharing, calibration: the drift, the hold panel, the assistant axis). Every action with an
``api_name`` is a named endpoint that ``gradio_client`` can call; the others are private.
``/chat`` and ``/retry`` get their inputs in the order of their endpoint's parameters
(``personachat.app.endpoints``), so the components and the parameters cannot drift apart. The
API's chat, retry and blend line hang on hidden triggers with their own outputs and, where the
page's defaults differ from the API's (the preset, the strength, the direction's layers and
tokens, side by side), hidden inputs holding the API's defaults; the page's own events take and
give more.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import gradio as gr

from personachat.app.endpoints import (
    chat_endpoint,
    page_chat_endpoint,
    page_retry_endpoint,
    retry_endpoint,
)
from personachat.app.handlers import Handlers
from personachat.app.layout import Page
from personachat.app.panels import dataset_personas
from personachat.app.recipes import HOLD, RECIPES
from personachat.app.settings import DIRECTION_POSITIONS, PRESETS, ChatInputs
from personachat.app.share import SHARED

PRIVATE: dict[str, Any] = {"api_visibility": "private"}
QUIET: dict[str, Any] = {**PRIVATE, "show_progress": "hidden"}
# the page's own calls of handlers that also have a named endpoint: named apart, so the
# endpoint keeps its name
BLEND: dict[str, Any] = {**QUIET, "api_name": "page_blend"}
WEIGHTS_JS = """(personas, a, b, c, d) => (personas || []).slice(0, 4)
  .map((p, i) => `${p}=${[a, b, c, d][i]}`).join(", ")"""
LINK_JS = """(q) => (q && q.startsWith('?'))
  ? window.location.origin + window.location.pathname + q : q"""
OPEN_SETTINGS_JS = "() => document.querySelector('.sidebar:not(.open) .toggle-button')?.click()"


def wire(page: Page, h: Handlers, demo: gr.Blocks, concurrency: int) -> None:
    """Connect every event of ``page`` to ``h``; at most ``concurrency`` generations at once."""
    wire_model(page, h, demo)
    wire_settings(page, h)
    wire_chat(page, h, concurrency)
    wire_views(page, h)
    wire_share(page, h)
    wire_calibration(page, h)


def wire_api_conversations(page: Page, h: Handlers, history: gr.JSON, side: gr.JSON) -> None:
    """/undo and /persona_map for API clients: the conversations as plain JSON (``history``,
    ``side``: the hidden inputs /chat takes them in), so the handlers check their shape and
    say what is wrong (the page's own events send the chatbots)."""
    undo, persona_map = gr.Button(visible=False), gr.Button(visible=False)
    c, t = page.chat, page.tokens
    undo.click(
        h.undo, [history, side], [c.chatbot, c.side_chat, c.message, c.status], api_name="undo"
    )
    persona_map.click(
        h.persona_map,
        [page.model.model, history, t.view_layer, page.persona.personas, page.model.vectors_from],
        page.map.plot,
        api_name="persona_map",
    )


def controls(page: Page) -> dict[str, Any]:
    """The page's component for each chat parameter (``ChatInputs`` fields, the conversations,
    the view, and the page's own ``prompted``)."""
    p, g, n, d, c = page.persona, page.generation, page.neurons, page.direction, page.chat
    return {
        "message": c.message,
        "history": c.chatbot,
        "side_history": c.side_chat,
        "prompted_history": c.prompted_chat,
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
        "side_by_side": c.side_by_side,
        "vectors_from": page.model.vectors_from,
        "view_layer": page.tokens.view_layer,
        "readout": page.readout,
        "last_n": p.last_n,
        "direction": d.direction,
        "direction_layers": d.direction_layers,
        "direction_mode": d.direction_mode,
        "direction_positions": d.direction_positions,
        "ablation_positions": n.ablation_positions,
        "preset": p.preset,
        "strength": p.strength,
        "direction_from": d.direction_from,
        "cap": page.cap.cap,
        "cap_side": page.cap.cap_side,
        "cap_by": page.cap.cap_by,
        "cap_level": page.cap.cap_level,
        "cap_layers": page.cap.cap_layers,
        "cap_positions": page.cap.cap_positions,
        "prompted": c.prompted,
    }


def api_controls(page: Page) -> dict[str, Any]:
    """``controls`` with hidden inputs holding the API's defaults where the page starts
    elsewhere (the preset, the strength, the direction's layers, tokens and kind, side by
    side), and the conversations as plain JSON."""
    api = ChatInputs(None)
    hidden = {
        "preset": gr.Radio(list(PRESETS), value=api.preset, visible=False),
        "strength": page.chat.api_strength,
        "direction_layers": gr.Textbox(value=api.direction_layers, visible=False),
        "direction_positions": gr.Radio(
            list(DIRECTION_POSITIONS), value=api.direction_positions, visible=False
        ),
        "side_by_side": gr.Checkbox(value=api.side_by_side, visible=False),
        "direction_from": gr.Textbox(value=api.direction_from, visible=False),
        # a client's conversation as sent: the handlers check its shape and say what is wrong
        # (the chatbot's own check would end in a generic error)
        "history": gr.JSON(value=[], visible=False),
        "side_history": gr.JSON(value=[], visible=False),
    }
    return {**controls(page), **hidden}


def endpoint_inputs(
    page: Page, endpoint: Callable[..., Any], by_name: dict[str, Any] | None = None
) -> list[Any]:
    """The component for each parameter of ``endpoint`` (``/chat``, ``/retry`` or the page's)."""
    found = by_name or controls(page)
    names = [name for name in inspect.signature(endpoint).parameters if name != "request"]
    return [found[name] for name in names]


def load_outputs(page: Page) -> list[Any]:
    """What loading a model updates (``Handlers.load``'s results, in order)."""
    m, s = page.model, page.store
    return [
        m.model_info,
        page.persona.personas,
        page.neurons.neuron_sets,
        m.extract_box,
        page.tokens.view_layer,
        m.vectors_from,
        m.dataset,
        page.direction.direction,
        page.direction.direction_from,
        page.chat.note,
        page.chat.examples,
        page.recipes.box,
        page.analysis.personas,
        s.vector_persona,
        s.vector_kind,
        page.chat.side_by_side,
        page.chat.status,
    ]


def steering_io(page: Page) -> tuple[list[Any], list[Any], list[Any]]:
    """The steering controls' inputs and outputs, and the blend line's inputs."""
    p, model, kind = page.persona, page.model.model, page.model.vectors_from
    steer_in = [model, p.personas, p.weights, p.preset, p.strength, p.units, kind]
    steer_out = [*p.weight_sliders, p.strength, p.layer_spec]
    blend_in = [model, p.personas, p.weights, p.layer_spec, p.units, kind, p.preset, p.strength]
    return steer_in, steer_out, blend_in


def wire_model(page: Page, h: Handlers, demo: gr.Blocks) -> None:
    """Load a model's view (then the settings a link names), re-read the store, extract."""
    m, status = page.model, page.chat.status
    loaded = load_outputs(page)
    steer_in, steer_out, blend_in = steering_io(page)
    shared = [controls(page)[name] for name in SHARED]
    choices = (h.cap_choices, [m.model, m.vectors_from], [page.cap.cap, page.store.axis.info])
    demo.load(h.load, [m.model], loaded, api_name="load_model").then(
        h.restore, None, [*shared, status], **PRIVATE
    ).then(h.steering_controls, steer_in, steer_out, **QUIET).then(
        h.blend_info, blend_in, page.persona.blend, **BLEND
    ).then(*choices, **QUIET)
    m.model.input(h.load, [m.model], loaded, **PRIVATE).then(
        h.steering_controls, steer_in, steer_out, **QUIET
    ).then(*choices, **QUIET)
    refresh_in = [m.model, page.persona.personas, m.vectors_from, page.direction.direction]
    refresh_out = [page.persona.personas, page.neurons.neuron_sets, page.direction.direction]
    m.refresh_btn.click(h.refresh, refresh_in, [*refresh_out, status], api_name="refresh").then(
        *choices, **QUIET
    )
    m.extract_btn.click(
        h.extract,
        [
            m.model,
            m.dataset,
            m.extract_positions,
            m.extract_personas,
            m.extract_neurons,
            m.admin_token,
        ],
        loaded,
        api_name="extract",
        concurrency_limit=1,
    ).then(*choices, **QUIET)
    m.dataset.change(
        lambda name: gr.update(choices=dataset_personas(name), value=[]),
        m.dataset,
        m.extract_personas,
        **PRIVATE,
    )
    m.vectors_from.input(h.refresh, refresh_in, [*refresh_out, status], **PRIVATE).then(
        *choices, **QUIET
    )


def wire_settings(page: Page, h: Handlers) -> None:
    """Sliders and presets fill the layer spec; the blend line follows the personas, weights,
    strength and spec; recipes set many controls at once."""
    p, model, kind = page.persona, page.model.model, page.model.vectors_from
    steer_in, steer_out, blend_in = steering_io(page)
    preset_in = [model, p.personas, p.preset, p.strength, kind]
    p.preset.change(h.preset, preset_in, [p.layer_spec, p.blend], api_name="preset")
    p.strength.change(
        lambda *args: h.preset(*args)[0],
        preset_in,
        p.layer_spec,
        trigger_mode="always_last",
        **QUIET,
    )
    p.personas.input(h.steering_controls, steer_in, steer_out, **QUIET).then(
        h.blend_info, blend_in, p.blend, **BLEND
    )
    p.units.input(h.units_changed, steer_in, steer_out, **QUIET)
    for slider in p.weight_sliders:
        slider.input(None, [p.personas, *p.weight_sliders], p.weights, js=WEIGHTS_JS, **PRIVATE)
    p.layer_spec.input(None, None, p.preset, js="() => 'custom'", **PRIVATE)
    for trigger in (p.weights.change, p.layer_spec.change, p.units.change, p.strength.change):
        trigger(h.blend_info, blend_in, p.blend, trigger_mode="always_last", **BLEND)
    api_blend = gr.Button(visible=False)  # /blend_info as before: the spec as typed
    api_blend.click(h.blend_info, blend_in[:6], p.blend, api_name="blend_info")
    n = page.neurons
    n.neuron_sets.input(
        h.neuron_sets_picked,
        n.neuron_sets,
        [n.ablation, n.ablation_positions, page.chat.status],
        **PRIVATE,
    )
    shared = [controls(page)[name] for name in SHARED]
    for recipe in RECIPES:
        key = gr.State(recipe.key)
        page.recipes.buttons[recipe.key].click(
            h.recipe, [key, p.personas], [*shared, page.chat.status], **PRIVATE
        ).then(h.steering_controls, steer_in, steer_out, **QUIET).then(
            h.blend_info, blend_in, p.blend, **BLEND
        )


def wire_chat(page: Page, h: Handlers, concurrency: int) -> None:
    """Send, retry, stop, undo and clear; a reply's end redraws the heatmap and the file."""
    c, t, readout = page.chat, page.tokens, page.readout
    run: dict[str, Any] = {"concurrency_limit": concurrency, "concurrency_id": "generate"}
    api_out = [c.chatbot, c.side_chat, c.message, c.status, t.tokens, readout]
    out = [*api_out, c.prompted_chat, c.compare, c.stop]
    chat, retry = page_chat_endpoint(h), page_retry_endpoint(h)
    api_chat, api_retry = chat_endpoint(h), retry_endpoint(h)
    by_api = api_controls(page)
    c.api_chat.click(
        api_chat, endpoint_inputs(page, api_chat, by_api), api_out, api_name="chat", **run
    )
    c.api_retry.click(
        api_retry, endpoint_inputs(page, api_retry, by_api), api_out, api_name="retry", **run
    )
    wire_api_conversations(page, h, by_api["history"], by_api["side_history"])
    sent_in = endpoint_inputs(page, chat)
    sent = [
        c.send.click(chat, sent_in, out, **PRIVATE, **run),
        c.message.submit(chat, sent_in, out, **PRIVATE, **run),
        c.retry.click(retry, endpoint_inputs(page, retry), out, **PRIVATE, **run),
        c.examples.click(lambda sample: sample[0], c.examples, c.message, **PRIVATE).then(
            chat, sent_in, out, **PRIVATE, **run
        ),
    ]
    chats = [c.chatbot, c.side_chat, c.prompted_chat, readout]
    for event in sent:
        event.then(h.view_personas, [readout, t.view_persona], t.view_persona, **PRIVATE).then(
            h.heatmap, [readout, t.view_persona], t.heatmap, **PRIVATE, api_name="page_heatmap"
        ).then(h.conversation_file, chats, page.share.download, **PRIVATE).then(
            lambda: gr.update(interactive=False), None, c.stop, **PRIVATE
        ).then(h.drift_plot, readout, page.drift.plot, **QUIET)
    # the reply's own last update says "Stopped"; the stop result goes to a hidden box so it
    # cannot arrive after (and overwrite) that status
    stopped = gr.Textbox(visible=False, label="Stop")
    c.stop.click(h.stop, None, stopped, api_name="stop", concurrency_limit=None, queue=False)
    views = [
        c.prompted_chat,
        c.compare,
        t.tokens,
        t.heatmap,
        readout,
        page.share.download,
        t.numbers,
    ]
    undo_out = [c.chatbot, c.side_chat, c.message, c.status]
    after = [c.chatbot, c.side_chat, c.prompted_chat, readout]  # the drift of the turns left
    c.undo.click(h.undo, [c.chatbot, c.side_chat], undo_out, api_name="page_undo", **PRIVATE).then(
        h.views_after, after, views, **PRIVATE
    ).then(h.drift_plot, readout, page.drift.plot, **QUIET)
    clear_out = [c.chatbot, c.side_chat, c.status, t.tokens, readout]
    c.clear.click(h.clear, None, clear_out, api_name="clear").then(
        h.views_after, after, views, **PRIVATE
    ).then(h.drift_plot, readout, page.drift.plot, **QUIET)


def wire_views(page: Page, h: Handlers) -> None:
    """The views of the model's inside: tokens at a layer, plots, tables, analysis."""
    model, personas, kind = page.model.model, page.persona.personas, page.model.vectors_from
    t, a, readout = page.tokens, page.analysis, page.readout
    t.view_layer.change(
        h.tokens, [readout, t.view_layer, t.view_persona], t.tokens, api_name="tokens"
    )
    t.view_persona.input(h.heatmap, [readout, t.view_persona], t.heatmap, api_name="heatmap")
    t.view_persona.input(
        h.tokens,
        [readout, t.view_layer, t.view_persona],
        t.tokens,
        **PRIVATE,
        api_name="page_tokens",
    )
    t.numbers_btn.click(h.readout_numbers, [readout], t.numbers, api_name="readout")
    page.layers.button.click(
        h.layer_plot, [model, personas, kind], page.layers.plot, api_name="layer_plot"
    )
    page.map.button.click(
        h.persona_map,
        [model, page.chat.chatbot, t.view_layer, personas, kind],
        page.map.plot,
        api_name="page_persona_map",
        **PRIVATE,
    )
    s = page.store
    s.button.click(
        h.store_tables,
        [model],
        [s.personas, s.models, s.metrics, s.neuron_sets],
        api_name="store_tables",
    )
    s.export.click(
        h.vector_file,
        [model, s.vector_persona, s.vector_kind, s.vector_format],
        s.vector_file,
        api_name="vector_file",
    )
    a.button.click(
        h.analysis,
        [model, a.personas],
        [a.text, *a.images],
        api_name="analysis",
        concurrency_limit=1,
        concurrency_id="analysis",
    )


def wire_share(page: Page, h: Handlers) -> None:
    """A link to the settings (the page puts its own address in front)."""
    shared = [controls(page)[name] for name in SHARED]
    link = page.share.link
    page.share.share.click(h.share, shared, link, **PRIVATE).then(
        None, link, link, js=LINK_JS, **PRIVATE
    )
    page.chat.settings_button.click(None, None, None, js=OPEN_SETTINGS_JS, **PRIVATE)


def wire_calibration(page: Page, h: Handlers) -> None:
    """The drift's numbers, the hold panel's words and recipe, the assistant axis' button."""
    k, model, kind, readout = page.cap, page.model.model, page.model.vectors_from, page.readout
    page.drift.numbers_btn.click(h.drift_numbers, [readout], page.drift.numbers, api_name="drift")
    cap_in = [model, kind, k.cap, k.cap_side, k.cap_by, k.cap_level, k.cap_layers, k.cap_positions]
    for control in (k.cap, k.cap_side, k.cap_by, k.cap_level, k.cap_layers, k.cap_positions):
        control.change(h.cap_info, cap_in, k.info, trigger_mode="always_last", **QUIET)
    shared = [controls(page)[name] for name in SHARED]
    steer_in, steer_out, blend_in = steering_io(page)
    k.recipe.click(
        h.recipe,
        [gr.State(HOLD.key), page.persona.personas],
        [*shared, page.chat.status],
        **PRIVATE,
    ).then(h.steering_controls, steer_in, steer_out, **QUIET).then(
        h.blend_info, blend_in, page.persona.blend, **BLEND
    )
    page.store.axis.button.click(
        h.register_axis,
        [model, page.model.dataset, kind, page.model.admin_token],
        [page.store.axis.info, k.cap, page.chat.status],
        api_name="register_axis",
        concurrency_limit=1,
    )
