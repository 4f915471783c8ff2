"""Activations: encode conversations, batch them, record and capture what the model computes."""

from __future__ import annotations

from personachat.activations.batch import Batch, pad, pad_batch, padding_side, run_forward
from personachat.activations.capture import Capture, CaptureSpec, capture
from personachat.activations.dist import Dist
from personachat.activations.encode import Encoded, Sample, build_samples, encode
from personachat.activations.record import Recorder

__all__ = [
    "Batch",
    "Capture",
    "CaptureSpec",
    "Dist",
    "Encoded",
    "Recorder",
    "Sample",
    "build_samples",
    "capture",
    "encode",
    "pad",
    "pad_batch",
    "padding_side",
    "run_forward",
]
