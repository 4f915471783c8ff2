"""Pure math of persona vectors: difference of means, projections, per-layer AUC and separation.

No model here: inputs are per-persona means ``[P, L, D]`` and per-sample projections.

- Vector of persona ``p`` = mean(p) - baseline, where the baseline is a named persona's mean or,
  for ``records.MEAN_BASELINE``, the unweighted mean of all personas' means.
- Metrics per layer, from each sample's projection onto the unit vector at that layer:
  AUC (scikit-learn's ``roc_auc_score``, computed from ranks) of persona samples (label 1)
  against baseline samples (label 0), and separation = Cohen's d (difference of mean
  projections over the pooled std).
  Baseline samples are the named baseline persona's samples, or for the mean baseline every other
  persona's samples.
- Held out: the questions are split into k folds (``question_folds``); the vectors of a fold are
  fit on the other folds' samples (``fold_vectors``) and scored on this fold's samples
  (``heldout_by_layer``: the mean and the spread of AUC and separation over folds), so a question
  never both builds and scores a vector. ``choose_best_by`` names the figure the best layer is
  chosen by (``records.LayerMetrics.best_layer``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy.stats import rankdata
from sklearn.model_selection import KFold

from personachat.records import (
    MEAN_BASELINE,
    QUANTILE_LEVELS,
    TIE,
    LayerMetrics,
    ProjectionQuantiles,
)

FOLDS = 5  # k of the k-fold split across questions
MIN_PER_FOLD = 2  # questions a fold needs; fewer questions than 2 folds of these: in-sample only


def baseline_mean(means: torch.Tensor, names: Sequence[str], baseline: str) -> torch.Tensor:
    """[L, D] baseline: a named persona's mean, or the mean of all personas (``MEAN_BASELINE``)."""
    if baseline == MEAN_BASELINE:
        return means.mean(dim=0)
    if baseline not in names:
        raise ValueError(
            f"baseline {baseline!r} is not among the extracted personas {list(names)}; add it to "
            f"--personas or use --baseline {MEAN_BASELINE}"
        )
    return means[list(names).index(baseline)]


def difference_of_means(
    means: torch.Tensor, names: Sequence[str], baseline: str
) -> dict[str, torch.Tensor]:
    """Persona vectors ``{name: [L, D]}``; the baseline persona itself gets none (it is zero)."""
    base = baseline_mean(means, names, baseline)
    return {n: means[i] - base for i, n in enumerate(names) if n != baseline}


def unit(vectors: torch.Tensor) -> torch.Tensor:
    """``vectors`` [..., D] scaled to unit norm; zero vectors stay zero."""
    norm = vectors.norm(dim=-1, keepdim=True)
    return torch.where(norm > 0, vectors / norm.clamp(min=1e-30), torch.zeros_like(vectors))


