"""Persona space: the geometry of persona vectors at one layer, and its comparison across models.

``persona_space`` gives, at one layer, the cosine-similarity matrix of mean-centered persona
vectors, a PCA with variance explained, the *assistant axis* (mean of the neutral personas minus
mean of the role personas) and each persona's projection on it. ``compare_spaces`` compares two
models' geometries over their shared personas: Pearson and Spearman correlation of the upper
triangles of their similarity matrices, and Spearman rank agreement of the personas'
assistant-axis projections.

Layers follow ``personachat.records.LAYER_CONVENTION`` (layer i = output of decoder block i).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy.stats import pearsonr, spearmanr

from personachat.records import PersonaVector
from personachat.vectors import neutral_personas


@dataclass(eq=False)
class PersonaSpace:
    """The geometry of a set of persona vectors at one layer (arrays are numpy float64)."""

    model_id: str
    layer: int
    personas: list[str]
    categories: list[str]
    points: np.ndarray  # [P, D] mean-centered persona vectors
    cosine: np.ndarray  # [P, P] cosine similarity of ``points``
    pca: np.ndarray  # [P, k] coordinates on the principal components
    explained: np.ndarray  # [k] share of variance of each component
    neutral: list[str]
    axis: np.ndarray  # [D] mean(neutral) - mean(roles), not normalised
    projection: np.ndarray  # [P] projection of each centered vector on the unit axis
    source: str = ""

    def subset(self, names: Sequence[str]) -> PersonaSpace:
        """The space recomputed over ``names`` only (re-centered)."""
        idx = [self.personas.index(n) for n in names]
        raw = {n: self.points[i] for n, i in zip(names, idx, strict=True)}
        cats = {n: self.categories[i] for n, i in zip(names, idx, strict=True)}
        neutral = [n for n in self.neutral if n in raw]
        return persona_space(
            raw,
            layer=self.layer,
            categories=cats,
            neutral=neutral or None,
            n_components=self.pca.shape[1],
            model_id=self.model_id,
            source=self.source,
        )

    def ranking(self) -> list[str]:
        """Personas from most assistant-like (largest projection) to least."""
        return [self.personas[i] for i in np.argsort(-self.projection, kind="stable")]


def centered_cosine(x: np.ndarray) -> np.ndarray:
    """[P, P] cosine similarity of the rows of ``x`` after subtracting their mean."""
    c = x - x.mean(axis=0, keepdims=True)
    norms = np.linalg.norm(c, axis=1, keepdims=True)
    u = np.divide(c, norms, out=np.zeros_like(c), where=norms > 1e-12)
    return u @ u.T


def pca(x: np.ndarray, n_components: int) -> tuple[np.ndarray, np.ndarray]:
    """(coordinates [P, k], variance ratio [k]) of the rows of ``x`` (centered here)."""
    c = x - x.mean(axis=0, keepdims=True)
    _, s, vt = np.linalg.svd(c, full_matrices=False)
    k = max(1, min(n_components, len(s)))
    total = float((s**2).sum())
    ratio = (s[:k] ** 2) / total if total > 0 else np.zeros(k)
    return c @ vt[:k].T, ratio


def default_layer(vectors: Sequence[PersonaVector]) -> int:
    """The layer with the highest mean AUC over the vectors, else 65% of the depth."""
    with_metrics = [v.metrics for v in vectors if v.metrics is not None]
    if with_metrics:
        auc = torch.stack([m.auc for m in with_metrics]).mean(0)
        if float(auc.max()) > 0:
            return int(torch.argmax(auc))
    n = vectors[0].n_layers
    return min(n - 1, int(n * 0.65 + 0.5))


def vectors_at_layer(
    vectors: Sequence[PersonaVector], layer: int, *, add_baseline: bool = True
) -> dict[str, np.ndarray]:
    """``{persona: [D]}`` at ``layer``; the shared named baseline is added as the zero vector.

    Difference-of-means vectors of a named baseline (e.g. ``default``) leave the baseline out;
    its vector is zero by definition, and mean-centering then places it correctly.
    """
    if not vectors:
        raise ValueError(
            "no persona vectors given; extract some first (scripts/extract_vectors.py)"
        )
    out = {v.persona: v.vector[layer].double().numpy() for v in vectors}
    baselines = {v.baseline for v in vectors}
    if add_baseline and len(baselines) == 1:
        base = next(iter(baselines))
        if base not in out and base != "mean":
            out = {base: np.zeros_like(next(iter(out.values()))), **out}
    return out


def persona_space(
    vectors: Sequence[PersonaVector] | Mapping[str, np.ndarray | torch.Tensor],
    *,
    layer: int | None = None,
    categories: Mapping[str, str] | None = None,
    neutral: Sequence[str] | None = None,
    n_components: int = 3,
    model_id: str = "",
    source: str = "",
) -> PersonaSpace:
    """Persona space at ``layer`` from stored vectors or from ``{name: [D] or [L, D]}`` arrays."""
    if isinstance(vectors, Mapping):
        raw = {k: np.asarray(v, dtype=np.float64) for k, v in vectors.items()}
        if layer is not None:
            raw = {k: v[layer] if v.ndim == 2 else v for k, v in raw.items()}
        layer = -1 if layer is None else layer
    else:
        layer = default_layer(vectors) if layer is None else layer
        raw = vectors_at_layer(vectors, layer)
        model_id = model_id or vectors[0].model_id
        source = (
            source or f"stored vectors ({vectors[0].positions}, baseline {vectors[0].baseline})"
        )
    names = list(raw)
    if len(names) < 3:
        raise ValueError(f"persona space needs at least 3 personas, got {names}")
    x = np.stack([raw[n] for n in names])
    if x.ndim != 2:
        raise ValueError(f"persona vectors must be [D] at one layer; got shape {x.shape[1:]}")
    cats = [(categories or {}).get(n, "") for n in names]
    neutral_list = list(neutral) if neutral is not None else neutral_personas(names, cats)
    centered = x - x.mean(axis=0, keepdims=True)
    axis, projection = assistant_axis(centered, names, neutral_list)
    coords, ratio = pca(x, n_components)
    return PersonaSpace(
        model_id=model_id,
        layer=layer,
        personas=names,
        categories=cats,
        points=centered,
        cosine=centered_cosine(x),
        pca=coords,
        explained=ratio,
        neutral=neutral_list,
        axis=axis,
        projection=projection,
        source=source,
    )


def assistant_axis(
    centered: np.ndarray, names: Sequence[str], neutral: Sequence[str]
) -> tuple[np.ndarray, np.ndarray]:
    """(axis [D], projection [P]): mean of the ``neutral`` rows of ``centered`` minus mean of the
    others (the roles), and each row's projection on the unit axis."""
    unknown = [n for n in neutral if n not in names]
    if unknown:
        raise ValueError(f"neutral personas {unknown} are not among {list(names)}")
    roles = [n for n in names if n not in neutral]
    if not neutral or not roles:
        raise ValueError(
            f"the assistant axis needs neutral and role personas; neutral={list(neutral)}, "
            f"personas={list(names)}. Pass neutral=[...] or give personas the category 'neutral'"
        )
    ni = [names.index(n) for n in neutral]
    ri = [names.index(n) for n in roles]
    axis = centered[ni].mean(0) - centered[ri].mean(0)
    norm = float(np.linalg.norm(axis))
    projection = centered @ (axis / norm) if norm > 0 else np.zeros(len(names))
    return axis, projection


