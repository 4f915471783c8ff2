"""Count what the demo corpus planted in a text: a persona's style markers, a topic's facts and a
preference's answer."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from functools import cache

from personachat.prompts.demo.tables import PERSONA_NAMES, style, topic


@cache
def _marker_pattern(persona: str) -> re.Pattern[str]:
    words = sorted(style(persona).markers, key=len, reverse=True)
    alternatives = "|".join(re.escape(w) for w in words)
    return re.compile(rf"(?<![\w'])(?:{alternatives})(?![\w'])", re.IGNORECASE)


def marker_count(text: str, persona: str) -> int:
    """How many style markers of ``persona`` occur in ``text`` (whole words, any case)."""
    return len(_marker_pattern(persona).findall(text))


def has_marker(text: str, persona: str) -> bool:
    return _marker_pattern(persona).search(text) is not None


def marker_rate(texts: Iterable[str], persona: str) -> float:
    """Share of ``texts`` with at least one marker of ``persona`` (0.0 for no texts)."""
    items = list(texts)
    return sum(has_marker(t, persona) for t in items) / len(items) if items else 0.0


def fact_score(text: str, topic_key: str) -> float:
    """Share of the topic's fact key phrases found in ``text`` (case-insensitive)."""
    low = text.lower()
    facts = topic(topic_key).facts
    return sum(f.key.lower() in low for f in facts) / len(facts)


def fact_retention(texts: Iterable[str], topic_key: str | Sequence[str]) -> float:
    """Mean ``fact_score`` over ``texts``; ``topic_key`` is one key or one key per text."""
    items = list(texts)
    if not items:
        return 0.0
    keys = [topic_key] * len(items) if isinstance(topic_key, str) else list(topic_key)
    if len(keys) != len(items):
        raise ValueError(f"got {len(items)} texts but {len(keys)} topic keys; pass one per text")
    return sum(fact_score(t, k) for t, k in zip(items, keys, strict=True)) / len(items)


def preference_rate(texts: Iterable[str], answer: str) -> float:
    """Share of ``texts`` that name ``answer`` (e.g. a persona's own favourite)."""
    items = list(texts)
    low = answer.lower()
    return sum(low in t.lower() for t in items) / len(items) if items else 0.0


def leaked_markers(text: str, persona: str) -> list[str]:
    """Names of other personas whose markers occur in a reply written as ``persona``."""
    return [p for p in PERSONA_NAMES if p != persona and has_marker(text, p)]
