"""Settings in a link: the page's chat settings as a URL query, and back.

``share_query`` writes every setting as a readable query parameter named like the ``/chat``
endpoint's (``?personas=pirate&preset=custom&layer_spec=2-3&strength=3...``; lists
comma-separated, booleans as 0/1); ``parse_query`` reads them back, typed and checked against
each control's choices, and drops what it cannot read, so a hand-edited link never breaks the
page. Opening the link restores the settings (``Handlers.restore``); the model is the app's.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlencode

from personachat.app.settings import (
    ABLATION_MODES,
    ABLATION_POSITIONS,
    DIRECTION_MODES,
    DIRECTION_POSITIONS,
    POSITIONS,
    PRESETS,
    UNITS,
    ChatInputs,
)

# the settings a link carries, in the page's order (the chat endpoint's names, then the page's)
SHARED = (*(f.name for f in dataclasses.fields(ChatInputs) if f.name != "model_id"), "prompted")
LISTS = frozenset({"personas", "neuron_sets"})
FLAGS = frozenset({"side_by_side", "prompted"})
NUMBERS = frozenset({"temperature", "max_new_tokens", "seed", "last_n", "strength", "cap_level"})
CHOICES: dict[str, Sequence[str]] = {
    "units": UNITS,
    "positions": POSITIONS,
    "ablation": ABLATION_MODES,
    "direction_mode": tuple(DIRECTION_MODES),
    "direction_positions": DIRECTION_POSITIONS,
    "ablation_positions": ABLATION_POSITIONS,
    "preset": PRESETS,
    "cap_side": ("above", "below"),
    "cap_by": ("percentile", "threshold"),
    "cap_positions": ABLATION_POSITIONS,
}


def _written(name: str, value: Any) -> str:
    if name in LISTS:
        return ",".join(str(v) for v in value or [])
    if name in FLAGS:
        return "1" if value else "0"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return "" if value is None else str(value)


def share_query(values: Mapping[str, Any]) -> str:
    """``?name=value&...`` for every ``SHARED`` setting in ``values``."""
    pairs = [(name, _written(name, values[name])) for name in SHARED if name in values]
    return "?" + urlencode(pairs)


def _read(name: str, text: str) -> Any:
    """The value of one query parameter, or None when it cannot be read."""
    if name in LISTS:
        return [item.strip() for item in text.split(",") if item.strip()]
    if name in FLAGS:
        return text.strip().lower() in ("1", "true", "yes", "on")
    if name in NUMBERS:
        try:
            number = float(text)
        except ValueError:
            return None
        return number if math.isfinite(number) else None
    if name in CHOICES and text not in CHOICES[name]:
        return None
    return text


def parse_query(params: Mapping[str, str]) -> dict[str, Any]:
    """The settings a link's query names (``SHARED`` only), typed; unreadable ones dropped."""
    out = {}
    for name in SHARED:
        if name in params:
            value = _read(name, str(params[name]))
            if value is not None:
                out[name] = value
    return out
