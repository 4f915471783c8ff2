"""How hard a steering strength pushes: the strength slider's range and hint in each unit, the
conversion when the units change, and the check that warns (or refuses) past the usual push.

A persona vector's stored metrics give, per layer, its norm ``|v|`` and the mean norm of the
residual stream it was read from. In raw units a strength ``s`` adds ``s * |v|`` at a layer; in
"x residual norm" units it adds ``s`` times the residual stream's own norm. The *push* of a
setting is what it adds over what is there: ``added / residual norm``, at its strongest layer.
On the demo model (question-span vectors at the prompt, layers 0-2 or 2-3, strengths 1-8, 8
held-out questions, pirate, robot, cynic) the settings that switch the persona with the facts
kept push 0.75-2.2x, below that nothing changes, and from about 3x the persona fades again or
the facts go; past ``BROKEN`` the numbers are meaningless (or overflow float32), so it is
refused.
Nothing here touches a model: the norms come in as numbers.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping
from dataclasses import dataclass

from personachat.app.limits import BOUNDS

RAW = "raw"
CALIBRATED = "x residual norm"
FAR = 3.0  # a push past this many residual norms: warn
BROKEN = BOUNDS.push  # ... past this many: refuse
SLIDER_PUSH = 4.0  # the slider reaches this push at a typical layer
TYPICAL = (0.75, 2.0)  # pushes that steer with the content kept (demo model: 0.75-2.2)
DEFAULT_RAW_MAX = 10.0  # the raw slider's reach when no vector metrics are known


@dataclass(frozen=True)
class Norms:
    """Per-layer norms of one persona vector and of the residual stream it was read from."""

    vector: tuple[float, ...]
    resid: tuple[float, ...]

    def ratio(self, layers: tuple[int, ...] = ()) -> float:
        """What raw strength 1 adds, in residual norms: the median of ``|v| / resid`` over
        ``layers`` (every layer when empty)."""
        chosen = layers or tuple(range(len(self.vector)))
        values = [self.vector[i] / self.resid[i] for i in chosen if self.resid[i] > 0]
        return statistics.median(values) if values else 1.0


def _nice(value: float) -> float:
    """``value`` rounded up to a whole number (to 0.5 below 5)."""
    return math.ceil(value * 2) / 2 if value < 5 else float(math.ceil(value))


def slider_range(units: str, norms: Norms | None) -> tuple[float, float]:
    """The strength slider's (reach, step) in ``units``: it spans -reach..reach."""
    if units == CALIBRATED:
        return SLIDER_PUSH, 0.05
    if norms is None:
        return DEFAULT_RAW_MAX, 0.1
    return _nice(SLIDER_PUSH / norms.ratio()), 0.1


def convert(value: float, old: str, new: str, norms: Norms | None) -> float:
    """A strength in ``old`` units as the same push in ``new`` units (rounded for the slider)."""
    if old == new or norms is None:
        return value
    factor = norms.ratio()
    if new == CALIBRATED:
        return round(value * factor, 2)
    return round(value / factor, 1)


def hint(units: str, norms: Norms | None) -> str:
    """The slider's help: what 1 means in ``units``, the typical range, where text breaks."""
    low, high = TYPICAL
    if units == CALIBRATED:
        return (
            "1 adds as much as the residual stream's own norm at each layer. "
            f"Typical {low:g}-{high:g}; past {FAR:g} the text tends to break."
        )
    if norms is None:
        return "1 adds the persona vector as extracted. Negative values steer away."
    r = norms.ratio()
    return (
        f"1 adds the vector as extracted, about {r:.2f}x the residual stream's norm here. "
        f"Typical {low / r:.1f}-{high / r:.1f}; past {FAR / r:.0f} the text tends to break."
    )


def push(
    strengths: Mapping[int, float],
    weights: Mapping[str, float],
    units: str,
    norms: Mapping[str, Norms],
) -> tuple[float, int] | None:
    """The largest push of a blend over its steered layers, in residual norms, and its layer;
    None when no vector's norms are known. (An upper bound: the vectors' sizes add up.)"""
    worst: tuple[float, int] | None = None
    for layer, strength in strengths.items():
        known = [(abs(w), norms[p]) for p, w in weights.items() if p in norms]
        if not known or strength == 0:
            continue
        resid = known[0][1].resid[layer]
        if resid <= 0:
            continue
        size = sum(w * (n.vector[layer] if units == RAW else n.resid[layer]) for w, n in known)
        ratio = abs(strength) * size / resid
        if worst is None or ratio > worst[0]:
            worst = (ratio, layer)
    return worst


def push_warning(worst: tuple[float, int] | None) -> str:
    """'' for a usual push; a warning past ``FAR``. Past ``BROKEN`` it is an error to raise:
    callers check ``too_far`` first."""
    if worst is None or worst[0] <= FAR:
        return ""
    ratio, layer = worst
    return (
        f"⚠ This strength adds {ratio:.3g}x the residual stream's own norm at layer {layer} "
        f"(typical {TYPICAL[0]:g}-{TYPICAL[1]:g}x): the text tends to break."
    )


def too_far(worst: tuple[float, int] | None) -> str:
    """The error message for a push past ``BROKEN``; '' otherwise."""
    if worst is None or worst[0] <= BROKEN:
        return ""
    ratio, layer = worst
    return (
        f"This strength adds {ratio:.3g}x the residual stream's own norm at layer {layer}: "
        f"the limit is {BROKEN:g}x (push): the model's numbers are meaningless (or overflow) "
        "that far out. Use a strength "
        f"that adds at most a few residual norms (typical {TYPICAL[0]:g}-{TYPICAL[1]:g}x)."
    )
