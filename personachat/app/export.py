"""What the page hands out as data: a readout's numbers, the conversation as a JSON file, a
stored vector as a ``.safetensors`` or ``.gguf`` file.

``readout_numbers`` is the one form of a readout's numbers (the ``/readout`` endpoint and the
conversation file both use it): per persona, one list per token with one value per layer, NaN
(a token the model never saw) written as null: raw, scaled (with the store's means) and as a
percentile of the vector's reference (with its stored quantiles); then the turn pooled as each
vector was read, and the conversation's drift. Files go to a fresh temporary folder; Gradio
serves them from there.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import threading
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from personachat.app.drift import PERCENTILE_UNIT
from personachat.app.readout import RAW_UNIT, SCALED_UNIT, UNCALIBRATED, Readout

FORMAT = "personachat.conversation/1"


def _listed(grid: np.ndarray) -> list[Any]:
    """A numpy array as nested lists of floats, NaN as None."""
    if grid.ndim == 1:
        return [None if not math.isfinite(float(v)) else round(float(v), 6) for v in grid]
    return [_listed(row) for row in grid]


def readout_numbers(readout: Readout | None) -> dict[str, Any]:
    """The readout's numbers: tokens, where the prompt ends, which tokens were steered, and per
    persona the raw projection (and, with the store's means, the scaled one) of every token at
    every layer; ``{"tokens": []}`` when there is no readout."""
    if readout is None or readout.projections is None:
        return {"tokens": [], "personas": [], "note": "no reply yet"}
    n_layers = readout.projections.shape[1]
    out: dict[str, Any] = {
        "model_id": readout.model_id,
        "tokens": list(readout.tokens),
        "n_prompt": readout.n_prompt,
        "layers": list(range(n_layers)),
        "personas": list(readout.personas),
        "steered_tokens": list(readout.steered) if readout.steered else None,
        "raw": {
            "unit": RAW_UNIT,
            "values": {
                name: _listed(readout.projections[:, :, i])
                for i, name in enumerate(readout.personas)
            },
        },
    }
    if readout.reference is not None:
        out["scaled"] = {
            "unit": SCALED_UNIT,
            "values": {name: _listed(readout.values(name)) for name in readout.personas},  # type: ignore[arg-type]
        }
    return {**out, **calibrated_numbers(readout)}


def calibrated_numbers(readout: Readout) -> dict[str, Any]:
    """The readout's percentiles (of each vector with a reference distribution; the others
    named under ``uncalibrated``), the turn pooled as each vector was read, and the drift."""
    ranked = {n: readout.percentiles(n) for n in readout.personas}
    out: dict[str, Any] = {
        "percentile": {
            "unit": PERCENTILE_UNIT,
            "reference": {
                n: readout.references[i].words
                for i, n in enumerate(readout.personas)
                if ranked[n] is not None
            },
            "values": {n: _listed(v) for n, v in ranked.items() if v is not None},
        },
        "uncalibrated": [n for n, v in ranked.items() if v is None],
        "uncalibrated_note": UNCALIBRATED,
        "turn": {},
        "drift": readout.drift.numbers(),
    }
    for i, name in enumerate(readout.personas):
        point = readout.turn_point(name)
        if point is None:
            continue
        ref = readout.references[i]
        out["turn"][name] = {
            "positions": ref.positions,
            "best_layer": ref.best_layer,
            "raw": _listed(point.raw),
            "scaled": _listed(point.scaled) if point.scaled is not None else None,
            "percentile": _listed(point.percentile) if point.percentile is not None else None,
        }
    return out


# The newest export folders kept; older ones are deleted as new ones are made, so a server
# that writes a conversation file after every reply holds a bounded number of them.
MAX_EXPORTS = 64
_exports: deque[Path] = deque()
_exports_lock = threading.Lock()


def _folder() -> Path:
    """A new folder for one exported file; the oldest beyond ``MAX_EXPORTS`` are removed."""
    folder = Path(tempfile.mkdtemp(prefix="personachat-"))
    with _exports_lock:
        _exports.append(folder)
        while len(_exports) > MAX_EXPORTS:
            shutil.rmtree(_exports.popleft(), ignore_errors=True)
    return folder


def conversation_record(
    history: Sequence[dict[str, Any]],
    side: Sequence[dict[str, Any]],
    prompted: Sequence[dict[str, Any]],
    readout: Readout | None,
) -> dict[str, Any]:
    """The conversation (steered, plain beside it, under the persona's own prompt), the page's
    settings of the last turn and that turn's per-token projections."""
    return {
        "format": FORMAT,
        "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model_id": readout.model_id if readout is not None else "",
        "settings": dict(readout.settings) if readout is not None else {},
        "conversation": list(history),
        "plain": list(side),
        "prompted": list(prompted),
        "readout": readout_numbers(readout),
    }


def conversation_file(
    history: Sequence[dict[str, Any]],
    side: Sequence[dict[str, Any]],
    prompted: Sequence[dict[str, Any]],
    readout: Readout | None,
) -> Path | None:
    """The conversation record as ``conversation.json`` in a new folder; None when empty."""
    if not history:
        return None
    path = _folder() / "conversation.json"
    record = conversation_record(history, side, prompted, readout)
    text = json.dumps(record, indent=1, ensure_ascii=False, default=str)
    path.write_text(text, encoding="utf-8")
    return path


def vector_file(store: Any, store_id: str, persona: str, kind: str, suffix: str) -> Path:
    """``persona``'s stored vector (read from ``kind``) written as ``<persona>.<kind><suffix>``
    (``personachat.store.formats.write_vector``: .safetensors keeps every layer and its
    metadata, .gguf is a llama.cpp control vector of layers 1 on)."""
    from personachat.store.formats import write_vector

    vector = store.load_vector(store_id, persona, positions=kind or None)
    info = store.model(store_id)
    name = f"{persona}.{vector.positions}{suffix}"
    return write_vector(vector, _folder() / name, info=info)
