"""The request's ``steering`` field, read and checked: a blend at per-layer strengths, and what to
ablate or cap, shaped after EasySteer's steering requests (a vector's ``scale`` and
``target_layers`` become per-layer strengths, its trigger positions a position window)::

    "steering": {
        "personas": {"pirate": 1.0},          # or ["pirate"]: names with weights
        "layers": "2-3:3",                    # or {"2": 3.0, "3": 3.0}, or [2, 3] at strength
        "strength": 1.0, "units": "raw",      # or "calibrated" (x the layer's residual norm)
        "positions": "prompt", "last_n": 4,   # "all", "prompt" (its last n) or "generated"
        "vectors_from": "question_span",      # which kind of stored vectors ("": preferred)
        "ablation": {"neuron_sets": ["..."], "neurons": "3:12,5:7", "mode": "mean",
                     "positions": "prompt"},
        "direction": {"persona": "cynic", "layers": "0-3", "mode": "zero", "positions": "all"},
        "cap": {"persona": "pirate", "layers": "all", "side": "below", "percentile": 75,
                "reference": "persona", "positions": "generated"}
    }

Names (personas, sets, kinds) and layers are checked against the model later
(``personachat.app.api.mapping``); shapes, choices and numbers are checked here.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from personachat.app.api.fields import ApiError, integer, number

POSITIONS = ("all", "prompt", "generated")
MAX_STRENGTH = 1e6
MAX_WEIGHT = 1e3
MAX_LAYER = 10_000
WINDOW_KEYS = ("positions", "last_n")
# a layer spec as text, (layer, strength) pairs, or layers alone (each at the strength)
Layers = str | tuple[tuple[int, float], ...] | tuple[int, ...]
KEYS = {
    "steering": (
        "personas",
        "layers",
        "strength",
        "units",
        "vectors_from",
        "ablation",
        "direction",
        "cap",
    ),
    "ablation": ("neuron_sets", "neurons", "mode"),
    "direction": ("persona", "layers", "mode"),
    "cap": ("persona", "layers", "side", "threshold", "percentile", "reference"),
}


@dataclass(frozen=True)
class Window:
    """The tokens an intervention acts on: all, the prompt (its last ``last_n``), generated."""

    positions: str = "all"
    last_n: int | None = None


@dataclass(frozen=True)
class Neurons:
    """Neuron ablation: registered sets and/or typed units (``"3:12,5:7"``)."""

    sets: tuple[str, ...] = ()
    neurons: str = ""
    mode: str = "zero"
    window: Window = Window()


@dataclass(frozen=True)
class Direction:
    """A persona's direction ablated in the residual stream at ``layers``."""

    persona: str
    layers: str | tuple[int, ...] = "all"
    mode: str = "mean"
    window: Window = Window()


@dataclass(frozen=True)
class Cap:
    """A persona's projection held on one ``side`` of a level at ``layers``."""

    persona: str
    layers: str | tuple[int, ...] = "all"
    side: str = "above"
    threshold: float | None = None
    percentile: float | None = None
    reference: str = "persona"
    window: Window = Window()


@dataclass(frozen=True)
class Steering:
    """The ``steering`` field: a blend of personas at per-layer strengths, and what to ablate."""

    personas: tuple[tuple[str, float], ...] = ()
    layers: Layers = "best"
    strength: float = 1.0
    units: str = "raw"
    window: Window = Window()
    vectors_from: str = ""
    ablation: Neurons | None = None
    direction: Direction | None = None
    cap: Cap | None = None


def parse_steering(value: Any) -> Steering | None:
    """The ``steering`` object (None or ``{}``: plain chat); ``ApiError`` names a bad field."""
    if value is None:
        return None
    obj = members(value, "steering")
    if not obj:
        return None
    raw = obj.get("ablation")
    return Steering(
        personas=blend(obj.get("personas", {})),
        layers=strengths(obj.get("layers", "best"), "steering.layers"),
        strength=number(obj.get("strength", 1.0), "steering.strength", -MAX_STRENGTH, MAX_STRENGTH),
        units=choice(obj.get("units", "raw"), "steering.units", ("raw", "calibrated")),
        window=window(obj, "steering"),
        vectors_from=text(obj.get("vectors_from", ""), "steering.vectors_from"),
        ablation=None if raw is None else neurons(raw),
        direction=None if obj.get("direction") is None else direction(obj["direction"]),
        cap=None if obj.get("cap") is None else cap(obj["cap"]),
    )


