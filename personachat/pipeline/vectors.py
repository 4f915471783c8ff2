"""Persona vectors from a dataset: per-persona mean activations, their differences, and metrics.

``extract_vectors`` answers missing responses (cached), captures pooled activations as sums,
turns per-persona means into difference-of-means vectors and scores every layer (AUC,
separation); ``extract_pairs`` does the same for contrast pairs (high minus low). Under
``accelerate launch`` the samples are split across processes and the sums gathered, so every
process returns the same result; only the main process should write (``Dist.is_main``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

from personachat.activations import Capture, CaptureSpec, Dist, capture
from personachat.model import LoadedModel
from personachat.pipeline.responses import GenerationConfig, ensure_responses
from personachat.pipeline.selection import (
    check_layers,
    check_positions,
    select_personas,
    shard_samples,
)
from personachat.prompts import DatasetError, PersonaDataset, conditions
from personachat.records import LayerMetrics, PersonaMeans, PersonaVector
from personachat.vectors import (
    baseline_samples,
    difference_of_means,
    layer_metrics,
    project,
    projection_quantiles,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SummaryRow:
    """One line of the summary table."""

    persona: str
    positions: str
    best_layer: int
    auc: float
    separation: float
    norm: float
    n_samples: int


@dataclass(eq=False)
class ExtractionResult:
    """Vectors (one per persona and position kind, baseline excluded), raw means, summary rows."""

    vectors: list[PersonaVector]
    means: list[PersonaMeans]
    summary: list[SummaryRow]
    layers: tuple[int, ...] = ()
    personas: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Run:
    """What every record of one extraction shares."""

    model_id: str
    dataset: str
    dataset_sha256: str
    names: list[str]
    baseline: str
    layers: tuple[int, ...]
    n_layers: int
    created_at: datetime
    render: str  # how the prompts were rendered (JSON RenderConditions)

    def expand(self, rows: torch.Tensor) -> torch.Tensor:
        """Rows for the captured layers placed in a zero tensor with a row per model layer."""
        full = torch.zeros((self.n_layers, *rows.shape[1:]), dtype=torch.float32)
        full[list(self.layers)] = rows.float()
        return full


def extract_vectors(
    lm: LoadedModel,
    dataset: PersonaDataset,
    personas: Sequence[str] | None = None,
    positions: str | Sequence[str] = "response_avg",
    baseline: str = "default",
    layers: Sequence[int] | None = None,
    batch_size: int = 8,
    progress: bool = True,
    *,
    generation: GenerationConfig | None = None,
    cache_dir: str | Path | None = None,
    padding_side: str | None = None,
    max_tokens: int | None = None,
    dist: Dist | None = None,
) -> ExtractionResult:
    """Persona vectors (persona mean - baseline mean per layer) with per-layer metrics.

    Every process of a multi-process run returns the same result. Layers not in ``layers`` get
    zero vectors and zero metrics.
    """
    dist = dist or Dist()
    kinds = check_positions(positions)
    chosen = check_layers(lm, layers)
    data = select_personas(dataset, personas, baseline)
    names = data.persona_names
    if "response_avg" in kinds:
        data = ensure_responses(
            lm, data, names, generation, cache_dir=cache_dir, progress=progress, dist=dist
        )
    samples = shard_samples(lm, data, kinds, max_tokens, dist)
    log.info("process %d/%d: %d samples", dist.rank + 1, dist.world, len(samples))
    spec = CaptureSpec(layers=chosen, positions=kinds)
    run = _Run(
        model_id=lm.info.model_id,
        dataset=data.name,
        dataset_sha256=dataset.sha256,
        names=names,
        baseline=baseline,
        layers=chosen,
        n_layers=lm.sites.n_layers,
        created_at=datetime.now(UTC),
        render=conditions(lm.tokenizer).to_json(),
    )
    result = ExtractionResult([], [], [], layers=chosen, personas=names)
    with capture(
        lm,
        samples,
        spec,
        len(names),
        batch_size=batch_size,
        side=padding_side,
        progress=progress and dist.is_main,
        desc=f"{lm.info.model_id} activations",
    ) as cap:
        cap.reduce(dist)
        _collect(result, run, cap, kinds, dist)
    return result


def _collect(
    result: ExtractionResult, run: _Run, cap: Capture, kinds: tuple[str, ...], dist: Dist
) -> None:
    """Per position kind: every persona's means, then the vectors with their metrics."""
    means = cap.means()
    resid = cap.norm_sums.sum(1) / cap.counts.sum().clamp(min=1)  # [n_pos, L]
    for p, kind in enumerate(kinds):
        result.means += [
            _persona_means(run, kind, name, means[p, i], int(cap.counts[i]))
            for i, name in enumerate(run.names)
        ]
        _add_vectors(result, run, cap, p, kind, means[p], resid[p], dist)


