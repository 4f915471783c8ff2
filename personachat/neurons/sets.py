"""Neuron sets from scores: rank units, keep the top k per pair, and rank them across pairs.

A pair's set holds its ``k`` best units; a kind with two or more pairs gets a set of the units
most of its pairs have in their top k. Every unit keeps its rank (0 = best) in each pair of its
kind (``NeuronSet.ranks``) and the fraction of those pairs that have it in their top k
(``NeuronSet.stability``).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch

from personachat.prompts import ContrastPair
from personachat.records import NeuronSet


def rank_key(scores: torch.Tensor, by_abs: bool) -> torch.Tensor:
    return scores.abs() if by_abs else scores


def ranks(scores: torch.Tensor, by_abs: bool) -> torch.Tensor:
    """Rank of every unit (0 = best) in ``scores`` [L, W], flattened order kept."""
    flat = rank_key(scores, by_abs).flatten()
    order = torch.argsort(flat, descending=True, stable=True)
    out = torch.empty_like(order)
    out[order] = torch.arange(len(order))
    return out.view(scores.shape)


def top_units(scores: torch.Tensor, k: int, by_abs: bool) -> list[tuple[int, int]]:
    """(layer slot, unit index) of the ``k`` best units of ``scores`` [L, W], best first."""
    flat = rank_key(scores, by_abs).flatten()
    order = torch.argsort(flat, descending=True, stable=True)[:k]
    width = scores.shape[1]
    return [(int(i) // width, int(i) % width) for i in order]


def neuron_sets(
    *,
    model_id: str,
    site: str,
    method: str,
    layers: Sequence[int],
    pairs: Sequence[ContrastPair],
    scores: dict[str, torch.Tensor],
    means: dict[str, torch.Tensor],
    k: int,
    source: str = "",
    orders: dict[str, list[tuple[int, int]]] | None = None,
) -> list[NeuronSet]:
    """One set per pair, plus one per kind with two or more pairs (units ranked across pairs).

    A pair's set holds its top ``k`` units by score, or ``orders[pair]`` where a method chose
    them otherwise (``exact``: greedily, together).
    """
    by_abs = method == "effect"
    rank_of = {p.name: ranks(scores[p.name], by_abs) for p in pairs}
    kinds: dict[str, list[ContrastPair]] = {}
    for pair in pairs:
        kinds.setdefault(pair.kind or pair.name, []).append(pair)
    make = partial(
        _make_set,
        model_id=model_id,
        site=site,
        method=method,
        layers=layers,
        rank_of=rank_of,
        k=k,
        source=source,
    )
    out = []
    for pair in pairs:
        group = kinds[pair.kind or pair.name]
        units = (orders or {}).get(pair.name) or top_units(scores[pair.name], k, by_abs)
        out.append(make(pair.name, units, group, scores[pair.name], means[pair.name]))
    for kind, group in kinds.items():
        if len(group) >= 2:
            out.append(make(kind, *_across(group, scores, means, rank_of, k, by_abs)))
    return out


def _across(
    group: list[ContrastPair],
    scores: dict[str, torch.Tensor],
    means: dict[str, torch.Tensor],
    rank_of: dict[str, torch.Tensor],
    k: int,
    by_abs: bool,
) -> tuple[list[tuple[int, int]], list[ContrastPair], torch.Tensor, torch.Tensor]:
    """The kind's units (most pairs with it in their top k, then best mean rank), the group,
    and the scores and means averaged over its pairs."""
    stacked = torch.stack([rank_key(scores[g.name], by_abs) for g in group])
    mean_rank = torch.stack([rank_of[g.name] for g in group]).double().mean(0)
    in_top = torch.stack([rank_of[g.name] < k for g in group]).sum(0).double()
    key = in_top * 1e9 - mean_rank  # most pairs with it in the top k, then best mean rank
    units = top_units(key, k, by_abs=False)
    score = stacked.mean(0) if by_abs else torch.stack([scores[g.name] for g in group]).mean(0)
    mean = torch.stack([means[g.name] for g in group]).mean(0)
    return units, group, score, mean


def _make_set(
    label: str,
    units: list[tuple[int, int]],
    group: list[ContrastPair],
    score: torch.Tensor,
    mean: torch.Tensor,
    *,
    model_id: str,
    site: str,
    method: str,
    layers: Sequence[int],
    rank_of: dict[str, torch.Tensor],
    k: int,
    source: str,
) -> NeuronSet:
    """The set of ``units`` (layer slot, index), with their ranks in every pair of ``group``."""
    unit_ranks = {g.name: [int(rank_of[g.name][s, i]) for s, i in units] for g in group}
    stable = [sum(r[j] < k for r in unit_ranks.values()) / len(group) for j in range(len(units))]
    return NeuronSet(
        model_id=model_id,
        label=f"{label}.{site}.{method}",
        site=site,
        layers=[int(layers[s]) for s, _ in units],
        indices=[i for _, i in units],
        scores=[float(score[s, i]) for s, i in units],
        method=method,
        pairs=[g.name for g in group],
        means=[float(mean[s, i]) for s, i in units],
        ranks=unit_ranks,
        stability=stable,
        source=source,
    )
