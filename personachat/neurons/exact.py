"""The ``exact`` score: exact activation patching at the decision, unit by unit, and a set
chosen greedily with its units patched together.

Each unit is set to the low persona's mean at the last prompt token; its effect on a persona is
the drop of that persona's log-odds of opening its reply its own way (``decision.Decision``). A
unit's score for a pair is the drop for the high persona minus the mean drop for every other
persona. The set's order then starts with a greedy core: units patched together so that the high
persona stops opening its way while no other persona does. Slower than ``patching`` (a forward
per unit of the chosen layers) but not fooled where the log-odds is far from linear in a unit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import torch
from tqdm.auto import tqdm

from personachat.activations import Dist, Sample
from personachat.hooks import Site, intervene
from personachat.model import LoadedModel
from personachat.neurons.decision import Decision, by_persona

# The greedy objectives of ``exact_selection``: how far other personas may sink below their
# unpatched log-odds before it counts (a level), or None: only their distance below ``margin``
# counts, wherever they started. The first keeps units that lower other personas out; the
# second, more lenient, serves pairs where no unit is free of side effects.
OBJECTIVES: tuple[float | None, ...] = (4.5, None)


def _exact_loss(
    logodds: torch.Tensor,
    clean: torch.Tensor,
    high: int,
    others: Sequence[int],
    margin: float,
    weight: float,
    level: float | None,
) -> torch.Tensor:
    """How far the high persona still opens its own way (log-odds above ``-margin``), plus
    ``weight`` times the worst-hit other persona's loss: with a ``level``, how much further below
    it its log-odds went than without the patch (``clean``); without, how far below ``margin``
    it is. Softplus hinges averaged over the questions."""
    hinge = torch.nn.functional.softplus
    loss = hinge(logodds[high] + margin).mean()
    if others:
        rows = list(others)
        if level is None:
            harm = hinge(margin - logodds[rows]).mean(1)
        else:
            harm = (hinge(level - logodds[rows]) - hinge(level - clean[rows])).mean(1)
        loss = loss + weight * harm.max().clamp(min=0)
    return loss


def _flips(logodds: torch.Tensor, high: int, others: Sequence[int], margin: float) -> bool:
    """Whether the high persona opens otherwise on >= 3/4 of the questions while every other
    persona still opens its own way, with log-odds above ``margin / 2``, on >= 95% of them (the
    neuron floor at the decision, with room for questions not seen here)."""
    if float((logodds[high] < 0).double().mean()) < 0.75:
        return False
    return all(float((logodds[o] > margin / 2).double().mean()) >= 0.95 for o in others)


def exact_selection(
    lm: LoadedModel,
    samples: Sequence[Sample],
    pairs: Sequence[tuple[int, int]],
    site: Site,
    layers: Sequence[int],
    n_personas: int,
    *,
    k: int,
    n_questions: int = 16,
    greedy: int = 16,
    candidates: int = 32,
    margin: float = 2.0,
    weight: float = 2.0,
    spare: float = 0.1,
    progress: bool = True,
    dist: Dist | None = None,
) -> tuple[list[torch.Tensor], list[list[tuple[int, int]]], list[torch.Tensor]]:
    """Per pair: the units' specific effects [L, W], the chosen order of the top ``k`` and the
    low persona's values [L, W] (what the set's mean ablation patches in).

    Exact activation patching at the last prompt token, where the first token of the reply is
    chosen. One unit at a time is set to the low persona's mean there, over the first
    ``n_questions`` questions of every persona under its own prompt. A unit's effect on persona
    ``p`` is the drop of ``p``'s log-odds of opening its reply its own way; its score for the pair
    is the effect on the high persona minus the mean effect on the other personas (not the low
    one). Units are then picked greedily among the ``candidates`` best (by score and by effect),
    patched together, minimising ``_exact_loss``: the high persona must stop opening its way
    while the other personas keep theirs. The greedy run stops once ``_flips`` holds on these
    questions (the high persona opens otherwise on 3/4 of them, every other persona keeps its
    opener, with log-odds above ``margin / 2``, on 95%) or after ``greedy`` picks. Each
    objective of ``OBJECTIVES`` is tried; the fewest picks that got there are kept (else the
    first objective's). The set then goes on by score, units that alone lower another persona's
    log-odds by more than ``spare`` coming last: the greedy picks are the set's core (2 to 16
    units on the demo model), and longer prefixes add little.
    Costs one forward of every persona's prompts per unit of ``layers`` (per distinct low
    persona) and per greedy candidate. Under ``dist`` the units are shared out between the
    processes and their effects summed; the greedy picks, cheap, run on every process alike.
    """
    groups = by_persona(samples, n_personas)
    count = min(len(group) for group in groups)
    if count == 0:
        raise ValueError("exact patching needs every persona's reply to some question")
    decision = Decision(lm, groups, min(n_questions, count), site, layers)
    grid = [(slot, index) for slot in range(len(layers)) for index in range(lm.sites.mlp_width)]
    knobs = _Knobs(k, min(greedy, k), candidates, margin, weight, spare)
    with torch.inference_mode(), intervene(lm.sites, [decision.patch]):
        acts = decision.activations()
        clean = decision.run([], acts[0])
        lows = sorted({low for _, low in pairs})
        effects = _unit_effects(decision, grid, acts, lows, clean.mean(1), dist or Dist(), progress)
        scores, orders, means = [], [], []
        for high, low in tqdm(pairs, desc="greedy units", disable=not progress, unit="pair"):
            run = partial(decision.run_units, grid, acts[low].to(lm.device))
            score, order = _pair_order(run, effects[low], clean, high, low, knobs)
            scores.append(score.float())
            orders.append([grid[i] for i in order])
            means.append(acts[low].float())
    return scores, orders, means


@dataclass(frozen=True)
class _Knobs:
    """How a pair's set is picked (see ``exact_selection``)."""

    k: int
    steps: int  # greedy picks at most
    candidates: int
    margin: float
    weight: float
    spare: float


