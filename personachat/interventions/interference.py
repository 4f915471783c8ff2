"""How the vectors of a steering blend relate at the steered layers: cancelling or duplicating.

``blend_interference`` measures the cosines between the blend's weighted terms per layer and how
much of their summed length the blend keeps, and warns (in the report and the log) when two
terms oppose (signed cosine below ``CANCEL_COSINE``) or repeat each other (above
``DUPLICATE_COSINE``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InterferenceReport:
    """How the blended vectors relate at the steered layers.

    ``cosine[i, j, k]``: cosine between ``weight_j * v_j`` and ``weight_k * v_k`` at
    ``layers[i]`` (signed by the weights, so a negative value means the terms pull apart and
    cancel); ``retained[i]``: norm of the blend over the sum of the terms' norms (1 = no loss).
    """

    personas: tuple[str, ...]
    layers: tuple[int, ...]
    cosine: torch.Tensor
    retained: torch.Tensor
    warnings: tuple[str, ...] = field(default=())


CANCEL_COSINE = -0.5
DUPLICATE_COSINE = 0.9


def blend_interference(
    terms: Sequence[tuple[str, float, torch.Tensor]], layers: Sequence[int]
) -> InterferenceReport:
    """Cosines of the weighted terms ``(name, weight, vector [n_layers, H])`` at ``layers``."""
    names = tuple(name for name, _, _ in terms)
    stacked = torch.stack([w * v[list(layers)].float() for _, w, v in terms], dim=1)  # [L, K, H]
    unit = torch.nn.functional.normalize(stacked, dim=-1)
    cosine = unit @ unit.transpose(1, 2)
    norms = stacked.norm(dim=-1).sum(dim=1)
    retained = stacked.sum(dim=1).norm(dim=-1) / norms.clamp_min(1e-12)
    warnings: list[str] = []
    for a in range(len(names)):
        for b in range(a + 1, len(names)):
            values = cosine[:, a, b]
            low, high = float(values.min()), float(values.max())
            if low < CANCEL_COSINE:
                at = layers[int(values.argmin())]
                warnings.append(
                    f"{names[a]} and {names[b]} cancel (signed cosine {low:.2f} at layer {at}); "
                    "their weighted directions oppose, so the blend is weaker than it looks"
                )
            if high > DUPLICATE_COSINE:
                at = layers[int(values.argmax())]
                warnings.append(
                    f"{names[a]} and {names[b]} duplicate each other (cosine {high:.2f} at layer "
                    f"{at}); the blend adds the same direction twice"
                )
    for message in warnings:
        log.warning("blend interference: %s", message)
    return InterferenceReport(names, tuple(layers), cosine, retained, tuple(warnings))
