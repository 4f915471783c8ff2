"""Neuron ablation under persona P's own prompt: P's top-k units of each neuron method against k
random units at the same layers, with other personas under their own prompts and P's units
ablated."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm import tqdm

from personachat.cli.evaluate_demo.config import EvalConfig
from personachat.cli.evaluate_demo.replies import Asker, Score, ablate_plan, cut
from personachat.interventions import AblationMode, AblationSpec, PositionMode
from personachat.pipeline import find_neurons
from personachat.prompts import PersonaDataset
from personachat.records import NeuronSet

# How each neuron method's sets are meant to be ablated (``personachat.neurons``): exact and
# patching sets are set to the baseline persona's values on the prompt, where the persona is
# decided (exact sets at its last token, where they were chosen, and on the whole prompt too).
NEURON_ABLATION: dict[str, tuple[tuple[AblationMode, PositionMode, int | None], ...]] = {
    "exact": (("mean", "prompt", 1), ("mean", "prompt", None)),
    "patching": (("mean", "prompt", None),),
    "attribution": (("zero", "all", None),),
    "effect": (("zero", "all", None),),
}


@dataclass(frozen=True)
class Setting:
    """One way to ablate one method's units: the mode, and where (``last_n``: the prompt's last
    tokens only)."""

    method: str
    mode: AblationMode
    positions: PositionMode
    last_n: int | None

    @property
    def label(self) -> str:
        placed = f"last {self.last_n} prompt" if self.last_n else self.positions
        return f"{self.mode} at {placed} positions"

    def spec(self, neuron_set: str) -> AblationSpec:
        """Ablate the registered neuron set labelled ``neuron_set`` this way."""
        return AblationSpec(
            neuron_set, mode=self.mode, positions=self.positions, last_n=self.last_n
        )


def subset(nset: NeuronSet, picks: Sequence[int], label: str) -> NeuronSet:
    """The entries ``picks`` of ``nset`` (units with their scores and baseline means)."""
    means = None if nset.means is None else [nset.means[i] for i in picks]
    return NeuronSet(
        nset.model_id,
        label,
        nset.site,
        [nset.layers[i] for i in picks],
        [nset.indices[i] for i in picks],
        [nset.scores[i] for i in picks],
        method=nset.method,
        means=means,
    )


def random_like(nset: NeuronSet, k: int, seed: int) -> NeuronSet:
    """k random units at the same layers as the top k, none of them in the top k.

    ``nset`` ranks every unit, so the random ones come with their baseline means too.
    """
    gen = torch.Generator().manual_seed(seed)
    rest: dict[int, list[int]] = {}
    for i in range(k, len(nset)):
        rest.setdefault(nset.layers[i], []).append(i)
    picks = []
    for layer in nset.layers[:k]:
        pool = rest[layer]
        picks.append(pool.pop(int(torch.randint(len(pool), (1,), generator=gen))))
    return subset(nset, picks, f"random{k}")


def ranked_sets(
    ask: Asker, data: PersonaDataset, targets: Sequence[str], methods: Sequence[str]
) -> dict[str, dict[str, NeuronSet]]:
    """Per method and contrast pair ``{target}_vs_default``: every unit ranked (random units
    need their baseline means too)."""
    pairs = [p for p in data.pairs if p.high in targets]
    every = ask.lm.info.n_layers * ask.lm.info.mlp_width
    sets: dict[str, dict[str, NeuronSet]] = {}
    for method in methods:
        found = find_neurons(ask.lm, pairs, method=method, k=every, dataset=data, batch_size=16)
        sets[method] = {s.pairs[0]: s for s in found if len(s.pairs) == 1}
    return sets


def neuron_ablation(
    ask: Asker, data: PersonaDataset, others: list[str], cfg: EvalConfig
) -> list[dict[str, Any]]:
    """One row per target, method, ablation setting and k (``effect``: the largest k only);
    ``others``: the personas checked besides the target, in order."""
    targets, methods = cfg.target_names, cfg.method_names
    sets = ranked_sets(ask, data, targets, methods)
    settings = [Setting(m, *how) for m in methods for how in NEURON_ABLATION[m]]
    rows: list[dict[str, Any]] = []
    for target in tqdm(targets, desc="ablation"):
        base, _ = ask.measure(target)
        checked = [p for p in others if p != target][: cfg.others]
        for setting in settings:
            full = sets[setting.method][f"{target}_vs_default"]  # keyed by contrast pair
            ks = cfg.k_values if setting.method != "effect" else [max(cfg.k_values)]
            for k in ks:
                rows.append(neuron_row(ask, target, base, full, setting, k, checked, cfg.seed))
    return rows


def neuron_row(
    ask: Asker,
    target: str,
    base: Score,
    full: NeuronSet,
    setting: Setting,
    k: int,
    others: Sequence[str],
    seed: int,
) -> dict[str, Any]:
    """The top k units of ``full`` and k random ones, each ablated as ``setting`` says."""
    top = subset(full, range(k), f"top{k}")
    rand = random_like(full, k, seed + k)
    plans = {s.label: ablate_plan(ask.lm, {s.label: s}, setting.spec(s.label)) for s in (top, rand)}
    sc, _ = ask.measure(target, plans[top.label])
    rsc, _ = ask.measure(target, plans[rand.label])
    kept = ask.kept_by_others(others, plans[top.label])
    return {
        "persona": target,
        "method": setting.method,
        "ablation": setting.label,
        "k": k,
        "markers_before": base.markers,
        "markers_top": sc.markers,
        "facts_top": sc.facts,
        "markers_random": rsc.markers,
        "facts_random": rsc.facts,
        "cut_top": cut(base.markers, sc.markers),
        "cut_random": cut(base.markers, rsc.markers),
        "others_min": min(kept.values()),
        "others": kept,
        "layers": sorted(set(top.layers)),
        "units": [f"{la}:{i}" for la, i in zip(top.layers, top.indices, strict=True)][:8],
    }
