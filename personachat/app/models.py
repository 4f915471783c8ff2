"""The models the app has loaded, shared by every session: each loads once, on first use.

``ModelCache.get(model_id)`` loads a model under the app's lock (other sessions asking for it
meanwhile wait for the same load) and keeps at most ``MAX_CACHED_MODELS``; the oldest goes first,
and whoever subscribed with ``on_drop`` (the chat engines built on it) lets go of it too. The
bundled demo model keeps one id in the store, ``DEMO_ID``, wherever the app runs from.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MAX_CACHED_MODELS = 2
REPO = Path(__file__).resolve().parents[2]
DEMO_ID = "store/models/demo"  # the bundled demo model's id in the store (relative to the repo)


def folder(model_id: str) -> Path | None:
    """The folder a model id names (relative ids also tried from the repo root), or None."""
    for path in (Path(model_id).expanduser(), REPO / model_id):
        if path.is_dir():
            return path.resolve()
    return None


def is_demo(model_id: str) -> bool:
    """Whether ``model_id`` is the bundled demo model (its own corpus extracts best)."""
    return model_id == DEMO_ID or folder(model_id) == (REPO / DEMO_ID).resolve()


class ModelCache:
    """Loaded models by id (``personachat.model.LoadedModel``), the oldest dropped past the cap.
    Each loads with ``dtype`` and ``device`` (``auto``: bfloat16 on a GPU, float32 on the CPU)."""

    def __init__(
        self,
        lock: threading.RLock,
        models: Mapping[str, Any] | None = None,
        *,
        dtype: str = "auto",
        device: str = "auto",
    ) -> None:
        self.dtype, self.device = dtype, device
        self._lock = lock
        self._models: dict[str, Any] = dict(models or {})
        self._on_drop: list[Callable[[str], None]] = []
        self.check: Callable[[str], None] | None = None  # raises for a model not to be loaded

    def on_drop(self, callback: Callable[[str], None]) -> None:
        """Call ``callback(model_id)`` whenever a model is dropped to make room."""
        self._on_drop.append(callback)

    def get(self, model_id: str) -> Any:
        """The loaded model ``model_id`` (loaded on first use, shared by all sessions)."""
        with self._lock:
            if self.check is not None:
                self.check(model_id)
            if model_id not in self._models:
                from personachat.model import load_model

                while len(self._models) >= MAX_CACHED_MODELS:
                    dropped = next(iter(self._models))
                    self._models.pop(dropped)
                    for callback in self._on_drop:
                        callback(dropped)
                log.info("loading model %s", model_id)
                lm = load_model(model_id, dtype=self.dtype, device=self.device)
                if is_demo(model_id) and lm.info.model_id != DEMO_ID:
                    # the bundled model keeps one id in the store, wherever the app runs from
                    lm = replace(lm, info=replace(lm.info, model_id=DEMO_ID))
                self._models[model_id] = lm
            return self._models[model_id]


UNKNOWN_LAST_LAYER = 255  # a layer range wide enough for any model whose config cannot be read


def last_layer(model_id: str) -> int:
    """The last layer of ``model_id`` from its ``config.json`` (a local folder, or the hub's
    cache), read without loading the model; ``UNKNOWN_LAST_LAYER`` when it cannot be read."""
    import json

    path = Path(model_id).expanduser() / "config.json"
    if not path.is_file():
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(model_id, "config.json")
        except Exception:  # not a valid repo id
            cached = None
        if not isinstance(cached, str):
            return UNKNOWN_LAST_LAYER
        path = Path(cached)
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return UNKNOWN_LAST_LAYER
    config = config.get("text_config", config) if isinstance(config, dict) else {}
    layers = config.get("num_hidden_layers", config.get("n_layer"))
    return layers - 1 if isinstance(layers, int) and layers > 0 else UNKNOWN_LAST_LAYER
