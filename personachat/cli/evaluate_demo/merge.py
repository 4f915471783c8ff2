"""``--merge``: what an earlier ``results.json`` keeps when this run redoes some of it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def carried_over(old: dict[str, Any], sections: Sequence[str]) -> dict[str, Any]:
    """What an earlier ``results.json`` keeps when this run redoes ``sections``: the other
    sections, and every earlier run's config (oldest first)."""
    redo = (*sections, "config", "merged_config", "earlier_configs")
    kept = {k: v for k, v in old.items() if k not in redo}
    earlier = old.get("earlier_configs") or [c for c in [old.get("merged_config")] if c]
    return {**kept, "earlier_configs": [*earlier, old["config"]]}


def merged_ablation(prev: dict[str, Any], new: dict[str, Any], methods: str) -> dict[str, Any]:
    """The ablation parts this run measured replace the earlier ones; in the neuron part, only
    the rows of the methods redone (``methods``, comma-separated) are replaced."""
    merged = {**prev, **new}
    if "neurons" in new and "neurons" in prev:
        redone = methods.split(",")
        kept = [r for r in prev["neurons"] if r["method"] not in redone]
        merged["neurons"] = kept + new["neurons"]
    return merged
