"""Persona collapse: distinct personas giving the same answer to a preference question.

For each preference: each persona's most frequent answer over the phrasings, the share of
personas giving the modal answer, the mean pairwise Jensen-Shannon divergence (nats) of the
next-token distributions at the answer position and of the answer spans, and a flag when at
least two personas share the modal answer and their share reaches the threshold.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from personachat.analysis.answers import Answer, generate_answers
from personachat.analysis.groups import Placement
from personachat.analysis.preferences import PreferenceItem
from personachat.model import LoadedModel
from personachat.records import Persona
from personachat.vectors import neutral_personas


@dataclass(eq=False)
class QuestionCollapse:
    """Collapse of one preference across personas."""

    key: str
    answers: dict[str, str]  # persona -> its most frequent answer over the phrasings
    modal_answer: str
    modal_share: float  # share of personas whose answer is the modal answer
    n_distinct: int  # number of distinct answers across personas
    token_js: float  # mean pairwise JS divergence (nats) of next-token distributions
    span_js: float  # mean pairwise JS divergence of answer-span distributions over phrasings
    collapsed: bool
    collapsed_personas: list[str]  # give the modal answer
    distinct_personas: list[str]  # give another answer
    generic_prob: float = float("nan")  # neutral persona's probability of the modal first token
    answered: float = 1.0  # share of replies in which an answer span was found


@dataclass(eq=False)
class CollapseResult:
    model_id: str
    personas: list[str]
    questions: list[QuestionCollapse]
    answers: list[Answer]
    threshold: float
    placement: str = "early"

    @property
    def n_collapsed(self) -> int:
        return sum(q.collapsed for q in self.questions)

    def question(self, key: str) -> QuestionCollapse:
        for q in self.questions:
            if q.key == key:
                return q
        raise KeyError(f"no preference {key!r}; known: {[q.key for q in self.questions]}")


def js_divergence(p: Mapping[Any, float], q: Mapping[Any, float]) -> float:
    """Jensen-Shannon divergence (nats) of two sparse distributions; missing mass is one bucket."""
    keys = set(p) | set(q)
    pa = np.array([p.get(k, 0.0) for k in keys] + [max(0.0, 1 - sum(p.values()))])
    qa = np.array([q.get(k, 0.0) for k in keys] + [max(0.0, 1 - sum(q.values()))])
    pa, qa = pa / pa.sum(), qa / qa.sum()
    m = (pa + qa) / 2

    def kl(a: np.ndarray) -> float:
        nz = a > 0
        return float((a[nz] * np.log(a[nz] / m[nz])).sum())

    return 0.5 * kl(pa) + 0.5 * kl(qa)


def mean_pairwise_js(dists: Sequence[Mapping[Any, float]]) -> float:
    pairs = list(itertools.combinations(dists, 2))
    return float(np.mean([js_divergence(a, b) for a, b in pairs])) if pairs else 0.0


def collapse_from_answers(
    answers: Sequence[Answer],
    *,
    threshold: float = 0.5,
    neutral: str | None = None,
    model_id: str = "",
    placement: str = "early",
) -> CollapseResult:
    """Per preference: modal answer share, divergences and collapse flags from ``answers``.

    A preference is *collapsed* when at least two personas give the modal answer and their share
    is >= ``threshold``. ``neutral`` (e.g. ``default``) gives the generic-bias probability.
    """
    personas = list(dict.fromkeys(a.persona for a in answers))
    keys = list(dict.fromkeys(a.key for a in answers))
    rows = []
    for key in keys:
        mine = [a for a in answers if a.key == key]
        per: dict[str, list[Answer]] = {p: [a for a in mine if a.persona == p] for p in personas}
        modal_of = {p: _modal([a.answer for a in rows_p]) for p, rows_p in per.items()}
        counts = Counter(v for v in modal_of.values() if v)  # "" = no answer found
        modal, n_modal = counts.most_common(1)[0] if counts else ("", 0)
        share = n_modal / len(personas)
        phrasings = list(dict.fromkeys(a.question for a in mine))
        token_js = float(
            np.mean([mean_pairwise_js([a.top for a in mine if a.question == q]) for q in phrasings])
        )
        span_js = mean_pairwise_js([_freq([a.answer for a in per[p]]) for p in personas])
        gp = float("nan")
        if neutral is not None and per.get(neutral):
            first = Counter(a.first_token for a in mine if a.answer == modal).most_common(1)
            if first:
                gp = float(np.mean([a.top.get(first[0][0], 0.0) for a in per[neutral]]))
        rows.append(
            QuestionCollapse(
                key=key,
                answers=modal_of,
                modal_answer=modal,
                modal_share=share,
                n_distinct=len(counts),
                token_js=token_js,
                span_js=span_js,
                collapsed=n_modal >= 2 and share >= threshold,
                collapsed_personas=[p for p in personas if modal and modal_of[p] == modal],
                distinct_personas=[p for p in personas if modal_of[p] and modal_of[p] != modal],
                generic_prob=gp,
                answered=sum(bool(a.answer) for a in mine) / len(mine),
            )
        )
    return CollapseResult(model_id, personas, rows, list(answers), threshold, placement)


def _modal(values: Sequence[str]) -> str:
    """The most frequent non-empty value (ties: the first seen); "" when all are empty."""
    counts = Counter(v for v in values if v)
    if not counts:
        return ""
    best = max(counts.values())
    return next(v for v in values if counts[v] == best)  # ties: first seen


def _freq(values: Sequence[str]) -> dict[str, float]:
    counts = Counter(values)
    return {k: c / len(values) for k, c in counts.items()}


def persona_collapse(
    lm: LoadedModel,
    personas: Sequence[Persona],
    items: Sequence[PreferenceItem],
    *,
    threshold: float = 0.5,
    neutral: str | None = None,
    placement: Placement = "early",
    max_new_tokens: int = 24,
    batch_size: int = 16,
    progress: bool = False,
) -> CollapseResult:
    """Generate every persona's answers to ``items`` and measure collapse per preference."""
    if len(personas) < 2:
        raise ValueError(f"collapse needs at least 2 personas, got {[p.name for p in personas]}")
    if neutral is None:
        names = [p.name for p in personas]
        found = neutral_personas(names, [p.category for p in personas])
        neutral = found[0] if found else None
    answers = generate_answers(
        lm,
        personas,
        items,
        placement=placement,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        progress=progress,
    )
    return collapse_from_answers(
        answers,
        threshold=threshold,
        neutral=neutral,
        model_id=lm.info.model_id,
        placement=placement,
    )
