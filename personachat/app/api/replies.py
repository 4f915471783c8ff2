"""The engine's updates as OpenAI's replies: a whole ``chat.completion``, or its chunks as SSE.

Choice 0 is the reply as the request asked for it; with ``side_by_side`` choice 1 is the
unsteered reply from the same batched generation. ``Choice`` follows one reply's text: it cuts
the text at the first stop sequence (and then asks the generation to stop once every choice is
done), holds back the tail that could still become a stop sequence, and hands out the rest as
deltas, so a stream's deltas concatenate to the whole reply's text. What the runtime warns
about (e.g. a vector read under other render conditions than the chat's) travels in an extra
top-level ``warnings`` list, on the completion or on the stream's last choice chunk.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

from personachat.app.api.fields import ApiError
from personachat.app.api.mapping import Call
from personachat.app.api.schema import ChatRequest


class Choice:
    """One reply's text so far, cut at a stop sequence, and how much of it was handed out."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(stops)
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.text = ""
        self.sent = 0
        self.tokens: tuple[int, ...] = ()
        self.cut = False  # ended at a stop sequence

    def update(self, text: str, tokens: Sequence[int] | None, done: bool) -> str:
        """Take the reply so far; return the new text that can be handed out."""
        if not self.cut:
            self.tokens = tuple(tokens or ())
            at = min((i for s in self.stops if (i := text.find(s)) >= 0), default=-1)
            if at >= 0:
                text, self.cut = text[:at], True
            self.text = text
        end = len(self.text) if done or self.cut else max(self.sent, len(self.text) - self.hold)
        delta, self.sent = self.text[self.sent : end], max(self.sent, end)
        return delta

    def finish_reason(self, max_tokens: int, eos: frozenset[int]) -> str:
        if self.cut or (self.tokens and self.tokens[-1] in eos):
            return "stop"
        return "length" if len(self.tokens) >= max_tokens else "stop"


def follow(call: Call, choices: list[Choice]) -> Iterator[list[str]]:
    """Each update's new text per choice; asks the generation to stop once every choice has met
    a stop sequence."""
    for update in call.updates:
        call.warnings.extend(w for w in update.warnings if w not in call.warnings)
        texts = [(update.text, update.tokens), (update.baseline_text, update.baseline_tokens)]
        deltas = [
            choice.update(text or "", tokens, update.done)
            for choice, (text, tokens) in zip(choices, texts, strict=False)
        ]
        if all(c.cut for c in choices):
            call.stop.set()
        yield deltas


def completion(request: ChatRequest, call: Call) -> dict[str, Any]:
    """The whole reply as a ``chat.completion`` object."""
    choices = [Choice(request.stop) for _ in range(2 if request.side_by_side else 1)]
    try:
        for _ in follow(call, choices):
            pass
    finally:
        call.stop.set()
    return {
        **_head(request, "chat.completion"),
        "choices": [
            {
                "index": i,
                "message": {"role": "assistant", "content": c.text, "refusal": None},
                "logprobs": None,
                "finish_reason": c.finish_reason(request.max_tokens, call.eos),
            }
            for i, c in enumerate(choices)
        ],
        "usage": usage(call, choices),
        **_warnings(call),
    }


def events(request: ChatRequest, call: Call) -> Iterator[str]:
    """The reply as server-sent events of ``chat.completion.chunk``s, then ``data: [DONE]``."""
    head = _head(request, "chat.completion.chunk")
    choices = [Choice(request.stop) for _ in range(2 if request.side_by_side else 1)]
    try:
        hello = {"role": "assistant", "content": ""}
        yield _event({**head, "choices": [_delta(i, hello) for i in range(len(choices))]})
        for deltas in follow(call, choices):
            parts = [_delta(i, {"content": d}) for i, d in enumerate(deltas) if d]
            if parts:
                yield _event({**head, "choices": parts})
        ends = [
            _delta(i, {}, c.finish_reason(request.max_tokens, call.eos))
            for i, c in enumerate(choices)
        ]
        yield _event({**head, "choices": ends, **_warnings(call)})
        if request.include_usage:
            yield _event({**head, "choices": [], "usage": usage(call, choices)})
    except Exception as err:  # the reply failed after it started: say so in the stream
        failure = ApiError(f"the reply failed: {err}", None, "generation_failed", 500)
        yield _event(failure.body())
    finally:
        call.stop.set()
        close = getattr(call.updates, "close", None)
        if close is not None:
            close()
    yield "data: [DONE]\n\n"


def usage(call: Call, choices: Sequence[Choice]) -> dict[str, int]:
    generated = sum(len(c.tokens) for c in choices)
    return {
        "prompt_tokens": call.prompt_tokens,
        "completion_tokens": generated,
        "total_tokens": call.prompt_tokens + generated,
    }


def _warnings(call: Call) -> dict[str, list[str]]:
    """``{"warnings": [...]}`` beside OpenAI's fields when the runtime warned, else nothing."""
    return {"warnings": list(call.warnings)} if call.warnings else {}


def _head(request: ChatRequest, kind: str) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": kind,
        "created": int(time.time()),
        "model": request.model,
        "system_fingerprint": None,
    }


def _delta(index: int, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}


def _event(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"
