"""Hold the persona from the page: the hold panel's inputs checked into ``CapSettings``, turned
into the runtime's ``CapSpec`` and said in words.

Capping keeps the residual stream's projection on a direction at one side of a level at the
chosen layers and tokens, and moves nothing that is already there
(``personachat.interventions.capping``). The direction is a persona's vector (the steering
kind's) or the model's assistant axis (``personachat.app.calibration.axis_vector``: the
``prompt_last`` one first), which joins the engine's vectors for this request. The level is a
raw threshold or a percentile of the same reference the readouts rank in
(``calibration.reference_side``): a persona vector's baseline samples, the assistant axis' own
default-assistant samples. Side by side, the plain column is never capped.
"""

from __future__ import annotations

from typing import Any

from personachat.app.calibration import NO_AXIS, axis_vector, reference_side, with_axis
from personachat.app.catalog import Catalog
from personachat.app.readout import AXIS
from personachat.app.settings import (
    ABLATION_POSITIONS,
    LAST_PROMPT_TOKEN,
    NO_DIRECTION,
    CapSettings,
    ChatInputs,
    InputError,
    Limits,
    Settings,
    check_choice,
    parse_layers,
    parse_number,
)

CAP_SIDES = {  # the runtime's side, and the page's words for it
    "above": "at least the level (a floor)",
    "below": "at most the level (a ceiling)",
}
CAP_BY = ("percentile", "threshold")
CAP_FIELD = "Hold layers"


def parse_cap(limits: Limits, inputs: ChatInputs) -> CapSettings | None:
    """The hold panel's inputs, checked; None when nothing is held (``cap`` "none" or empty)."""
    direction = (inputs.cap or "").strip()
    if direction in ("", NO_DIRECTION):
        return None
    known = sorted({*limits.personas, AXIS})
    if direction not in known:
        raise InputError(
            f"Hold: {direction!r} is neither the assistant axis nor a persona of this model; "
            f"known: {', '.join(known)}."
        )
    side = check_choice("Hold side", inputs.cap_side, tuple(CAP_SIDES))
    by = check_choice("Hold level as", inputs.cap_by, CAP_BY)
    positions = check_choice("Hold at tokens", inputs.cap_positions, ABLATION_POSITIONS)
    layers = parse_layers(inputs.cap_layers, limits.n_layers, CAP_FIELD)
    if by == "percentile":
        level = parse_number("Hold percentile", inputs.cap_level, low=0.0, high=100.0)
        return CapSettings(direction, side, level, None, layers, positions)  # type: ignore[arg-type]
    level = parse_number("Hold threshold", inputs.cap_level)
    return CapSettings(direction, side, None, level, layers, positions)  # type: ignore[arg-type]


def runtime_spec(cap: CapSettings, side: str) -> Any:
    """The runtime's ``CapSpec`` of ``cap``, its percentile taken among the ``side``
    ("baseline" or "persona") samples of the vector's reference."""
    from personachat.interventions import CapSpec

    where, last_n = ("prompt", 1) if cap.positions == LAST_PROMPT_TOKEN else (cap.positions, None)
    return CapSpec(
        cap.direction,
        layers=list(cap.layers),
        side=cap.side,  # type: ignore[arg-type]
        threshold=cap.threshold,
        percentile=cap.percentile,
        reference=side,  # type: ignore[arg-type]
        positions=where,  # type: ignore[arg-type]
        last_n=last_n,
    )


def cap_spec(catalog: Catalog, model_id: str, engine: Any, settings: Settings) -> tuple[Any, Any]:
    """The engine to generate with and the runtime's ``CapSpec`` (None when nothing is held).
    Holding the assistant axis puts the model's own axis among the engine's vectors."""
    cap = settings.cap
    if cap is None:
        return engine, None
    if cap.direction == AXIS:
        axis = axis_vector(catalog, model_id)
        if axis is None:
            raise InputError(f"Hold: {NO_AXIS}.")
        engine = with_axis(engine, axis)
    vector = engine.vectors.get(cap.direction)
    if vector is None:
        known = ", ".join(sorted(engine.vectors)) or "none"
        raise InputError(f"Hold: no vector of {cap.direction!r} to hold; known: {known}.")
    return engine, runtime_spec(cap, reference_side(vector))


def cap_words(cap: CapSettings) -> str:
    """What holding does, in words for the status line (``interventions.describe_cap``)."""
    from personachat.interventions import describe_cap

    side = "persona" if cap.direction == AXIS else "baseline"
    text = describe_cap(runtime_spec(cap, side), cap.layers).rstrip(".")
    where = "every token" if cap.positions == "all" else f"the {cap.positions} tokens"
    where = f"the {LAST_PROMPT_TOKEN}" if cap.positions == LAST_PROMPT_TOKEN else where
    note = ""
    if side == "persona" and cap.percentile is not None:
        note = " (the axis' persona side: the default assistant's own prompts)"
    return f"{text}, at {where}{note}."
