"""Persona vectors equal a direct computation from output_hidden_states; metrics are right."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from personachat.model import LoadedModel, SiteError
from personachat.pipeline import extract_pairs, extract_vectors
from personachat.prompts import DatasetError, format_chat, from_json, persona_messages
from personachat.records import MEAN_BASELINE, QUANTILE_LEVELS
from personachat.vectors import (
    assistant_axis,
    auc_by_layer,
    cosine_matrix,
    difference_of_means,
    separation_by_layer,
)
from tests.conftest import tiny
from tests.tiny_data import DATASET, PERSONAS, QUESTIONS, REPLIES


def _unnormed(lm: LoadedModel) -> nn.Module:
    model = copy.deepcopy(lm.model)
    base = model.transformer if hasattr(model, "transformer") else model.model
    setattr(base, "ln_f" if hasattr(base, "ln_f") else "norm", nn.Identity())
    return model


def _direct_pooled(lm: LoadedModel, model: nn.Module, persona: str) -> torch.Tensor:
    """[n_questions, L, D] response-averaged block outputs, computed without any hook."""
    rows = []
    for q, r in zip(QUESTIONS, REPLIES[persona], strict=True):
        prompt = format_chat(lm.tokenizer, persona_messages(PERSONAS[persona], q))
        p_ids = lm.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        ids = lm.tokenizer(prompt + r, add_special_tokens=False)["input_ids"]
        assert ids[: len(p_ids)] == p_ids
        with torch.no_grad():
            out = model(input_ids=torch.tensor([ids]), output_hidden_states=True)
        hs = torch.stack(out.hidden_states[1:])[:, 0, len(p_ids) :]  # [L, n_response, D]
        rows.append(hs.mean(1).double())
    return torch.stack(rows)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2", "olmo2"])
def test_vectors_equal_direct_computation(arch: str) -> None:
    lm = tiny(arch)
    res = extract_vectors(lm, DATASET, baseline="default", batch_size=4, progress=False)
    model = _unnormed(lm)
    pooled = {n: _direct_pooled(lm, model, n) for n in PERSONAS}
    base = pooled["default"].mean(0)
    assert [v.persona for v in res.vectors] == ["pirate", "chef"]
    for v in res.vectors:
        want = pooled[v.persona].mean(0) - base
        assert v.vector.shape == (lm.sites.n_layers, lm.sites.hidden_size)
        assert (v.vector.double() - want).abs().max() < 1e-5
        cos = torch.nn.functional.cosine_similarity(v.vector.double(), want, dim=-1)
        assert cos.min() > 0.9999
        # metrics from the directly computed per-sample projections
        unit = want / want.norm(dim=-1, keepdim=True)
        pos = torch.einsum("nld,ld->nl", pooled[v.persona], unit).numpy()
        neg = torch.einsum("nld,ld->nl", pooled["default"], unit).numpy()
        assert v.metrics is not None
        for layer in range(lm.sites.n_layers):
            labels = [1] * len(pos) + [0] * len(neg)
            auc = roc_auc_score(labels, np.r_[pos[:, layer], neg[:, layer]])
            assert abs(float(v.metrics.auc[layer]) - auc) < 1e-6
        pooled_std = np.sqrt((pos.var(0, ddof=1) + neg.var(0, ddof=1)) / 2)
        sep = (pos.mean(0) - neg.mean(0)) / pooled_std
        assert np.allclose(v.metrics.separation.numpy(), sep, rtol=1e-4)
        assert np.allclose(v.metrics.norm.numpy(), want.norm(dim=-1).numpy(), rtol=1e-5)
        # the reference readouts are calibrated against: quantiles of the same projections
        assert v.quantiles is not None
        levels = np.asarray(QUANTILE_LEVELS)
        want_q = np.quantile(pos, levels, axis=0).T
        assert np.allclose(v.quantiles.persona.numpy(), want_q, atol=1e-5)
        assert np.allclose(
            v.quantiles.baseline.numpy(), np.quantile(neg, levels, axis=0).T, atol=1e-5
        )
        assert (v.quantiles.n_persona, v.quantiles.n_baseline) == (len(pos), len(neg))
        assert v.metrics.best_layer == max(
            range(lm.sites.n_layers),
            key=lambda la: (float(v.metrics.auc[la]), float(v.metrics.separation[la])),  # type: ignore[union-attr]
        )
    means = {m.persona: m for m in res.means}
    assert means["default"].n_samples == 3
    assert (means["chef"].mean.double() - pooled["chef"].mean(0)).abs().max() < 1e-5
    assert [r.persona for r in res.summary] == ["pirate", "chef"]


def test_mean_baseline_and_layer_subset(llama: LoadedModel) -> None:
    res = extract_vectors(
        llama, DATASET, baseline=MEAN_BASELINE, layers=[1], positions="prompt_last", progress=False
    )
    assert [v.persona for v in res.vectors] == ["default", "pirate", "chef"]
    stacked = torch.stack([m.mean for m in res.means])
    for v in res.vectors:
        assert v.baseline == MEAN_BASELINE and v.positions == "prompt_last"
        assert v.metrics is not None and v.metrics.best_layer == 1
        assert torch.count_nonzero(v.vector[[0, 2]]) == 0
        own = next(m.mean for m in res.means if m.persona == v.persona)
        assert torch.allclose(v.vector, own - stacked.mean(0), atol=1e-6)
    # the mean-baseline vectors sum to zero
    assert torch.stack([v.vector for v in res.vectors]).sum(0).abs().max() < 1e-5


def test_bad_requests_fail_before_any_work(llama: LoadedModel) -> None:
    with pytest.raises(DatasetError, match="unknown persona 'ghost'"):
        extract_vectors(llama, DATASET, personas=["ghost"], progress=False)
    with pytest.raises(DatasetError, match="unknown persona 'nobody'"):
        extract_vectors(llama, DATASET, baseline="nobody", progress=False)
    with pytest.raises(SiteError, match="layer 9 is out of range"):
        extract_vectors(llama, DATASET, layers=[9], progress=False)
    with pytest.raises(ValueError, match="unknown positions"):
        extract_vectors(llama, DATASET, positions="everywhere", progress=False)


def test_metric_math_on_known_numbers() -> None:
    pos = np.array([[3.0, 1.0], [4.0, 0.0], [5.0, 2.0]])
    neg = np.array([[1.0, 1.0], [2.0, 3.0], [3.5, 2.0]])
    # Mann-Whitney by hand: layer 0 has 8 wins of 9 pairs; layer 1: 1 win + 2 ties (1/2) = 2 of 9
    assert np.allclose(auc_by_layer(pos, neg), [8 / 9, 2 / 9])
    sd0 = np.sqrt((np.var([3, 4, 5], ddof=1) + np.var([1, 2, 3.5], ddof=1)) / 2)
    assert np.isclose(separation_by_layer(pos, neg)[0], (4 - 6.5 / 3) / sd0)
    assert np.allclose(separation_by_layer(pos[:, :1] * 0, neg[:, :1] * 0), [0.0])
    means = torch.tensor([[[1.0, 0.0]], [[3.0, 2.0]], [[2.0, 4.0]]])
    vecs = difference_of_means(means, ["a", "b", "c"], "a")
    assert list(vecs) == ["b", "c"] and torch.equal(vecs["c"], torch.tensor([[1.0, 4.0]]))
    mean_vecs = difference_of_means(means, ["a", "b", "c"], MEAN_BASELINE)
    assert torch.allclose(mean_vecs["a"], torch.tensor([[-1.0, -2.0]]))
    with pytest.raises(ValueError, match="baseline 'z' is not among"):
        difference_of_means(means, ["a", "b", "c"], "z")


def test_assistant_axis_and_cosine() -> None:
    vecs = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0], [0.0, 4.0]])
    axis = assistant_axis(vecs, ["neutral", "neutral", "creative", "fantastical"])
    assert torch.equal(axis, torch.tensor([2.0, -3.0]))
    sims = cosine_matrix(vecs)
    assert torch.allclose(sims.diagonal(), torch.ones(4))
    centered = vecs - vecs.mean(0)
    want = torch.nn.functional.cosine_similarity(centered[0], centered[2], dim=0)
    assert torch.isclose(sims[0, 2], want)
    with pytest.raises(ValueError, match="needs neutral and role personas"):
        assistant_axis(vecs, ["creative"] * 4)


def test_pair_vectors_are_high_minus_low(llama: LoadedModel) -> None:
    data = DATASET.to_json()
    data["pairs"] = [
        {"name": "pirate_default", "high": "pirate", "low": "default", "kind": "style"},
        {"name": "chef_pirate", "high": "chef", "low": "pirate", "kind": "style"},
    ]
    ds = from_json(data)
    res = extract_pairs(llama, ds, positions="prompt_avg", progress=False)
    assert [(v.persona, v.baseline) for v in res.vectors] == [
        ("pirate", "default"),
        ("chef", "pirate"),
    ]
    means = extract_vectors(
        llama, ds, positions="prompt_avg", baseline=MEAN_BASELINE, progress=False
    ).means
    mean_of = {m.persona: m.mean for m in means}
    assert torch.allclose(res.vectors[1].vector, mean_of["chef"] - mean_of["pirate"], atol=1e-5)
    with pytest.raises(DatasetError, match="unknown pair 'nope'"):
        extract_pairs(llama, ds, ["nope"], progress=False)
