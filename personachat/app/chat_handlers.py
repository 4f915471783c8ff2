"""The page's chat actions: send, retry, stop, undo and clear.

``turns`` takes the page's settings as one ``ChatInputs``, checks them into ``Settings`` once
and streams the backend's reply as ``Turn``s, at most one page update per
``STREAM_INTERVAL_S``; the last one carries the reply's ``Readout`` for the session's state.
``chat`` and ``retry`` give the API's tuples of those turns; the page's own events take more of
each turn (the prompted column, the Stop button). Each session's running generation has a stop
event, so Stop ends that session's reply and keeps what was written.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import gradio as gr

from personachat.app.backend import Backend
from personachat.app.capping import parse_cap
from personachat.app.export import conversation_file
from personachat.app.generation import Step
from personachat.app.handler_base import HandlerBase, Messages, gpu
from personachat.app.limits import check_history, message_text
from personachat.app.prompted import NO_PROMPT
from personachat.app.readout import Readout, readout_html
from personachat.app.settings import (
    ChatInputs,
    InputError,
    Settings,
    check_message,
    parse_settings,
)
from personachat.app.views import compare_html, empty_html

# The tokens view while a reply streams. A value, not gr.skip(): Gradio answers a skip of an
# HTML output by building a new component for the session, which it then keeps, one per reply.
PENDING_TOKENS = empty_html("Generating… the per-token projections come with the reply's end.")

log = logging.getLogger(__name__)

STREAM_INTERVAL_S = 0.05  # at most 20 page updates a second while a reply streams
OFF = "—"  # the reply of a column that was not asked for in a turn
NO_REPLY = "No reply yet."
BEFORE_REPLY = "Stopped before the reply began: nothing was generated."


@dataclass(frozen=True)
class Turn:
    """One update of the page while a message is answered: the three conversations (steered,
    unsteered beside it, under the persona's own prompt), the message box, the status, the
    tokens view and the readout (``gr.skip()`` where nothing changes), and whether the reply
    is still being written."""

    history: Messages
    side: Messages
    prompted: Messages
    box: Any
    status: str
    tokens: Any
    readout: Any
    running: bool = False

    def api(self) -> tuple[Any, ...]:
        """The ``/chat`` endpoint's outputs: (history, side_history, message box, status,
        tokens html, readout)."""
        return self.history, self.side, self.box, self.status, self.tokens, self.readout


def _text(message: dict[str, Any]) -> str:
    from personachat.prompts import message_text

    return message_text(message)


def _lists(*values: Any) -> tuple[Messages, ...]:
    """Each conversation as a list; one not made of user and assistant messages (sent so
    through the API) is shown back empty."""

    def shaped(value: Any) -> bool:
        try:
            return all(bool(message_text(m, "")) or True for m in value)
        except (TypeError, ValueError):
            return False

    return tuple(list(v) if shaped(v) else [] for v in values)


def _begun(step: Step | None) -> bool:
    """Whether any column of the reply has text (none when it was stopped before a token)."""
    if step is None:
        return False
    prompted = step.prompted_text if step.prompted_text != NO_PROMPT else None
    return any((step.text, step.side_text, prompted))


def _drift_only(readout: Readout | None) -> Readout | None:
    """An empty readout that keeps ``readout``'s drift (a failed reply keeps the chart)."""
    return Readout(drift=readout.drift) if readout is not None else None


