"""The last reply's per-token readout: the one record the app carries from the model to the page.

When a reply ends, the backend turns the engine's ``personachat.chat.ReplyReadout`` (token ids,
a tensor) into a ``Readout`` (decoded tokens, numpy projections, the store's reference levels,
which personas were picked and which tokens were steered); the last ``Step`` of the reply
carries it, and the session keeps it in ``gr.State`` so the inside view redraws at another
layer or persona without the model. ``readout_html`` draws it with ``personachat.app.views``;
``personachat.app.figures`` draws its heatmap and ``personachat.app.export`` writes its numbers.

A token without a projection (the last reply token, never fed back through the model) stays
NaN all the way: it is drawn uncoloured and written as null.

Calibrated (``personachat.app.calibration`` fills it in): each persona's ``Reference`` (the
kind of positions its vector was read from, its best layer, its reference distribution) and
the turn's projection pooled that way (``turn``), so every value reads three ways: raw, scaled
(0 = baseline mean, 1 = persona mean) and as a percentile among the reference samples. The
conversation's per-turn numbers (``Drift``) ride along from one reply to the next.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from personachat.app import views
from personachat.app.drift import BAND, Drift, Point, Track

if TYPE_CHECKING:
    from personachat.chat import ReplyReadout

SCALED_UNIT = "0 = baseline mean, 1 = persona mean"
RAW_UNIT = "raw projection"
ALL_PERSONAS = "all personas"  # the tokens view's choice of every persona read out
AXIS = "assistant_axis"  # the assistant axis' persona name (personachat.pipeline.AXIS_PERSONA)
CLIP_PERCENTILE = 98.0  # the colour scale's full colour: this percentile of |value|


@dataclass(frozen=True, eq=False)
class Reference:
    """How one vector read out is calibrated: the ``positions`` it was read from (a turn is
    pooled the same way), its best layer, and its reference distribution: ``quantiles``
    [layers, levels] at ``records.QUANTILE_LEVELS`` of the ``side`` ("baseline" or "persona")
    samples, ``words`` saying whose they are; None when the vector was registered without."""

    positions: str = ""
    best_layer: int = 0
    quantiles: np.ndarray | None = None
    side: str = ""
    words: str = ""


@dataclass(frozen=True, eq=False)
class Readout:
    """Per-token projections of the last exchange (prompt then reply) on persona vectors."""

    model_id: str = ""
    personas: tuple[str, ...] = ()
    tokens: tuple[str, ...] = ()
    n_prompt: int = 0
    # [tokens, layers, personas], raw projections; NaN where the model never saw the token
    projections: np.ndarray | None = None
    # [2, layers, personas]: the projections of the baseline mean (0) and of the persona's own
    # mean (1) from the store, so a token reads as "how far from baseline towards the persona";
    # None when the store has no raw means
    reference: np.ndarray | None = None
    picked: tuple[str, ...] = ()  # the personas the turn steered with (shown by default)
    steered: tuple[int, int] | None = None  # the tokens [first, last) steering was added at
    settings: Mapping[str, Any] = field(default_factory=dict)  # the page's inputs of the turn
    references: tuple[Reference, ...] = ()  # one per persona; () when not calibrated
    turn: np.ndarray | None = None  # [layers, personas]: the turn pooled as each was read
    drift: Drift = field(default_factory=Drift)  # the conversation's turns so far

    @classmethod
    def from_reply(
        cls,
        model_id: str,
        reply: ReplyReadout,
        decode: Callable[[int], str],
        reference: np.ndarray | None,
        picked: Sequence[str] = (),
        steered: tuple[int, int] | None = None,
    ) -> Readout:
        """The engine's readout with its tokens decoded one by one (NaN rows stay NaN)."""
        values = reply.projections.numpy().astype(np.float32)
        tokens = tuple(decode(t) for t in reply.tokens)
        return cls(
            model_id,
            tuple(reply.personas),
            tokens,
            int(reply.prompt_len),
            values,
            reference,
            tuple(p for p in picked if p in reply.personas),
            steered,
        )

    @property
    def scaled(self) -> bool:
        return self.reference is not None

    @property
    def unit(self) -> str:
        return SCALED_UNIT if self.scaled else RAW_UNIT

    def shown(self, persona: str | None = None) -> list[str]:
        """The personas a view shows: ``persona`` (or all, with ``ALL_PERSONAS``), else the
        picked ones, else the first one read out."""
        if persona in self.personas:
            return [str(persona)]
        if persona == ALL_PERSONAS:
            return list(self.personas)
        return list(self.picked) or list(self.personas[:1])

    def values(self, persona: str | None, layer: int | None = None) -> np.ndarray | None:
        """Projections on ``persona`` [tokens, layers] (or [tokens] at ``layer``), rescaled so
        0 is the baseline persona's mean and 1 this persona's mean when the store has means."""
        if self.projections is None or not self.personas:
            return None
        index = self.personas.index(persona) if persona in self.personas else 0
        grid = self.projections[:, :, index]
        if self.reference is not None:
            zero, one = self.reference[0, :, index], self.reference[1, :, index]
            grid = (grid - zero) / np.maximum(one - zero, 1e-12)
        return grid if layer is None else grid[:, min(max(layer, 0), grid.shape[1] - 1)]

    def reference_of(self, persona: str) -> Reference | None:
        """``persona``'s reference, when it has a reference distribution."""
        if persona not in self.personas or len(self.references) != len(self.personas):
            return None
        found = self.references[self.personas.index(persona)]
        return found if found.quantiles is not None else None

    def percentiles(self, persona: str, layer: int | None = None) -> np.ndarray | None:
        """Each token's projection on ``persona`` as a percentile (0-100) of its reference at
        each layer ([tokens, layers], or [tokens] at ``layer``); None without a reference.
        One token ranked among pooled samples: like with like only for ``prompt_last``
        vectors at the last prompt token; ``turn_point`` pools first."""
        ref = self.reference_of(persona)
        if ref is None or self.projections is None:
            return None
        raw = self.projections[:, :, self.personas.index(persona)]
        assert ref.quantiles is not None
        grid = _ranks(raw.T, ref.quantiles).T
        return grid if layer is None else grid[:, min(max(layer, 0), grid.shape[1] - 1)]

    def _scale(self, values: np.ndarray, persona: str) -> np.ndarray | None:
        """``values`` [..., layers] in scaled units (None without the store's means)."""
        if self.reference is None:
            return None
        index = self.personas.index(persona)
        zero, one = self.reference[0, :, index], self.reference[1, :, index]
        return np.asarray((values - zero) / np.maximum(one - zero, 1e-12))

    def turn_point(self, persona: str) -> Point | None:
        """This turn's projection on ``persona``, pooled as its vector was read: raw, scaled
        and as a percentile of its reference, per layer."""
        if self.turn is None or persona not in self.personas:
            return None
        raw = self.turn[:, self.personas.index(persona)].astype(np.float64)
        ref = self.reference_of(persona)
        ranked = None
        if ref is not None and ref.quantiles is not None:
            ranked = _ranks(raw[:, None], ref.quantiles)[:, 0]
        return Point(raw, self._scale(raw, persona), ranked)

    def track(self, persona: str) -> Track:
        """What a drift line of ``persona`` follows: its best layer, its pooling, its reference
        and that reference's normal band in scaled units."""
        index = self.personas.index(persona)
        ref = self.references[index] if len(self.references) == len(self.personas) else None
        if ref is None:
            return Track(persona, 0, "")
        band = None
        if ref.quantiles is not None:
            band = self._scale(ref.quantiles[:, list(BAND)].T, persona)
        words = ref.words if ref.quantiles is not None else ""
        return Track(persona, ref.best_layer, ref.positions, words, band)

    def tracked(self) -> list[str]:
        """The personas the drift follows: the picked ones and the assistant axis."""
        return [p for p in self.personas if p in self.picked or p == AXIS]

    def after(self, previous: Readout | None, turn: int) -> Readout:
        """This readout carrying the conversation's drift: ``previous``'s turns before ``turn``
        (counted from 1), then this turn's points."""
        before = previous.drift if previous is not None else Drift()
        points = {p: point for p in self.tracked() if (point := self.turn_point(p)) is not None}
        tracks = {p: self.track(p) for p in points}
        return dataclasses.replace(self, drift=before.add(turn, points, tracks))

    def colour_limit(self, values: np.ndarray) -> float:
        """Full colour for ``values`` [tokens, ...]: the ``CLIP_PERCENTILE``-th percentile of
        |value| over the tokens steering was not added at (all tokens when it was added at
        every one), at least 1 on the scaled readout (the persona's own mean)."""
        keep = np.ones(values.shape[0], dtype=bool)
        if self.steered is not None:
            keep[self.steered[0] : self.steered[1]] = False
        chosen = values[keep] if keep.any() else values
        finite = np.abs(chosen[np.isfinite(chosen)])
        limit = float(np.percentile(finite, CLIP_PERCENTILE)) if finite.size else 0.0
        if self.scaled:
            limit = max(1.0, limit)
        return limit if limit > 0 else 1.0


