"""Persona vectors and raw means: catalog rows plus checked files.

A batch (vectors, means and the personas they belong to) is written crash-safe: files staged
and fsynced, then under the lock journaled, renamed and their rows committed in one
transaction, the files of replaced rows deleted after the commit (``staging.py``). Loading
re-hashes the file and checks its shape against the catalog, the model and the caller's
``hidden_size``; a reader whose file was deleted by a concurrent replacement reads again from a
refreshed snapshot (``fresh``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import fields, replace
from typing import Any, TypeVar

import duckdb
import torch

from personachat.records import MEAN_BASELINE, ModelInfo, Persona, PersonaMeans, PersonaVector
from personachat.store.catalog import Catalog, tensor_files
from personachat.store.errors import IntegrityError, MissingFileError, UnknownError
from personachat.store.files import TensorFiles
from personachat.store.model_registry import ModelRegistry, check_personas
from personachat.store.prepare import check_unique_keys, prepare_means, prepare_vector
from personachat.store.schema import MeansEntry, VectorEntry, as_utc, utcnow
from personachat.store.sql import insert, transaction
from personachat.store.staging import Pending
from personachat.store.tensorfile import (
    HELDOUT_FIELDS,
    METRIC_FIELDS,
    dtype_name,
    vector_from_tensors,
)

VECTOR_KEY = ["model_id", "persona", "method", "positions", "baseline"]
T = TypeVar("T")


class VectorRegistry:
    """Rows of ``vectors``, ``vector_layer_metrics``, ``vector_quantiles`` and ``means``, and
    the files they name."""

    def __init__(self, catalog: Catalog, files: TensorFiles, models: ModelRegistry) -> None:
        self.catalog = catalog
        self.files = files
        self.models = models

    # --- writing -------------------------------------------------------------------------------

    def register(
        self,
        vectors: Iterable[PersonaVector],
        means: Iterable[PersonaMeans] = (),
        personas: Iterable[Persona] = (),
        model: ModelInfo | None = None,
    ) -> list[int]:
        """Store vectors, raw means and personas (and ``model``, added or updated as
        ``register_model`` does) atomically in one transaction; returns the vector ids. Readers
        see the whole batch or none of it."""
        now = utcnow()
        vecs = [replace(v, created_at=as_utc(v.created_at or now)) for v in vectors]
        mns = list(means)
        people = check_personas(personas)
        if not vecs and not mns and model is None:
            self.models.register_personas(people)
            return []
        check_unique_keys(vecs, mns)
        models = self.models.models_with(model)
        pending_v = [prepare_vector(v, models, self.catalog, self.files) for v in vecs]
        pending_m = [prepare_means(m, models, self.catalog, self.files) for m in mns]
        with self.files.batch(pending_v + pending_m) as batch:
            with self.catalog.writing() as conn:
                self.files.clean(lambda: tensor_files(conn))
                with transaction(conn):
                    if model is not None:
                        self.models.upsert_model(conn, model)
                    self.models.upsert_personas(conn, people)
                    ids, old_files = self._insert_vectors(conn, vecs, pending_v, models)
                    old_files += self._insert_means(conn, mns, pending_m, models)
                    batch.publish(old_files)
                batch.committed = True
        return ids

    def _insert_vectors(
        self,
        conn: duckdb.DuckDBPyConnection,
        vecs: list[PersonaVector],
        pending: list[Pending],
        models: dict[str, ModelInfo],
    ) -> tuple[list[int], list[str]]:
        """Rows of new vectors replacing those with the same key; (ids, files of old rows)."""
        if not vecs:
            return [], []
        self.models.ensure_rows(conn, {v.model_id for v in vecs}, {v.persona for v in vecs})
        keys = [[getattr(v, c) for v in vecs] for c in VECTOR_KEY]
        unnest = ", ".join(f"unnest(${i + 1}) AS {c}" for i, c in enumerate(VECTOR_KEY))
        join = " AND ".join(f"v.{c} = k.{c}" for c in VECTOR_KEY)
        old = conn.execute(
            f"SELECT v.vector_id, v.file FROM vectors v JOIN (SELECT {unnest}) k ON {join}", keys
        ).fetchall()
        if old:
            old_ids = [r[0] for r in old]
            delete_details(conn, old_ids)
            conn.execute("DELETE FROM vectors WHERE vector_id IN (SELECT unnest(?))", [old_ids])
        ids = [
            int(r[0])
            for r in conn.execute(
                "SELECT nextval('vector_ids') FROM range(?)", [len(vecs)]
            ).fetchall()
        ]
        rows: list[tuple[Any, ...]] = []
        metric_rows: list[tuple[Any, ...]] = []
        quantile_rows: list[tuple[Any, ...]] = []
        for vid, v, item in zip(ids, vecs, pending, strict=True):
            info = models[v.model_id]
            rows.append(vector_row(vid, v, item, info))
            metric_rows.extend(metric_rows_of(vid, v))
            quantile_rows.extend(quantile_rows_of(vid, v))
        insert(conn, "vectors", [f.name for f in fields(VectorEntry)], rows)
        columns = ["vector_id", "layer", *METRIC_FIELDS, *HELDOUT_FIELDS]
        insert(conn, "vector_layer_metrics", columns, metric_rows)
        insert(
            conn,
            "vector_quantiles",
            ["vector_id", "layer", "sample", "n", "quantiles"],
            quantile_rows,
        )
        return ids, [r[1] for r in old]

    def _insert_means(
        self,
        conn: duckdb.DuckDBPyConnection,
        mns: list[PersonaMeans],
        pending: list[Pending],
        models: dict[str, ModelInfo],
    ) -> list[str]:
        """Rows of new means replacing those with the same key; returns the old rows' files."""
        if not mns:
            return []
        self.models.ensure_rows(conn, {m.model_id for m in mns}, {m.persona for m in mns})
        old: list[tuple[Any, ...]] = []
        for m in mns:
            old += conn.execute(
                "DELETE FROM means WHERE model_id = ? AND persona = ? AND positions = ? "
                "RETURNING file",
                [m.model_id, m.persona, m.positions],
            ).fetchall()
        ids = [
            int(r[0])
            for r in conn.execute("SELECT nextval('mean_ids') FROM range(?)", [len(mns)]).fetchall()
        ]
        rows = []
        for mid, m, item in zip(ids, mns, pending, strict=True):
            info = models[m.model_id]
            rows.append(
                (
                    *(mid, m.model_id, info.revision, m.persona, m.positions, *m.mean.shape),
                    *(info.layer_convention, m.dataset, m.dataset_sha256, m.n_samples),
                    *(dtype_name(m.mean), item.rel, item.sha256, utcnow(), m.render or None),
                )
            )
        insert(conn, "means", [f.name for f in fields(MeansEntry)], rows)
        return [r[0] for r in old]

    def remove_vector(self, model_id: str, persona: str, filters: dict[str, Any]) -> int:
        """Remove the vectors matching ``filters``; returns how many."""
        entries = self.vectors(model_id, persona, **filters)
        if not entries:
            raise self._missing("vector", model_id, persona, filters)
        return self._delete([e.vector_id for e in entries], [])

    def remove_persona(self, name: str, model_id: str | None = None) -> int:
        """Remove a persona's vectors and means (and, for every model, its row)."""
        vec_ids = [e.vector_id for e in self.vectors(model_id, name)]
        mean_ids = [e.mean_id for e in self.means(model_id, name)]
        known = self.models.persona_names()
        if not vec_ids and not mean_ids and (model_id is not None or name not in known):
            raise UnknownError(
                f"nothing stored for persona {name!r}"
                + (f" and model {model_id!r}" if model_id else "")
                + f"; known personas: {self.models.persona_names(model_id)}"
            )
        return self._delete(vec_ids, mean_ids, persona=name if model_id is None else None)

    def remove_damaged(self) -> list[str]:
        """Remove the vectors and means whose file is missing or no longer matches its
        checksum (in one transaction); returns each removed row's file."""
        root = self.catalog.root
        bad_v = [e for e in self.vectors() if not self.files.intact(e.file, e.sha256)]
        bad_m = [e for e in self.means() if not self.files.intact(e.file, e.sha256)]
        if bad_v or bad_m:
            self._delete([e.vector_id for e in bad_v], [e.mean_id for e in bad_m])
        return [str(root / e.file) for e in bad_v] + [str(root / e.file) for e in bad_m]

    def _delete(self, vec_ids: list[int], mean_ids: list[int], persona: str | None = None) -> int:
        with self.files.batch([]) as batch:
            with self.catalog.writing() as conn:
                self.files.clean(lambda: tensor_files(conn))
                with transaction(conn):
                    files = conn.execute(
                        "DELETE FROM vectors WHERE vector_id IN (SELECT unnest(?)) RETURNING file",
                        [vec_ids],
                    ).fetchall()
                    delete_details(conn, vec_ids)
                    files += conn.execute(
                        "DELETE FROM means WHERE mean_id IN (SELECT unnest(?)) RETURNING file",
                        [mean_ids],
                    ).fetchall()
                    if persona is not None:
                        conn.execute("DELETE FROM personas WHERE name = ?", [persona])
                    batch.publish([rel for (rel,) in files])
                batch.committed = True
        return len(files)

    # --- reading -------------------------------------------------------------------------------

    def vectors(
        self,
        model_id: str | None = None,
        persona: str | None = None,
        *,
        method: str | None = None,
        positions: str | None = None,
        baseline: str | None = None,
    ) -> list[VectorEntry]:
        """Catalog rows of the stored vectors matching the given filters, newest first."""
        index = self.catalog.current()
        if model_id is not None and persona is not None:
            found = index.by_key.get((model_id, persona), [])
        else:
            found = index.vectors
        where = {
            "model_id": model_id,
            "persona": persona,
            "method": method,
            "positions": positions,
            "baseline": baseline,
        }
        wanted = [(k, v) for k, v in where.items() if v is not None]
        return [e for e in found if all(getattr(e, k) == v for k, v in wanted)]

    def layer_metrics(self, vector_id: int) -> list[tuple[Any, ...]]:
        """(layer, auc, separation, norm, resid_norm) rows of one vector."""
        return self.catalog.rows(
            "SELECT layer, auc, separation, norm, resid_norm FROM vector_layer_metrics "
            "WHERE vector_id = ? ORDER BY layer",
            [vector_id],
        )

    def means(self, model_id: str | None = None, persona: str | None = None) -> list[MeansEntry]:
        return self.catalog.entries(MeansEntry, "means", {"model_id": model_id, "persona": persona})

    def fresh(self, attempt: Callable[[], T]) -> T:
        """``attempt()`` (look rows up, read their files), again on a refreshed snapshot while
        a file it wanted was deleted by a write that replaced or removed its row meanwhile
        (for up to ``lock_timeout`` seconds): a long-lived reader never fails on that race."""
        deadline = time.monotonic() + max(self.catalog.lock_timeout, 1.0)
        while True:
            try:
                return attempt()
            except MissingFileError:
                if not self.catalog.changed() or time.monotonic() > deadline:
                    raise
                self.catalog.refresh()

    def load_vector(
        self, model_id: str, persona: str, filters: dict[str, Any], hidden_size: int | None
    ) -> PersonaVector:
        """The newest vector matching ``filters``, its sha256 and shape verified."""
        vector = self.fresh(lambda: self._read_vector(model_id, persona, filters, hidden_size))
        vector.baseline_mean = self._baseline_mean(model_id, vector)
        return vector

    def _read_vector(
        self, model_id: str, persona: str, filters: dict[str, Any], hidden_size: int | None
    ) -> PersonaVector:
        entries = self.vectors(model_id, persona, **filters)
        if not entries:
            raise self._missing("vector", model_id, persona, filters)
        entry = entries[0]
        info = self.models.model(model_id)
        shape = (info.n_layers, info.hidden_size)
        if (entry.n_layers, entry.hidden_size) != shape:
            raise IntegrityError(
                f"{entry.file}: catalog shape {(entry.n_layers, entry.hidden_size)} differs "
                f"from model {model_id!r} shape {shape}"
            )
        tensors, meta = self.files.read_checked(entry.file, entry.sha256, shape, hidden_size)
        source = str(self.catalog.root / entry.file)
        return vector_from_tensors(tensors, meta, source=source)

    def _baseline_mean(self, model_id: str, vector: PersonaVector) -> torch.Tensor | None:
        """The registered mean of the vector's baseline persona at its positions, if any."""
        if vector.baseline == MEAN_BASELINE:
            return None  # a mean over personas: which ones is not recorded
        have = [e for e in self.means(model_id, vector.baseline) if e.positions == vector.positions]
        if not have:
            return None
        return self.load_means(model_id, vector.baseline, vector.positions).mean

    def load_means(self, model_id: str, persona: str, positions: str) -> PersonaMeans:
        """A persona's raw per-layer mean activations, their sha256 and shape verified."""
        return self.fresh(lambda: self._read_means(model_id, persona, positions))

    def _read_means(self, model_id: str, persona: str, positions: str) -> PersonaMeans:
        rows = [e for e in self.means(model_id, persona) if e.positions == positions]
        if not rows:
            raise self._missing("means", model_id, persona, {"positions": positions})
        e = rows[0]
        tensors, _ = self.files.read_checked(e.file, e.sha256, (e.n_layers, e.hidden_size), None)
        return PersonaMeans(
            model_id,
            persona,
            positions,
            tensors["mean"],
            e.n_samples,
            e.dataset,
            e.dataset_sha256,
            render=e.render or "",
        )

    def _missing(
        self, kind: str, model_id: str, persona: str, filters: dict[str, Any]
    ) -> UnknownError:
        """The error for a lookup that found nothing, listing what the store does hold."""
        models = self.catalog.model_map()
        root = self.catalog.root
        if model_id not in models:
            return UnknownError(
                f"model {model_id!r} is not in the store {root}; known models: {sorted(models)}"
            )
        known = self.models.persona_names(model_id)
        if persona not in known:
            return UnknownError(
                f"no {kind} for persona {persona!r} and model {model_id!r} in {root}; "
                f"known personas for this model: {known}"
            )
        return UnknownError(
            f"no {kind} for persona {persona!r}, model {model_id!r} with "
            f"{ {k: v for k, v in filters.items() if v is not None} }; stored: "
            + (
                str([(e.method, e.positions, e.baseline) for e in self.vectors(model_id, persona)])
                if kind == "vector"
                else str([e.positions for e in self.means(model_id, persona)])
            )
        )