def _persona_means(
    run: _Run, kind: str, name: str, mean: torch.Tensor, n_samples: int
) -> PersonaMeans:
    return PersonaMeans(
        model_id=run.model_id,
        persona=name,
        positions=kind,
        mean=run.expand(mean),
        n_samples=n_samples,
        dataset=run.dataset,
        dataset_sha256=run.dataset_sha256,
        render=run.render,
    )


def _add_vectors(
    result: ExtractionResult,
    run: _Run,
    cap: Capture,
    pos: int,
    kind: str,
    means: torch.Tensor,
    resid: torch.Tensor,
    dist: Dist,
) -> None:
    """The vectors of position kind ``kind`` (index ``pos``) from per-persona ``means``
    [P, L, D], each scored on every sample's projection, and their summary rows."""
    vecs = difference_of_means(means, run.names, run.baseline)
    order = list(vecs)
    stacked = torch.stack([vecs[n] for n in order])
    sample_persona, proj = _projections(cap, stacked, pos, dist)
    for v, name in enumerate(order):
        i = run.names.index(name)
        negative = baseline_samples(i, run.baseline, run.names)
        full = run.expand(vecs[name])
        pos_proj = proj[sample_persona == i, v]
        neg_proj = proj[np.isin(sample_persona, negative), v]
        metrics = layer_metrics(full, pos_proj, neg_proj, run.expand(resid), run.layers)
        n_samples = int(cap.counts[i])
        result.vectors.append(
            PersonaVector(
                model_id=run.model_id,
                persona=name,
                vector=full,
                positions=kind,
                baseline=run.baseline,
                dataset=run.dataset,
                dataset_sha256=run.dataset_sha256,
                n_samples=n_samples,
                metrics=metrics,
                created_at=run.created_at,
                render=run.render,
                quantiles=projection_quantiles(pos_proj, neg_proj, run.n_layers, run.layers),
                baseline_mean=run.expand(means[negative].mean(0)),
            )
        )
        result.summary.append(_summary_row(name, kind, metrics, n_samples))


def _summary_row(name: str, kind: str, metrics: LayerMetrics, n_samples: int) -> SummaryRow:
    best = metrics.best_layer
    return SummaryRow(
        persona=name,
        positions=kind,
        best_layer=best,
        auc=float(metrics.auc[best]),
        separation=float(metrics.separation[best]),
        norm=float(metrics.norm[best]),
        n_samples=n_samples,
    )


def _projections(
    cap: Capture, vectors: torch.Tensor, pos: int, dist: Dist
) -> tuple[np.ndarray, np.ndarray]:
    """(persona index [N], projections [N, V, L]) of every sample over all processes."""
    persona_parts, proj_parts = [], []
    for personas, pooled in cap.iter_pooled():
        persona_parts.append(personas)
        proj_parts.append(project(pooled[:, pos], vectors).numpy())
    v, n_layers = vectors.shape[0], vectors.shape[1]
    mine = (
        np.concatenate(persona_parts) if persona_parts else np.zeros(0, dtype=np.int64),
        np.concatenate(proj_parts) if proj_parts else np.zeros((0, v, n_layers)),
    )
    parts = dist.gather(mine)
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def extract_pairs(
    lm: LoadedModel,
    dataset: PersonaDataset,
    pairs: Sequence[str] | None = None,
    positions: str | Sequence[str] = "response_avg",
    layers: Sequence[int] | None = None,
    batch_size: int = 8,
    progress: bool = True,
    *,
    generation: GenerationConfig | None = None,
    cache_dir: str | Path | None = None,
    dist: Dist | None = None,
) -> ExtractionResult:
    """Trait vectors from contrast pairs: mean(high) - mean(low), the low persona as baseline."""
    chosen = [dataset.pair(n) for n in pairs] if pairs is not None else list(dataset.pairs)
    if not chosen:
        raise DatasetError(f"dataset {dataset.name!r} has no contrast pairs")
    merged = ExtractionResult([], [], [], personas=[])
    for pair in chosen:
        part = extract_vectors(
            lm,
            dataset,
            [pair.high],
            positions,
            pair.low,
            layers,
            batch_size,
            progress,
            generation=generation,
            cache_dir=cache_dir,
            dist=dist,
        )
        merged.vectors += part.vectors
        merged.means += part.means
        merged.summary += part.summary
        merged.layers = part.layers
        merged.personas += part.personas
    return merged
