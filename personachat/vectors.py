"""Pure math of persona vectors: difference of means, projections, per-layer AUC and separation.

No model here: inputs are per-persona means ``[P, L, D]`` and per-sample projections.

- Vector of persona ``p`` = mean(p) - baseline, where the baseline is a named persona's mean or,
  for ``records.MEAN_BASELINE``, the unweighted mean of all personas' means.
- Metrics per layer, from each sample's projection onto the unit vector at that layer:
  AUC (scikit-learn ``roc_auc_score``) of persona samples (label 1) against baseline samples
  (label 0), and separation = Cohen's d (difference of mean projections over the pooled std).
  Baseline samples are the named baseline persona's samples, or for the mean baseline every other
  persona's samples.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from personachat.records import (
    MEAN_BASELINE,
    QUANTILE_LEVELS,
    LayerMetrics,
    ProjectionQuantiles,
)


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
    """[L] AUC of ``pos`` [n1, L] (label 1) against ``neg`` [n2, L]; 0.5 where undefined."""
    if len(pos) == 0 or len(neg) == 0:
        return np.full(pos.shape[1], 0.5)
    labels = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
    scores = np.concatenate([pos, neg])
    return np.array([roc_auc_score(labels, scores[:, i]) for i in range(scores.shape[1])])


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
) -> LayerMetrics:
    """Metrics over all ``vector`` layers; projections cover the ``captured`` layers only.

    Layers that were not captured get zeros (vector, AUC, separation, norms).
    """
    n_layers = vector.shape[0]
    rows = list(range(n_layers)) if captured is None else list(captured)
    auc = torch.zeros(n_layers, dtype=torch.float32)
    sep = torch.zeros(n_layers, dtype=torch.float32)
    auc[rows] = torch.from_numpy(auc_by_layer(pos_proj, neg_proj)).float()
    sep[rows] = torch.from_numpy(separation_by_layer(pos_proj, neg_proj)).float()
    return LayerMetrics(
        auc=auc, separation=sep, norm=vector.float().norm(dim=-1), resid_norm=resid_norm.float()
    )


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
