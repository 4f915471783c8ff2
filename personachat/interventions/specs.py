"""What an intervention asks for: frozen specs, their choices, and the error a bad one raises.

Specs name *what* to do; ``personachat.interventions.plan`` checks them against a model and
turns them into handlers. Layers come as text (``"8-12:4, 13:2"``, a preset) or as numbers
(``{8: 4.0, 13: 2.0}``; layers alone for a direction), read by ``personachat.interventions.layers``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

Units = Literal["raw", "calibrated"]
PositionMode = Literal["all", "prompt", "generated"]
AblationMode = Literal["zero", "mean"]
PRESETS = ("best", "band", "all")
UNITS = ("raw", "calibrated")
POSITION_MODES = ("all", "prompt", "generated")
ABLATION_MODES = ("zero", "mean")


class InterventionError(ValueError):
    """A steering, ablation or readout request does not fit the model; nothing was changed."""


@dataclass(frozen=True)
class SteeringSpec:
    """A blend of persona vectors added to the residual stream.

    ``blend`` maps persona names to weights (``{"pirate": 0.7, "cynic": -0.3}``). ``layers`` is
    a preset (``"best"``: the best layer of the largest-weight persona, ``"band"``: ``band``
    layers either side of it, ``"all"``) scaled by ``strength``, or a layer spec such as
    ``"8-12:4, 13:2"`` (layer or range, colon, strength; a bare layer takes ``strength``), or
    the same as numbers: ``{8: 4.0, 9: 4.0, 13: 2.0}``, or layers alone (``range(8, 13)``),
    each at ``strength``.
    ``positions`` is where the sum is added; ``last_n`` limits ``"prompt"`` to its last tokens.
    """

    blend: Mapping[str, float]
    layers: str | Mapping[int, float] | Iterable[int] = "best"
    strength: float = 1.0
    units: Units = "raw"
    positions: PositionMode = "all"
    last_n: int | None = None
    band: int = 2


@dataclass(frozen=True)
class AblationSpec:
    """MLP units to ablate: a registered neuron set and/or typed ``"layer:index"`` lists.

    ``neurons`` reads like ``"3:12,3:40,5:7"`` (``"3:10-19"`` is a range of indices), or comes
    as ``(layer, index)`` pairs. ``mode``
    ``"mean"`` sets each unit to the baseline mean stored with the neuron set. ``positions``
    (and ``last_n``) choose the tokens it acts on, as for steering: sets found by the
    ``patching`` method are meant for ``mode="mean", positions="prompt"``.
    """

    neuron_set: str | None = None
    neurons: str | Sequence[tuple[int, int]] = ""
    mode: AblationMode = "zero"
    top_k: int | None = None
    positions: PositionMode = "all"
    last_n: int | None = None


@dataclass(frozen=True)
class DirectionSpec:
    """Ablate ``persona``'s direction in the residual stream at ``layers`` (spec or preset).

    ``mode="mean"`` moves the stream's component along the direction to the baseline persona's
    mean level there (``x - (x.u - m) u``): the persona's own push is removed and nothing else.
    ``mode="zero"`` projects the component out entirely (``x - (x.u) u``), which, where the
    baseline itself sits far from zero along the direction, moves the stream as much as the
    persona does (on the demo model it brings the persona out). ``positions`` and ``last_n``
    choose the tokens, as for steering.
    """

    persona: str
    layers: str | Iterable[int] = "all"
    mode: AblationMode = "mean"
    positions: PositionMode = "all"
    last_n: int | None = None


def check_finite(value: float, what: str) -> None:
    """An ``InterventionError`` unless ``value`` is a finite number."""
    if not math.isfinite(value):
        raise InterventionError(f"{what} is {value}; give a finite number")
