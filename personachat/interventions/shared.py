"""The interventions of many requests stacked as rows of one batch: one op per layer for all.

The chat scheduler decodes the requests of many sessions as rows of one shared batch. At a
generated token every handler ``build_plan`` makes does a fixed thing to a row: a position
window covers all generated tokens (``all``, ``generated``) or none (``prompt``, with or without
``last_n``), so ``row_effects`` reads from a request's plan what each of its rows gets at its
generated tokens, and ``SharedPlan`` stacks the effects of every row of the batch into one
tensor per layer, built once per change of the batch's rows:

- ``SharedSteer``: ``x + D`` with ``D[b]`` row b's offset (0 for a row not steered there);
- ``SharedDirection``: ``x - c (x . u - m) u`` with a unit, level and coefficient per row (0s
  leave a row as it is);
- ``SharedAblate``: ``fill + x * keep`` (or ``x * keep``) with a keep mask and fill per row;
- ``SharedCap``: ``x - c s min(0, s (x . u - m)) u`` with a unit, level, side ``s`` (+1 keeps the
  projection at least ``m``, -1 at most) and coefficient per row;
- ``SharedReadout``: keeps each step's block output and projects all rows at once, every
  ``flush_every`` steps, onto each row's own unit vectors (zero-padded to the widest set).

Each row gets the arithmetic its own handler would do on it alone (elementwise ops are the same
op; projections are batched matrix products, equal to a lone row's up to float rounding).
The prompt is not handled here: each request's prefill runs alone under its own plan.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from personachat.hooks import Handler, Site
from personachat.interventions.capping import Cap
from personachat.interventions.handlers import (
    Ablate,
    DirectionalAblation,
    Projections,
    Readout,
    Steer,
)
from personachat.interventions.plan import Plan
from personachat.interventions.specs import InterventionError

Keep = tuple[torch.Tensor, torch.Tensor | None]  # keep mask [W], fill [W] (None: zero ablation)


@dataclass(frozen=True)
class RowEffects:
    """What one batch row gets at each generated token, per layer (empty: nothing)."""

    steer: Mapping[int, torch.Tensor] = field(default_factory=dict)  # [H] offset
    direction: Mapping[int, tuple[torch.Tensor, float, float]] = field(default_factory=dict)
    ablate: Mapping[tuple[Site, int], Keep] = field(default_factory=dict)
    readout: Mapping[int, torch.Tensor] = field(default_factory=dict)  # [V, H] unit rows
    # unit [H], level, side (+1 at least the level, -1 at most), coefficient
    cap: Mapping[int, tuple[torch.Tensor, float, float, float]] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return not (self.steer or self.direction or self.ablate or self.readout or self.cap)


def _row(t: torch.Tensor, row: int, stacked: bool) -> torch.Tensor:
    return t[row, 0] if stacked else t


def row_effects(plan: Plan, row: int) -> RowEffects:
    """The effects of ``plan``'s handlers on batch row ``row`` at generated tokens."""
    steer: dict[int, torch.Tensor] = {}
    direction: dict[int, tuple[torch.Tensor, float, float]] = {}
    ablate: dict[tuple[Site, int], Keep] = {}
    readout: dict[int, torch.Tensor] = {}
    cap: dict[int, tuple[torch.Tensor, float, float, float]] = {}
    for handler in plan.handlers:
        if isinstance(handler, Steer):
            if handler.positions != "prompt":
                stacked = handler.rows is not None
                steer = {k: _row(d, row, stacked) for k, d in handler.deltas.items()}
        elif isinstance(handler, DirectionalAblation):
            coef = 1.0 if handler.rows is None else float(handler.rows[row])
            if handler.positions != "prompt" and coef != 0.0:
                direction = {
                    k: (u, handler.levels.get(k, 0.0), coef) for k, u in handler.units.items()
                }
        elif isinstance(handler, Ablate):
            on = handler.rows is None or bool(handler.rows[row])
            if handler.positions != "prompt" and on:
                ablate = {(handler.site, k): _keep(handler, k, row) for k in handler.keep}
        elif isinstance(handler, Readout):
            readout = {k: handler.units[k] for k in handler.layers}
        elif isinstance(handler, Cap):
            coef = 1.0 if handler.rows is None else float(handler.rows[row])
            if handler.positions != "prompt" and coef != 0.0:
                side = 1.0 if handler.side == "above" else -1.0
                cap = {k: (u, handler.levels[k], side, coef) for k, u in handler.units.items()}
        else:
            raise InterventionError(
                f"{type(handler).__name__} has no shared-batch form; pass it as an extra handler"
            )
    return RowEffects(steer, direction, ablate, readout, cap)


