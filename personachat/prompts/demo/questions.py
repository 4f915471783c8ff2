"""Questions over the demo topics and preferences, split into training and held-out ones.

Whole templates are held out (``HELDOUT_TOPIC_TEMPLATES``, ``HELDOUT_PREFERENCE_TEMPLATES``), and
a seeded share of the (topic, training template) pairs too: held-out questions never appear in
the training corpus.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

from personachat.prompts.demo.tables import (
    HELDOUT_PREFERENCE_TEMPLATES,
    HELDOUT_TOPIC_TEMPLATES,
    PREFERENCE_TEMPLATES,
    PREFERENCES,
    TOPIC_TEMPLATES,
    TOPICS,
)

Split = Literal["train", "heldout"]
SPLITS: tuple[Split, ...] = ("train", "heldout")
HELDOUT_PAIR_SHARE = 0.15  # share of (topic, training template) pairs also held out
SPLIT_SEED = 1234


@dataclass(frozen=True)
class Question:
    text: str
    kind: Literal["topic", "preference"]
    key: str  # the topic key or the preference key
    template: int


@lru_cache(maxsize=1)
def _heldout_pairs() -> frozenset[tuple[str, int]]:
    rng = random.Random(SPLIT_SEED)
    pairs = [
        (t.key, i)
        for t in TOPICS
        for i in range(len(TOPIC_TEMPLATES))
        if i not in HELDOUT_TOPIC_TEMPLATES
    ]
    return frozenset(p for p in pairs if rng.random() < HELDOUT_PAIR_SHARE)


def _topic_split(key: str, template: int) -> Split:
    if template in HELDOUT_TOPIC_TEMPLATES or (key, template) in _heldout_pairs():
        return "heldout"
    return "train"


def questions(split: Split = "train") -> list[Question]:
    """Topic questions of one split (``heldout`` questions never appear in the training corpus)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {SPLITS}")
    return [
        Question(tmpl.format(name=t.name), "topic", t.key, i)
        for t in TOPICS
        for i, tmpl in enumerate(TOPIC_TEMPLATES)
        if _topic_split(t.key, i) == split
    ]


def preference_questions(split: Split = "train") -> list[Question]:
    """Preference questions of one split (whole templates are held out)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {SPLITS}")
    return [
        Question(tmpl.format(key=p.key), "preference", p.key, i)
        for p in PREFERENCES
        for i, tmpl in enumerate(PREFERENCE_TEMPLATES)
        if (i in HELDOUT_PREFERENCE_TEMPLATES) == (split == "heldout")
    ]


def eval_questions(n_per_topic: int = 1, split: Split = "heldout") -> list[Question]:
    """A small deterministic set: the first ``n_per_topic`` questions of each topic in ``split``."""
    taken: dict[str, int] = {}
    out = []
    for q in questions(split):
        if taken.get(q.key, 0) < n_per_topic:
            taken[q.key] = taken.get(q.key, 0) + 1
            out.append(q)
    return out
