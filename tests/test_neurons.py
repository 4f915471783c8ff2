"""Neuron scores equal direct computations (effect sizes, finite differences); ranks are right."""

from __future__ import annotations

import copy
from collections.abc import Iterable

import numpy as np
import pytest
import torch

from personachat.hooks import Site, intervene
from personachat.model import LoadedModel, wrap_model
from personachat.neurons import neuron_sets, ranks, top_units
from personachat.pipeline import SCORERS, find_neurons
from personachat.prompts import ContrastPair, format_chat, persona_messages
from personachat.records import NEURON_METHODS
from tests.conftest import tiny
from tests.tiny_data import DATASET, PERSONAS, QUESTIONS, REPLIES


def _ids(lm: LoadedModel, persona: str, i: int) -> tuple[list[int], int]:
    prompt = format_chat(lm.tokenizer, persona_messages(PERSONAS[persona], QUESTIONS[i]))
    p_ids = lm.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    ids = lm.tokenizer(prompt + REPLIES[persona][i], add_special_tokens=False)["input_ids"]
    return ids, len(p_ids)


class _Record:
    def __init__(self, site: Site, layers: list[int], scale: dict[tuple[int, int], float]) -> None:
        self.site, self.layers, self.scale = site, layers, scale
        self.seen: dict[int, torch.Tensor] = {}

    def wants(self) -> Iterable[tuple[Site, int]]:
        return [(self.site, la) for la in self.layers]

    def __call__(self, site: Site, layer: int, x: torch.Tensor) -> torch.Tensor | None:
        self.seen[layer] = x.detach().clone()
        if not self.scale:
            return None
        x = x.clone()
        for (la, unit), factor in self.scale.items():
            if la == layer:
                x[..., unit] = x[..., unit] * factor
        return x


@pytest.mark.parametrize(("arch", "site"), [("llama", "gate"), ("gpt2", "mlp_hidden")])
def test_effect_equals_per_sample_cohens_d(arch: str, site: Site) -> None:
    lm = tiny(arch)
    sets = find_neurons(lm, DATASET, [0, 2], site, "effect", 5, batch_size=4, progress=False)
    assert [s.label for s in sets] == [
        f"pirate_default.{site}.effect",
        f"chef_default.{site}.effect",
        f"style.{site}.effect",
    ]
    pooled: dict[str, dict[int, list[torch.Tensor]]] = {}
    for persona in ("pirate", "default"):
        for i in range(len(QUESTIONS)):
            ids, n_prompt = _ids(lm, persona, i)
            rec = _Record(site, [0, 2], {})
            with intervene(lm.sites, [rec]), torch.no_grad():
                lm.model(input_ids=torch.tensor([ids]))
            for la, x in rec.seen.items():
                pooled.setdefault(persona, {}).setdefault(la, []).append(x[0, n_prompt:].mean(0))
    first = sets[0]
    for j in range(len(first)):
        la, unit = first.layers[j], first.indices[j]
        hi = np.array([float(v[unit]) for v in pooled["pirate"][la]])
        lo = np.array([float(v[unit]) for v in pooled["default"][la]])
        sd = np.sqrt((hi.var(ddof=1) + lo.var(ddof=1)) / 2)
        assert abs(first.scores[j] - (hi.mean() - lo.mean()) / sd) < 1e-3 * max(
            1, abs(first.scores[j])
        )
        assert first.means is not None
        assert abs(first.means[j] - (hi.mean() + lo.mean()) / 2) < 1e-5
    assert sorted(np.abs(first.scores), reverse=True) == list(np.abs(first.scores))


def _reply_logprob(lm: LoadedModel, persona: str, scale: dict[tuple[int, int], float]) -> float:
    total = 0.0
    for i in range(len(QUESTIONS)):
        ids, n_prompt = _ids(lm, persona, i)
        with intervene(lm.sites, [_Record("mlp_hidden", [1], scale)]), torch.no_grad():
            logits = lm.model(input_ids=torch.tensor([ids])).logits[0]
        logp = torch.log_softmax(logits.double(), -1)
        total += float(sum(logp[t - 1, ids[t]] for t in range(n_prompt, len(ids))))
    return total / len(QUESTIONS)


def test_attribution_equals_finite_difference() -> None:
    # GPT-2 in float64 is float64 throughout (Llama's RMSNorm computes in float32), so central
    # differences are exact to ~1e-9 and can check the gradient tightly.
    base = tiny("gpt2")
    lm = wrap_model(copy.deepcopy(base.model).double(), base.tokenizer, "tiny-gpt2-f64")
    sets = find_neurons(lm, DATASET, [1], "mlp_hidden", "attribution", 3, progress=False)
    top = sets[0]
    assert top.label == "pirate_default.mlp_hidden.attribution"
    eps = 1e-4
    for j in range(2):
        key = (top.layers[j], top.indices[j])

        def slope(persona: str, key: tuple[int, int] = key) -> float:
            up = _reply_logprob(lm, persona, {key: 1 + eps})
            down = _reply_logprob(lm, persona, {key: 1 - eps})
            return (up - down) / (2 * eps)

        want = slope("pirate") - slope("default")
        assert abs(top.scores[j] - want) < 1e-5 * max(1.0, abs(want)), (top.scores[j], want)
        assert abs(want) > 1e-3  # a unit that matters
    assert top.scores == sorted(top.scores, reverse=True)


