"""What the system prompt alone does: each persona's markers under every persona's prompt, and
persona collapse on the favourite-X questions."""

from __future__ import annotations

from typing import Any

from tqdm import tqdm

from personachat.cli.evaluate_demo.replies import Asker
from personachat.model import LoadedModel
from personachat.prompts import demo
from personachat.records import Persona


def conditioning(ask: Asker) -> dict[str, Any]:
    """Marker matrix [prompt persona][marker persona] and fact retention per persona."""
    matrix: dict[str, dict[str, float]] = {}
    facts: dict[str, float] = {}
    samples: dict[str, str] = {}
    for p in tqdm(demo.demo_personas(), desc="conditioning"):
        replies = ask.replies(p.system_prompt)
        matrix[p.name] = {m: demo.marker_rate(replies, m) for m in demo.PERSONA_NAMES}
        facts[p.name] = demo.fact_retention(replies, list(ask.topics))
        samples[p.name] = replies[0]
    own = {p: matrix[p][p] for p in demo.PERSONA_NAMES}
    others = {
        m: max(matrix[p][m] for p in demo.PERSONA_NAMES if p != m) for m in demo.PERSONA_NAMES
    }
    return {"matrix": matrix, "own": own, "max_other": others, "facts": facts, "samples": samples}


def collapse(lm: LoadedModel, max_new_tokens: int) -> dict[str, Any]:
    """Per split and persona: share of favourite-X answers that are generic / as planted."""
    out: dict[str, Any] = {}
    for split in demo.SPLITS:
        qs = demo.preference_questions(split)
        ask = Asker.of(lm, qs, max_new_tokens)
        out[split] = {p.name: collapse_row(ask, qs, p) for p in demo.demo_personas()}
    return out


def collapse_row(ask: Asker, qs: list[demo.Question], persona: Persona) -> dict[str, Any]:
    """How ``persona`` answers the favourite-X questions ``qs`` under its system prompt."""
    replies = ask.replies(persona.system_prompt)
    pairs = list(zip(qs, replies, strict=True))
    generic = sum(demo.preference(q.key).generic.lower() in r.lower() for q, r in pairs)
    planted = sum(
        demo.preference_answer(persona.name, q.key).lower() in r.lower() for q, r in pairs
    )
    return {
        "generic": generic / len(qs),
        "as_planted": planted / len(qs),
        "own_markers": demo.marker_rate(replies, persona.name),
        "sample": replies[0],
    }
