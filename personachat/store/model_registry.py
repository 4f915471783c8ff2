"""Models and personas: the registry of what stored tensors belong to."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import duckdb

from personachat.records import ModelInfo, Persona, check_model_sizes, check_name
from personachat.store.catalog import Catalog
from personachat.store.errors import StoreError, UnknownError
from personachat.store.schema import utcnow
from personachat.store.sql import insert, transaction

PERSONA_COLUMNS = ["name", "system_prompt", "description", "category", "source", "registered_at"]


def check_personas(personas: Iterable[Persona]) -> list[Persona]:
    """The personas, after checking their names: safe for file names, each once."""
    items = list(personas)
    for p in items:
        check_name(p.name, "persona name")
    if len({p.name for p in items}) != len(items):
        raise ValueError("register_personas got the same persona name twice")
    return items


class ModelRegistry:
    """Rows of ``models`` and ``personas``."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog

    def register_model(self, info: ModelInfo) -> None:
        """Add or update a model. Absurd sizes (``check_model_sizes``) are refused, and so is
        changing the shape of a model that has tensors."""
        check_model_sizes(info)
        with self.catalog.writing() as conn, transaction(conn):
            self.upsert_model(conn, info)

    def models_with(self, model: ModelInfo | None) -> dict[str, ModelInfo]:
        """The registered models by id, with ``model`` (its sizes checked) as a write that
        brings it along (``upsert_model`` in its transaction) will leave it."""
        models = self.catalog.model_map()
        if model is not None:
            check_model_sizes(model)
            models[model.model_id] = model
        return models

    def upsert_model(self, conn: duckdb.DuckDBPyConnection, info: ModelInfo) -> None:
        """Inside a write: add or update a model whose sizes were checked
        (``check_model_sizes``), refusing to change the shape of one that has tensors."""
        old = conn.execute(
            "SELECT n_layers, hidden_size, mlp_width FROM models WHERE model_id = ?",
            [info.model_id],
        ).fetchone()
        new = (info.n_layers, info.hidden_size, info.mlp_width)
        if old is not None and tuple(old) != new:
            used = conn.execute(
                "SELECT (SELECT count(*) FROM vectors WHERE model_id = $1) + "
                "(SELECT count(*) FROM means WHERE model_id = $1) + "
                "(SELECT count(*) FROM neuron_sets WHERE model_id = $1)",
                [info.model_id],
            ).fetchone()
            if used and used[0]:
                raise StoreError(
                    f"model {info.model_id!r} is registered with (n_layers, hidden, "
                    f"mlp_width) = {tuple(old)} and has {used[0]} stored items; refusing "
                    f"to change it to {new}. Remove its items first or use another model id"
                )
        conn.execute(
            "INSERT INTO models VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (model_id) "
            "DO UPDATE SET revision = excluded.revision, architecture = "
            "excluded.architecture, n_layers = excluded.n_layers, hidden_size = "
            "excluded.hidden_size, mlp_width = excluded.mlp_width, layer_convention = "
            "excluded.layer_convention",
            [
                info.model_id,
                info.revision,
                info.architecture,
                info.n_layers,
                info.hidden_size,
                info.mlp_width,
                info.layer_convention,
                utcnow(),
            ],
        )

    def models(self) -> list[ModelInfo]:
        return list(self.catalog.current().models.values())

    def model(self, model_id: str) -> ModelInfo:
        """The registered model, or UnknownError listing the known ones."""
        models = self.catalog.current().models
        if model_id in models:
            return models[model_id]
        known = [m.model_id for m in self.models()]
        raise UnknownError(
            f"model {model_id!r} is not in the store {self.catalog.root}; known models: {known}. "
            "Register it first (Store.register_model(loaded.info))"
        )

    def register_personas(self, personas: Iterable[Persona]) -> None:
        """Add or update personas (by name), in one transaction."""
        items = check_personas(personas)
        if not items:
            return
        with self.catalog.writing() as conn, transaction(conn):
            self.upsert_personas(conn, items)

    def upsert_personas(self, conn: duckdb.DuckDBPyConnection, items: list[Persona]) -> None:
        """Inside a write: add or update checked personas."""
        now = utcnow()
        rows = [(p.name, p.system_prompt, p.description, p.category, p.source, now) for p in items]
        insert(
            conn,
            "personas",
            PERSONA_COLUMNS,
            rows,
            conflict="(name) DO UPDATE SET system_prompt = excluded.system_prompt, "
            "description = excluded.description, category = excluded.category, "
            "source = excluded.source",
        )

    def personas(self, model_id: str | None = None) -> list[Persona]:
        """All personas, or those with a vector or means for ``model_id``."""
        query = "SELECT name, system_prompt, description, category, source FROM personas"
        params: list[Any] = []
        if model_id is not None:
            query += (
                " WHERE name IN (SELECT persona FROM vectors WHERE model_id = $1 "
                "UNION SELECT persona FROM means WHERE model_id = $1)"
            )
            params = [model_id]
        return [Persona(*row) for row in self.catalog.rows(query + " ORDER BY name", params)]

    def persona(self, name: str) -> Persona:
        rows = self.catalog.rows(
            "SELECT name, system_prompt, description, category, source FROM personas "
            "WHERE name = ?",
            [name],
        )
        if not rows:
            raise UnknownError(
                f"persona {name!r} is not in the store; known personas: {self.persona_names()}"
            )
        return Persona(*rows[0])

    def persona_names(self, model_id: str | None = None) -> list[str]:
        return [p.name for p in self.personas(model_id)]

    def ensure_rows(
        self, conn: duckdb.DuckDBPyConnection, model_ids: set[str], personas: set[str]
    ) -> None:
        """Inside a write: refuse models removed meanwhile, give new personas an empty row."""
        missing = [
            m
            for m in sorted(model_ids)
            if not conn.execute("SELECT 1 FROM models WHERE model_id = ?", [m]).fetchone()
        ]
        if missing:
            raise UnknownError(f"models {missing} were removed from {self.catalog.root} meanwhile")
        now = utcnow()
        insert(
            conn,
            "personas",
            PERSONA_COLUMNS,
            [(p, "", "", "", "registered with a vector", now) for p in sorted(personas)],
            conflict="DO NOTHING",
        )
