"""The drift of a conversation: each assistant turn's projection on the tracked vectors (the
picked personas and the assistant axis), raw, scaled and as a percentile, turn by turn.

A ``Drift`` holds plain per-turn numbers, never a readout: one ``Point`` (one value per layer
for each of raw, scaled and percentile) per tracked vector and turn, at most ``MAX_TURNS``
turns (the oldest go first). The session's ``Readout`` carries it from one reply to the next
(``Readout.after``); a retried turn replaces its point, Undo cuts the turns after the
conversation's end (``upto``). ``numbers`` is its JSON form (the ``/drift`` endpoint and the
readout's numbers); ``personachat.app.figures.drift_figure`` draws it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

MAX_TURNS = 100
BAND = (5, 95)  # the reference's normal band, in its own percentiles
PERCENTILE_UNIT = "percentile (0-100) among the reference samples at that layer"


@dataclass(frozen=True, eq=False)
class Point:
    """One vector's projection at one assistant turn, pooled the way the vector was read, per
    layer: raw, scaled (None without the store's means) and as a percentile (None without a
    reference distribution)."""

    raw: np.ndarray
    scaled: np.ndarray | None = None
    percentile: np.ndarray | None = None


@dataclass(frozen=True, eq=False)
class Track:
    """What one drift line follows: the vector, the layer shown (its best), the positions a
    turn is pooled over, whose samples its percentiles rank among ("" when it has no reference
    distribution) and that reference's ``BAND`` in scaled units per layer ([2, layers])."""

    name: str
    layer: int
    positions: str
    reference: str = ""
    band: np.ndarray | None = None


def _value(values: np.ndarray | None, layer: int) -> float | None:
    if values is None or not 0 <= layer < len(values):
        return None
    value = float(values[layer])
    return round(value, 6) if math.isfinite(value) else None


def _row(values: np.ndarray | None) -> list[float | None] | None:
    return None if values is None else [_value(values, i) for i in range(len(values))]


@dataclass(frozen=True, eq=False)
class Drift:
    """The tracked vectors' points, turn by turn: ``turns`` holds (turn number from 1, {vector:
    Point}) in order; ``tracks`` what each vector's line is."""

    turns: tuple[tuple[int, Mapping[str, Point]], ...] = ()
    tracks: Mapping[str, Track] = field(default_factory=dict)

    def upto(self, n: int) -> Drift:
        """The first ``n`` turns only (a retried or undone turn goes)."""
        return Drift(tuple(t for t in self.turns if t[0] <= n), self.tracks)

    def add(self, turn: int, points: Mapping[str, Point], tracks: Mapping[str, Track]) -> Drift:
        """Turn ``turn``'s points after the earlier turns (any later ones dropped), at most
        ``MAX_TURNS`` kept."""
        kept = self.upto(turn - 1).turns
        if not points:
            return Drift(kept, self.tracks)
        turns = (*kept, (turn, dict(points)))[-MAX_TURNS:]
        return Drift(turns, {**self.tracks, **tracks})

    def series(self, name: str, unit: str) -> tuple[list[int], list[float | None]]:
        """(turn numbers, the vector's ``unit`` value at its track's layer per turn; None where
        a turn did not track it or has no such value)."""
        track = self.tracks[name]
        xs, ys = [], []
        for turn, points in self.turns:
            point = points.get(name)
            xs.append(turn)
            ys.append(_value(getattr(point, unit), track.layer) if point is not None else None)
        return xs, ys

    def numbers(self) -> dict[str, Any]:
        """The JSON form: per tracked vector, its layer, pooling and reference, its band, and per
        turn the raw, scaled and percentile value at that layer and at every layer."""
        out: dict[str, Any] = {
            "turns": [turn for turn, _ in self.turns],
            "band_percentiles": list(BAND),
            "units": {
                "raw": "projection on the unit vector",
                "scaled": "0 = baseline mean, 1 = persona mean",
                "percentile": PERCENTILE_UNIT,
            },
            "vectors": {},
        }
        for name, track in self.tracks.items():
            entry: dict[str, Any] = {
                "layer": track.layer,
                "positions": track.positions,
                "reference": track.reference or None,
                "band_scaled": _row(track.band[:, track.layer]) if track.band is not None else None,
            }
            for unit in ("raw", "scaled", "percentile"):
                entry[unit] = self.series(name, unit)[1]
                entry[f"{unit}_by_layer"] = [
                    _row(getattr(points[name], unit)) if name in points else None
                    for _, points in self.turns
                ]
            out["vectors"][name] = entry
        if not self.tracks:
            out["note"] = "no turn yet, or nothing tracked: pick a persona or register the axis"
        return out
