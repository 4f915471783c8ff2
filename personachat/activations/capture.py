"""Batched, padding-aware, teacher-forced capture of pooled activations, accumulated as sums.

A forward pass runs the *base* model (``sites.base``: no LM head) through
``personachat.hooks.intervene`` and stops after the last layer needed (``StopForward``). The
handler pools each position's span per sample ([B, D] per layer) and, once per batch, adds the
pooled vectors into per-persona float64 sums on the CPU, so memory does not grow with the number
of samples. Per-sample pooled vectors (needed later for AUC) are appended to a file in a
temporary folder, read back in chunks by ``Capture.iter_pooled``, with each sample's persona and
question. Multi-process runs shard samples with ``Dist`` and sum the accumulators across
processes.

``capture`` does it all for a list of samples. A run that also reads activations while it
generates (``personachat.activations.live``) opens one ``Capture`` (``open_capture``), fills it
from both (``capture_into``, ``Capture.add``) and closes the spill (``Capture.finish``).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from tqdm.auto import tqdm

from personachat.activations.batch import pad_batch, padding_side, run_forward, span_weights
from personachat.activations.dist import Dist
from personachat.activations.encode import Sample
from personachat.hooks import Site, StopForward, intervene
from personachat.model import LoadedModel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CaptureSpec:
    """What to capture: a site at some layers, pooled over some positions."""

    layers: tuple[int, ...]
    positions: tuple[str, ...] = ("response_avg",)
    site: Site = "residual"
    spill: bool = True  # keep per-sample pooled vectors on disk (for AUC)
    squares: bool = False  # accumulate per-persona sums of squares (for standardized effects)


class _PoolHandler:
    """Pools each position span at each wanted layer per batch; stops after the last layer."""

    def __init__(self, spec: CaptureSpec) -> None:
        self.spec = spec
        self.slot = {layer: i for i, layer in enumerate(spec.layers)}
        self.last = max(spec.layers)
        self.weights: torch.Tensor | None = None
        self.pooled: list[torch.Tensor | None] = []
        self.norms: list[torch.Tensor | None] = []

    def start(self, weights: torch.Tensor) -> None:
        self.weights = weights
        self.pooled = [None] * len(self.spec.layers)
        self.norms = [None] * len(self.spec.layers)

    def wants(self) -> Iterable[tuple[Site, int]]:
        return [(self.spec.site, layer) for layer in self.spec.layers]

    def __call__(self, site: Site, layer: int, x: torch.Tensor) -> torch.Tensor | None:
        assert self.weights is not None, "start() a batch before the forward pass"
        w = self.weights.to(x.device)
        xf = x.detach().float()
        i = self.slot[layer]
        self.pooled[i] = torch.einsum("pbt,btd->pbd", w, xf)
        self.norms[i] = torch.einsum("pbt,bt->pb", w, xf.norm(dim=-1))
        if layer == self.last:
            raise StopForward
        return None

    def collect(self) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, n_pos, L, D] pooled vectors and [B, n_pos, L] mean token norms, on the CPU."""
        if any(p is None for p in self.pooled):
            missing = [la for la, p in zip(self.spec.layers, self.pooled, strict=True) if p is None]
            raise RuntimeError(f"the forward pass never reached layers {missing}")
        pooled = torch.stack([p for p in self.pooled if p is not None], dim=2)  # [P, B, L, D]
        norms = torch.stack([n for n in self.norms if n is not None], dim=2)  # [P, B, L]
        return pooled.permute(1, 0, 2, 3).cpu(), norms.permute(1, 0, 2).cpu()