def vector_row(vid: int, v: PersonaVector, item: Pending, info: ModelInfo) -> tuple[Any, ...]:
    """The ``vectors`` row of a new vector, in the column order of ``VectorEntry``."""
    best = v.metrics.best_layer if v.metrics is not None else None
    return (
        *(vid, v.model_id, info.revision, v.persona, v.method, v.positions),
        *(v.baseline, v.n_layers, v.hidden_size, info.layer_convention, best),
        *(v.dataset, v.dataset_sha256, v.n_samples, dtype_name(v.vector)),
        *(item.rel, item.sha256, as_utc(v.created_at), v.render or None),
        v.metrics.best_by if v.metrics is not None else None,
    )


def metric_rows_of(vid: int, v: PersonaVector) -> list[tuple[Any, ...]]:
    """One ``vector_layer_metrics`` row per layer; without metrics only the norm is known."""
    norms = v.vector.double().norm(dim=1).tolist()
    none: list[Any] = [None] * v.n_layers
    if v.metrics is not None:
        cols = [getattr(v.metrics, n).double().tolist() for n in METRIC_FIELDS]
        for name in HELDOUT_FIELDS:
            value = getattr(v.metrics, name)
            cols.append(value.double().tolist() if value is not None else none)
    else:
        cols = [none, none, norms, none, *([none] * len(HELDOUT_FIELDS))]
    return [(vid, layer, *(c[layer] for c in cols)) for layer in range(v.n_layers)]


def quantile_rows_of(vid: int, v: PersonaVector) -> list[tuple[Any, ...]]:
    """The ``vector_quantiles`` rows of a vector: per layer, its baseline's and its own."""
    q = v.quantiles
    if q is None:
        return []
    out = []
    for sample, values, n in (
        ("baseline", q.baseline, q.n_baseline),
        ("persona", q.persona, q.n_persona),
    ):
        out += [(vid, layer, sample, n, row) for layer, row in enumerate(values.double().tolist())]
    return out


def delete_details(conn: duckdb.DuckDBPyConnection, vector_ids: list[int]) -> None:
    """The per-layer rows of vectors about to go (metrics and projection quantiles)."""
    for table in ("vector_layer_metrics", "vector_quantiles"):
        conn.execute(f"DELETE FROM {table} WHERE vector_id IN (SELECT unnest(?))", [vector_ids])