class ChatHandlers(HandlerBase):
    """Send, retry, stop, undo and clear; one stop event per session's running generation."""

    def __init__(self, backend: Backend) -> None:
        super().__init__(backend)
        self._stops: dict[str, list[threading.Event]] = {}  # session -> its generations
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
        asked = (message, history, side_history, None, inputs, view_layer, readout, request)
        for turn in self.turns(*asked):
            yield turn.api()

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
        asked = (history, side_history, None, inputs, view_layer, readout, request)
        for turn in self.retry_turns(*asked):
            yield turn.api()

    def turns(
        self,
        message: str | None,
        history: Messages | None,
        side_history: Messages | None,
        prompted_history: Messages | None,
        inputs: ChatInputs,
        view_layer: float = 0,
        readout: Readout | None = None,
        request: gr.Request | None = None,
        prompted: bool = False,
    ) -> Iterator[Turn]:
        """Send ``message`` under ``inputs`` (and, with ``prompted``, also under the lead
        persona's own system prompt) and stream the page's ``Turn``s."""
        history_of = history
        history, side, before = _lists(history, side_history, prompted_history)
        model_id = self.model_id(inputs.model_id)
        try:
            check_history([] if history_of is None else history_of)
            text = check_message(message)
            limits = self.backend.limits(model_id, inputs.vectors_from or "")
            settings = dataclasses.replace(
                parse_settings(limits, inputs), prompted=prompted, cap=parse_cap(limits, inputs)
            )
        except Exception as err:
            yield self._refuse(err, history, side, before, message, readout)
            return
        for warning in settings.warnings:
            gr.Warning(warning)
        record = {**dataclasses.asdict(inputs), "message": text, "prompted": prompted}
        conversation = (model_id, settings, history, side, before, text)
        yield from self._reply(*conversation, view_layer, request, record, readout)

    def retry_turns(
        self,
        history: Messages | None,
        side_history: Messages | None,
        prompted_history: Messages | None,
        inputs: ChatInputs,
        view_layer: float = 0,
        readout: Readout | None = None,
        request: gr.Request | None = None,
        prompted: bool = False,
    ) -> Iterator[Turn]:
        """Drop the last reply and generate it again under ``inputs``."""
        try:
            check_history([] if history is None else history)
        except ValueError as err:
            shown, side, before = _lists(history, side_history, prompted_history)
            yield self._refuse(err, shown, side, before, "", readout)
            return
        history, side, before, last = self.pop_turn(history, side_history, prompted_history)
        if last is None:
            error = InputError("Nothing to retry yet.")
            yield self._refuse(error, history, side, before, "", readout)
            return
        again = (last, history, side, before, inputs, view_layer, readout, request, prompted)
        yield from self.turns(*again)

    def stop(self, request: gr.Request | None = None) -> str:
        """Stop this session's running generations; the partial replies are kept. A request
        without a session is refused: it has no generation of its own to stop."""
        key = getattr(request, "session_hash", None)
        if not key:
            raise gr.Error(
                "Stop needs the session that is generating: call /stop from the client (the "
                "session_hash) that sent the message; a request without a session stops nothing."
            )
        with self._lock:
            events = list(self._stops.get(key, ()))
        for event in events:
            event.set()
        log.debug("stop for session %s: %d generation(s)", key, len(events))
        return "Stopping…" if events else "Nothing is generating."

    def undo(
        self, history: Messages | None, side_history: Messages | None
    ) -> tuple[Messages, Messages, str, str]:
        """Remove the last turn; its message goes back into the box."""
        try:
            check_history([] if history is None else history)
        except ValueError as err:
            shown, side = _lists(history, side_history)
            return shown, side, "", f"⚠ {err}"
        history, side, _, last = self.pop_turn(history, side_history, None)
        if last is None:
            return history, side, "", "Nothing to undo."
        return history, side, last, "Last turn removed."

    def clear(self) -> tuple[Messages, Messages, str, str, Readout]:
        """Start a new conversation."""
        return [], [], "Conversation cleared.", empty_html(NO_REPLY), Readout()

    def views_after(
        self,
        history: Messages | None,
        side: Messages | None,
        prompted: Messages | None,
        readout: Readout | None = None,
    ) -> tuple[Any, ...]:
        """After Undo or Clear: the prompted conversation cut to the turns left, the
        conversation view, the views of the last reply emptied (``readout``'s drift kept for
        the turns left) and the download holding what is left. Returns (prompted
        conversation, conversation view, tokens, heatmap, readout, download, numbers)."""
        turns = sum(1 for m in history or [] if m.get("role") == "user")
        users = [i for i, m in enumerate(prompted or []) if m.get("role") == "user"]
        third = list(prompted or [])[: users[turns]] if len(users) > turns else list(prompted or [])
        view = compare_html(history or [], side or [], third)
        path = conversation_file(history or [], side or [], third, None)
        download = gr.update(value=str(path) if path else None, interactive=path is not None)
        kept = Readout(drift=readout.drift.upto(turns)) if readout is not None else Readout()
        return third, view, empty_html(NO_REPLY), None, kept, download, None

    @gpu
    def _reply(
        self,
        model_id: str,
        settings: Settings,
        history: Messages,
        side: Messages,
        before: Messages,
        text: str,
        view_layer: float,
        request: gr.Request | None,
        record: dict[str, Any],
        previous: Readout | None = None,
    ) -> Iterator[Turn]:
        key, stop = self._stop_event(request)
        conversation = [*history, {"role": "user", "content": text}]
        hold = text == self.backend.hold_message
        try:
            steps = self.backend.generate(model_id, settings, conversation, stop, hold)
        except Exception as err:  # checked before generation: nothing changed
            self._forget(key, stop)
            yield self._refuse(err, history, side, before, text, _drift_only(previous))
            return
        user = {"role": "user", "content": text}
        history = [*conversation, {"role": "assistant", "content": ""}]
        side = [*side, user, {"role": "assistant", "content": "" if settings.side_by_side else OFF}]
        prompted = [
            *before,
            user,
            {"role": "assistant", "content": "" if settings.prompted else OFF},
        ]
        status = self.backend.settings_summary(model_id, settings)
        skip, pending = gr.skip(), PENDING_TOKENS
        yield Turn(
            history, side, prompted, "", f"Generating… {status}".strip(), pending, skip, True
        )
        step: Step | None = None
        try:
            shown = -math.inf  # the first token always shows (monotonic may start near 0)
            for step in steps:
                history[-1] = {"role": "assistant", "content": step.text}
                if settings.side_by_side:
                    side[-1] = {"role": "assistant", "content": step.side_text or ""}
                if settings.prompted:
                    prompted[-1] = {"role": "assistant", "content": step.prompted_text or ""}
                # a page update per token floods the browser on a fast model (and then the
                # Stop button waits behind the renders): at most one update per interval
                if time.monotonic() - shown >= STREAM_INTERVAL_S or step.done:
                    shown = time.monotonic()
                    words = f"Generating… {status}".strip()
                    yield Turn(history, side, prompted, "", words, pending, skip, True)
        except Exception as err:
            kept = _drift_only(previous)
            yield self._refuse(err, history[:-2], side[:-2], prompted[:-2], text, kept)
            return
        finally:
            self._forget(key, stop)
        chats = (history, side, prompted)
        yield self._done(model_id, step, stop, status, view_layer, chats, record, previous)

    @staticmethod
    def _done(
        model_id: str,
        step: Step | None,
        stop: threading.Event,
        status: str,
        view_layer: float,
        chats: tuple[Messages, Messages, Messages],
        record: dict[str, Any],
        previous: Readout | None = None,
    ) -> Turn:
        """The last update of a reply: its readout (with the ``record`` of the page's inputs,
        and the conversation's drift: ``previous``'s turns, then this one), the tokens view and
        the final status."""
        readout = step.readout if step is not None else None
        readout = dataclasses.replace(readout or Readout(model_id=model_id), settings=record)
        turn = sum(1 for m in chats[0] if m.get("role") == "user")
        readout = readout.after(previous, turn)
        done = "Done."
        if stop.is_set():
            done = "Stopped: partial reply kept." if _begun(step) else BEFORE_REPLY
        if step is not None and step.dropped:
            done += f" ({step.dropped} oldest turns left out to fit the model's context.)"
        if step is not None and step.render_warnings:
            done += " ⚠ " + " ".join(step.render_warnings)
        html = readout_html(readout, view_layer)
        return Turn(*chats, "", f"{done} {status}".strip(), html, readout, False)

    def _stop_event(self, request: gr.Request | None) -> tuple[str, threading.Event]:
        key = getattr(request, "session_hash", None) or uuid.uuid4().hex
        event = threading.Event()
        with self._lock:
            self._stops.setdefault(key, []).append(event)
        log.debug("generation for session %s", key)
        return key, event

    def _forget(self, key: str, event: threading.Event) -> None:
        with self._lock:
            events = self._stops.get(key, [])
            if event in events:
                events.remove(event)
            if not events:
                self._stops.pop(key, None)

    @staticmethod
    def pop_turn(
        history: Messages | None, side_history: Messages | None, prompted: Messages | None
    ) -> tuple[Messages, Messages, Messages, str | None]:
        """The conversations without their last turn, and that turn's message (None: none)."""
        history, side, third = list(history or []), list(side_history or []), list(prompted or [])
        users = [i for i, m in enumerate(history) if m.get("role") == "user"]
        if not users:
            return history, side, third, None
        last = _text(history[users[-1]])

        def cut(messages: Messages) -> Messages:
            at = [i for i, m in enumerate(messages) if m.get("role") == "user"]
            return messages[: at[-1]] if at else messages

        return history[: users[-1]], cut(side), cut(third), last

    def _refuse(
        self,
        err: BaseException,
        history: Messages,
        side: Messages,
        prompted: Messages,
        message: str | None,
        readout: Readout | None,
    ) -> Turn:
        if not isinstance(err, InputError | ValueError | KeyError):
            log.exception("chat failed")
        # a KeyError's str() is its quoted repr (others may end in a quote: 'zero'); no paths
        # on a public server
        text = self.backend.access.error(err)
        gr.Warning(text)
        return Turn(
            history, side, prompted, message or "", f"⚠ {text}", gr.skip(), readout or Readout()
        )