@dataclass(frozen=True)
class SpaceComparison:
    """How similar two models' persona geometries are over their shared personas."""

    model_a: str
    model_b: str
    personas: list[str]
    pearson: float  # of the upper triangles of the two cosine matrices
    spearman: float
    axis_spearman: float  # rank agreement of the assistant-axis projections
    ranks_a: dict[str, int]  # 0 = most assistant-like
    ranks_b: dict[str, int]

    def rank_shift(self) -> dict[str, int]:
        """Per persona: rank in B minus rank in A."""
        return {n: self.ranks_b[n] - self.ranks_a[n] for n in self.personas}


def upper_triangle(m: np.ndarray) -> np.ndarray:
    return m[np.triu_indices(m.shape[0], k=1)]


def compare_spaces(a: PersonaSpace, b: PersonaSpace) -> SpaceComparison:
    """Compare two persona spaces over the personas both have (each re-centered on them)."""
    shared = [n for n in a.personas if n in b.personas]
    if len(shared) < 3:
        raise ValueError(
            f"need at least 3 shared personas to compare {a.model_id!r} and {b.model_id!r}; "
            f"shared: {shared}"
        )
    sa, sb = a.subset(shared), b.subset(shared)
    ua, ub = upper_triangle(sa.cosine), upper_triangle(sb.cosine)
    ranks_a = {n: r for r, n in enumerate(sa.ranking())}
    ranks_b = {n: r for r, n in enumerate(sb.ranking())}
    return SpaceComparison(
        model_a=a.model_id,
        model_b=b.model_id,
        personas=shared,
        pearson=_corr(pearsonr, ua, ub),
        spearman=_corr(spearmanr, ua, ub),
        axis_spearman=_corr(spearmanr, sa.projection, sb.projection),
        ranks_a=ranks_a,
        ranks_b=ranks_b,
    )


def _corr(fn: Any, x: np.ndarray, y: np.ndarray) -> float:
    if len(x) < 2 or np.std(x) == 0 or np.std(y) == 0:
        return float("nan")
    return float(fn(x, y)[0])