def test_ranks_and_cross_pair_stability() -> None:
    a = torch.tensor([[5.0, 1.0, 0.0], [4.0, 3.0, 2.0]])
    b = torch.tensor([[0.0, 1.0, 9.0], [8.0, 2.0, 7.0]])
    assert ranks(a, by_abs=False).tolist() == [[0, 4, 5], [1, 2, 3]]
    assert top_units(b, 2, by_abs=False) == [(0, 2), (1, 0)]
    assert top_units(-b, 1, by_abs=True) == [(0, 2)]
    pairs = [ContrastPair("pa", "x", "y", "k"), ContrastPair("pb", "z", "y", "k")]
    zeros = torch.zeros(2, 3)
    sets = neuron_sets(
        model_id="m",
        site="gate",
        method="attribution",
        layers=[4, 9],
        pairs=pairs,
        scores={"pa": a, "pb": b},
        means={"pa": zeros, "pb": zeros + 1},
        k=2,
    )
    pa, pb, kind = sets
    assert (pa.layers, pa.indices) == ([4, 9], [0, 0])
    assert pa.ranks == {"pa": [0, 1], "pb": [5, 1]}
    assert pa.stability == [0.5, 1.0]
    assert pb.ranks == {"pa": [5, 1], "pb": [0, 1]}
    # unit 9:0 is in both pairs' top 2 (rank 1 in each): first across the kind
    assert kind.label == "k.gate.attribution"
    assert (kind.layers, kind.indices) == ([9, 4], [0, 0])
    assert kind.ranks == {"pa": [1, 0], "pb": [1, 5]}
    assert kind.stability == [1.0, 0.5]
    assert kind.means == [0.5, 0.5]


def test_bad_neuron_requests(llama: LoadedModel) -> None:
    gpt2 = tiny("gpt2")
    with pytest.raises(ValueError, match="no separate gate projection"):
        find_neurons(gpt2, DATASET, [0], "gate", "effect", 4, progress=False)
    with pytest.raises(ValueError, match="unknown method"):
        find_neurons(llama, DATASET, [0], "mlp_hidden", "magic", 4, progress=False)
    with pytest.raises(ValueError, match="unknown neuron site"):
        find_neurons(llama, DATASET, [0], "residual", "effect", 4, progress=False)
    with pytest.raises(ValueError, match="out of range"):
        find_neurons(llama, DATASET, [3], "mlp_hidden", "effect", 4, progress=False)


def test_every_neuron_method_has_a_scorer() -> None:
    assert set(SCORERS) == set(NEURON_METHODS) - {"imported"}


class _SetUnit:
    """Records the site at the last position and, optionally, sets one unit there to a value."""

    def __init__(self, layers: list[int], unit: tuple[int, int] | None, value: float = 0.0) -> None:
        self.layers, self.unit, self.value = layers, unit, value
        self.seen: dict[int, torch.Tensor] = {}

    def wants(self) -> Iterable[tuple[Site, int]]:
        return [("mlp_hidden", la) for la in self.layers]

    def __call__(self, site: Site, layer: int, x: torch.Tensor) -> torch.Tensor | None:
        self.seen[layer] = x[0, -1].detach().clone()
        if self.unit is None or self.unit[0] != layer:
            return None
        out = x.clone()
        out[0, -1, self.unit[1]] = self.value
        return out


def _opener_logodds(
    lm: LoadedModel, persona: str, i: int, handler: _SetUnit, own: str = "pirate"
) -> float:
    """Log-odds at the last prompt token of opening with any first token of ``own``'s replies."""
    openers = sorted({_ids(lm, own, q)[0][_ids(lm, own, q)[1]] for q in range(3)})
    ids, n_prompt = _ids(lm, persona, i)
    with torch.no_grad(), intervene(lm.sites, [handler]):
        logits = lm.model(input_ids=torch.tensor([ids[:n_prompt]])).logits[0, -1].double()
    logp = torch.log_softmax(logits, -1)
    rest = torch.ones_like(logp, dtype=torch.bool)
    rest[openers] = False
    return float(logp[openers].logsumexp(0) - logp[rest].logsumexp(0))