def _ranks(values: np.ndarray, quantiles: np.ndarray) -> np.ndarray:
    """``values`` [layers, n] as percentiles of ``quantiles`` [layers, levels], layer by layer
    (``personachat.vectors.percentile_rank``); NaN stays NaN."""
    from personachat.vectors import percentile_rank

    out = np.full(values.shape, np.nan)
    for layer in range(min(len(values), len(quantiles))):
        out[layer] = percentile_rank(values[layer], quantiles[layer])
    return out


POOLED_OVER = {
    "question_span": "the question span",
    "prompt_last": "the last prompt token",
    "prompt_avg": "the prompt",
    "response_avg": "the reply",
}
UNCALIBRATED = "raw and scaled only: this vector was registered without a reference distribution"


def turn_words(readout: Readout, persona: str, layer: int) -> str:
    """This turn's projection on ``persona`` at ``layer`` in words: pooled how, raw, scaled,
    percentile (or why there is none)."""
    point = readout.turn_point(persona)
    ref = readout.references[readout.personas.index(persona)] if readout.references else None
    if point is None or ref is None:
        return ""
    parts = [f"raw {point.raw[layer]:.3g}"]
    if point.scaled is not None:
        parts.append(f"scaled {point.scaled[layer]:.2f}")
    if point.percentile is not None:
        parts.append(f"percentile {point.percentile[layer]:.0f} among {ref.words}")
    else:
        parts.append(UNCALIBRATED)
    over = POOLED_OVER.get(ref.positions, ref.positions)
    return f"This turn, pooled over {over} as the vector was read: {' · '.join(parts)}."


