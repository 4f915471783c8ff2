"""Activations: encode conversations, batch them, capture pooled activations."""

from __future__ import annotations

from personachat.activations.capture import (
    Capture,
    CaptureSpec,
    Dist,
    Sample,
    build_samples,
    capture,
    encode,
    pad_batch,
)

__all__ = [
    "Capture",
    "CaptureSpec",
    "Dist",
    "Sample",
    "build_samples",
    "capture",
    "encode",
    "pad_batch",
]
