"""The Gradio page: ``build_ui(backend)`` lays out the panels and wires their events.

Every action is a named endpoint (``api_name``) so ``gradio_client`` can drive it; the handlers
(``personachat.app.handlers``) are plain methods over the ``Backend``. The ``Backend`` (models,
store, chat engines) is shared by all sessions: the model loads once, lazily, on first use. What
differs per browser tab (settings, the last readout) travels in the inputs themselves or in
``gr.State``; steering is isolated per request by the runtime (``personachat.hooks`` scopes hooks
to the request's context).
"""

from __future__ import annotations

import gradio as gr

from personachat.app.backend import Backend
from personachat.app.handlers import Handlers
from personachat.app.layout import layout
from personachat.app.wiring import wire

CSS = """
.pc-tokens { font-family: ui-monospace, monospace; font-size: 13px; line-height: 1.9; }
.pc-tok { display: inline-block; white-space: pre; padding: 1px 0; border-radius: 2px; }
.pc-reply { font-weight: 700; }
.pc-caption { font-size: 12px; opacity: 0.75; margin: 4px 0; }
"""


def theme() -> gr.themes.Base:
    """The page theme: Gradio's default (local fonts only, so no request leaves the machine)."""
    return gr.themes.Default(primary_hue="orange", secondary_hue="blue")


def build_ui(backend: Backend, *, concurrency: int = 2) -> gr.Blocks:
    """The page. Nothing loads here: the model loads on the first event that needs it."""
    h = Handlers(backend)
    with gr.Blocks(title="PersonaChat", analytics_enabled=False) as demo:
        page = layout(backend.default_model, backend.is_demo(backend.default_model))
        wire(page, h, demo, concurrency)
    return demo
