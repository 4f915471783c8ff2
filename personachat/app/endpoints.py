"""The ``/chat`` and ``/retry`` endpoints: the page's settings as keyword parameters outside, one
``ChatInputs`` inside; and the page's own send and retry, which take and give more (the
prompted column, the conversation view, the Stop button).

Gradio names an endpoint's parameters after the function it calls (``inspect.signature``, which
reads ``__signature__``) and finds the request parameter by its type hint
(``typing.get_type_hints``, which reads ``__annotations__``). So each endpoint is a small
generator function whose signature is built from the ``ChatInputs`` fields: it binds what Gradio
passes, builds the ``ChatInputs`` and streams the handler's updates. The parameters keep the
page's order, with the view's layer and the readout state before ``last_n``: the settings from
``last_n`` on were added last, so calls by position keep working.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable, Iterator, Sequence
from inspect import Parameter, Signature
from typing import Any

import gradio as gr

from personachat.app.chat_handlers import ChatHandlers, Turn
from personachat.app.handler_base import Messages
from personachat.app.readout import Readout
from personachat.app.settings import ChatInputs
from personachat.app.views import compare_html

Endpoint = Callable[..., Iterator[tuple[Any, ...]]]

_NAMED = Parameter.POSITIONAL_OR_KEYWORD
LATER = "last_n"  # the first of the settings added after the view's layer and readout state
MESSAGE = Parameter("message", _NAMED, annotation=str | None)
HISTORY = Parameter("history", _NAMED, annotation=Messages | None)
SIDE_HISTORY = Parameter("side_history", _NAMED, annotation=Messages | None)
VIEW = (
    Parameter("view_layer", _NAMED, default=0, annotation=float),
    Parameter("readout", _NAMED, default=None, annotation=Readout | None),
)
REQUEST = Parameter("request", _NAMED, default=None, annotation=gr.Request | None)
PAGE = (  # the page's own: the prompted conversation and whether to write it
    Parameter("prompted_history", _NAMED, default=None, annotation=Messages | None),
    Parameter("prompted", _NAMED, default=False, annotation=bool),
)


def settings_parameters() -> list[Parameter]:
    """One parameter per ``ChatInputs`` field, with its type and default, in the page's order."""
    hints = typing.get_type_hints(ChatInputs)
    out = []
    for f in dataclasses.fields(ChatInputs):
        default = Parameter.empty if f.default is dataclasses.MISSING else f.default
        out.append(Parameter(f.name, _NAMED, default=default, annotation=hints[f.name]))
    return out


def signature(head: Sequence[Parameter], tail: Sequence[Parameter] = ()) -> Signature:
    """``head``, the settings with the view's parameters before ``LATER``, ``tail`` and the
    request."""
    settings = settings_parameters()
    at = [p.name for p in settings].index(LATER)
    return Signature([*head, *settings[:at], *VIEW, *settings[at:], *tail, REQUEST])


def _bind(sig: Signature, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """Every parameter's value: what Gradio (or a caller) passed, else its default."""
    bound = sig.bind(*args, **kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


def _inputs(values: dict[str, Any]) -> ChatInputs:
    return ChatInputs(**{f.name: values[f.name] for f in dataclasses.fields(ChatInputs)})


def _as_endpoint(fn: Endpoint, sig: Signature) -> Endpoint:
    fn.__signature__ = sig  # type: ignore[attr-defined]
    fn.__annotations__ = {p.name: p.annotation for p in sig.parameters.values()}
    return fn


def chat_endpoint(chats: ChatHandlers) -> Endpoint:
    """``chats.chat`` with the page's settings as keyword parameters (the ``/chat`` endpoint)."""
    sig = signature([MESSAGE, HISTORY, SIDE_HISTORY])

    def chat(*args: Any, **kwargs: Any) -> Iterator[tuple[Any, ...]]:
        """Send ``message`` and stream the (steered) reply; yields
        (history, side_history, message box, status, tokens html, inside state).

        ``last_n`` (0: all) narrows ``positions="prompt"`` to the prompt's last tokens;
        ``direction`` names a persona whose direction is ablated in the residual stream at
        ``direction_layers`` ("none": nothing is), moved to the baseline's level
        (``direction_mode="mean"``) or projected out (``"zero"``), at ``direction_positions``;
        ``ablation_positions`` are the tokens the neuron ablation acts on."""
        v = _bind(sig, args, kwargs)
        yield from chats.chat(
            v["message"],
            v["history"],
            v["side_history"],
            _inputs(v),
            v["view_layer"],
            v["readout"],
            v["request"],
        )

    return _as_endpoint(chat, sig)


def retry_endpoint(chats: ChatHandlers) -> Endpoint:
    """``chats.retry`` with the page's settings as keyword parameters (``/retry``)."""
    sig = signature([HISTORY, SIDE_HISTORY])

    def retry(*args: Any, **kwargs: Any) -> Iterator[tuple[Any, ...]]:
        """Drop the last reply and generate it again with the current settings."""
        v = _bind(sig, args, kwargs)
        yield from chats.retry(
            v["history"], v["side_history"], _inputs(v), v["view_layer"], v["readout"], v["request"]
        )

    return _as_endpoint(retry, sig)


def page_update(turn: Turn) -> tuple[Any, ...]:
    """What the page's own send and retry update: the API's outputs, then the prompted
    conversation, the conversation view and the Stop button (enabled while writing)."""
    view = compare_html(turn.history, turn.side, turn.prompted)
    return (*turn.api(), turn.prompted, view, gr.update(interactive=turn.running))


def page_chat_endpoint(chats: ChatHandlers) -> Endpoint:
    """The page's send: ``/chat``'s parameters plus the prompted conversation (private)."""
    sig = signature([MESSAGE, HISTORY, SIDE_HISTORY], PAGE)

    def page_chat(*args: Any, **kwargs: Any) -> Iterator[tuple[Any, ...]]:
        v = _bind(sig, args, kwargs)
        for turn in chats.turns(
            v["message"],
            v["history"],
            v["side_history"],
            v["prompted_history"],
            _inputs(v),
            v["view_layer"],
            v["readout"],
            v["request"],
            bool(v["prompted"]),
        ):
            yield page_update(turn)

    return _as_endpoint(page_chat, sig)


def page_retry_endpoint(chats: ChatHandlers) -> Endpoint:
    """The page's retry: ``/retry``'s parameters plus the prompted conversation (private)."""
    sig = signature([HISTORY, SIDE_HISTORY], PAGE)

    def page_retry(*args: Any, **kwargs: Any) -> Iterator[tuple[Any, ...]]:
        v = _bind(sig, args, kwargs)
        for turn in chats.retry_turns(
            v["history"],
            v["side_history"],
            v["prompted_history"],
            _inputs(v),
            v["view_layer"],
            v["readout"],
            v["request"],
            bool(v["prompted"]),
        ):
            yield page_update(turn)

    return _as_endpoint(page_retry, sig)
