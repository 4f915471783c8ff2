"""What one model's analysis runs on: the dataset's personas and questions, and stored vectors."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from personachat.analysis.preferences import (
    PreferenceItem,
    default_preferences,
    demo_preferences,
)
from personachat.records import Persona, PersonaVector

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AnalysisInputs:
    """What one model's analysis runs on: personas, collapse questions, patching questions."""

    dataset: str
    personas: list[Persona]
    items: list[PreferenceItem]
    patch_items: list[PreferenceItem] | None  # None: patch on ``items``


def default_dataset(model: str) -> str:
    """``demo`` for the bundled demo model (a folder named ``demo``), else ``personas``."""
    return "demo" if Path(str(model)).name == "demo" else "personas"


def analysis_inputs(
    dataset: str, names: Sequence[str] | None = None, *, forced: bool = False
) -> AnalysisInputs:
    """The personas and questions of ``dataset``: ``demo`` is the demo model's planted personas
    and preference questions (patched with the forced reply prefix); any other dataset (built-in
    name or .json/.jsonl file) gives the personas, with ``default_preferences()``.
    ``names`` keeps only those personas, in that order (ValueError naming unknown ones)."""
    patch_items = None
    if dataset == "demo":
        from personachat.prompts.demo import demo_personas

        personas, items = demo_personas(), demo_preferences(forced=forced)
        patch_items = demo_preferences(forced=True)
    else:
        from personachat.prompts import load_dataset

        personas, items = list(load_dataset(dataset).personas), default_preferences()
    if names:
        known = {p.name: p for p in personas}
        missing = [n for n in names if n not in known]
        if missing:
            raise ValueError(
                f"unknown personas {missing} in dataset {dataset!r}; known: {sorted(known)}"
            )
        personas = [known[n] for n in names]
    return AnalysisInputs(dataset, list(personas), list(items), patch_items)


def stored_vectors(
    store: Any, model_ids: Sequence[str], names: Sequence[str]
) -> list[PersonaVector]:
    """One stored persona vector per name (reply-average ones preferred) of the first of
    ``model_ids`` the store (``personachat.store.Store``) has; [] when it has none of them."""
    have = {m.model_id for m in store.models()}
    model_id = next((m for m in model_ids if m in have), None)
    if model_id is None:
        log.warning("store has no model %s (has %s)", list(model_ids), sorted(have))
        return []
    out = []
    for name in names:
        entries = store.vectors(model_id, name)
        if entries:
            e = next((x for x in entries if x.positions == "response_avg"), entries[0])
            out.append(store.load_vector(model_id, name, positions=e.positions, method=e.method))
    log.info("loaded %d stored vectors of %s", len(out), model_id)
    return out
