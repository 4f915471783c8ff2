"""Neuron scorers: one small function per scoring method, looked up by name in ``SCORERS``.

A scorer reads a ``Scoring`` (the model, this process's samples, the contrast pairs, the site and
layers) and returns ``Scores``: per pair, a score per unit [L, W], the values a mean ablation of
the unit patches in [L, W] and, where the method orders the set itself, that order. Its
``Scorer`` entry says what samples it reads. What each method measures is told in
``personachat.neurons``, which holds the math; a scorer sums over processes and pairs it up.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from personachat.activations import CaptureSpec, Dist, Sample, capture
from personachat.hooks import Site
from personachat.model import LoadedModel
from personachat.neurons import (
    attribution_sums,
    exact_selection,
    patching_scores,
    patching_sums,
    standardized_effect,
)
from personachat.prompts import ContrastPair


@dataclass(frozen=True)
class Scoring:
    """What a scorer is given: samples of every persona in ``names`` (indexed as there)."""

    lm: LoadedModel
    samples: list[Sample]
    names: list[str]
    pairs: list[ContrastPair]
    site: Site
    layers: tuple[int, ...]
    positions: tuple[str, ...]
    k: int
    batch_size: int
    progress: bool
    dist: Dist

    def index(self) -> list[tuple[int, int]]:
        """(high, low) persona indices of every pair."""
        return [(self.names.index(p.high), self.names.index(p.low)) for p in self.pairs]


@dataclass
class Scores:
    """Per pair name: scores [L, W], the units' means [L, W] and, maybe, the set's order."""

    scores: dict[str, torch.Tensor] = field(default_factory=dict)
    means: dict[str, torch.Tensor] = field(default_factory=dict)
    orders: dict[str, list[tuple[int, int]]] = field(default_factory=dict)


@dataclass(frozen=True)
class Scorer:
    """A scoring method: its function and the samples it reads."""

    score: Callable[[Scoring], Scores]
    replies: bool = False  # reads the personas' own replies, whatever the positions asked
    decision: bool = False  # reads every persona's reply to each question: splits questions itself
    everyone: bool = False  # every other persona of the dataset checks that a unit is specific


def score_effect(run: Scoring) -> Scores:
    """Cohen's d of each unit's pooled activation, high vs low; means: the pair's midpoint."""
    spec = CaptureSpec(
        layers=run.layers, positions=run.positions, site=run.site, spill=False, squares=True
    )
    out = Scores()
    with capture(
        run.lm,
        run.samples,
        spec,
        len(run.names),
        batch_size=run.batch_size,
        progress=run.progress,
        desc="neuron activations",
    ) as cap:
        cap.reduce(run.dist)
        mean = cap.means()[0]
        n = cap.counts.clamp(min=1).double()[:, None, None]
        assert cap.sq_sums is not None
        sq = cap.sq_sums[0] / n
        for pair, (h, lo) in zip(run.pairs, run.index(), strict=True):
            out.scores[pair.name] = standardized_effect(
                mean[h], sq[h], int(cap.counts[h]), mean[lo], sq[lo], int(cap.counts[lo])
            ).float()
            out.means[pair.name] = ((mean[h] + mean[lo]) / 2).float()
    return out


def score_attribution(run: Scoring) -> Scores:
    """Mean attribution of the high persona minus the low's; means: the pair's midpoint."""
    attr, acts, counts = attribution_sums(
        run.lm,
        run.samples,
        run.site,
        run.layers,
        len(run.names),
        batch_size=run.batch_size,
        progress=run.progress,
    )
    dist = run.dist
    attr, acts, counts = dist.all_reduce(attr), dist.all_reduce(acts), dist.all_reduce(counts)
    n = counts.clamp(min=1).double()[:, None, None]
    attr_mean, act_mean = attr / n, acts / n
    out = Scores()
    for pair, (h, lo) in zip(run.pairs, run.index(), strict=True):
        out.scores[pair.name] = (attr_mean[h] - attr_mean[lo]).float()
        out.means[pair.name] = ((act_mean[h] + act_mean[lo]) / 2).float()
    return out


def score_patching(run: Scoring) -> Scores:
    """Attribution patching at the last prompt token; means: the low persona's values there."""
    index = run.index()
    products, diffs, act_sums, count = patching_sums(
        run.lm,
        run.samples,
        index,
        run.site,
        run.layers,
        len(run.names),
        batch_size=run.batch_size,
        progress=run.progress,
        dist=run.dist,
    )
    dist = run.dist
    products, diffs = dist.all_reduce(products), dist.all_reduce(diffs)
    act_sums, count = dist.all_reduce(act_sums), dist.all_reduce(count)
    pair_scores = patching_scores(products, diffs, count)
    out = Scores()
    for j, pair in enumerate(run.pairs):
        out.scores[pair.name] = pair_scores[j]
        out.means[pair.name] = (act_sums[index[j][1]] / count.clamp(min=1)).float()
    return out


def score_exact(run: Scoring) -> Scores:
    """Exact patching unit by unit, the set ordered greedily; means: the low persona's values."""
    scores, orders, means = exact_selection(
        run.lm,
        run.samples,
        run.index(),
        run.site,
        run.layers,
        len(run.names),
        k=run.k,
        progress=run.progress,
        dist=run.dist,
    )
    out = Scores()
    for j, pair in enumerate(run.pairs):
        out.scores[pair.name], out.means[pair.name] = scores[j], means[j]
        out.orders[pair.name] = orders[j]
    return out


SCORERS: dict[str, Scorer] = {
    "effect": Scorer(score_effect),
    "attribution": Scorer(score_attribution, replies=True),
    "patching": Scorer(score_patching, replies=True, decision=True),
    "exact": Scorer(score_exact, replies=True, decision=True, everyone=True),
}


def scorer(method: str) -> Scorer:
    """The scorer of ``method``; an error names the methods there are."""
    if method not in SCORERS:
        *first, last = (repr(name) for name in SCORERS)
        raise ValueError(f"unknown method {method!r}; use {', '.join(first)} or {last}")
    return SCORERS[method]
