"""Prompts with token groups: a chat-formatted persona prompt and the spans of its parts.

Every analysis that reads activations pools or patches them over three token groups:
``persona`` (the persona text), ``question`` (the question text) and ``answer`` (the last
position, the one that predicts the first answer token). The persona is the system prompt
(``early``) or is appended after the question (``late``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from personachat.model import LoadedModel
from personachat.prompts import Message, format_chat
from personachat.prompts.tokens import tokenize
from personachat.records import Persona

GROUPS = ("persona", "question", "answer")
Placement = Literal["early", "late"]
LATE_TEMPLATE = "{question}\n\n(Answer in character. {persona})"


@dataclass(frozen=True)
class Prompt:
    """A tokenized prompt with the token spans of the persona text and the question text."""

    ids: tuple[int, ...]
    persona_span: tuple[int, int]
    question_span: tuple[int, int]

    @property
    def answer_pos(self) -> int:
        return len(self.ids) - 1

    def group(self, name: str) -> list[int]:
        """Token positions of a group (``persona``, ``question`` or ``answer``)."""
        if name == "answer":
            return [self.answer_pos]
        span = self.persona_span if name == "persona" else self.question_span
        if name not in GROUPS:
            raise ValueError(f"unknown token group {name!r}; use one of {GROUPS}")
        return list(range(*span))


def persona_messages_at(persona: Persona, question: str, placement: Placement) -> list[Message]:
    """Messages with the persona as system prompt (``early``) or after the question (``late``)."""
    if not persona.system_prompt:
        return [{"role": "user", "content": question}]
    if placement == "early":
        return [
            {"role": "system", "content": persona.system_prompt},
            {"role": "user", "content": question},
        ]
    text = LATE_TEMPLATE.format(question=question, persona=persona.system_prompt)
    return [{"role": "user", "content": text}]


def encode_prompt(
    lm: LoadedModel,
    persona: Persona,
    question: str,
    answer_prefix: str = "",
    placement: Placement = "early",
) -> Prompt:
    """Chat-format and tokenize one prompt (plus the forced start of the reply) with its spans.

    A persona without a system prompt (the model's default) has as persona span the chat tokens
    before the question (at least one token), so every sample has all three groups.
    """
    tok = lm.tokenizer
    text = format_chat(tok, persona_messages_at(persona, question, placement)) + answer_prefix
    special = not bool(getattr(tok, "chat_template", None))
    q_start = text.rfind(question)
    p_start = text.find(persona.system_prompt) if persona.system_prompt else -1
    tokens = tokenize(tok, text, add_special_tokens=special)
    ids, at = tokens.ids, tokens.token_at
    q_span = (at(q_start), max(at(q_start + len(question) - 1) + 1, at(q_start) + 1))
    if p_start >= 0:
        p_span = (at(p_start), at(p_start + len(persona.system_prompt) - 1) + 1)
    else:
        p_span = (0, max(1, q_span[0]))
    return Prompt(ids=tuple(ids), persona_span=p_span, question_span=q_span)
