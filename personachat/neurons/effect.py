"""The ``effect`` score: each unit's standardized effect (Cohen's d), high persona vs low persona.

The sums it reads (per-persona means and mean squares of pooled activations) come from
``activations.capture`` with ``CaptureSpec(squares=True)``.
"""

from __future__ import annotations

import torch


def standardized_effect(
    mean_h: torch.Tensor,
    sq_h: torch.Tensor,
    n_h: int,
    mean_l: torch.Tensor,
    sq_l: torch.Tensor,
    n_l: int,
) -> torch.Tensor:
    """Cohen's d per unit from means and mean squares (``sq`` = mean of squares) of both sides."""
    var_h = (sq_h - mean_h.square()).clamp(min=0) * (n_h / max(n_h - 1, 1))
    var_l = (sq_l - mean_l.square()).clamp(min=0) * (n_l / max(n_l - 1, 1))
    pooled = (((n_h - 1) * var_h + (n_l - 1) * var_l) / max(n_h + n_l - 2, 1)).sqrt()
    diff = mean_h - mean_l
    return torch.where(pooled > 1e-12, diff / pooled.clamp(min=1e-12), torch.zeros_like(diff))
