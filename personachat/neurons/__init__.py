"""Persona neurons: score MLP units for contrast pairs and pick persona-specific sets."""

from __future__ import annotations

from personachat.neurons.scores import (
    attribution_sums,
    exact_selection,
    neuron_sets,
    patching_scores,
    patching_sums,
    ranks,
    standardized_effect,
    top_units,
)

__all__ = [
    "attribution_sums",
    "exact_selection",
    "neuron_sets",
    "patching_scores",
    "patching_sums",
    "ranks",
    "standardized_effect",
    "top_units",
]