def token_details(readout: Readout, persona: str, layer: int) -> list[str]:
    """Each token's raw value and percentile, for its hover text."""
    assert readout.projections is not None
    raw = readout.projections[:, layer, readout.personas.index(persona)]
    ranks = readout.percentiles(persona, layer)
    return [
        f"raw {r:.3f}" + (f", percentile {ranks[i]:.0f}" if ranks is not None else "")
        for i, r in enumerate(raw)
    ]


def readout_html(readout: Readout | None, layer: float, persona: str | None = None) -> str:
    """Coloured per-token projections at ``layer``, one row per persona shown (the picked ones
    by default; ``persona`` or ``ALL_PERSONAS`` to choose), each with the turn's pooled value;
    every token's raw value and percentile on hover."""
    if readout is None or readout.projections is None or not readout.personas:
        return views.empty_html("Send a message to see per-token projections.")
    n_layers = readout.projections.shape[1]
    at = min(max(int(layer or 0), 0), n_layers - 1)
    rows = []
    for name in readout.shown(persona):
        values = readout.values(name, at)
        assert values is not None
        scale = readout.colour_limit(values)
        caption = (
            f"{name} at layer {at} ({readout.unit}; red +, blue −, full colour at "
            f"±{scale:.3g}; reply in bold; grey: no projection) {turn_words(readout, name, at)}"
        ).strip()
        details = token_details(readout, name, at)
        rows.append(
            views.tokens_html(readout.tokens, values, readout.n_prompt, caption, scale, details)
        )
    return "".join(rows)
