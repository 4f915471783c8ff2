"""The library's heavy modules, imported once under one lock before any request uses them.

The page is served before the model loads: a background thread loads it while the first
requests arrive. Two threads importing transformers' modules for the first time at once can hand
one of them a half-initialised module (``cannot import name ... from 'transformers'``), so every
entry into the library goes through ``ready()``: the first caller imports everything here while
the others wait, and later calls return at once.
"""

from __future__ import annotations

import functools
import importlib
import threading
from collections.abc import Callable
from typing import Any, TypeVar

# Every library module an app request may reach, in the order of the data flow.
MODULES = (
    "personachat.records",
    "personachat.prompts",
    "personachat.model",
    "personachat.hooks",
    "personachat.activations",
    "personachat.vectors",
    "personachat.neurons",
    "personachat.store",
    "personachat.interventions",
    "personachat.chat",
    "personachat.pipeline",
    "personachat.analysis.run",
    "personachat.analysis.figures",
)

_LOCK = threading.Lock()
_DONE = threading.Event()

F = TypeVar("F", bound=Callable[..., Any])


def ready() -> None:
    """Import ``MODULES`` once (the first caller does it; the others wait for it)."""
    if _DONE.is_set():
        return
    with _LOCK:
        if not _DONE.is_set():
            for name in MODULES:
                importlib.import_module(name)
            _DONE.set()


def needs_library(method: F) -> F:
    """``method``, run after ``ready()``."""

    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        ready()
        return method(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
