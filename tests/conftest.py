"""Shared fixtures: tiny random models of every supported architecture."""

from __future__ import annotations

import functools

import pytest
import torch

from personachat.model import LoadedModel
from personachat.model.tiny import TINY_ARCHITECTURES, tiny_model

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@functools.cache
def tiny(arch: str = "llama", **kwargs: int) -> LoadedModel:
    """A tiny random model, built once per test session for each set of arguments (shared,
    read-only: a test that changes weights builds its own with ``tiny_model``)."""
    return tiny_model(arch, **kwargs)


@pytest.fixture(params=TINY_ARCHITECTURES)
def any_arch(request: pytest.FixtureRequest) -> LoadedModel:
    """One tiny random model per architecture (shared, read-only: do not modify weights)."""
    return tiny(request.param)


@pytest.fixture
def llama() -> LoadedModel:
    return tiny("llama")