def test_patching_equals_a_finite_difference_towards_the_low_persona() -> None:
    """Score = mean over questions of (a_high - a_low) x d logodds / d a at the last prompt token:
    the slope of the log-odds when the unit moves from its high value towards its low value."""
    base = tiny("gpt2")
    lm = wrap_model(copy.deepcopy(base.model).double(), base.tokenizer, "tiny-gpt2-f64")
    width = lm.info.mlp_width
    sets = find_neurons(lm, DATASET, [0, 1], "mlp_hidden", "patching", 2 * width, progress=False)
    pirate = sets[0]
    assert pirate.label == "pirate_default.mlp_hidden.patching" and pirate.means is not None
    acts = {}
    for persona in ("pirate", "default"):
        rows = []
        for i in range(3):
            rec = _SetUnit([0, 1], None)
            _opener_logodds(lm, persona, i, rec)
            rows.append(torch.stack([rec.seen[0], rec.seen[1]]))
        acts[persona] = torch.stack(rows)  # [question, layer, unit]
    position = {
        (la, ix): j for j, (la, ix) in enumerate(zip(pirate.layers, pirate.indices, strict=True))
    }
    diff = acts["pirate"] - acts["default"]
    eps = 1e-4
    checked = 0
    for j in range(6):  # the top units, and units the pirate does not turn up score 0
        layer, index = pirate.layers[j], pirate.indices[j]
        slopes = []
        for i in range(3):
            a_h, d = float(acts["pirate"][i, layer, index]), float(diff[i, layer, index])
            up = _opener_logodds(lm, "pirate", i, _SetUnit([0, 1], (layer, index), a_h + eps * d))
            down = _opener_logodds(lm, "pirate", i, _SetUnit([0, 1], (layer, index), a_h - eps * d))
            slopes.append((up - down) / (2 * eps))
        want = sum(slopes) / 3 if float(diff[:, layer, index].mean()) > 0 else 0.0
        assert abs(pirate.scores[j] - want) < 1e-5 * max(1.0, abs(want)), (
            j,
            pirate.scores[j],
            want,
        )
        checked += abs(want) > 1e-4
        # the stored mean is the low persona's value there: what mean ablation patches in
        low = float(acts["default"][:, layer, index].mean())
        assert abs(pirate.means[j] - low) < 1e-6 * max(1.0, abs(low))  # stored as float32
    assert checked >= 3
    down_units = (diff.mean(0) <= 0).nonzero().tolist()
    assert down_units and all(pirate.scores[position[(la, ix)]] == 0.0 for la, ix in down_units)


@pytest.mark.slow
def test_exact_effects_equal_patching_each_unit_by_hand() -> None:
    """Score = (drop of pirate's own-opener log-odds) - (drop of chef's), each unit set to the
    default's mean at the last prompt token; the first unit of the set is the greedy best."""
    base = tiny("gpt2")
    lm = wrap_model(copy.deepcopy(base.model).double(), base.tokenizer, "tiny-gpt2-f64")
    width = lm.info.mlp_width
    sets = find_neurons(lm, DATASET, [0, 1], "mlp_hidden", "exact", 2 * width, progress=False)
    pirate = sets[0]
    assert pirate.label == "pirate_default.mlp_hidden.exact" and pirate.means is not None
    units = list(zip(pirate.layers, pirate.indices, strict=True))
    assert len(set(units)) == 2 * width  # every unit, greedy picks first, then by score
    low = []
    for i in range(3):
        rec = _SetUnit([0, 1], None)
        _opener_logodds(lm, "default", i, rec)
        low.append(torch.stack([rec.seen[0], rec.seen[1]]))
    mean = torch.stack(low).mean(0)  # the default's mean at the last prompt token [layer, unit]
    clean = {
        p: [_opener_logodds(lm, p, i, _SetUnit([0, 1], None), own=p) for i in range(3)]
        for p in ("pirate", "chef")
    }

    def patched(p: str, layer: int, index: int) -> list[float]:
        value = float(mean[layer, index])
        return [
            _opener_logodds(lm, p, i, _SetUnit([0, 1], (layer, index), value), own=p)
            for i in range(3)
        ]

    def drop(p: str, layer: int, index: int) -> float:
        return sum(c - v for c, v in zip(clean[p], patched(p, layer, index), strict=True)) / 3

    by_score = sorted(range(len(units)), key=lambda j: -pirate.scores[j])
    for j in [*range(4), *by_score[:4]]:
        layer, index = pirate.layers[j], pirate.indices[j]
        want = drop("pirate", layer, index) - drop("chef", layer, index)
        assert abs(pirate.scores[j] - want) < 1e-6 * max(1.0, abs(want)), (j, pirate.scores[j])
        assert abs(pirate.means[j] - float(mean[layer, index])) < 1e-6  # stored as float32

    def loss(layer: int, index: int) -> float:  # neurons._exact_loss: margin 2, weight 2,
        hinge = torch.nn.functional.softplus  # the first objective (level 4.5)
        high = hinge(torch.tensor(patched("pirate", layer, index)) + 2).mean()
        chef = torch.tensor(patched("chef", layer, index))
        harm = (hinge(4.5 - chef) - hinge(4.5 - torch.tensor(clean["chef"]))).mean()
        return float(high + 2 * harm.clamp(min=0))

    first = loss(*units[0])  # the best of the candidates, which include the 16 best by score
    assert all(first <= loss(*units[j]) + 1e-9 for j in by_score[:16])
