"""Encode conversations for capture: token ids and the span of every position kind.

Each sample is one (persona, question, response) conversation, tokenized once with the spans of
every position kind (``personachat.records.POSITIONS``):

- ``response_avg``: the response tokens (teacher-forced);
- ``prompt_last``: the last prompt token (the end of the assistant header);
- ``prompt_avg``: every prompt token (system turn, user turn, assistant header);
- ``question_span``: the user turn plus the assistant header.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from personachat.prompts import format_chat, persona_messages
from personachat.prompts.tokens import tokenize
from personachat.records import POSITIONS

Span = tuple[int, int]


@dataclass(frozen=True)
class Sample:
    """One tokenized conversation: its persona index, token ids and one span per position."""

    persona: int
    ids: tuple[int, ...]
    spans: tuple[Span, ...]
    n_prompt: int


@dataclass(frozen=True)
class Encoded:
    """A conversation's token ids and the span of each position kind, in ``POSITIONS`` terms."""

    ids: list[int]
    n_prompt: int
    user_start: int

    def span(self, position: str) -> Span:
        n, p = len(self.ids), self.n_prompt
        spans = {
            "response_avg": (p, n),
            "prompt_last": (p - 1, p),
            "prompt_avg": (0, p),
            "question_span": (self.user_start, p),
        }
        if position not in spans:
            raise ValueError(f"unknown position {position!r}; use one of {POSITIONS}")
        return spans[position]


_HEADERS: dict[tuple[int, str], str] = {}


def _user_header(tokenizer: PreTrainedTokenizerBase) -> str:
    """The text a chat template puts before a user message's content (``<|im_start|>user\\n``)."""
    key = (id(tokenizer), str(getattr(tokenizer, "chat_template", "")))
    if key not in _HEADERS:
        probe = [{"role": "system", "content": "S"}]
        try:
            ref = format_chat(tokenizer, [*probe, {"role": "user", "content": "Q?"}])
            prefix = format_chat(tokenizer, probe, add_generation_prompt=False)
            at = ref.rfind("Q?")
            _HEADERS[key] = ref[len(prefix) : at] if ref.startswith(prefix) and at > 0 else ""
        except Exception:  # a template that rejects system turns
            _HEADERS[key] = ""
    return _HEADERS[key]


def _user_turn_start(
    tokenizer: PreTrainedTokenizerBase, system: str, question: str, prompt: str
) -> int:
    """Character offset where the user turn (its role header included) starts in ``prompt``."""
    if system:
        try:
            prefix = format_chat(
                tokenizer, [{"role": "system", "content": system}], add_generation_prompt=False
            )
        except Exception:  # a template that rejects a lone system turn
            prefix = ""
        if prefix and prompt.startswith(prefix):
            return len(prefix)
    # No system turn (or a template that folds it in): find the question, step back over the
    # user header.
    header = _user_header(tokenizer)
    at = prompt.rfind(question)
    if at < 0:
        return 0
    if header and prompt[:at].endswith(header):
        return at - len(header)
    return at


def encode(
    tokenizer: PreTrainedTokenizerBase, system: str, question: str, response: str | None
) -> Encoded:
    """Tokenize ``system`` + ``question`` (+ ``response``) with the chat template, with spans."""
    prompt = format_chat(tokenizer, persona_messages(system, question), add_generation_prompt=True)
    text = prompt + (response or "")
    user_char = _user_turn_start(tokenizer, system, question, prompt)
    special = not bool(getattr(tokenizer, "chat_template", None))
    tokens = tokenize(tokenizer, text, add_special_tokens=special)
    ids = tokens.ids
    n_prompt = tokens.token_at(len(prompt))
    user_start = tokens.token_at(user_char)
    return Encoded(ids=ids, n_prompt=max(1, n_prompt), user_start=min(user_start, n_prompt - 1))


def build_samples(
    tokenizer: PreTrainedTokenizerBase,
    conversations: Iterable[tuple[int, str, str, str | None]],
    positions: Sequence[str],
    *,
    max_tokens: int | None = None,
) -> list[Sample]:
    """Samples from ``(persona index, system prompt, question, response)`` tuples.

    With a response, ``response_avg`` needs at least one response token; a response that
    tokenizes to nothing raises. ``max_tokens`` truncates long responses (never the prompt).
    """
    out = []
    for persona, system, question, response in conversations:
        enc = encode(tokenizer, system, question, response)
        ids = enc.ids if max_tokens is None else enc.ids[: max(max_tokens, enc.n_prompt + 1)]
        enc = Encoded(ids=ids, n_prompt=enc.n_prompt, user_start=enc.user_start)
        spans = tuple(enc.span(p) for p in positions)
        for pos, (start, end) in zip(positions, spans, strict=True):
            if end <= start:
                raise ValueError(
                    f"position {pos!r} is empty for question {question!r:.60} (response "
                    f"{response!r:.40}); the response needs at least one token"
                )
        out.append(Sample(persona=persona, ids=tuple(ids), spans=spans, n_prompt=enc.n_prompt))
    return out
