"""Held-out metrics: k-fold across questions against a hand computation with scikit-learn; the
best layer under saturation; the in-sample fallback and its label; the shipped store still loads.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import KFold

from personachat.model import LoadedModel
from personachat.pipeline import extract_vectors, format_run, format_summary
from personachat.prompts import format_chat, from_json, persona_messages
from personachat.records import LayerMetrics
from personachat.store import Store
from personachat.vectors import choose_best_by, question_folds
from tests.conftest import tiny
from tests.tiny_data import DATASET

PERSONAS = {"default": "", "pirate": "You are a pirate.", "chef": "You are a chef."}
TOPICS = ["Paris", "the ocean", "numbers", "history", "cooking", "the stars", "maths"]
QUESTIONS = [f"Tell me about {t}." for t in TOPICS]
REPLIES = {
    "default": [f"Here is a plain fact about {t}." for t in TOPICS],
    "pirate": [f"Arr, {t} be grand, matey!" for t in TOPICS],
    "chef": [f"Salt, eggs and {t} for dinner." for t in TOPICS],
}
SEVEN = from_json(
    {
        "name": "seven",
        "personas": [{"name": n, "system_prompt": s} for n, s in PERSONAS.items()],
        "questions": QUESTIONS,
        "responses": [
            {"persona": n, "question": q, "response": r}
            for n, rs in REPLIES.items()
            for q, r in zip(QUESTIONS, rs, strict=True)
        ],
    }
)


def _pooled(lm: LoadedModel, persona: str) -> torch.Tensor:
    """[n_questions, L, D] each reply's mean block output, from output_hidden_states."""
    model = lm.model
    rows = []
    for q, r in zip(QUESTIONS, REPLIES[persona], strict=True):
        prompt = format_chat(lm.tokenizer, persona_messages(PERSONAS[persona], q))
        p_ids = lm.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        ids = lm.tokenizer(prompt + r, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            out = model(input_ids=torch.tensor([ids]), output_hidden_states=True)
        hs = torch.stack(out.hidden_states[1:-1])[:, 0, len(p_ids) :]  # layers 0..L-2 (no norm)
        rows.append(hs.mean(1).double())
    return torch.stack(rows)


def _hand(pooled: dict[str, torch.Tensor], persona: str, layer: int) -> tuple[list, list]:
    """Per-fold AUC and Cohen's d of ``persona`` vs default at ``layer``, by hand: KFold over
    the questions, the vector fit on the other folds, scored on this fold."""
    aucs, seps = [], []
    split = KFold(n_splits=3, shuffle=True, random_state=0).split(np.arange(len(QUESTIONS)))
    for fit, scored in split:
        vec = pooled[persona][fit, layer].mean(0) - pooled["default"][fit, layer].mean(0)
        unit = vec / vec.norm()
        pos = (pooled[persona][scored, layer] @ unit).numpy()
        neg = (pooled["default"][scored, layer] @ unit).numpy()
        aucs.append(roc_auc_score([1] * len(pos) + [0] * len(neg), np.r_[pos, neg]))
        sd = np.sqrt((pos.var(ddof=1) + neg.var(ddof=1)) / 2)
        seps.append((pos.mean() - neg.mean()) / sd)
    return aucs, seps


def test_heldout_metrics_equal_a_hand_computation() -> None:
    lm = tiny("llama")
    res = extract_vectors(lm, SEVEN, baseline="default", progress=False)
    assert list(question_folds(7)) == list(_folds(7, 3))  # 7 questions: 3 folds (2, 2 and 3)
    pooled = {n: _pooled(lm, n) for n in PERSONAS}
    for v in res.vectors:
        m = v.metrics
        assert m is not None and m.auc_heldout is not None and m.separation_heldout is not None
        assert m.auc_heldout_std is not None and m.separation_heldout_std is not None
        for layer in range(lm.sites.n_layers - 1):  # the last layer's states are normed here
            aucs, seps = _hand(pooled, v.persona, layer)
            assert float(m.auc_heldout[layer]) == pytest.approx(np.mean(aucs), abs=1e-6)
            assert float(m.auc_heldout_std[layer]) == pytest.approx(np.std(aucs), abs=1e-6)
            assert float(m.separation_heldout[layer]) == pytest.approx(np.mean(seps), rel=1e-3)
            assert float(m.separation_heldout_std[layer]) == pytest.approx(np.std(seps), rel=1e-3)
        assert m.best_by in ("auc_heldout", "separation_heldout")
        assert m.best_layer == _best(m.auc_heldout, m.separation_heldout)
    row, first = res.summary[0], res.vectors[0].metrics
    assert first is not None and first.auc_heldout is not None
    assert row.auc_heldout == pytest.approx(float(first.auc_heldout[row.best_layer]))
    assert "held out" in format_summary(res.summary) and not res.notes


def _folds(n: int, k: int) -> np.ndarray:
    fold = np.empty(n, dtype=np.int64)
    for f, (_, scored) in enumerate(KFold(k, shuffle=True, random_state=0).split(np.arange(n))):
        fold[scored] = f
    return fold


def _best(auc: torch.Tensor, sep: torch.Tensor) -> int:
    top = auc.max()
    return max((la for la in range(len(auc)) if auc[la] >= top - 1e-6), key=lambda la: sep[la])


def _metrics(auc: list[float], sep: list[float], held: bool, **kw: object) -> LayerMetrics:
    n = len(auc)
    a, s = torch.tensor(auc), torch.tensor(sep)
    extra = {"auc_heldout": a, "separation_heldout": s} if held else {}
    base = {"auc": a if not held else torch.full((n,), 1.0), "separation": s}
    return LayerMetrics(**base, norm=torch.ones(n), resid_norm=torch.ones(n), **extra, **kw)  # type: ignore[arg-type]


def test_saturated_auc_is_decided_by_separation() -> None:
    # held-out AUC 1.0 at three layers: separation chooses among them, and says so
    auc, sep = [0.9, 1.0, 1.0, 1.0, 0.7], [9.0, 2.0, 5.0, 3.0, 1.0]
    by = choose_best_by(torch.ones(5), torch.tensor(auc), torch.ones(5))
    assert by == "separation_heldout"
    assert _metrics(auc, sep, True, best_by=by).best_layer == 2
    # one layer on top: held-out AUC chooses
    auc2 = [0.9, 1.0, 0.95, 0.8, 0.7]
    assert choose_best_by(torch.ones(5), torch.tensor(auc2), torch.ones(5)) == "auc_heldout"
    assert _metrics(auc2, sep, True, best_by="auc_heldout").best_layer == 1
    # no held-out figures: the in-sample ones, with the same rule
    assert choose_best_by(torch.tensor(auc), None, torch.ones(5)) == "separation"
    assert _metrics(auc, sep, False, best_by="separation").best_layer == 2
    assert choose_best_by(torch.tensor(auc2), None, torch.ones(5)) == "auc"
    # layers without a vector (not captured: zero norm) are never chosen
    m = _metrics([1.0, 1.0, 1.0], [-3.0, -2.0, 0.0], True, best_by="separation_heldout")
    m.norm = torch.tensor([1.0, 1.0, 0.0])
    assert m.best_layer == 1
    with pytest.raises(ValueError, match="needs held-out metrics"):
        _ = _metrics(auc, sep, False, best_by="auc_heldout").best_layer
    with pytest.raises(ValueError, match="unknown best_by"):
        _ = _metrics(auc, sep, False, best_by="vibes").best_layer


def test_too_few_questions_fall_back_to_in_sample_with_a_label(
    caplog: pytest.LogCaptureFixture,
) -> None:
    assert question_folds(3) is None and question_folds(4) is not None
    with caplog.at_level(logging.WARNING):
        res = extract_vectors(tiny("llama"), DATASET, progress=False)  # 3 questions
    assert "held-out metrics need at least 4 questions" in caplog.text
    assert res.notes == ["in-sample only: held-out metrics need at least 4 questions, tiny has 3"]
    for v in res.vectors:
        assert v.metrics is not None and v.metrics.auc_heldout is None
        assert v.metrics.best_by in ("auc", "separation")
    run = format_run(res)
    assert "in-sample figures where held-out ones could not be computed" in run
    assert "note: in-sample only" in run
    assert all(r.auc_heldout is None for r in res.summary)
    assert " - " in format_summary(res.summary)


def test_the_shipped_store_carries_held_out_metrics_and_its_best_layers() -> None:
    """Every shipped persona vector has its held-out figures and the best layer they chose;
    the assistant axis (one vector over all prompts, no folds) keeps its in-sample choice."""
    with Store(read_only=True) as store:
        entries = store.vectors("store/models/demo")
        assert len(entries) == 34
        for entry in entries:
            vec = store.load_vector("store/models/demo", entry.persona, positions=entry.positions)
            assert vec.metrics is not None and vec.metrics.best_layer == entry.best_layer
            if entry.method == "diff_means":
                assert vec.metrics.auc_heldout is not None
                assert vec.metrics.separation_heldout is not None
                assert vec.metrics.best_by in ("auc_heldout", "separation_heldout")
            else:
                assert vec.metrics.best_by == "auc"