def _keep(handler: Ablate, layer: int, row: int) -> Keep:
    keep = handler.keep[layer]
    stacked = keep.dim() == 3
    fill = None if handler.fill is None else _row(handler.fill[layer], row, stacked)
    return _row(keep, row, stacked), fill


def _stack(
    rows: Sequence[torch.Tensor | None], like: torch.Tensor, blank: float = 0.0
) -> torch.Tensor:
    """``[B, 1, ...]``: each row's tensor, ``blank`` where a row has none."""
    filler = torch.full_like(like, blank)
    return torch.stack([filler if t is None else t for t in rows]).unsqueeze(1)


def _column(values: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    """``[B, 1, 1]`` of ``values`` in ``like``'s dtype and device."""
    return torch.tensor(values, dtype=like.dtype, device=like.device)[:, None, None]


class SharedSteer:
    """``x + D[layer]``, ``D`` ``[B, 1, H]``: every row's steering offset at once."""

    def __init__(self, effects: Sequence[RowEffects]) -> None:
        layers = sorted({k for e in effects for k in e.steer})
        self.deltas: dict[int, torch.Tensor] = {}
        for k in layers:
            rows = [e.steer.get(k) for e in effects]
            like = next(t for t in rows if t is not None)
            self.deltas[k] = _stack(rows, like)

    def wants(self) -> Iterable[tuple[Site, int]]:
        return [("residual", k) for k in self.deltas]

    def __call__(self, site: Site, layer: int, x: torch.Tensor) -> torch.Tensor:
        return x + self.deltas[layer]


class SharedDirection:
    """``x - c (x . u - m) u`` with ``u``, ``m``, ``c`` per row (zeros leave a row alone)."""

    def __init__(self, effects: Sequence[RowEffects]) -> None:
        layers = sorted({k for e in effects for k in e.direction})
        self.units: dict[int, torch.Tensor] = {}  # [B, 1, H]
        self.levels: dict[int, torch.Tensor] = {}  # [B, 1, 1]
        self.coefs: dict[int, torch.Tensor] = {}  # [B, 1, 1]
        for k in layers:
            parts = [e.direction.get(k) for e in effects]
            like = next(p[0] for p in parts if p is not None)
            self.units[k] = _stack([None if p is None else p[0] for p in parts], like)
            levels = [0.0 if p is None else p[1] for p in parts]
            coefs = [0.0 if p is None else p[2] for p in parts]
            self.levels[k] = _column(levels, like)
            self.coefs[k] = _column(coefs, like)

    def wants(self) -> Iterable[tuple[Site, int]]:
        return [("residual", k) for k in self.units]

    def __call__(self, site: Site, layer: int, x: torch.Tensor) -> torch.Tensor:
        unit = self.units[layer]
        coef = (torch.matmul(x, unit.transpose(1, 2)) - self.levels[layer]) * self.coefs[layer]
        return x - coef * unit


class SharedAblate:
    """``fill + x * keep`` (``x * keep`` when no row fills) per MLP site and layer, per row."""

    def __init__(self, effects: Sequence[RowEffects]) -> None:
        keys = sorted({k for e in effects for k in e.ablate}, key=lambda k: (k[1], k[0]))
        self.keep: dict[tuple[Site, int], torch.Tensor] = {}  # [B, 1, W]
        self.fill: dict[tuple[Site, int], torch.Tensor | None] = {}
        for key in keys:
            parts = [e.ablate.get(key) for e in effects]
            like = next(p[0] for p in parts if p is not None)
            self.keep[key] = _stack([None if p is None else p[0] for p in parts], like, 1.0)
            fills = [None if p is None else p[1] for p in parts]
            has_fill = any(f is not None for f in fills)
            self.fill[key] = _stack(fills, like) if has_fill else None

    def wants(self) -> Iterable[tuple[Site, int]]:
        return list(self.keep)

    def __call__(self, site: Site, layer: int, x: torch.Tensor) -> torch.Tensor:
        keep = self.keep[(site, layer)]
        fill = self.fill[(site, layer)]
        return x * keep if fill is None else torch.addcmul(fill, x, keep)


class SharedCap:
    """``x - c s min(0, s (x . u - m)) u`` per row: each row's projection held on its side."""

    def __init__(self, effects: Sequence[RowEffects]) -> None:
        layers = sorted({k for e in effects for k in e.cap})
        self.units: dict[int, torch.Tensor] = {}  # [B, 1, H]
        self.levels: dict[int, torch.Tensor] = {}  # [B, 1, 1]
        self.sides: dict[int, torch.Tensor] = {}
        self.coefs: dict[int, torch.Tensor] = {}
        for k in layers:
            parts = [e.cap.get(k) for e in effects]
            like = next(p[0] for p in parts if p is not None)
            self.units[k] = _stack([None if p is None else p[0] for p in parts], like)
            self.levels[k] = _column([0.0 if p is None else p[1] for p in parts], like)
            self.sides[k] = _column([1.0 if p is None else p[2] for p in parts], like)
            self.coefs[k] = _column([0.0 if p is None else p[3] for p in parts], like)

    def wants(self) -> Iterable[tuple[Site, int]]:
        return [("residual", k) for k in self.units]

    def __call__(self, site: Site, layer: int, x: torch.Tensor) -> torch.Tensor:
        unit, side = self.units[layer], self.sides[layer]
        excess = torch.matmul(x, unit.transpose(1, 2)) - self.levels[layer]
        over = (excess * side).clamp(max=0) * side * self.coefs[layer]
        return x - over * unit


class SharedReadout(Projections):
    """Each row's projections onto its own unit vectors, for every step of the batch's rows.

    A forward keeps a reference to the block output; every ``flush_every`` steps the kept ones
    are projected at once (``[B, k, H] @ [B, H, V]`` per layer). ``take`` hands each row its
    ``[steps, layers, vectors]`` (float32, CPU) and starts over.
    """

    def __init__(self, effects: Sequence[RowEffects], flush_every: int = 32) -> None:
        self.rows = [list(e.readout) for e in effects]  # each row's layers, in its order
        self.widths = [next((len(u) for u in e.readout.values()), 0) for e in effects]
        layers = sorted({k for e in effects for k in e.readout})
        width = max(self.widths, default=0)
        self.units: dict[int, torch.Tensor] = {}  # [B, H, V]
        for k in layers:
            parts = [e.readout.get(k) for e in effects]
            like = next(p for p in parts if p is not None)
            blank = torch.zeros(width, like.shape[1], dtype=like.dtype, device=like.device)
            padded = [blank if p is None else torch.cat([p, blank[len(p) :]]) for p in parts]
            self.units[k] = torch.stack(padded).transpose(1, 2)
        self.flush_every = flush_every
        self._stash: dict[int, list[torch.Tensor]] = {k: [] for k in self.units}
        self._parts: dict[int, list[torch.Tensor]] = {k: [] for k in self.units}

    def wants(self) -> Iterable[tuple[Site, int]]:
        return [("residual", k) for k in self.units]

    def _project(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        return torch.matmul(x, self.units[layer])

    def take(self) -> list[torch.Tensor | None]:
        """Per batch row: ``[steps, layers, vectors]`` since the last take, or None (no readout)."""
        joined: dict[int, torch.Tensor] = {}
        for k in self.units:
            self._flush(k)
            if self._parts[k]:
                joined[k] = torch.cat(self._parts[k], dim=1).float().cpu()
            self._parts[k] = []
        out: list[torch.Tensor | None] = []
        for b, (layers, width) in enumerate(zip(self.rows, self.widths, strict=True)):
            if not layers or not all(k in joined for k in layers):
                out.append(None)
                continue
            steps = min(joined[k].shape[1] for k in layers)
            out.append(torch.stack([joined[k][b, :steps, :width] for k in layers], dim=1))
        return out


class SharedPlan:
    """The stacked handlers of a batch's rows, in ``build_plan``'s order (empty: none needed)."""

    def __init__(self, effects: Sequence[RowEffects]) -> None:
        self.handlers: list[Handler] = []
        self.readout: SharedReadout | None = None
        if any(e.steer for e in effects):
            self.handlers.append(SharedSteer(effects))
        if any(e.direction for e in effects):
            self.handlers.append(SharedDirection(effects))
        if any(e.ablate for e in effects):
            self.handlers.append(SharedAblate(effects))
        if any(e.cap for e in effects):
            self.handlers.append(SharedCap(effects))
        if any(e.readout for e in effects):
            self.readout = SharedReadout(effects)
            self.handlers.append(self.readout)