def project(pooled: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """Projections [n, V, L] of samples [n, L, D] onto the unit vectors [V, L, D]."""
    return torch.einsum("nld,vld->nvl", pooled.double(), unit(vectors.double()))


def auc_by_layer(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """[L] AUC of ``pos`` [n1, L] (label 1) against ``neg`` [n2, L]; 0.5 where undefined.

    The Mann-Whitney form, all layers at once: the positives' mean rank among all samples (ties
    share their average rank), which is what scikit-learn's ``roc_auc_score`` gives.
    """
    n1, n2 = len(pos), len(neg)
    if n1 == 0 or n2 == 0:
        return np.full(pos.shape[1], 0.5)
    ranks = rankdata(np.concatenate([pos, neg]), axis=0)
    return (ranks[:n1].sum(0) - n1 * (n1 + 1) / 2) / (n1 * n2)


def separation_by_layer(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """[L] Cohen's d: (mean pos - mean neg) / pooled std (ddof 1); 0 where the std is 0."""
    n1, n2 = len(pos), len(neg)
    if n1 == 0 or n2 == 0:
        return np.zeros(pos.shape[1])
    diff = pos.mean(0) - neg.mean(0)
    var1 = pos.var(0, ddof=1) if n1 > 1 else np.zeros_like(diff)
    var2 = neg.var(0, ddof=1) if n2 > 1 else np.zeros_like(diff)
    dof = max(n1 + n2 - 2, 1)
    pooled = np.sqrt(((n1 - 1) * var1 + (n2 - 1) * var2) / dof)
    return np.divide(diff, pooled, out=np.zeros_like(diff), where=pooled > 1e-12)


def layer_metrics(
    vector: torch.Tensor,
    pos_proj: np.ndarray,
    neg_proj: np.ndarray,
    resid_norm: torch.Tensor,
    captured: Sequence[int] | None = None,
    heldout: Sequence[np.ndarray] | None = None,
) -> LayerMetrics:
    """Metrics over all ``vector`` layers; projections cover the ``captured`` layers only.

    ``heldout`` is ``heldout_by_layer``'s four arrays (AUC mean and std, separation mean and
    std over folds, on the captured layers), or None when they could not be computed.
    Layers that were not captured get zeros (vector, AUC, separation, norms). The best layer is
    chosen by the figure ``choose_best_by`` names.
    """
    n_layers = vector.shape[0]
    rows = list(range(n_layers)) if captured is None else list(captured)

    def full(values: np.ndarray) -> torch.Tensor:
        out = torch.zeros(n_layers, dtype=torch.float32)
        out[rows] = torch.from_numpy(np.asarray(values, dtype=np.float64)).float()
        return out

    auc = full(auc_by_layer(pos_proj, neg_proj))
    sep = full(separation_by_layer(pos_proj, neg_proj))
    norm = vector.float().norm(dim=-1)
    held = [full(a) for a in heldout] if heldout is not None else [None] * 4
    return LayerMetrics(
        auc=auc,
        separation=sep,
        norm=norm,
        resid_norm=resid_norm.float(),
        auc_heldout=held[0],
        auc_heldout_std=held[1],
        separation_heldout=held[2],
        separation_heldout_std=held[3],
        best_by=choose_best_by(auc, held[0], norm),
    )


def choose_best_by(auc: torch.Tensor, auc_heldout: torch.Tensor | None, norm: torch.Tensor) -> str:
    """The figure the best layer is chosen by: held-out AUC when there is one, else in-sample
    AUC; when several layers share the top AUC (saturated, e.g. 1.0 at many layers), the
    separation of the same kind (``separation_heldout`` / ``separation``) chooses among them."""
    figure = auc if auc_heldout is None else auc_heldout
    kept = figure.double()[norm > 0] if bool((norm > 0).any()) else figure.double()
    saturated = int((kept >= kept.max() - TIE).sum()) > 1
    kind = "separation" if saturated else "auc"
    return kind if auc_heldout is None else f"{kind}_heldout"


def question_folds(n_questions: int, k: int = FOLDS, seed: int = 0) -> np.ndarray | None:
    """The fold of each question (scikit-learn ``KFold`` over the questions, shuffled with
    ``seed``): ``min(k, n_questions // MIN_PER_FOLD)`` folds, or None below two folds."""
    n_folds = min(k, n_questions // MIN_PER_FOLD)
    if n_folds < 2:
        return None
    fold = np.empty(n_questions, dtype=np.int64)
    split = KFold(n_splits=n_folds, shuffle=True, random_state=seed)
    for f, (_, scored) in enumerate(split.split(np.arange(n_questions))):
        fold[scored] = f
    return fold


def fold_vectors(
    sums: torch.Tensor,
    counts: torch.Tensor,
    fold_sums: torch.Tensor,
    fold_counts: torch.Tensor,
    names: Sequence[str],
    baseline: str,
) -> tuple[list[str], torch.Tensor]:
    """(vector names, [K, V, L, D]) each fold's vectors, fit without that fold's samples.

    ``sums`` [P, L, D] and ``counts`` [P] cover every sample; ``fold_sums`` [K, P, L, D] and
    ``fold_counts`` [K, P] each fold's share.
    """
    out = []
    order: list[str] = []
    for f in range(fold_sums.shape[0]):
        n = (counts - fold_counts[f]).clamp(min=1).to(sums.dtype)[:, None, None]
        vecs = difference_of_means((sums - fold_sums[f]) / n, names, baseline)
        order = list(vecs)
        out.append(torch.stack([vecs[name] for name in order]))
    return order, torch.stack(out)


def heldout_by_layer(
    proj: np.ndarray, persona: np.ndarray, fold: np.ndarray, positive: int, negative: Sequence[int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(AUC mean, AUC std, separation mean, separation std) [L] over the folds, from each
    sample's projection ``proj`` [N, L] onto the vector fit without its fold. In each fold the
    ``positive`` persona's samples score against the ``negative`` personas' samples; a fold
    without either is skipped. The std is the population std over folds (0 for one fold)."""
    is_neg = np.isin(persona, list(negative))
    aucs, seps = [], []
    for f in np.unique(fold):
        here = fold == f
        pos, neg = proj[here & (persona == positive)], proj[here & is_neg]
        if len(pos) and len(neg):
            aucs.append(auc_by_layer(pos, neg))
            seps.append(separation_by_layer(pos, neg))
    if not aucs:
        zero = np.zeros(proj.shape[1])
        return np.full(proj.shape[1], 0.5), zero, zero, zero
    a, s = np.stack(aucs), np.stack(seps)
    return a.mean(0), a.std(0), s.mean(0), s.std(0)


def projection_quantiles(
    pos_proj: np.ndarray,
    neg_proj: np.ndarray,
    n_layers: int,
    captured: Sequence[int] | None = None,
) -> ProjectionQuantiles:
    """Quantiles at ``QUANTILE_LEVELS`` of the persona's (``pos_proj`` [n1, L]) and the
    baseline's (``neg_proj`` [n2, L]) sample projections, per layer: the reference readouts are
    calibrated against. Layers not captured (and a side without samples) get zeros."""
    rows = list(range(n_layers)) if captured is None else list(captured)
    levels = np.asarray(QUANTILE_LEVELS)

    def per_layer(proj: np.ndarray) -> torch.Tensor:
        out = torch.zeros((n_layers, len(levels)), dtype=torch.float32)
        if len(proj):
            out[rows] = torch.from_numpy(np.quantile(proj, levels, axis=0).T.copy()).float()
        return out

    return ProjectionQuantiles(
        baseline=per_layer(neg_proj),
        persona=per_layer(pos_proj),
        n_baseline=len(neg_proj),
        n_persona=len(pos_proj),
    )


def percentile_rank(values: np.ndarray, quantiles: np.ndarray) -> np.ndarray:
    """Where ``values`` fall (0-100) in a distribution given by its ``quantiles`` at
    ``QUANTILE_LEVELS`` (one layer's row of ``ProjectionQuantiles``): linear between the stored
    quantiles, 0 below the smallest and 100 above the largest."""
    return np.interp(
        values, np.asarray(quantiles, dtype=np.float64), np.asarray(QUANTILE_LEVELS) * 100
    )


def baseline_samples(persona: int, baseline: str, names: Sequence[str]) -> list[int]:
    """Indices of the personas whose samples are the baseline samples for ``persona``."""
    if baseline == MEAN_BASELINE:
        return [i for i in range(len(names)) if i != persona]
    return [list(names).index(baseline)]


NEUTRAL_CATEGORY = "neutral"


def neutral_personas(names: Sequence[str], categories: Sequence[str]) -> list[str]:
    """Personas of category ``neutral``; else those named ``default*`` or ``assistant``."""
    by_cat = [n for n, c in zip(names, categories, strict=True) if c == NEUTRAL_CATEGORY]
    if by_cat:
        return by_cat
    return [n for n in names if n.startswith("default") or n == "assistant"]


def assistant_axis(vectors: torch.Tensor, categories: Sequence[str]) -> torch.Tensor:
    """Mean of the neutral personas' vectors minus the mean of the others (``[..., D]``)."""
    neutral = [i for i, c in enumerate(categories) if c == "neutral"]
    roles = [i for i, c in enumerate(categories) if c != "neutral"]
    if not neutral or not roles:
        raise ValueError(
            f"the assistant axis needs neutral and role personas; categories: {list(categories)}"
        )
    return vectors[neutral].mean(0) - vectors[roles].mean(0)


def cosine_matrix(vectors: torch.Tensor, center: bool = True) -> torch.Tensor:
    """[V, V] cosine similarity of vectors [V, D], mean-centered across vectors first."""
    x = vectors.double()
    if center:
        x = x - x.mean(0, keepdim=True)
    u = unit(x)
    return (u @ u.T).float()
