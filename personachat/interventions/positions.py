"""Which token positions of a forward a handler acts on: all, the prompt, or the generated tokens.

Generation runs with a KV cache, so the first forward at a layer is the prefill (the prompt) and
each later forward is one generated token. A ``Cursor`` counts the positions seen per layer; when
the prompt length is not given, the first forward's length is taken as the prompt. A ``Window``
turns a position mode into the slice of each forward's positions to change.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from personachat.interventions.specs import PositionMode

_END = 1 << 62  # past any position


class Cursor:
    """Counts positions per layer: the first forward is the prompt, later ones one token each."""

    def __init__(self, prompt_len: int | None) -> None:
        self.prompt_len = prompt_len
        self._seen: dict[int, int] = {}

    def advance(self, layer: int, length: int) -> tuple[int, int, int]:
        """``(start, end, prompt_len)`` of the positions in this forward at ``layer``."""
        start = self._seen.get(layer, 0)
        self._seen[layer] = start + length
        prompt_len = self.prompt_len if self.prompt_len is not None else length
        if self.prompt_len is None and start == 0:
            self.prompt_len = length
        return start, start + length, prompt_len


def bounds(mode: PositionMode, last_n: int | None, prompt_len: int) -> tuple[int, int]:
    """``[first, last)``: the positions ``mode`` covers, counted from the prompt's start."""
    if mode == "all":
        return 0, _END
    if mode == "generated":
        return prompt_len, _END
    first = 0 if last_n is None else max(prompt_len - last_n, 0)
    return first, prompt_len


class Window:
    """The positions of each forward a handler acts on: all, the prompt (or its last n tokens),
    or the generated tokens; ``span`` is the slice of this forward's positions, or ``None``."""

    def __init__(self, mode: PositionMode, last_n: int | None, prompt_len: int | None) -> None:
        self.mode: PositionMode = mode
        self.last_n = last_n
        self._cursor = Cursor(prompt_len)

    def span(self, layer: int, length: int) -> tuple[int, int] | None:
        if self.mode == "all":
            return 0, length
        start, end, prompt_len = self._cursor.advance(layer, length)
        first, last = bounds(self.mode, self.last_n, prompt_len)
        lo, hi = max(first, start), min(last, end)
        return None if lo >= hi else (lo - start, hi - start)

    def apply(
        self, layer: int, x: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]
    ) -> torch.Tensor | None:
        """``fn`` on this forward's positions in the window (a copy of ``x`` with them
        replaced); ``None`` when the window misses this forward."""
        span = self.span(layer, x.shape[1])
        if span is None:
            return None
        lo, hi = span
        if lo == 0 and hi == x.shape[1]:
            return fn(x)
        out = x.clone()
        out[:, lo:hi] = fn(x[:, lo:hi])
        return out
