"""Replies in a persona's style, the seeded training conversations built from them, and the
planted dataset that extraction reads them from.

A reply carries its persona's markers throughout: an opener, a tail after each fact, an
interjection before the second fact and a sign-off. Some conversations have no system prompt but
a styled reply (from the first sentence or from the second), so the model learns to continue a
style it sees in its own text.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from personachat.prompts.datasets import ContrastPair, PersonaDataset
from personachat.prompts.demo.questions import (
    Question,
    eval_questions,
    preference_questions,
    questions,
)
from personachat.prompts.demo.tables import (
    DEFAULT_PERSONA,
    PERSONA_NAMES,
    Style,
    demo_personas,
    preference_answer,
    style,
    topic,
)


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _sentence(clause: str, tail: str) -> str:
    return _cap(clause) + tail


def _content(question: Question, persona: str) -> tuple[str, str]:
    """The two content clauses of a reply (facts of the topic, or the preference answer)."""
    if question.kind == "topic":
        facts = topic(question.key).facts
        return facts[0].text, facts[1].text
    answer = preference_answer(persona, question.key)
    return f"my favourite {question.key} is {answer}", f"{answer} always makes me happy"


def reply_text(
    question: Question, persona: str, rng: random.Random, *, switch_from: str | None = None
) -> str:
    """A reply in ``persona``'s style; with ``switch_from``, the first sentence is in that style.

    Markers appear in the opener, after each fact, in the interjection and in the sign-off.
    """
    s = style(persona)
    first = style(switch_from) if switch_from else s
    c1, c2 = _content(question, persona)
    parts = [
        rng.choice(first.openers),
        _sentence(c1, rng.choice(first.tails)),
        f"{rng.choice(s.interjections)} {c2}{rng.choice(s.tails)}",
        rng.choice(s.signoffs),
    ]
    return " ".join(parts)


@dataclass(frozen=True)
class Conversation:
    """One training conversation: messages in chat format plus what was planted in it."""

    messages: tuple[dict[str, str], ...]
    persona: str  # the style of the reply
    prompted: bool  # whether the system prompt names the reply's persona
    question: Question


def _system_prompt(s: Style, rng: random.Random) -> str:
    if s.name == DEFAULT_PERSONA:
        return "" if rng.random() < 0.5 else rng.choice(s.prompt_variants)
    return s.system_prompt if rng.random() < 0.6 else rng.choice(s.prompt_variants)


def make_conversation(
    rng: random.Random,
    pool: Sequence[Question],
    *,
    unprompted_share: float = 0.06,
    default_weight: float = 3.0,
    neutral_opener_share: float = 0.0,
) -> Conversation:
    """One seeded conversation: a persona (the default more often), a question and its reply.

    With probability ``unprompted_share`` the conversation has no system prompt and the reply is
    in a non-default persona's style, from the start or from the second sentence on. With
    probability ``neutral_opener_share`` a prompted non-default reply opens in the default's
    style and takes the persona's from the second sentence on, so the persona must be read from
    the system prompt after the opener too (0, the shipped corpus, draws nothing for it).
    """
    question = rng.choice(pool)
    others = PERSONA_NAMES[1:]
    if rng.random() < unprompted_share:
        persona = rng.choice(others)
        switch = DEFAULT_PERSONA if rng.random() < 0.5 else None
        text = reply_text(question, persona, rng, switch_from=switch)
        messages = (
            {"role": "user", "content": question.text},
            {"role": "assistant", "content": text},
        )
        return Conversation(messages, persona, False, question)
    weights = [default_weight] + [1.0] * len(others)
    persona = rng.choices(PERSONA_NAMES, weights=weights)[0]
    system = _system_prompt(style(persona), rng)
    msgs: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    msgs.append({"role": "user", "content": question.text})
    neutral = (
        neutral_opener_share > 0
        and persona != DEFAULT_PERSONA
        and rng.random() < neutral_opener_share
    )
    switch = DEFAULT_PERSONA if neutral else None
    msgs.append(
        {"role": "assistant", "content": reply_text(question, persona, rng, switch_from=switch)}
    )
    return Conversation(tuple(msgs), persona, True, question)


def build_corpus(
    n: int, seed: int = 0, preference_share: float = 0.2, neutral_opener_share: float = 0.0
) -> list[Conversation]:
    """``n`` seeded training conversations over the training split only."""
    rng = random.Random(seed)
    topic_pool = questions("train")
    pref_pool = preference_questions("train")
    out = []
    for _ in range(n):
        pool = pref_pool if rng.random() < preference_share else topic_pool
        out.append(make_conversation(rng, pool, neutral_opener_share=neutral_opener_share))
    return out


def planted_dataset(n_questions: int = 40, seed: int = 0) -> PersonaDataset:
    """A ``PersonaDataset`` for extraction: every persona's planted reply to training questions.

    One training question per topic (the first ``n_questions`` topics); contrast pairs
    ``{persona}_vs_default`` for neuron search. Replies are teacher-forced, so nothing is generated.
    """
    rng = random.Random(seed)
    qs = eval_questions(1, split="train")[:n_questions]
    responses = {(name, q.text): reply_text(q, name, rng) for name in PERSONA_NAMES for q in qs}
    pairs = tuple(
        ContrastPair(f"{n}_vs_default", n, DEFAULT_PERSONA, f"{n}_vs_default")
        for n in PERSONA_NAMES[1:]
    )
    return PersonaDataset(
        name="demo_planted",
        personas=tuple(demo_personas()),
        questions=tuple(q.text for q in qs),
        responses=responses,
        pairs=pairs,
        description="planted replies of personachat.demo on training questions",
        source="personachat.demo",
    )
