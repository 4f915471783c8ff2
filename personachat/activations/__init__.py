"""Activations: encode conversations, batch them, capture what the model computes or generates."""

from __future__ import annotations

from personachat.activations.batch import Batch, pad, pad_batch, padding_side, run_forward
from personachat.activations.capture import (
    Capture,
    CaptureSpec,
    capture,
    capture_into,
    open_capture,
)
from personachat.activations.dist import Dist
from personachat.activations.encode import Encoded, Response, Sample, build_samples, encode
from personachat.activations.live import GenerationConfig, LivePrompt, Reply, generate_live
from personachat.activations.record import Recorder

__all__ = [
    "Batch",
    "Capture",
    "CaptureSpec",
    "Dist",
    "Encoded",
    "GenerationConfig",
    "LivePrompt",
    "Recorder",
    "Reply",
    "Response",
    "Sample",
    "build_samples",
    "capture",
    "capture_into",
    "encode",
    "generate_live",
    "open_capture",
    "pad",
    "pad_batch",
    "padding_side",
    "run_forward",
]
