"""The running batch's KV cache: rows of different lengths, left-padded, joined and dropped.

Each row's keys and values sit at the right end of the cache, and the columns to their left
are padding: zeros in the cache, 0 in the attention mask. A new request's prefill cache (its
rows alone, no padding) joins by padding both sides on the left to a common length and
concatenating along the batch; rows that leave are dropped, and columns left holding only
padding are cut from the left. Forwards get explicit position ids (each row's own positions),
so a row's numbers are those of its run alone.

Only caches of plain ``DynamicLayer``s join this way (``unmergeable`` says why a model's do
not: sliding-window and hybrid caches keep a window or a state per layer).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.nn import functional
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


def unmergeable(model: Any) -> str | None:
    """Why the rows of ``model``'s KV cache cannot be joined and dropped, or None if they can."""
    config = model.config
    if getattr(config, "is_encoder_decoder", False):
        return "it is an encoder-decoder model"
    try:
        layers = DynamicCache(config=config).layers
    except Exception as err:  # any failure means: do not merge
        return f"its cache could not be built ({err})"
    kinds = sorted({type(layer).__name__ for layer in layers if type(layer) is not DynamicLayer})
    if kinds:
        return f"its cache keeps {', '.join(kinds)} layers"
    return None


def _left(t: torch.Tensor, n: int) -> torch.Tensor:
    """``t`` with ``n`` zero columns on the left of its sequence axis (-2 for 4-D K/V, -1 for
    a 2-D mask)."""
    if n == 0:
        return t
    return functional.pad(t, (0, 0, n, 0) if t.dim() == 4 else (n, 0))


def _kv(layer: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """A filled ``DynamicLayer``'s keys and values."""
    assert type(layer) is DynamicLayer and layer.keys is not None and layer.values is not None
    return layer.keys, layer.values


def _put(layer: Any, keys: torch.Tensor, values: torch.Tensor) -> None:
    layer.keys, layer.values = keys, values


class BatchCache:
    """The KV cache and attention mask of the batch's rows (none: ``cache`` is None)."""

    def __init__(self) -> None:
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None  # [rows, columns] long, 1 where a row has a token

    @property
    def rows(self) -> int:
        return 0 if self.mask is None else int(self.mask.shape[0])

    def add(self, cache: DynamicCache, mask: torch.Tensor) -> None:
        """Join a prefill ``cache`` of ``mask.shape[0]`` rows (``mask``: its own, all ones)."""
        if self.cache is None or self.mask is None:
            self.cache, self.mask = cache, mask
            return
        width, length = int(self.mask.shape[1]), int(mask.shape[1])
        total = max(width, length)
        pad, theirs_pad = total - width, total - length
        for mine, theirs in zip(self.cache.layers, cache.layers, strict=True):
            (keys, values), (their_keys, their_values) = _kv(mine), _kv(theirs)
            _put(
                mine,
                torch.cat([_left(keys, pad), _left(their_keys, theirs_pad)]),
                torch.cat([_left(values, pad), _left(their_values, theirs_pad)]),
            )
        self.mask = torch.cat([_left(self.mask, total - width), _left(mask, total - length)])

    def keep(self, rows: Sequence[int]) -> None:
        """Keep ``rows`` (in this order), drop the others, cut columns of padding alone."""
        if self.cache is None or self.mask is None:
            return
        if not rows:
            self.cache = self.mask = None
            return
        index = torch.tensor(list(rows), dtype=torch.long, device=self.mask.device)
        mask = self.mask.index_select(0, index)
        lead = int(mask.any(dim=0).int().argmax())  # the first column some row still uses
        self.mask = mask[:, lead:]
        for layer in self.cache.layers:
            keys, values = _kv(layer)
            _put(
                layer,
                keys.index_select(0, index)[:, :, lead:],
                values.index_select(0, index)[:, :, lead:],
            )

    def grow(self) -> torch.Tensor:
        """The attention mask of the next decode step: one more column, a token for every row."""
        assert self.mask is not None
        ones = self.mask.new_ones((self.mask.shape[0], 1))
        self.mask = torch.cat([self.mask, ones], dim=1)
        return self.mask

    def clear(self) -> None:
        self.cache = self.mask = None
