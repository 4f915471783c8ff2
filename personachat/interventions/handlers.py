"""The handlers ``personachat.hooks.intervene`` runs live: steer, ablate and read out.

Each holds tensors precomputed on its layer's device (``personachat.interventions.plan`` builds
them from specs), so the hot path of a decode step is one or two tensor ops per hooked layer. In
the order ``build_plan`` lists them (a handler sees the result of the ones before):

- ``Steer``: add a per-layer offset to the residual stream, at all tokens, the prompt (or its
  last n tokens) or the generated tokens only, with a coefficient per batch row.
- ``DirectionalAblation``: set the residual stream's component along a direction to a level.
- ``Ablate``: zero or mean-ablate MLP units at the input of the down projection (or the gate).
- ``Readout``: the projection of the residual stream onto unit persona vectors at every layer,
  after the interventions at that layer, kept on the device and concatenated once at the end.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch

from personachat.hooks import Site
from personachat.interventions.positions import Window
from personachat.interventions.specs import InterventionError, PositionMode


class Steer:
    """Add a precomputed per-layer offset to the residual stream, per row and per position."""

    def __init__(
        self,
        deltas: Mapping[int, torch.Tensor],
        *,
        positions: PositionMode = "all",
        last_n: int | None = None,
        prompt_len: int | None = None,
        rows: torch.Tensor | None = None,
    ) -> None:
        # rows: coefficient per batch row; folded into the deltas as [B, 1, H].
        self.rows = rows
        self.deltas = {
            layer: d if rows is None else rows.to(d)[:, None, None] * d
            for layer, d in deltas.items()
        }
        self.positions: PositionMode = positions
        self._window = Window(positions, last_n, prompt_len)
        self._plain = positions == "all" and rows is None  # every position of every row

    def wants(self) -> Iterable[tuple[Site, int]]:
        return [("residual", layer) for layer in sorted(self.deltas)]

    def __call__(self, site: Site, layer: int, x: torch.Tensor) -> torch.Tensor | None:
        delta = self.deltas[layer]
        if self._plain:
            return x + delta
        if self.rows is not None and x.shape[0] != delta.shape[0]:
            raise InterventionError(
                f"steering has {delta.shape[0]} row coefficients but the batch has "
                f"{x.shape[0]} rows"
            )
        if self.positions == "all":
            return x + delta
        return self._window.apply(layer, x, lambda t: t + delta)


class Directions:
    """A handler that moves the component along one unit direction per layer, in the rows
    ``rows`` marks (all when None) and at its position window; subclasses give ``_apply``."""

    def __init__(
        self,
        units: Mapping[int, torch.Tensor],
        levels: Mapping[int, float] | None = None,
        rows: torch.Tensor | None = None,
        *,
        positions: PositionMode = "all",
        last_n: int | None = None,
        prompt_len: int | None = None,
    ) -> None:
        self.units = dict(units)
        self.levels = dict(levels or {})
        self.rows = rows  # 1 where a row is acted on, 0 where it is left alone
        self.positions: PositionMode = positions
        self._window = None if positions == "all" else Window(positions, last_n, prompt_len)

    def wants(self) -> Iterable[tuple[Site, int]]:
        return [("residual", layer) for layer in sorted(self.units)]

    def __call__(self, site: Site, layer: int, x: torch.Tensor) -> torch.Tensor | None:
        if self._window is None:
            return self._apply(layer, x)
        return self._window.apply(layer, x, lambda t: self._apply(layer, t))

    def _apply(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class DirectionalAblation(Directions):
    """Set the component along unit directions to a level: ``x - (x . u - m) u`` per layer.

    ``m`` is the baseline's mean level (mean ablation) or 0 (the direction projected out).
    """

    def _apply(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        unit = self.units[layer]
        coef = x @ unit - self.levels.get(layer, 0.0)  # [B, T]
        if self.rows is not None:
            coef = coef * self.rows.to(coef)[:, None]
        return x - coef.unsqueeze(-1) * unit


class Ablate:
    """Set MLP units to zero or to fixed values at ``site`` (``mlp_hidden`` or ``gate``).

    One fused op per call: ``x * keep`` (zero) or ``fill + x * keep`` (mean), where ``keep`` is
    0 at ablated units of ablated rows and 1 elsewhere, so untouched units pass through exactly.
    ``positions`` limits it to the prompt (or its last ``last_n`` tokens) or the generated tokens.
    """

    def __init__(
        self,
        indices: Mapping[int, torch.Tensor],
        values: Mapping[int, torch.Tensor] | None = None,
        *,
        width: int,
        site: Site = "mlp_hidden",
        rows: torch.Tensor | None = None,
        dtype: torch.dtype = torch.float32,
        positions: PositionMode = "all",
        last_n: int | None = None,
        prompt_len: int | None = None,
    ) -> None:
        self.indices = dict(indices)
        self.rows = rows  # True where a row is ablated
        self.positions: PositionMode = positions
        self._window = None if positions == "all" else Window(positions, last_n, prompt_len)
        self.site: Site = site
        self.keep: dict[int, torch.Tensor] = {}
        self.fill: dict[int, torch.Tensor] | None = None if values is None else {}
        for layer, idx in self.indices.items():
            ones = torch.ones(width, device=idx.device, dtype=dtype)
            keep = ones.index_fill(0, idx, 0.0)
            fill = torch.zeros_like(ones)
            if values is not None:
                fill = fill.index_copy(0, idx, values[layer].to(dtype))
            if rows is not None:  # bool per row: ablate this row only
                on = rows.to(idx.device)[:, None, None]
                keep = torch.where(on, keep, ones)
                fill = torch.where(on, fill, torch.zeros_like(fill))
            self.keep[layer] = keep
            if self.fill is not None:
                self.fill[layer] = fill

    def wants(self) -> Iterable[tuple[Site, int]]:
        return [(self.site, layer) for layer in sorted(self.indices)]

    def __call__(self, site: Site, layer: int, x: torch.Tensor) -> torch.Tensor | None:
        if self._window is None:
            if self.fill is None:
                return x * self.keep[layer]
            return self._ablate(layer, x)
        return self._window.apply(layer, x, lambda t: self._ablate(layer, t))

    def _ablate(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        keep = self.keep[layer]
        if self.fill is None:
            return x * keep
        return torch.addcmul(self.fill[layer], x, keep)


class Projections:
    """Block outputs kept per layer by reference and projected ``flush_every`` at a time
    (one concatenation along the tokens and one ``_project`` per layer); subclasses give
    ``_project`` and fill ``_stash`` / ``_parts`` for their layers."""

    flush_every: int
    _stash: dict[int, list[torch.Tensor]]
    _parts: dict[int, list[torch.Tensor]]

    def __call__(self, site: Site, layer: int, x: torch.Tensor) -> None:
        stash = self._stash[layer]
        stash.append(x)
        if len(stash) >= self.flush_every:
            self._flush(layer)

    def _flush(self, layer: int) -> None:
        stash = self._stash[layer]
        if stash:
            self._parts[layer].append(self._project(layer, torch.cat(stash, dim=1)))
            stash.clear()

    def _project(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class Readout(Projections):
    """Projections of the residual stream onto unit persona vectors, per token and layer.

    A forward only keeps a reference to the block output (a fresh tensor, never changed in
    place later), and ``flush_every`` of them are projected at once (one concatenation and one
    ``[B, T, V]`` matmul per layer), so a decode step costs a list append per layer. Everything
    stays on the device until ``result()`` concatenates once into ``[B, tokens, layers,
    vectors]`` (float32, CPU).
    """

    def __init__(
        self,
        units: Mapping[int, torch.Tensor],
        names: Sequence[str],
        layers: Sequence[int],
        flush_every: int = 32,
    ) -> None:
        self.units = units  # {layer: [V, H]}, unit rows on that layer's device
        self.names = list(names)
        self.layers = list(layers)
        self.flush_every = flush_every
        self._parts: dict[int, list[torch.Tensor]] = {layer: [] for layer in self.layers}
        self._stash: dict[int, list[torch.Tensor]] = {layer: [] for layer in self.layers}

    def wants(self) -> Iterable[tuple[Site, int]]:
        return [("residual", layer) for layer in self.layers]

    def _project(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        return x @ self.units[layer].T

    def result(self) -> torch.Tensor:
        """``[B, tokens, layers, vectors]``; tokens are those seen by the first layer."""
        for layer in self.layers:
            self._flush(layer)
        if not self.layers or not self._parts[self.layers[0]]:
            return torch.zeros(0, 0, len(self.layers), len(self.names))
        per_layer = [torch.cat(self._parts[layer], dim=1).float().cpu() for layer in self.layers]
        n = min(p.shape[1] for p in per_layer)  # a forward may stop early past some layers
        return torch.stack([p[:, :n] for p in per_layer], dim=2)
