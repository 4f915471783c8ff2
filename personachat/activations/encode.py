"""Encode conversations for capture: token ids and the span of every position kind.

Each sample is one (persona, question, response) conversation, tokenized once with the spans of
every position kind (``personachat.records.POSITIONS``):

- ``response_avg``: the response tokens (teacher-forced);
- ``prompt_last``: the last prompt token (the end of the assistant header);
- ``prompt_avg``: every prompt token (system turn, user turn, assistant header);
- ``question_span``: the user turn plus the assistant header (from the user's own text where
  the system prompt is folded into the user turn; never system text).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from personachat.prompts.render import prompt_spans
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


def encode(
    tokenizer: PreTrainedTokenizerBase, system: str, question: str, response: str | None
) -> Encoded:
    """``system`` + ``question`` rendered by ``personachat.prompts.prompt_spans`` (the ids chat
    feeds the model), then the response's own tokens, with the spans of the position kinds."""
    spans = prompt_spans(tokenizer, system or None, question)
    reply = tokenizer(response, add_special_tokens=False)["input_ids"] if response else []
    return Encoded(
        ids=[*spans.input_ids, *(int(i) for i in reply)],
        n_prompt=len(spans.input_ids),
        user_start=spans.question[0],
    )


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
