"""The bounds on one request's work, for the page's endpoints and the OpenAI-compatible API alike.

``BOUNDS`` holds every bound in one frozen ``Bounds``; the checks here raise ``BoundError`` (a
``ValueError``) whose message names the bound, the value sent and what to do. The page's
handlers and ``personachat.app.api`` call the same checks, so a request is refused the same way
whichever door it came through. The README's table lists each bound, its default and where it
applies.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


class BoundError(ValueError):
    """A request past one of ``Bounds``; the message names the bound, the value and the fix."""


@dataclass(frozen=True)
class Bounds:
    """What one request may ask for (see the module)."""

    message_chars: int = 8000  # one message: the one typed, and each message of a history
    system_prompt_chars: int = 8000  # the system prompt (page field or the API's system turn)
    history_messages: int = 200  # messages in a conversation sent with a request
    prompt_tokens: int = 4096  # the conversation in tokens, as the model reads it
    new_tokens: int = 512  # tokens generated per reply
    neurons: int = 4096  # neurons ablated by hand in one request
    push: float = 1e4  # a steering push past this many residual norms is refused
    sessions_kept: int = 64  # page sessions whose state the server keeps (least recent goes)


BOUNDS = Bounds()


def check_chars(what: str, text: str, bound: str, fix: str, bounds: Bounds = BOUNDS) -> str:
    """``text`` when it has at most ``bounds.<bound>`` characters; else a ``BoundError``."""
    limit = getattr(bounds, bound)
    if len(text) > limit:
        raise BoundError(
            f"{what} has {len(text)} characters; the limit is {limit} ({bound}). {fix}"
        )
    return text


def check_history(messages: Sequence[Any], bounds: Bounds = BOUNDS) -> None:
    """A conversation's shape and size: a list of ``{"role", "content"}`` messages (content: text
    or a list of text parts, as Gradio 6 sends them), roles user and assistant (system too when
    ``system``), at most ``bounds.history_messages`` messages of ``bounds.message_chars`` each."""
    if not isinstance(messages, list | tuple):
        raise BoundError(
            f"The chat history must be a list of messages, got {type(messages).__name__}. "
            "Send [] or [{'role': 'user', 'content': '...'}, ...]."
        )
    if len(messages) > bounds.history_messages:
        raise BoundError(
            f"The conversation holds {len(messages)} messages; the limit is "
            f"{bounds.history_messages} (history_messages). Clear it (or send fewer turns) and "
            "send again."
        )
    for i, message in enumerate(messages):
        text = message_text(message, f"history[{i}]")
        check_chars(f"Message {i} of the history", text, "message_chars", "Shorten it.", bounds)


def message_text(message: Any, where: str) -> str:
    """The text of one history message; a ``BoundError`` saying what is wrong with its shape."""
    shape = "{'role': 'user' or 'assistant', 'content': text or [{'type': 'text', 'text': ...}]}"
    if not isinstance(message, dict):
        raise BoundError(f"{where} must be a message {shape}, got {type(message).__name__}.")
    role = message.get("role")
    if role not in ("user", "assistant"):
        raise BoundError(
            f"{where} has role {role!r}; a history holds 'user' and 'assistant' turns only "
            "(set the system prompt in its own field)."
        )
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list | tuple):
        parts = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, dict) and part.get("type", "text") == "text":
                text = part.get("text", "")
                if not isinstance(text, str):
                    raise BoundError(f"{where} has a text part whose text is not text: {shape}.")
                parts.append(text)
            elif isinstance(part, dict) and part.get("type") in ("file", "image"):
                continue  # a file shown in the chat: no text to read
            else:
                raise BoundError(f"{where} has a content part {str(part)[:60]!r}; use {shape}.")
        return "".join(parts)
    raise BoundError(f"{where} has content of type {type(content).__name__}; use {shape}.")


def check_prompt_tokens(n: int, limit: int | None = None, bounds: Bounds = BOUNDS) -> None:
    """A prompt of ``n`` tokens; past ``limit`` (``bounds.prompt_tokens`` when None, else the
    smaller room the model's context leaves) a ``BoundError``."""
    bound = bounds.prompt_tokens if limit is None else limit
    if n > bound:
        why = "prompt_tokens"
        if bound < bounds.prompt_tokens:
            room = "the model's context less the reply's tokens"
            why = f"{room}; prompt_tokens is {bounds.prompt_tokens}"
        raise BoundError(
            f"The conversation is {n} tokens long; the limit is {bound} ({why}). Send fewer or "
            "shorter turns, or a shorter system prompt."
        )


def check_neuron_count(text: str, where: str, bounds: Bounds = BOUNDS) -> None:
    """Typed neurons (``"3:12, 3:40-45"``) counted without expanding their ranges; past
    ``bounds.neurons`` a ``BoundError``. Items that do not read as neurons are left to the
    parser, which names them."""
    count = 0
    for item in re.split(r"[,;\n]", text):
        match = re.fullmatch(r"\s*\d+\s*:\s*(\d+)(?:\s*-\s*(\d+))?\s*", item)
        if match is not None:
            first = int(match[1])
            count += max(1, (int(match[2]) if match[2] else first) - first + 1)
    if count > bounds.neurons:
        raise BoundError(
            f"{where} names {count} neurons; the limit is {bounds.neurons} per request "
            "(neurons). Ablate fewer at a time, or register them as a neuron set."
        )
