"""Persona vectors from a dataset: per-persona mean activations, their differences, and metrics.

``extract_vectors`` reads pooled activations as sums (``personachat.pipeline.passes``: missing
responses answered and read in one pass, cached), turns per-persona means into
difference-of-means vectors and scores every layer: AUC and separation in-sample, and held out
across questions (``personachat.pipeline.heldout``), the best layer chosen on the held-out
figures; ``extract_pairs`` does the same for contrast pairs (high minus low). Under
``accelerate launch`` the samples are split across processes and the sums gathered, so every
process returns the same result; only the main process should write (``Dist.is_main``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

from personachat.activations import Capture, CaptureSpec, Dist, GenerationConfig
from personachat.model import LoadedModel
from personachat.pipeline.heldout import FoldProjections, fold_projections, folds_for
from personachat.pipeline.passes import PassOptions, Phases, batch_size_for, read_activations
from personachat.pipeline.selection import check_layers, check_positions, select_personas
from personachat.prompts import DatasetError, PersonaDataset, conditions
from personachat.records import LayerMetrics, PersonaMeans, PersonaVector
from personachat.vectors import (
    MIN_PER_FOLD,
    baseline_samples,
    difference_of_means,
    heldout_by_layer,
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
    auc: float  # in-sample, at the best layer
    separation: float
    norm: float
    n_samples: int
    best_by: str = "auc"  # the figure that chose the best layer (``LayerMetrics.best_by``)
    auc_heldout: float | None = None  # held out: mean over folds at the best layer
    auc_heldout_std: float | None = None  # its spread over folds
    separation_heldout: float | None = None
    separation_heldout_std: float | None = None


@dataclass(eq=False)
class ExtractionResult:
    """Vectors (one per persona and position kind, baseline excluded), raw means, summary rows."""

    vectors: list[PersonaVector]
    means: list[PersonaMeans]
    summary: list[SummaryRow]
    layers: tuple[int, ...] = ()
    personas: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)  # time of each phase
    notes: list[str] = field(default_factory=list)  # what the summary should say (fallbacks)


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
    folds: np.ndarray | None = None  # the fold of each question; None: in-sample only

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
    batch_size: int | None = None,
    progress: bool = True,
    *,
    generation: GenerationConfig | None = None,
    cache_dir: str | Path | None = None,
    padding_side: str | None = None,
    max_tokens: int | None = None,
    dist: Dist | None = None,
    one_pass: bool = True,
    engine: str = "transformers",
) -> ExtractionResult:
    """Persona vectors (persona mean - baseline mean per layer) with per-layer metrics.

    ``batch_size`` None picks one for the device (``batch_size_for``); replies are generated in
    batches of the same size. Missing responses are answered while their activations are read
    (``one_pass``; False: generated first, then captured teacher-forced), or by vLLM with
    ``engine="vllm"``. Every process of a multi-process run returns the same result. Layers
    not in ``layers`` get zero vectors and zero metrics.
    """
    dist = dist or Dist()
    kinds = check_positions(positions)
    chosen = check_layers(lm, layers)
    data = select_personas(dataset, personas, baseline)
    size = batch_size or batch_size_for(lm)
    opts = PassOptions(
        generation=replace(generation or GenerationConfig(), batch_size=size),
        batch_size=size,
        cache_dir=cache_dir,
        max_tokens=max_tokens,
        padding_side=padding_side,
        progress=progress,
        one_pass=one_pass,
        engine=engine,
    )
    phases = Phases()
    run = _new_run(lm, dataset, data, baseline, chosen)
    result = ExtractionResult([], [], [], layers=chosen, personas=run.names)
    if run.folds is None:
        result.notes.append(
            f"in-sample only: held-out metrics need at least {2 * MIN_PER_FOLD} questions, "
            f"{data.name} has {len(data.questions)}"
        )
    spec = CaptureSpec(layers=chosen, positions=kinds)
    with read_activations(lm, data, kinds, spec, opts, dist, phases) as cap:
        log.info("process %d/%d: %d samples", dist.rank + 1, dist.world, len(cap.sample_personas))
        cap.reduce(dist)
        with phases.phase("metrics"):
            _collect(result, run, cap, kinds, dist)
    result.seconds = dict(phases.seconds)
    return result


def _new_run(
    lm: LoadedModel,
    dataset: PersonaDataset,
    data: PersonaDataset,
    baseline: str,
    layers: tuple[int, ...],
) -> _Run:
    return _Run(
        model_id=lm.info.model_id,
        dataset=data.name,
        dataset_sha256=dataset.sha256,
        names=data.persona_names,
        baseline=baseline,
        layers=layers,
        n_layers=lm.sites.n_layers,
        created_at=datetime.now(UTC),
        render=conditions(lm.tokenizer).to_json(),
        folds=folds_for(len(data.questions), data.name),
    )


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
    [P, L, D], each scored on every sample's projection (and held out, when the questions
    allow it), and their summary rows."""
    vecs = difference_of_means(means, run.names, run.baseline)
    order = list(vecs)
    stacked = torch.stack([vecs[n] for n in order])
    sample_persona, proj = _projections(cap, stacked, pos, dist)
    held: FoldProjections | None = None
    if run.folds is not None:
        held = fold_projections(cap, pos, run.folds, run.names, run.baseline, dist)
    for v, name in enumerate(order):
        i = run.names.index(name)
        negative = baseline_samples(i, run.baseline, run.names)
        full = run.expand(vecs[name])
        pos_proj = proj[sample_persona == i, v]
        neg_proj = proj[np.isin(sample_persona, negative), v]
        figures = None
        if held is not None:
            w = held.names.index(name)
            figures = heldout_by_layer(held.proj[:, w], held.persona, held.fold, i, negative)
        metrics = layer_metrics(full, pos_proj, neg_proj, run.expand(resid), run.layers, figures)
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

    def at(values: torch.Tensor | None) -> float | None:
        return None if values is None else float(values[best])

    return SummaryRow(
        persona=name,
        positions=kind,
        best_layer=best,
        auc=float(metrics.auc[best]),
        separation=float(metrics.separation[best]),
        norm=float(metrics.norm[best]),
        n_samples=n_samples,
        best_by=metrics.best_by,
        auc_heldout=at(metrics.auc_heldout),
        auc_heldout_std=at(metrics.auc_heldout_std),
        separation_heldout=at(metrics.separation_heldout),
        separation_heldout_std=at(metrics.separation_heldout_std),
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
    batch_size: int | None = None,
    progress: bool = True,
    *,
    generation: GenerationConfig | None = None,
    cache_dir: str | Path | None = None,
    dist: Dist | None = None,
    one_pass: bool = True,
    engine: str = "transformers",
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
            one_pass=one_pass,
            engine=engine,
        )
        merged.vectors += part.vectors
        merged.means += part.means
        merged.summary += part.summary
        merged.layers = part.layers
        merged.personas += part.personas
        merged.notes += [n for n in part.notes if n not in merged.notes]
        for name, seconds in part.seconds.items():
            merged.seconds[name] = merged.seconds.get(name, 0.0) + seconds
    return merged
