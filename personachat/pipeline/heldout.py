"""Held-out metrics of a run's vectors: k-fold across questions, read from the capture's spill.

The questions are split into folds (``personachat.vectors.question_folds``); a question's
samples (every persona's answer to it) all sit in one fold. One pass over the spill sums each
fold's samples per persona; each fold's vectors are the difference of means of the *other*
folds' samples (``fold_vectors``); a second pass projects every sample onto the vectors of its
own fold, so no sample scores a vector it helped build. ``personachat.vectors.heldout_by_layer``
turns those projections into per-fold AUC and separation, averaged over folds with their spread.
Under several processes the fold sums are added across processes and the projections gathered.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from personachat.activations import Capture, Dist
from personachat.vectors import MIN_PER_FOLD, fold_vectors, project, question_folds

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FoldProjections:
    """Each sample's persona, fold and projection onto its fold's vectors [N, V, L]."""

    persona: np.ndarray
    fold: np.ndarray
    names: list[str]  # the vectors, in the order of ``proj``'s second axis
    proj: np.ndarray


def folds_for(n_questions: int, dataset: str) -> np.ndarray | None:
    """The fold of each question, or None (logged) when there are too few questions."""
    folds = question_folds(n_questions)
    if folds is None:
        log.warning(
            "held-out metrics need at least %d questions (2 folds of %d); dataset %r has %d: "
            "AUC and separation are in-sample only and the best layers are chosen in-sample",
            2 * MIN_PER_FOLD,
            MIN_PER_FOLD,
            dataset,
            n_questions,
        )
    return folds


def fold_projections(
    cap: Capture,
    pos: int,
    folds: np.ndarray,
    names: Sequence[str],
    baseline: str,
    dist: Dist,
) -> FoldProjections:
    """Every sample of position kind ``pos`` projected onto the vectors fit without its fold
    (``cap``'s sums already added across processes)."""
    n_folds, n_personas = int(folds.max()) + 1, cap.sums.shape[1]
    fold_sums = torch.zeros((n_folds * n_personas, *cap.sums.shape[2:]), dtype=torch.float64)
    fold_counts = torch.zeros(n_folds * n_personas, dtype=torch.int64)
    sample_fold = folds[np.asarray(cap.sample_questions, dtype=np.int64)]
    start = 0
    for personas, pooled in cap.iter_pooled():
        here = sample_fold[start : start + len(personas)]
        index = torch.from_numpy(here * n_personas + personas)
        fold_sums.index_add_(0, index, pooled[:, pos].double())
        fold_counts.index_add_(0, index, torch.ones_like(index))
        start += len(personas)
    fold_sums = dist.all_reduce(fold_sums).view(n_folds, n_personas, *cap.sums.shape[2:])
    fold_counts = dist.all_reduce(fold_counts).view(n_folds, n_personas)
    order, vecs = fold_vectors(cap.sums[pos], cap.counts, fold_sums, fold_counts, names, baseline)
    parts, start = [], 0
    for personas, pooled in cap.iter_pooled():
        here = sample_fold[start : start + len(personas)]
        proj = np.zeros((len(personas), len(order), vecs.shape[2]))
        for f in np.unique(here):
            rows = here == f
            proj[rows] = project(pooled[torch.from_numpy(rows), pos], vecs[f]).numpy()
        parts.append((personas, here, proj))
        start += len(personas)
    mine = [np.concatenate([p[i] for p in parts]) if parts else None for i in range(3)]
    gathered = [m for m in dist.gather(mine) if m[0] is not None]
    if not gathered:
        empty = np.zeros(0, dtype=np.int64)
        return FoldProjections(empty, empty, order, np.zeros((0, len(order), vecs.shape[2])))
    return FoldProjections(
        np.concatenate([g[0] for g in gathered]),
        np.concatenate([g[1] for g in gathered]),
        order,
        np.concatenate([g[2] for g in gathered]),
    )
