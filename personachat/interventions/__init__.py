"""Interventions: steering, ablation and readout specs, turned into hook handlers.

``specs`` (what to do) -> ``layers`` (the layer grammar) -> ``positions`` (token windows) ->
``handlers`` (what runs in the hooks) and ``interference`` (how a blend's vectors relate) ->
``plan`` (specs checked and built into handlers) -> ``steering`` (``with steer(lm, vector):``).
"""

from __future__ import annotations

from personachat.interventions.capping import Cap, CapSpec, describe_cap
from personachat.interventions.interference import InterferenceReport, blend_interference
from personachat.interventions.layers import (
    format_layer_spec,
    format_layers,
    layer_strengths,
    parse_layer_list,
    parse_layer_spec,
    parse_neurons,
)
from personachat.interventions.plan import Plan, build_ablation, build_plan, build_steer
from personachat.interventions.specs import (
    ABLATION_MODES,
    POSITION_MODES,
    PRESETS,
    UNITS,
    AblationMode,
    AblationSpec,
    DirectionSpec,
    InterventionError,
    PositionMode,
    SteeringSpec,
    Units,
)
from personachat.interventions.steering import steer

__all__ = [
    "ABLATION_MODES",
    "POSITION_MODES",
    "PRESETS",
    "UNITS",
    "AblationMode",
    "AblationSpec",
    "Cap",
    "CapSpec",
    "DirectionSpec",
    "InterferenceReport",
    "InterventionError",
    "Plan",
    "PositionMode",
    "SteeringSpec",
    "Units",
    "blend_interference",
    "build_ablation",
    "build_cap",
    "build_plan",
    "build_steer",
    "describe_cap",
    "format_layer_spec",
    "format_layers",
    "layer_strengths",
    "parse_layer_list",
    "parse_layer_spec",
    "parse_neurons",
    "steer",
]
