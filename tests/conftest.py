"""Shared fixtures: tiny random models of every supported architecture."""

from __future__ import annotations

import functools

import pytest
import torch

from personachat.model import LoadedModel
from personachat.model.tiny import TINY_ARCHITECTURES, tiny_model

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@functools.cache
def _cached_tiny(arch: str) -> LoadedModel:
    return tiny_model(arch)


@pytest.fixture(params=TINY_ARCHITECTURES)
def any_arch(request: pytest.FixtureRequest) -> LoadedModel:
    """One tiny random model per architecture (shared, read-only: do not modify weights)."""
    return _cached_tiny(request.param)


@pytest.fixture
def llama() -> LoadedModel:
    return _cached_tiny("llama")