def _unit_effects(
    decision: Decision,
    grid: Sequence[tuple[int, int]],
    acts: torch.Tensor,
    lows: Sequence[int],
    base: torch.Tensor,
    dist: Dist,
    progress: bool,
) -> dict[int, torch.Tensor]:
    """Per low persona, every unit's effect [L, W, P]: the drop of each persona's mean log-odds
    (from ``base``) with the unit alone set to the low persona's value. The units are shared out
    between the processes and their effects summed."""
    lm = decision.lm
    shape = (len(decision.layers), lm.sites.mlp_width, decision.n_personas)
    mine = range(dist.rank, len(grid), dist.world)  # this process's share of the units
    effects: dict[int, torch.Tensor] = {}
    bar = tqdm(
        total=len(lows) * len(mine), desc="exact patching", disable=not progress, unit="unit"
    )
    for low in lows:
        values = acts[low].to(lm.device)
        eff = torch.zeros((len(grid), decision.n_personas), dtype=torch.float64)
        for i in mine:
            eff[i] = base - decision.run([grid[i]], values).mean(1)
            bar.update(1)
        effects[low] = dist.all_reduce(eff).view(*shape)
    bar.close()
    return effects


def _pair_order(
    run: Callable[[Sequence[int]], torch.Tensor],
    eff: torch.Tensor,
    clean: torch.Tensor,
    high: int,
    low: int,
    knobs: _Knobs,
) -> tuple[torch.Tensor, list[int]]:
    """The pair's scores [L, W] and the set's units (flat indices), best first: the greedy core,
    then the rest by score, units that alone lower another persona's log-odds by more than
    ``spare`` last, so that a longer prefix of the set still spares the others."""
    others = [p for p in range(eff.shape[-1]) if p not in (high, low)]
    score = eff[..., high] - (eff[..., others].mean(-1) if others else 0.0)
    flat_score, flat_eff = score.flatten(), eff[..., high].flatten()
    n = knobs.candidates
    pool = list(dict.fromkeys(_best(flat_score, n // 2) + _best(flat_eff, n)))[:n]
    chosen = _core(run, pool, clean, high, others, knobs)
    harm = eff[..., others].amax(-1).flatten() if others else torch.zeros_like(flat_score)
    taken = set(chosen)
    by_score = _best(flat_score)
    rest = [i for i in by_score if i not in taken and harm[i] <= knobs.spare]
    rest += [i for i in by_score if i not in taken and harm[i] > knobs.spare]
    return score, (chosen + rest)[: knobs.k]


def _best(values: torch.Tensor, n: int | None = None) -> list[int]:
    """Indices of the ``n`` largest ``values`` (all when ``None``), largest first, ties in order."""
    return torch.argsort(values, descending=True, stable=True)[:n].tolist()


def _core(
    run: Callable[[Sequence[int]], torch.Tensor],
    pool: Sequence[int],
    clean: torch.Tensor,
    high: int,
    others: Sequence[int],
    knobs: _Knobs,
) -> list[int]:
    """The greedy picks under each objective of ``OBJECTIVES``: the fewest that got there, else
    the first objective's."""
    tries = []  # (got there, picks) per objective
    for level in OBJECTIVES:
        loss = partial(
            _exact_loss,
            clean=clean,
            high=high,
            others=others,
            margin=knobs.margin,
            weight=knobs.weight,
            level=level,
        )
        done = partial(_flips, high=high, others=others, margin=knobs.margin)
        picked, met = _greedy(run, pool, knobs.steps, loss, done)
        tries.append((met, picked))
    reached = [picked for met, picked in tries if met]
    return min(reached, key=len) if reached else tries[0][1]


def _greedy(
    run: Callable[[Sequence[int]], torch.Tensor],
    pool: Sequence[int],
    steps: int,
    loss: Callable[[torch.Tensor], torch.Tensor],
    done: Callable[[torch.Tensor], bool],
) -> tuple[list[int], bool]:
    """Up to ``steps`` units of ``pool``, each the one whose addition gives the lowest ``loss``
    of ``run(units)``; stops early once ``done``. Returns the picks and whether it got there."""
    chosen: list[int] = []
    for _ in range(min(steps, len(pool))):
        best: tuple[float, int] | None = None
        for i in pool:
            if i in chosen:
                continue
            value = float(loss(run([*chosen, i])))
            if best is None or value < best[0]:
                best = (value, i)
        assert best is not None
        chosen.append(best[1])
        if done(run(chosen)):
            return chosen, True
    return chosen, False
