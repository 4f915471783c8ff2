"""Hold a persona: clamp the residual stream's component along a direction to one side of a level.

``CapSpec(persona, side="above", percentile=25)`` keeps the projection ``x . u`` on the unit
direction ``u`` at least ``t`` (``x - min(0, x . u - t) u``); ``side="below"`` keeps it at most
``t`` (``x - max(0, x . u - t) u``). Nothing else moves: a position already on the kept side is
left exactly as it was. ``t`` is a raw projection (``threshold``) or, per layer, a percentile of
the vector's stored reference distribution (``ProjectionQuantiles``: the extraction samples of
its baseline or of its persona projected onto it), e.g. the 25th percentile of the assistant's
own projections on the assistant axis.

In a plan a cap acts after the steering and the directional ablation at the same layer, so it
bounds what they leave; a readout at that layer reads the capped stream.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

import torch

from personachat.interventions.handlers import Directions
from personachat.interventions.specs import POSITION_MODES, InterventionError, PositionMode
from personachat.records import QUANTILE_LEVELS, PersonaVector

Side = Literal["above", "below"]
SIDES: tuple[Side, ...] = ("above", "below")
REFERENCES = ("baseline", "persona")


@dataclass(frozen=True)
class CapSpec:
    """Keep ``persona``'s projection on one ``side`` of a level at ``layers`` (see the module).

    Give ``threshold`` (raw units) or ``percentile`` (0-100) of the ``reference`` samples'
    projections ("baseline" or "persona"); ``positions`` and ``last_n`` choose the tokens, as
    for steering.
    """

    persona: str
    layers: str | Iterable[int] = "all"
    side: Side = "above"
    threshold: float | None = None
    percentile: float | None = 25.0
    reference: Literal["baseline", "persona"] = "persona"
    positions: PositionMode = "all"
    last_n: int | None = None


class Cap(Directions):
    """Clamp the component along unit directions to one side of a level, per layer."""

    def __init__(
        self,
        units: Mapping[int, torch.Tensor],
        levels: Mapping[int, float],
        side: Side,
        rows: torch.Tensor | None = None,
        *,
        positions: PositionMode = "all",
        last_n: int | None = None,
        prompt_len: int | None = None,
    ) -> None:
        super().__init__(
            units, levels, rows, positions=positions, last_n=last_n, prompt_len=prompt_len
        )
        self.side: Side = side

    def _apply(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        unit = self.units[layer]
        excess = x @ unit - self.levels[layer]  # [B, T]: how far past the level
        over = excess.clamp(max=0) if self.side == "above" else excess.clamp(min=0)
        if self.rows is not None:
            over = over * self.rows.to(over)[:, None]
        return x - over.unsqueeze(-1) * unit  # 0 where a position is on the kept side


def cap_levels(vector: PersonaVector, spec: CapSpec, layers: Iterable[int]) -> dict[int, float]:
    """The level ``t`` at each layer: the raw threshold, or the percentile of the reference."""
    check_cap(spec)
    if spec.threshold is not None:
        return dict.fromkeys(layers, float(spec.threshold))
    quantiles = vector.quantiles
    if quantiles is None:
        raise InterventionError(
            f"a cap at a percentile needs {spec.persona!r}'s reference distribution, which was "
            "not registered with this vector; re-extract it (scripts/extract_vectors.py keeps "
            "it) or give a raw threshold"
        )
    table = quantiles.baseline if spec.reference == "baseline" else quantiles.persona
    assert spec.percentile is not None
    levels = torch.tensor(QUANTILE_LEVELS, dtype=torch.float64)
    at = torch.tensor([spec.percentile / 100.0], dtype=torch.float64)
    return {layer: float(_interpolate(at, levels, table[layer].double())) for layer in layers}


def _interpolate(x: torch.Tensor, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
    """Linear interpolation of ``ys`` at ``xs`` to the point ``x`` (``xs`` ascending)."""
    i = int(torch.searchsorted(xs, x).clamp(1, len(xs) - 1))
    w = (x - xs[i - 1]) / (xs[i] - xs[i - 1])
    return ys[i - 1] + w * (ys[i] - ys[i - 1])


def check_cap(spec: CapSpec) -> None:
    """The spec's choices and numbers, each checked with a message naming it."""
    if spec.side not in SIDES:
        raise InterventionError(f"unknown cap side {spec.side!r}; use one of {SIDES}")
    if spec.reference not in REFERENCES:
        raise InterventionError(f"unknown cap reference {spec.reference!r}; use {REFERENCES}")
    if spec.positions not in POSITION_MODES:
        raise InterventionError(f"unknown positions {spec.positions!r}; use {POSITION_MODES}")
    if (spec.threshold is None) == (spec.percentile is None):
        raise InterventionError("give a cap either a threshold or a percentile, not both")
    if spec.threshold is not None and not math.isfinite(spec.threshold):
        raise InterventionError(f"cap threshold is {spec.threshold}; give a finite number")
    if spec.percentile is not None and not 0.0 <= spec.percentile <= 100.0:
        raise InterventionError(f"cap percentile must be in 0..100, got {spec.percentile}")


def describe_cap(spec: CapSpec, layers: Iterable[int]) -> str:
    """What the cap does, in words for a status line."""
    where = "at least" if spec.side == "above" else "at most"
    level = (
        f"{spec.threshold:g}"
        if spec.threshold is not None
        else f"the {spec.percentile:g}th percentile of its {spec.reference}'s projections"
    )
    shown = sorted(layers)
    span = f"{shown[0]}-{shown[-1]}" if len(shown) > 1 else str(shown[0]) if shown else "none"
    return f"Holding {spec.persona}'s projection {where} {level} at layers {span}."