@dataclass(eq=False)
class Capture:
    """Per-persona sums of pooled activations ([n_pos, P, L, D], float64) and per-sample spill."""

    spec: CaptureSpec
    sums: torch.Tensor
    norm_sums: torch.Tensor  # [n_pos, P, L] sums over samples of the mean token norm
    counts: torch.Tensor  # [P] samples per persona
    sq_sums: torch.Tensor | None = None
    sample_personas: list[int] = field(default_factory=list)
    sample_questions: list[int] = field(default_factory=list)  # in spill order, as the personas
    spill_path: Path | None = None
    _tmp: tempfile.TemporaryDirectory[str] | None = None
    _writer: BinaryIO | None = None

    @property
    def n_positions(self) -> int:
        return len(self.spec.positions)

    def means(self) -> torch.Tensor:
        """[n_pos, P, L, D] per-persona means (float64); NaN-free (zero where no samples)."""
        return self.sums / self.counts.clamp(min=1).to(self.sums.dtype)[None, :, None, None]

    def reduce(self, dist: Dist) -> None:
        """Sum the accumulators over processes (the spill stays per process)."""
        self.sums = dist.all_reduce(self.sums)
        self.norm_sums = dist.all_reduce(self.norm_sums)
        self.counts = dist.all_reduce(self.counts)
        if self.sq_sums is not None:
            self.sq_sums = dist.all_reduce(self.sq_sums)

    def add(
        self,
        personas: Sequence[int],
        questions: Sequence[int],
        pooled: torch.Tensor,
        norms: torch.Tensor,
    ) -> None:
        """Add a batch's pooled vectors [B, n_pos, L, D] and mean token norms [B, n_pos, L] to
        the per-persona sums, and append the pooled vectors to the spill."""
        index = torch.tensor(list(personas), dtype=torch.long)
        pooled64 = pooled.double().transpose(0, 1)  # [n_pos, B, L, D]
        self.sums.index_add_(1, index, pooled64)
        self.norm_sums.index_add_(1, index, norms.double().transpose(0, 1))
        self.counts.index_add_(0, index, torch.ones_like(index))
        if self.sq_sums is not None:
            self.sq_sums.index_add_(1, index, pooled64.square())
        if self._writer is not None:
            pooled.float().contiguous().numpy().tofile(self._writer)
            self.sample_personas.extend(int(i) for i in personas)
            self.sample_questions.extend(int(q) for q in questions)

    def finish(self) -> None:
        """Close the spill for writing (reading it back needs no more)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def iter_pooled(self, chunk: int = 256) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        """(persona indices [n], pooled [n, n_pos, L, D] float32) in chunks of ``chunk`` samples,
        in spill order (``sample_questions`` gives each one's question in the same order)."""
        if self.spill_path is None:
            raise RuntimeError("this capture kept no per-sample vectors (spill=False)")
        if self._writer is not None:
            self._writer.flush()
        row = self.n_positions * self.sums.shape[2] * self.sums.shape[3]
        personas = np.asarray(self.sample_personas, dtype=np.int64)
        with open(self.spill_path, "rb") as f:
            for start in range(0, len(personas), chunk):
                n = min(chunk, len(personas) - start)
                flat = np.fromfile(f, dtype=np.float32, count=n * row)
                block = torch.from_numpy(flat).view(n, self.n_positions, *self.sums.shape[2:])
                yield personas[start : start + n], block

    def close(self) -> None:
        self.finish()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> Capture:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_capture(
    lm: LoadedModel,
    spec: CaptureSpec,
    n_personas: int,
    *,
    spill_dir: str | Path | None = None,
) -> Capture:
    """An empty capture of ``spec`` (zero sums; the spill opened when ``spec.spill``), once its
    layers are known to be the model's."""
    if not spec.layers:
        raise ValueError("no layers to capture")
    for layer in spec.layers:
        lm.sites.check_layer(layer)
    width = lm.sites.hidden_size if spec.site == "residual" else lm.sites.mlp_width
    shape = (len(spec.positions), n_personas, len(spec.layers), width)
    cap = Capture(
        spec=spec,
        sums=torch.zeros(shape, dtype=torch.float64),
        norm_sums=torch.zeros(shape[:3], dtype=torch.float64),
        counts=torch.zeros(n_personas, dtype=torch.int64),
        sq_sums=torch.zeros(shape, dtype=torch.float64) if spec.squares else None,
    )
    if spec.spill:
        cap._tmp = tempfile.TemporaryDirectory(prefix="personachat-", dir=spill_dir)
        cap.spill_path = Path(cap._tmp.name) / "pooled.f32"
        cap._writer = open(cap.spill_path, "wb")  # noqa: SIM115 - closed by finish()/close()
    return cap


def capture(
    lm: LoadedModel,
    samples: Sequence[Sample],
    spec: CaptureSpec,
    n_personas: int,
    *,
    batch_size: int = 8,
    side: str | None = None,
    progress: bool = True,
    desc: str = "activations",
    spill_dir: str | Path | None = None,
) -> Capture:
    """Capture ``spec`` over ``samples``: per-persona sums, and the per-sample spill if asked."""
    if not samples:
        raise ValueError("no samples to capture: the dataset selection is empty")
    cap = open_capture(lm, spec, n_personas, spill_dir=spill_dir)
    try:
        capture_into(
            cap, lm, samples, batch_size=batch_size, side=side, progress=progress, desc=desc
        )
    except BaseException:
        cap.close()
        raise
    cap.finish()
    return cap


def capture_into(
    cap: Capture,
    lm: LoadedModel,
    samples: Sequence[Sample],
    *,
    batch_size: int = 8,
    side: str | None = None,
    progress: bool = True,
    desc: str = "activations",
) -> None:
    """Teacher-forced capture of ``samples`` into ``cap``: length-sorted batches, each forward
    stopped after the last layer needed."""
    handler = _PoolHandler(cap.spec)
    order = sorted(samples, key=lambda s: -len(s.ids))  # similar lengths batch together
    pad_id = int(lm.tokenizer.pad_token_id or 0)
    pad_side = padding_side(lm, side)
    bar = tqdm(total=len(order), desc=desc, disable=not progress, unit="sample")
    try:
        with intervene(lm.sites, [handler]), torch.inference_mode():
            for start in range(0, len(order), batch_size):
                chunk = order[start : start + batch_size]
                batch = pad_batch(chunk, pad_id, pad_side, lm.device)
                handler.start(span_weights(chunk, batch, len(cap.spec.positions)))
                run_forward(lm, batch)
                pooled, norms = handler.collect()
                cap.add([s.persona for s in chunk], [s.question for s in chunk], pooled, norms)
                bar.update(len(chunk))
    finally:
        bar.close()