def neurons(value: Any) -> Neurons:
    obj = members(value, "steering.ablation")
    sets = obj.get("neuron_sets", [])
    if isinstance(sets, str):
        sets = [sets]
    if not isinstance(sets, list) or not all(isinstance(s, str) and s for s in sets):
        raise ApiError("neuron_sets must be a list of set labels", "steering.ablation.neuron_sets")
    typed = text(obj.get("neurons", ""), "steering.ablation.neurons")
    if not sets and not typed:
        raise ApiError(
            "the ablation names no neurons: give neuron_sets or neurons ('3:12,5:7')",
            "steering.ablation",
        )
    return Neurons(
        tuple(sets),
        typed,
        choice(obj.get("mode", "zero"), "steering.ablation.mode", ("zero", "mean")),
        window(obj, "steering.ablation"),
    )


def direction(value: Any) -> Direction:
    obj = members(value, "steering.direction")
    return Direction(
        persona=name(obj.get("persona"), "steering.direction.persona"),
        layers=layer_list(obj.get("layers", "all"), "steering.direction.layers"),
        mode=choice(obj.get("mode", "mean"), "steering.direction.mode", ("mean", "zero")),
        window=window(obj, "steering.direction"),
    )


def cap(value: Any) -> Cap:
    obj = members(value, "steering.cap")
    threshold, percentile = obj.get("threshold"), obj.get("percentile")
    if (threshold is None) == (percentile is None):
        raise ApiError("give the cap a threshold or a percentile (one of them)", "steering.cap")
    return Cap(
        persona=name(obj.get("persona"), "steering.cap.persona"),
        layers=layer_list(obj.get("layers", "all"), "steering.cap.layers"),
        side=choice(obj.get("side", "above"), "steering.cap.side", ("above", "below")),
        threshold=None
        if threshold is None
        else number(threshold, "steering.cap.threshold", -MAX_STRENGTH, MAX_STRENGTH),
        percentile=None
        if percentile is None
        else number(percentile, "steering.cap.percentile", 0.0, 100.0),
        reference=choice(
            obj.get("reference", "persona"), "steering.cap.reference", ("persona", "baseline")
        ),
        window=window(obj, "steering.cap"),
    )


def members(value: Any, param: str) -> dict[str, Any]:
    """``value`` as an object whose keys are all known for ``param``."""
    if not isinstance(value, dict):
        raise ApiError(f"{param} must be an object", param)
    known = (*KEYS[param.rsplit(".", 1)[-1]], *WINDOW_KEYS)
    unknown = sorted(set(value) - set(known))
    if unknown:
        raise ApiError(f"unknown field {unknown[0]!r} in {param}; known: {', '.join(known)}", param)
    return value


def blend(value: Any) -> tuple[tuple[str, float], ...]:
    """``{"pirate": 1.0}`` or ``["pirate"]`` (weight 1) as (name, weight) pairs."""
    param = "steering.personas"
    if isinstance(value, list):
        value = {name(v, param): 1.0 for v in value}
    if not isinstance(value, dict):
        raise ApiError("personas must be {name: weight} or a list of names", param)
    return tuple(
        (name(k, param), number(w, f"{param}.{k}", -MAX_WEIGHT, MAX_WEIGHT))
        for k, w in value.items()
    )


def strengths(value: Any, param: str) -> Layers:
    """A layer spec (``"2-3:3"``, a preset), ``{"2": 3.0}`` or layers alone (``[2, 3]``)."""
    if isinstance(value, dict):
        pairs = []
        for key, strength in value.items():
            if not (isinstance(key, str) and key.strip().isdigit()):
                raise ApiError(f"layer {key!r} in {param} is not a layer number", param)
            where = f"{param}.{key.strip()}"
            layer = integer(int(key), where, 0, MAX_LAYER)
            pairs.append((layer, number(strength, where, -MAX_STRENGTH, MAX_STRENGTH)))
        if not pairs:
            raise ApiError(f"{param} names no layer", param)
        return tuple(pairs)
    return layer_list(value, param)


def layer_list(value: Any, param: str) -> str | tuple[int, ...]:
    """A layer spec as text (checked against the model later) or a list of layer numbers."""
    if isinstance(value, str):
        return text(value, param) or "all"
    if isinstance(value, list) and value:
        return tuple(integer(v, param, 0, MAX_LAYER) for v in value)
    raise ApiError(f"{param} must be a layer spec like '2-3' or a list of layers", param)


def window(obj: dict[str, Any], param: str) -> Window:
    last_n = obj.get("last_n")
    return Window(
        choice(obj.get("positions", "all"), f"{param}.positions", POSITIONS),
        None if last_n is None else integer(last_n, f"{param}.last_n", 1, 1 << 20),
    )


def choice(value: Any, param: str, choices: Collection[str]) -> str:
    if value not in choices:
        raise ApiError(f"{param} is {value!r}; use one of {', '.join(choices)}", param)
    return str(value)


def name(value: Any, param: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ApiError(f"{param} must be a name, got {value!r}", param)
    return value.strip()


def text(value: Any, param: str) -> str:
    if not isinstance(value, str):
        raise ApiError(f"{param} must be text, got {value!r}", param)
    return value.strip()
