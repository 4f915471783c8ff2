"""Controlled contrasts of persona collapse: persona distance, generic bias, persona placement.

Strongly vs mildly different persona pairs (by persona-space cosine), preferences with a high vs
low generic bias (the neutral persona's probability of the modal answer), and the persona placed
early (system prompt) vs late (after the question).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from personachat.analysis.collapse import CollapseResult, QuestionCollapse, js_divergence
from personachat.analysis.space import PersonaSpace


@dataclass(frozen=True)
class PairStats:
    """How alike two personas answer: share of preferences with the same answer, mean JS."""

    a: str
    b: str
    cosine: float
    agreement: float
    token_js: float


@dataclass(eq=False)
class Contrasts:
    """Collapse under three contrasts: persona distance, generic bias, persona placement."""

    strong: list[PairStats]  # the most different persona pairs (lowest cosine)
    mild: list[PairStats]  # the most similar pairs (highest cosine)
    high_bias: list[str]  # preferences with the strongest generic prior
    low_bias: list[str]
    share_high_bias: float  # mean modal share on high-bias preferences
    share_low_bias: float
    early: dict[str, float]  # n_collapsed, mean modal share, mean token JS (persona early)
    late: dict[str, float] | None  # the same with the persona after the question
    late_own_kept: float = float("nan")  # share of early own answers that survive placing late

    @staticmethod
    def mean(pairs: Sequence[PairStats], attr: str) -> float:
        values = [getattr(p, attr) for p in pairs if np.isfinite(getattr(p, attr))]
        return float(np.mean(values)) if values else float("nan")


def pair_stats(collapse: CollapseResult, a: str, b: str, cosine: float = float("nan")) -> PairStats:
    """Agreement and next-token JS of personas ``a`` and ``b`` over all preferences."""
    answered = [q for q in collapse.questions if q.answers[a] and q.answers[b]]
    same = [q.answers[a] == q.answers[b] for q in answered]
    by = {(x.persona, x.question): x for x in collapse.answers}
    phrasings = list(dict.fromkeys(x.question for x in collapse.answers))
    js = [js_divergence(by[(a, q)].top, by[(b, q)].top) for q in phrasings]
    agreement = float(np.mean(same)) if same else float("nan")
    return PairStats(a, b, cosine, agreement, float(np.mean(js)))


def collapse_summary(collapse: CollapseResult) -> dict[str, float]:
    qs = collapse.questions
    return {
        "n_collapsed": float(collapse.n_collapsed),
        "n_questions": float(len(qs)),
        "modal_share": float(np.mean([q.modal_share for q in qs])),
        "token_js": float(np.mean([q.token_js for q in qs])),
        "answered": float(np.mean([q.answered for q in qs])),
    }


def own_answers_kept(early: CollapseResult, late: CollapseResult) -> float:
    """Share of (persona, preference) own answers under ``early`` that ``late`` reproduces."""
    own = [(q.key, p, q.answers[p]) for q in early.questions for p in q.distinct_personas]
    if not own:
        return float("nan")
    return float(np.mean([late.question(k).answers.get(p) == a for k, p, a in own]))


def contrasts(
    collapse: CollapseResult,
    space: PersonaSpace | None = None,
    late: CollapseResult | None = None,
    *,
    n_pairs: int = 5,
) -> Contrasts:
    """Strong vs mild persona pairs (by persona-space cosine), high vs low generic-bias
    preferences (by the neutral persona's probability of the modal answer), early vs late
    persona placement (when ``late`` is given)."""
    names = [n for n in collapse.personas if space is None or n in space.personas]
    stats = []
    for a, b in itertools.combinations(names, 2):
        cos = (
            float(space.cosine[space.personas.index(a), space.personas.index(b)])
            if space
            else float("nan")
        )
        stats.append(pair_stats(collapse, a, b, cos))
    stats.sort(key=lambda p: p.cosine)
    k = min(n_pairs, len(stats) // 2)
    strong, mild = (stats[:k], stats[-k:]) if space is not None and k else ([], [])
    qs = [q for q in collapse.questions if np.isfinite(q.generic_prob)]
    qs.sort(key=lambda q: -q.generic_prob)
    half = len(qs) // 2
    high, low = qs[:half], qs[len(qs) - half :]

    def share(rows: Sequence[QuestionCollapse]) -> float:
        return float(np.mean([q.modal_share for q in rows])) if rows else float("nan")

    return Contrasts(
        strong=strong,
        mild=mild,
        high_bias=[q.key for q in high],
        low_bias=[q.key for q in low],
        share_high_bias=share(high),
        share_low_bias=share(low),
        early=collapse_summary(collapse),
        late=collapse_summary(late) if late else None,
        late_own_kept=own_answers_kept(collapse, late) if late else float("nan"),
    )
