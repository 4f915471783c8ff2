"""Interventions: steering, ablation and readout specs, turned into hook handlers."""

from __future__ import annotations

from personachat.interventions.plan import (
    POSITION_MODES,
    UNITS,
    AblationMode,
    AblationSpec,
    DirectionSpec,
    InterferenceReport,
    InterventionError,
    Plan,
    PositionMode,
    SteeringSpec,
    blend_interference,
    build_ablation,
    build_plan,
    build_steer,
    parse_layer_spec,
    parse_neurons,
)

__all__ = [
    "POSITION_MODES",
    "UNITS",
    "AblationMode",
    "AblationSpec",
    "DirectionSpec",
    "InterferenceReport",
    "InterventionError",
    "Plan",
    "PositionMode",
    "SteeringSpec",
    "blend_interference",
    "build_ablation",
    "build_plan",
    "build_steer",
    "parse_layer_spec",
    "parse_neurons",
]
