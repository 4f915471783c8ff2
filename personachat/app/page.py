"""The Gradio page: ``build_ui(backend)`` lays out the panels and wires their events.

Every action is a named endpoint (``api_name``) so ``gradio_client`` can drive it; the handlers
(``personachat.app.handlers``) are plain methods over the ``Backend``. The ``Backend`` (models,
store, chat engines) is shared by all sessions: the model loads once, lazily, on first use. What
differs per browser tab (settings, the last readout) travels in the inputs themselves or in
``gr.State``; steering is isolated per request by the runtime (``personachat.hooks`` scopes hooks
to the request's context). ``CSS`` styles the conversation view and the phone layout; ``PAGE_JS``
runs once in the browser: it closes the settings drawer on a phone, keeps the conversation view
at its last turn and lets Esc press Stop.
"""

from __future__ import annotations

import gradio as gr

from personachat.app.backend import Backend
from personachat.app.handlers import Handlers
from personachat.app.layout import layout
from personachat.app.limits import BOUNDS
from personachat.app.wiring import wire

CSS = """
.pc-tokens { font-family: ui-monospace, monospace; font-size: 13px; line-height: 1.9; }
.pc-tok { display: inline-block; white-space: pre; padding: 1px 0; border-radius: 2px; }
.pc-tok.pc-none { outline: 1px dashed #999; }
.pc-reply { font-weight: 700; }
.pc-caption, .pc-caption p { font-size: 12px; opacity: 0.75; margin: 4px 0; }
#compare { min-height: 140px; max-height: 460px; overflow-y: auto !important; }
.pc-conv { display: flex; flex-direction: column; gap: 14px; padding: 4px; }
.pc-empty { opacity: 0.7; padding: 24px 8px; text-align: center; }
.pc-user { align-self: flex-end; max-width: 85%; background: var(--color-accent-soft);
  border-radius: 12px; padding: 6px 12px; white-space: pre-wrap; }
.pc-replies { display: grid; gap: 8px;
  grid-template-columns: repeat(var(--pc-cols), minmax(0, 1fr)); }
.pc-card { border: 1px solid var(--border-color-primary); border-radius: 10px;
  padding: 6px 10px; background: var(--background-fill-secondary); }
.pc-steered { border-color: #f97316; }
.pc-label { font-size: 11px; font-weight: 600; text-transform: uppercase; opacity: 0.7; }
.pc-text { white-space: pre-wrap; overflow-wrap: anywhere; }
#heatmap { overflow-x: auto !important; }
#open-settings { display: none; }
#views .tab-wrapper button, #views [role="tab"] { padding-left: 8px; padding-right: 8px; }
@media (max-width: 768px) {
  #open-settings { display: inline-flex; max-width: 9em; }
  #intro { padding-left: 18px; }
  #columns .info-text { display: none; }
  #compare { min-height: 60px; }
  .pc-empty { padding: 8px; }
  .pc-replies { grid-template-columns: 1fr; }
  #compare { max-height: 340px; }
  #intro p { display: none; }
}
"""

PAGE_JS = """() => {
  if (window.matchMedia('(max-width: 768px)').matches) {
    let tries = 40;
    const close = () => {
      const open = document.querySelector('.sidebar.open .toggle-button');
      if (open) open.click();
      else if (tries-- > 0) setTimeout(close, 100);
    };
    close();
  }
  const view = document.querySelector('#compare');
  if (view) {  // the conversation view follows its last turn
    new MutationObserver(() => { view.scrollTop = view.scrollHeight; })
      .observe(view, {subtree: true, childList: true, characterData: true});
  }
  document.addEventListener('keydown', (event) => {
    const stop = document.querySelector('#stop');
    if (event.key === 'Escape' && stop && !stop.disabled) stop.click();
  });
}"""


def theme() -> gr.themes.Base:
    """The page theme: Gradio's default (local fonts only, so no request leaves the machine)."""
    return gr.themes.Default(primary_hue="orange", secondary_hue="blue")


def build_ui(backend: Backend, *, concurrency: int = 2) -> gr.Blocks:
    """The page. Nothing loads here: the model loads on the first event that needs it."""
    h = Handlers(backend)
    # Gradio's copies of served files (the conversation downloads) older than an hour are
    # deleted every hour
    with gr.Blocks(title="PersonaChat", analytics_enabled=False, delete_cache=(3600, 3600)) as demo:
        default, public = backend.default_model, backend.access.public
        page = layout(default, backend.is_demo(default), public)
        wire(page, h, demo, concurrency)
        demo.load(None, None, None, js=PAGE_JS)
    # Gradio keeps each session's copy of the page's settings (10,000 sessions by default,
    # a few hundred KB each): keep the most recently used few; ``launch`` sets its own.
    demo.state_session_capacity = BOUNDS.sessions_kept
    return demo
