"""Batches for plain forward passes: padding (left or right) with explicit position ids.

Position ids are passed explicitly (``cumsum(mask) - 1``), so left and right padding give the
same numbers as a batch of one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from personachat.activations.encode import Sample
from personachat.hooks import StopForward
from personachat.model import LoadedModel


@dataclass(frozen=True)
class Batch:
    """Padded tensors of a batch plus each sample's offset (left padding shifts spans)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    offsets: list[int]


def pad(
    rows: Sequence[Sequence[int]], pad_id: int, side: Literal["left", "right"], device: torch.device
) -> Batch:
    """Token id rows padded to one width, with the mask, position ids and each row's offset."""
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    pos = torch.zeros((len(rows), width), dtype=torch.long)
    offsets = []
    for b, row in enumerate(rows):
        n = len(row)
        start = width - n if side == "left" else 0
        ids[b, start : start + n] = torch.tensor(list(row), dtype=torch.long)
        mask[b, start : start + n] = 1
        pos[b, start : start + n] = torch.arange(n)
        offsets.append(start)
    return Batch(ids.to(device), mask.to(device), pos.to(device), offsets)


def pad_batch(
    samples: Sequence[Sample], pad_id: int, side: Literal["left", "right"], device: torch.device
) -> Batch:
    """``pad`` of the samples' token ids."""
    return pad([s.ids for s in samples], pad_id, side, device)


def span_weights(samples: Sequence[Sample], batch: Batch, n_positions: int) -> torch.Tensor:
    """[n_positions, B, T] averaging weights (1/len over each span, 0 elsewhere)."""
    width = batch.input_ids.shape[1]
    w = torch.zeros((n_positions, len(samples), width), dtype=torch.float32)
    for b, (s, off) in enumerate(zip(samples, batch.offsets, strict=True)):
        for p, (start, end) in enumerate(s.spans):
            w[p, b, off + start : off + end] = 1.0 / (end - start)
    return w.to(batch.input_ids.device)


def run_forward(lm: LoadedModel, batch: Batch, *, head: bool = False) -> Any:
    """Run the base model (no LM head; with ``head``, the whole causal LM) on ``batch``, without
    a cache; a handler's ``StopForward`` ends it early and gives None."""
    module = lm.model if head else lm.sites.base
    try:
        return module(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            use_cache=False,
        )
    except StopForward:
        return None


def padding_side(lm: LoadedModel, side: str | None) -> Literal["left", "right"]:
    chosen = side or getattr(lm.tokenizer, "padding_side", "right") or "right"
    if chosen not in ("left", "right"):
        raise ValueError(f"padding side must be 'left' or 'right', got {chosen!r}")
    return "left" if chosen == "left" else "right"
