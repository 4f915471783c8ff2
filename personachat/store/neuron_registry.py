"""Neuron sets: ranked MLP units per (model, label), catalog rows only."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import fields
from typing import Any

from personachat.records import NEURON_METHODS, NEURON_SITES, ModelInfo, NeuronSet, check_name
from personachat.store.catalog import Catalog
from personachat.store.errors import UnknownError
from personachat.store.model_registry import ModelRegistry
from personachat.store.schema import NeuronSetEntry, as_utc
from personachat.store.sql import insert, transaction

UNIT_COLUMNS = ["set_id", "rank", "layer", "idx", "score", "mean", "stability", "ranks"]


def check_neurons(s: NeuronSet, models: dict[str, ModelInfo]) -> ModelInfo:
    """The set's registered model, after checking the set's site, method, units and values."""
    what = f"neuron set {s.label!r} (model {s.model_id!r})"
    check_name(s.label, "neuron set label")
    info = models.get(s.model_id)
    if info is None:
        raise UnknownError(
            f"{what}: model not registered; known models: {sorted(models)}. "
            "Call register_model(info) first"
        )
    if s.site not in NEURON_SITES:
        raise ValueError(f"{what}: site {s.site!r} is not one of {NEURON_SITES}")
    if s.method not in NEURON_METHODS:
        raise ValueError(f"{what}: method {s.method!r} is not one of {NEURON_METHODS}")
    n = len(s.indices)
    if n == 0 or len(s.layers) != n:
        raise ValueError(f"{what}: needs as many layers as indices, got {len(s.layers)}, {n}")
    check_unit_values(s, what)
    for layer, idx in zip(s.layers, s.indices, strict=True):
        if not 0 <= layer < info.n_layers:
            raise ValueError(f"{what}: layer {layer} outside 0..{info.n_layers - 1}")
        if not 0 <= idx < info.mlp_width:
            raise ValueError(
                f"{what}: neuron index {idx} at layer {layer} is outside the MLP width "
                f"{info.mlp_width} of model {s.model_id!r}"
            )
    if len(set(zip(s.layers, s.indices, strict=True))) != n:
        raise ValueError(f"{what}: a (layer, index) unit appears twice")
    return info


def check_unit_values(s: NeuronSet, what: str) -> None:
    """Scores, means, stability and ranks: one finite value per unit when given."""
    n = len(s.indices)
    optional: dict[str, Sequence[float] | None] = {
        "scores": s.scores,
        "means": s.means,
        "stability": s.stability,
    }
    optional |= {f"ranks[{p!r}]": r for p, r in s.ranks.items()}
    for name, values in optional.items():
        if values and len(values) != n:
            raise ValueError(f"{what}: {name} has {len(values)} entries for {n} units")
        if values and not all(math.isfinite(float(x)) for x in values):
            raise ValueError(f"{what}: {name} contains NaN or Inf")


def set_row(sid: int, s: NeuronSet, info: ModelInfo) -> tuple[Any, ...]:
    """The ``neuron_sets`` row of a new set, in the column order of ``NeuronSetEntry``."""
    return (
        *(sid, s.model_id, info.revision, s.label, s.site, s.method),
        *(list(s.pairs), len(s), s.source, info.layer_convention),
        as_utc(s.created_at),
    )


def unit_rows(sid: int, s: NeuronSet) -> list[tuple[Any, ...]]:
    """One ``neurons`` row per unit, best first; unknown values are NULL."""
    rows = []
    for i in range(len(s)):
        ranks = json.dumps({p: int(r[i]) for p, r in s.ranks.items()})
        rows.append(
            (
                *(sid, i, s.layers[i], s.indices[i]),
                float(s.scores[i]) if s.scores else None,
                float(s.means[i]) if s.means else None,
                float(s.stability[i]) if s.stability else None,
                ranks,
            )
        )
    return rows


class NeuronRegistry:
    """Rows of ``neuron_sets`` and ``neurons``."""

    def __init__(self, catalog: Catalog, models: ModelRegistry) -> None:
        self.catalog = catalog
        self.models = models

    def register(self, sets: Iterable[NeuronSet], model: ModelInfo | None = None) -> list[int]:
        """Store neuron sets (and ``model``, added or updated as ``register_model`` does) in one
        transaction (same (model, label) replaces); returns set ids."""
        items = list(sets)
        if not items and model is None:
            return []
        models = self.models.models_with(model)
        infos = [check_neurons(s, models) for s in items]
        keys = [(s.model_id, s.label) for s in items]
        if len(set(keys)) != len(keys):
            raise ValueError("register_neurons got two sets with the same (model, label)")
        with self.catalog.writing() as conn, transaction(conn):
            if model is not None:
                self.models.upsert_model(conn, model)
            for s in items:
                conn.execute(
                    "DELETE FROM neurons WHERE set_id IN (SELECT set_id FROM neuron_sets "
                    "WHERE model_id = ? AND label = ?)",
                    [s.model_id, s.label],
                )
                conn.execute(
                    "DELETE FROM neuron_sets WHERE model_id = ? AND label = ?",
                    [s.model_id, s.label],
                )
            ids = [
                int(r[0])
                for r in conn.execute(
                    "SELECT nextval('neuron_set_ids') FROM range(?)", [len(items)]
                ).fetchall()
            ]
            triples = list(zip(ids, items, infos, strict=True))
            set_rows = [set_row(sid, s, info) for sid, s, info in triples]
            units = [row for sid, s, _ in triples for row in unit_rows(sid, s)]
            insert(conn, "neuron_sets", [f.name for f in fields(NeuronSetEntry)], set_rows)
            insert(conn, "neurons", UNIT_COLUMNS, units)
        return ids

    def neuron_sets(self, model_id: str | None = None) -> list[NeuronSetEntry]:
        return self.catalog.entries(NeuronSetEntry, "neuron_sets", {"model_id": model_id})

    def load(self, model_id: str, label: str) -> NeuronSet:
        """The neuron set ``label`` of a model, units best first."""
        sets = [e for e in self.neuron_sets(model_id) if e.label == label]
        if not sets:
            known = [e.label for e in self.neuron_sets(model_id)]
            raise UnknownError(
                f"no neuron set {label!r} for model {model_id!r}; known sets: {known}"
            )
        e = sets[0]
        units = self.catalog.rows(
            "SELECT layer, idx, score, mean, stability, ranks FROM neurons WHERE set_id = ? "
            "ORDER BY rank",
            [e.set_id],
        )
        rank_maps = [json.loads(u[5]) for u in units]
        return NeuronSet(
            model_id=e.model_id,
            label=e.label,
            site=e.site,
            layers=[u[0] for u in units],
            indices=[u[1] for u in units],
            scores=[u[2] for u in units] if units[0][2] is not None else [],
            method=e.method,
            pairs=list(e.pairs),
            means=[u[3] for u in units] if units[0][3] is not None else None,
            ranks={p: [int(m[p]) for m in rank_maps] for p in rank_maps[0]},
            stability=[u[4] for u in units] if units[0][4] is not None else None,
            source=e.source,
            created_at=e.created_at,
        )

    def remove(self, model_id: str, label: str) -> None:
        """Remove the neuron set ``label`` of a model."""
        self.load(model_id, label)  # raises with the known labels
        with self.catalog.writing() as conn, transaction(conn):
            conn.execute(
                "DELETE FROM neurons WHERE set_id IN (SELECT set_id FROM neuron_sets "
                "WHERE model_id = ? AND label = ?)",
                [model_id, label],
            )
            conn.execute(
                "DELETE FROM neuron_sets WHERE model_id = ? AND label = ?", [model_id, label]
            )
