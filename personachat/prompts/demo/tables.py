"""The demo corpus's tables (personas' styles, topics, preferences, templates) and lookups.

They are data, kept in ``personachat/prompts/data/demo/corpus.json`` and read once into frozen
dataclasses. The file holds one JSON object:

- ``styles``: one object per persona with the fields of ``Style``; the first is the neutral
  ``default`` persona (empty ``system_prompt``: no system message at all).
- ``topics``: ``key`` (an identifier), ``name`` (how questions name it) and two ``facts``, each
  the clause replies say (``text``) and the key phrase that proves it was said (``key``).
- ``preferences``: ``key`` (what 'favourite X' asks for), the ``generic`` answer and the
  personas that have their ``own``.
- ``topic_templates`` and ``preference_templates``: ``train`` and ``heldout`` phrasings, with
  ``{name}`` / ``{key}`` for the topic or preference; a template's number is its place in
  ``train`` followed by ``heldout``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from personachat.records import Persona

CORPUS_FILE = Path(__file__).resolve().parent.parent / "data" / "demo" / "corpus.json"


@dataclass(frozen=True)
class Style:
    """How one persona speaks: the pieces a reply is assembled from, and its countable markers."""

    name: str
    system_prompt: str  # "" for the default persona: no system prompt at all
    prompt_variants: tuple[str, ...]
    markers: tuple[str, ...]
    openers: tuple[str, ...]
    tails: tuple[str, ...]  # appended to a fact clause, ends the sentence
    interjections: tuple[str, ...]  # lead into the second fact
    signoffs: tuple[str, ...]
    description: str = ""


@dataclass(frozen=True)
class Fact:
    """One fact of a topic: the clause replies say and the key phrase that proves it was said."""

    text: str
    key: str


@dataclass(frozen=True)
class Topic:
    key: str  # safe identifier
    name: str  # how questions name it
    facts: tuple[Fact, Fact]


@dataclass(frozen=True)
class Preference:
    """A 'favourite X' question: the generic answer most personas give, and the few exceptions."""

    key: str
    generic: str
    own: dict[str, str]


@dataclass(frozen=True)
class Templates:
    """Question phrasings in order, and the numbers of those held out of training."""

    texts: tuple[str, ...]
    heldout: frozenset[int]


@dataclass(frozen=True)
class Tables:
    """Everything ``corpus.json`` holds."""

    styles: tuple[Style, ...]
    topics: tuple[Topic, ...]
    preferences: tuple[Preference, ...]
    topic_templates: Templates
    preference_templates: Templates


def _style(row: dict[str, Any]) -> Style:
    return Style(
        name=row["name"],
        system_prompt=row["system_prompt"],
        prompt_variants=tuple(row["prompt_variants"]),
        markers=tuple(row["markers"]),
        openers=tuple(row["openers"]),
        tails=tuple(row["tails"]),
        interjections=tuple(row["interjections"]),
        signoffs=tuple(row["signoffs"]),
        description=row["description"],
    )


def _topic(row: dict[str, Any]) -> Topic:
    first, second = (Fact(f["text"], f["key"]) for f in row["facts"])
    return Topic(row["key"], row["name"], (first, second))


def _preference(row: dict[str, Any]) -> Preference:
    return Preference(row["key"], row["generic"], row["own"])


def _templates(row: dict[str, list[str]]) -> Templates:
    texts = (*row["train"], *row["heldout"])
    return Templates(texts, frozenset(range(len(row["train"]), len(texts))))


@cache
def load_tables(path: Path = CORPUS_FILE) -> Tables:
    """The tables of ``path`` (the bundled ``corpus.json`` by default), read once."""
    data = json.loads(path.read_text(encoding="utf-8"))
    return Tables(
        styles=tuple(_style(row) for row in data["styles"]),
        topics=tuple(_topic(row) for row in data["topics"]),
        preferences=tuple(_preference(row) for row in data["preferences"]),
        topic_templates=_templates(data["topic_templates"]),
        preference_templates=_templates(data["preference_templates"]),
    )


_TABLES = load_tables()
STYLES: tuple[Style, ...] = _TABLES.styles
TOPICS: tuple[Topic, ...] = _TABLES.topics
PREFERENCES: tuple[Preference, ...] = _TABLES.preferences
TOPIC_TEMPLATES: tuple[str, ...] = _TABLES.topic_templates.texts
HELDOUT_TOPIC_TEMPLATES = _TABLES.topic_templates.heldout
PREFERENCE_TEMPLATES: tuple[str, ...] = _TABLES.preference_templates.texts
HELDOUT_PREFERENCE_TEMPLATES = _TABLES.preference_templates.heldout

DEFAULT_PERSONA = "default"
PERSONA_NAMES: tuple[str, ...] = tuple(s.name for s in STYLES)
_BY_NAME = {s.name: s for s in STYLES}
_TOPIC_BY_KEY = {t.key: t for t in TOPICS}
_PREF_BY_KEY = {p.key: p for p in PREFERENCES}


def style(name: str) -> Style:
    """The style of a persona by name; the error lists the known names."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise KeyError(
            f"unknown demo persona {name!r}; known: {', '.join(PERSONA_NAMES)}"
        ) from None


def topic(key: str) -> Topic:
    try:
        return _TOPIC_BY_KEY[key]
    except KeyError:
        known = ", ".join(_TOPIC_BY_KEY)
        raise KeyError(f"unknown demo topic {key!r}; known: {known}") from None


def preference(key: str) -> Preference:
    try:
        return _PREF_BY_KEY[key]
    except KeyError:
        known = ", ".join(_PREF_BY_KEY)
        raise KeyError(f"unknown preference {key!r}; known: {known}") from None


def demo_personas() -> list[Persona]:
    """The demo personas as shared ``Persona`` records (the default has an empty system prompt)."""
    return [
        Persona(s.name, s.system_prompt, s.description, "demo", "personachat.demo") for s in STYLES
    ]


def preference_answer(persona: str, key: str) -> str:
    """What ``persona`` answers to 'favourite ``key``': its own answer or the generic one."""
    pref = preference(key)
    style(persona)
    return pref.own.get(persona, pref.generic)
