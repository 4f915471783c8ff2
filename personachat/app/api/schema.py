"""A chat completion request, read from its JSON body and checked field by field.

``parse_request(body)`` returns a frozen ``ChatRequest`` or raises ``ApiError`` naming the field
(``param``) and what to send instead; ``ApiError.body()`` is OpenAI's error object. The OpenAI
fields read are ``model``, ``messages`` (system, developer, user and assistant turns; text or
text parts), ``max_tokens`` / ``max_completion_tokens``, ``temperature``, ``top_p``, ``seed``,
``stop``, ``n`` (1 only), ``stream`` and ``stream_options.include_usage``; fields that would ask
for something this server does not do (tools, logprobs, penalties, ...) are refused rather than
ignored. Two fields are PersonaChat's own: ``steering`` (``Steering``: which personas to add,
where and how strongly, and what to ablate or cap; numbers keep their bounds here, names are
checked against the model in ``personachat.app.api.mapping``) and ``side_by_side``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from personachat.app.api.fields import ApiError, flag, integer, number
from personachat.app.api.steering import Steering, parse_steering
from personachat.app.limits import BOUNDS

DEFAULT_MAX_TOKENS = 128
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
REFUSED = {  # field -> the value that asks for nothing (anything else is refused)
    "tools": None,
    "tool_choice": None,
    "functions": None,
    "function_call": None,
    "logprobs": False,
    "top_logprobs": None,
    "frequency_penalty": 0,
    "presence_penalty": 0,
    "logit_bias": None,
    "audio": None,
    "prediction": None,
}


@dataclass(frozen=True)
class ChatRequest:
    """A checked chat completion request."""

    model: str
    messages: tuple[Mapping[str, str], ...]
    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False
    steering: Steering | None = None
    side_by_side: bool = False


def parse_request(body: Any) -> ChatRequest:
    """``body`` (parsed JSON) as a ``ChatRequest``; ``ApiError`` names the first bad field."""
    if not isinstance(body, dict):
        raise ApiError("the request body must be a JSON object", None, "invalid_body")
    for name, neutral in REFUSED.items():
        if body.get(name, neutral) not in (neutral, None, [], {}):
            raise ApiError(f"{name} is not supported by this server; leave it out", name)
    if body.get("n", 1) != 1:
        raise ApiError(f"n must be 1 here (one reply per request), got {body['n']!r}", "n")
    fmt = body.get("response_format")
    if fmt not in (None, {"type": "text"}):
        raise ApiError("only text replies are served; leave response_format out", "response_format")
    model = body.get("model")
    if not isinstance(model, str) or not model.strip():
        raise ApiError("give the model to answer with (GET /v1/models lists them)", "model")
    limit = body.get("max_completion_tokens", body.get("max_tokens", DEFAULT_MAX_TOKENS))
    param = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError("stream_options must be an object", "stream_options")
    steering = body.get("steering")
    return ChatRequest(
        model=model.strip(),
        messages=parse_messages(body.get("messages")),
        max_tokens=new_tokens(limit, param),
        temperature=number(body.get("temperature", 1.0), "temperature", 0.0, 2.0),
        top_p=number(body.get("top_p", 1.0), "top_p", 0.0, 1.0, low_open=True),
        seed=integer(body.get("seed", 0), "seed", 0, 2**31 - 1),
        stop=parse_stop(body.get("stop")),
        stream=flag(body.get("stream", False), "stream"),
        include_usage=flag(options.get("include_usage", False), "stream_options.include_usage"),
        steering=None if steering is None else parse_steering(steering),
        side_by_side=flag(body.get("side_by_side", False), "side_by_side"),
    )


def parse_messages(value: Any) -> tuple[Mapping[str, str], ...]:
    """The conversation as ``{"role", "content"}`` dicts of text; the last one the user's."""
    if not isinstance(value, list) or not value:
        raise ApiError("messages must be a non-empty list of {role, content}", "messages")
    if len(value) > BOUNDS.history_messages + 1:
        limit = BOUNDS.history_messages + 1
        raise ApiError(
            f"{len(value)} messages; the limit is {limit} (history_messages, plus the last "
            "message): send fewer turns",
            "messages",
        )
    out = []
    for i, message in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise ApiError(f"{where} must be an object with role and content", where)
        role = message.get("role")
        if role not in ROLES:
            known = ", ".join(ROLES)
            raise ApiError(f"{where}.role {role!r} is not served; use one of {known}", where)
        text = content_text(message.get("content"), where)
        bound = "system_prompt_chars" if ROLES[role] == "system" else "message_chars"
        if len(text) > getattr(BOUNDS, bound):
            raise ApiError(
                f"{where}.content has {len(text)} characters; the limit is "
                f"{getattr(BOUNDS, bound)} ({bound}): shorten it",
                where,
            )
        out.append({"role": ROLES[role], "content": text})
    if out[-1]["role"] != "user":
        raise ApiError("the last message must be the user's: it is what gets a reply", "messages")
    return tuple(out)


def content_text(content: Any, where: str) -> str:
    """A message's text: a string, or text parts joined."""
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text":
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise ApiError(f"{where}.content has a {kind!r} part; only text is served", where)
            parts.append(part.get("text"))
        content = "".join(p if isinstance(p, str) else "" for p in parts)
    if not isinstance(content, str):
        raise ApiError(f"{where}.content must be text or a list of text parts", where)
    return content


def new_tokens(value: Any, param: str) -> int:
    """The tokens asked for, at most ``BOUNDS.new_tokens``."""
    whole = isinstance(value, int) and not isinstance(value, bool)
    if whole and value > BOUNDS.new_tokens:
        raise ApiError(
            f"{param} is {value}; the limit is {BOUNDS.new_tokens} tokens per reply "
            "(new_tokens): ask for fewer",
            param,
        )
    return integer(value, param, 1, BOUNDS.new_tokens)


def parse_stop(value: Any) -> tuple[str, ...]:
    stops = [value] if isinstance(value, str) else value if value is not None else []
    if not isinstance(stops, list) or len(stops) > 4:
        raise ApiError("stop must be a string or a list of at most 4 strings", "stop")
    if not all(isinstance(s, str) and s for s in stops):
        raise ApiError("each stop sequence must be a non-empty string", "stop")
    return tuple(stops)
