"""The page's chat actions: send, retry, stop, undo and clear.

``chat`` takes the page's settings as one ``ChatInputs``, checks them into ``Settings`` once and
streams the backend's reply, at most one page update per ``STREAM_INTERVAL_S``; its last update
carries the reply's ``Readout`` for the session's state. Each session's running generation has
a stop event, so Stop ends that session's reply and keeps what was written.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import gradio as gr

from personachat.app.backend import Backend
from personachat.app.generation import Step
from personachat.app.handler_base import HandlerBase, Messages, gpu
from personachat.app.readout import Readout, readout_html
from personachat.app.settings import (
    ChatInputs,
    InputError,
    Settings,
    check_message,
    parse_settings,
)
from personachat.app.views import empty_html

log = logging.getLogger(__name__)

STREAM_INTERVAL_S = 0.05  # at most 20 page updates a second while a reply streams


def _text(message: dict[str, Any]) -> str:
    from personachat.prompts import message_text

    return message_text(message)


class ChatHandlers(HandlerBase):
    """Send, retry, stop, undo and clear; one stop event per session's running generation."""

    def __init__(self, backend: Backend) -> None:
        super().__init__(backend)
        self._stops: dict[str, threading.Event] = {}
        self._lock = threading.Lock()

    def chat(
        self,
        message: str | None,
        history: Messages | None,
        side_history: Messages | None,
        inputs: ChatInputs,
        view_layer: float = 0,
        readout: Readout | None = None,
        request: gr.Request | None = None,
    ) -> Iterator[tuple[Any, ...]]:
        """Send ``message`` under ``inputs`` and stream the (steered) reply; yields (history,
        side_history, message box, status, tokens html at ``view_layer``, readout)."""
        history = list(history or [])
        side = list(side_history or [])
        model_id = self.model_id(inputs.model_id)
        try:
            text = check_message(message)
            settings = parse_settings(
                self.backend.limits(model_id, inputs.vectors_from or ""), inputs
            )
        except Exception as err:
            yield self._refuse(err, history, side, message, readout)
            return
        yield from self._reply(model_id, settings, history, side, text, view_layer, request)

    def retry(
        self,
        history: Messages | None,
        side_history: Messages | None,
        inputs: ChatInputs,
        view_layer: float = 0,
        readout: Readout | None = None,
        request: gr.Request | None = None,
    ) -> Iterator[tuple[Any, ...]]:
        """Drop the last reply and generate it again under ``inputs``."""
        history, side, last = self._pop_turn(history, side_history)
        if last is None:
            yield self._refuse(InputError("Nothing to retry yet."), history, side, "", readout)
            return
        yield from self.chat(last, history, side, inputs, view_layer, readout, request)

    def stop(self, request: gr.Request | None = None) -> str:
        """Stop this session's running generation; the partial reply is kept."""
        key = getattr(request, "session_hash", None)
        with self._lock:
            if key is None:  # an API call without a session: stop every generation
                events = list(self._stops.values())
            else:
                events = [self._stops[key]] if key in self._stops else []
        for event in events:
            event.set()
        log.debug("stop for session %s: %d generation(s)", key, len(events))
        return "Stopping…" if events else "Nothing is generating."

    def undo(
        self, history: Messages | None, side_history: Messages | None
    ) -> tuple[Messages, Messages, str, str]:
        """Remove the last turn; its message goes back into the box."""
        history, side, last = self._pop_turn(history, side_history)
        if last is None:
            return history, side, "", "Nothing to undo."
        return history, side, last, "Last turn removed."

    def clear(self) -> tuple[Messages, Messages, str, str, Readout]:
        """Start a new conversation."""
        return [], [], "Conversation cleared.", empty_html("No reply yet."), Readout()

    @gpu
    def _reply(
        self,
        model_id: str,
        settings: Settings,
        history: Messages,
        side: Messages,
        text: str,
        view_layer: float,
        request: gr.Request | None,
    ) -> Iterator[tuple[Any, ...]]:
        key, stop = self._stop_event(request)
        conversation = [*history, {"role": "user", "content": text}]
        try:
            steps = self.backend.generate(model_id, settings, conversation, stop)
        except Exception as err:  # checked before generation: nothing changed
            self._forget(key, stop)
            yield self._refuse(err, history, side, text, None)
            return
        history = [*conversation, {"role": "assistant", "content": ""}]
        side = [*side, {"role": "user", "content": text}]
        side.append({"role": "assistant", "content": "" if settings.side_by_side else "—"})
        status = self.backend.settings_summary(model_id, settings)
        yield history, side, "", f"Generating… {status}".strip(), gr.skip(), gr.skip()
        step: Step | None = None
        try:
            shown = -math.inf  # the first token always shows (monotonic may start near 0)
            for step in steps:
                history[-1] = {"role": "assistant", "content": step.text}
                if settings.side_by_side:
                    side[-1] = {"role": "assistant", "content": step.side_text or ""}
                # a page update per token floods the browser on a fast model (and then the
                # Stop button waits behind the renders): at most one update per interval
                if time.monotonic() - shown >= STREAM_INTERVAL_S or step.done:
                    shown = time.monotonic()
                    yield history, side, "", f"Generating… {status}".strip(), gr.skip(), gr.skip()
        except Exception as err:
            yield self._refuse(err, history[:-2], side[:-2], text, None)
            return
        finally:
            self._forget(key, stop)
        readout = step.readout if step is not None else None
        readout = readout or Readout(model_id=model_id)
        done = "Stopped: partial reply kept." if stop.is_set() else "Done."
        if step is not None and step.dropped:
            done += f" ({step.dropped} oldest turns left out to fit the model's context.)"
        if step is not None and step.render_warnings:
            done += " ⚠ " + " ".join(step.render_warnings)
        html = readout_html(readout, view_layer)
        yield history, side, "", f"{done} {status}".strip(), html, readout

    def _stop_event(self, request: gr.Request | None) -> tuple[str, threading.Event]:
        key = getattr(request, "session_hash", None) or uuid.uuid4().hex
        event = threading.Event()
        with self._lock:
            self._stops[key] = event
        log.debug("generation for session %s", key)
        return key, event

    def _forget(self, key: str, event: threading.Event) -> None:
        with self._lock:
            if self._stops.get(key) is event:
                del self._stops[key]

    @staticmethod
    def _pop_turn(
        history: Messages | None, side_history: Messages | None
    ) -> tuple[Messages, Messages, str | None]:
        history, side = list(history or []), list(side_history or [])
        users = [i for i, m in enumerate(history) if m.get("role") == "user"]
        if not users:
            return history, side, None
        last = _text(history[users[-1]])
        side_users = [i for i, m in enumerate(side) if m.get("role") == "user"]
        return history[: users[-1]], side[: side_users[-1]] if side_users else side, last

    @staticmethod
    def _refuse(
        err: BaseException,
        history: Messages,
        side: Messages,
        message: str | None,
        readout: Readout | None,
    ) -> tuple[Any, ...]:
        if not isinstance(err, InputError | ValueError | KeyError):
            log.exception("chat failed")
        # a KeyError's str() is its quoted repr; other messages may end in a quote ('zero')
        text = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
        text = text.strip() or type(err).__name__
        gr.Warning(text)
        return history, side, message or "", f"⚠ {text}", gr.skip(), readout or Readout()
