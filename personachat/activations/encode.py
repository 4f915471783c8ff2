"""Encode conversations for capture: token ids and the span of every position kind.

Each sample is one (persona, question, response) conversation, tokenized once with the spans of
every position kind (``personachat.records.POSITIONS``):

- ``response_avg``: the response tokens (teacher-forced);
- ``prompt_last``: the last prompt token (the end of the assistant header);
- ``prompt_avg``: every prompt token (system turn, user turn, assistant header);
- ``question_span``: the user turn plus the assistant header (from the user's own text where
  the system prompt is folded into the user turn; never system text).

A response is text (tokenized on its own, without special tokens) or the token ids a model
generated, read as they are. Each sample keeps the index of its question, by which held-out
metrics split the samples into folds.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from personachat.prompts.render import prompt_spans
from personachat.records import POSITIONS

Span = tuple[int, int]
Response = str | Sequence[int] | None  # text, generated token ids, or none


@dataclass(frozen=True)
class Sample:
    """One tokenized conversation: its persona index, token ids and one span per position."""

    persona: int
    ids: tuple[int, ...]
    spans: tuple[Span, ...]
    n_prompt: int
    question: int = 0  # the question's index in the dataset (held-out folds split by it)


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
    tokenizer: PreTrainedTokenizerBase, system: str, question: str, response: Response
) -> Encoded:
    """``system`` + ``question`` rendered by ``personachat.prompts.prompt_spans`` (the ids chat
    feeds the model), then the response's tokens (text tokenized on its own; ids as they are),
    with the spans of the position kinds."""
    spans = prompt_spans(tokenizer, system or None, question)
    if isinstance(response, str):
        reply = tokenizer(response, add_special_tokens=False)["input_ids"] if response else []
    else:
        reply = list(response or [])
    return Encoded(
        ids=[*spans.input_ids, *(int(i) for i in reply)],
        n_prompt=len(spans.input_ids),
        user_start=spans.question[0],
    )


def build_samples(
    tokenizer: PreTrainedTokenizerBase,
    conversations: Iterable[tuple[int, str, str, Response]],
    positions: Sequence[str],
    *,
    max_tokens: int | None = None,
    questions: Sequence[str] | None = None,
) -> list[Sample]:
    """Samples from ``(persona index, system prompt, question, response)`` tuples.

    With a response, ``response_avg`` needs at least one response token; a response that
    tokenizes to nothing raises. ``max_tokens`` truncates long responses (never the prompt).
    Each sample's ``question`` is its question's index in ``questions`` (default: the order in
    which the conversations first ask them).
    """
    index = {q: i for i, q in enumerate(dict.fromkeys(questions or ()))}
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
        q = index.setdefault(question, len(index))
        out.append(Sample(persona, tuple(ids), spans, enc.n_prompt, q))
    return out
