"""The catalog's tables, their rows as dataclasses, and migrations.

Tables (schema version ``SCHEMA_VERSION``, recorded in ``migrations``): ``models``, ``personas``,
``vectors``, ``vector_layer_metrics``, ``means``, ``neuron_sets``, ``neurons``, ``migrations``;
see ``SCHEMA`` for the columns. Timestamps are naive datetimes in UTC.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

import duckdb

from personachat.store.errors import StoreError
from personachat.store.sql import transaction

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2

SCHEMA: list[str] = [
    """CREATE TABLE models (
        model_id VARCHAR PRIMARY KEY,      -- hub name or local path
        revision VARCHAR,                  -- commit hash when known
        architecture VARCHAR NOT NULL,     -- model_type, e.g. llama, qwen2, gpt2
        n_layers INTEGER NOT NULL,
        hidden_size INTEGER NOT NULL,
        mlp_width INTEGER NOT NULL,
        layer_convention VARCHAR NOT NULL,
        registered_at TIMESTAMP NOT NULL)""",
    """CREATE TABLE personas (
        name VARCHAR PRIMARY KEY,
        system_prompt VARCHAR NOT NULL,
        description VARCHAR NOT NULL,
        category VARCHAR NOT NULL,
        source VARCHAR NOT NULL,           -- source dataset
        registered_at TIMESTAMP NOT NULL)""",
    "CREATE SEQUENCE vector_ids START 1",
    """CREATE TABLE vectors (
        vector_id BIGINT PRIMARY KEY,
        model_id VARCHAR NOT NULL,
        model_revision VARCHAR,
        persona VARCHAR NOT NULL,
        method VARCHAR NOT NULL,           -- diff_means | imported
        positions VARCHAR NOT NULL,        -- response_avg, prompt_last, prompt_avg, question_span
        baseline VARCHAR NOT NULL,         -- a persona name, or 'mean' (all personas)
        n_layers INTEGER NOT NULL,
        hidden_size INTEGER NOT NULL,
        layer_convention VARCHAR NOT NULL,
        best_layer INTEGER,                -- NULL without metrics
        dataset VARCHAR NOT NULL,
        dataset_sha256 VARCHAR NOT NULL,
        n_samples INTEGER NOT NULL,
        dtype VARCHAR NOT NULL,
        file VARCHAR NOT NULL UNIQUE,      -- relative to the store root
        sha256 VARCHAR NOT NULL,           -- of the whole file
        created_at TIMESTAMP NOT NULL,
        UNIQUE (model_id, persona, method, positions, baseline))""",
    """CREATE TABLE vector_layer_metrics (
        vector_id BIGINT NOT NULL,
        layer INTEGER NOT NULL,
        auc DOUBLE,                        -- NULL when not measured (imported vectors)
        separation DOUBLE,
        norm DOUBLE NOT NULL,
        resid_norm DOUBLE,
        PRIMARY KEY (vector_id, layer))""",
    "CREATE SEQUENCE mean_ids START 1",
    """CREATE TABLE means (
        mean_id BIGINT PRIMARY KEY,
        model_id VARCHAR NOT NULL,
        model_revision VARCHAR,
        persona VARCHAR NOT NULL,
        positions VARCHAR NOT NULL,
        n_layers INTEGER NOT NULL,
        hidden_size INTEGER NOT NULL,
        layer_convention VARCHAR NOT NULL,
        dataset VARCHAR NOT NULL,
        dataset_sha256 VARCHAR NOT NULL,
        n_samples INTEGER NOT NULL,
        dtype VARCHAR NOT NULL,
        file VARCHAR NOT NULL UNIQUE,
        sha256 VARCHAR NOT NULL,
        created_at TIMESTAMP NOT NULL,
        UNIQUE (model_id, persona, positions))""",
    "CREATE SEQUENCE neuron_set_ids START 1",
    """CREATE TABLE neuron_sets (
        set_id BIGINT PRIMARY KEY,
        model_id VARCHAR NOT NULL,
        model_revision VARCHAR,
        label VARCHAR NOT NULL,
        site VARCHAR NOT NULL,             -- mlp_hidden | gate
        method VARCHAR NOT NULL,           -- effect | attribution | imported
        pairs VARCHAR[] NOT NULL,          -- the contrast pairs the units came from
        n_units INTEGER NOT NULL,
        source VARCHAR NOT NULL,
        layer_convention VARCHAR NOT NULL,
        created_at TIMESTAMP NOT NULL,
        UNIQUE (model_id, label))""",
    """CREATE TABLE neurons (
        set_id BIGINT NOT NULL,
        rank INTEGER NOT NULL,             -- 0 = best in the set
        layer INTEGER NOT NULL,
        idx INTEGER NOT NULL,              -- unit index at the site, < models.mlp_width
        score DOUBLE,                      -- NULL when unknown (imported index lists)
        mean DOUBLE,                       -- baseline mean, for mean ablation
        stability DOUBLE,                  -- fraction of pairs ranking it in the top k
        ranks VARCHAR NOT NULL,            -- JSON {pair: rank in that pair, -1 = absent}
        PRIMARY KEY (set_id, rank))""",
]
# Version 2: how each prompt was rendered (chat template, system mode, BOS, pinned template
# variables), held-out layer metrics with the figure the best layer was chosen by, and the
# distribution of the extraction samples' projections onto each vector (for calibrated readouts).
SCHEMA_2: list[str] = [
    "ALTER TABLE vectors ADD COLUMN render VARCHAR",  # JSON render conditions; NULL: unknown
    "ALTER TABLE vectors ADD COLUMN best_layer_by VARCHAR",  # the figure that chose best_layer
    "ALTER TABLE means ADD COLUMN render VARCHAR",
    "ALTER TABLE vector_layer_metrics ADD COLUMN auc_heldout DOUBLE",  # mean over folds
    "ALTER TABLE vector_layer_metrics ADD COLUMN auc_heldout_std DOUBLE",  # spread over folds
    "ALTER TABLE vector_layer_metrics ADD COLUMN separation_heldout DOUBLE",
    "ALTER TABLE vector_layer_metrics ADD COLUMN separation_heldout_std DOUBLE",
    """CREATE TABLE vector_quantiles (
        vector_id BIGINT NOT NULL,
        layer INTEGER NOT NULL,
        sample VARCHAR NOT NULL,           -- baseline | persona: whose samples were projected
        n INTEGER NOT NULL,                -- how many samples
        quantiles DOUBLE[] NOT NULL,       -- at QUANTILE_LEVELS (0, 1, ..., 100 percent)
        PRIMARY KEY (vector_id, layer, sample))""",
]
MIGRATIONS: list[tuple[int, str, list[str]]] = [
    (1, "initial schema", SCHEMA),
    (2, "render conditions, held-out metrics, projection quantiles", SCHEMA_2),
]
TABLES = (
    "migrations",
    "models",
    "personas",
    "vectors",
    "vector_layer_metrics",
    "means",
    "neuron_sets",
    "neurons",
    "vector_quantiles",
)
# The levels of the stored projection quantiles: every whole percent.
QUANTILE_LEVELS = tuple(i / 100 for i in range(101))
MIGRATIONS_DDL = (
    "CREATE TABLE IF NOT EXISTS migrations (version INTEGER PRIMARY KEY, "
    "description VARCHAR NOT NULL, applied_at TIMESTAMP NOT NULL)"
)


@dataclass(frozen=True)
class VectorEntry:
    """One row of the ``vectors`` table."""

    vector_id: int
    model_id: str
    model_revision: str | None
    persona: str
    method: str
    positions: str
    baseline: str
    n_layers: int
    hidden_size: int
    layer_convention: str
    best_layer: int | None
    dataset: str
    dataset_sha256: str
    n_samples: int
    dtype: str
    file: str
    sha256: str
    created_at: datetime
    render: str | None = None  # JSON render conditions (personachat.prompts.RenderConditions)
    best_layer_by: str | None = None  # the figure best_layer was chosen by


@dataclass(frozen=True)
class MeansEntry:
    """One row of the ``means`` table."""

    mean_id: int
    model_id: str
    model_revision: str | None
    persona: str
    positions: str
    n_layers: int
    hidden_size: int
    layer_convention: str
    dataset: str
    dataset_sha256: str
    n_samples: int
    dtype: str
    file: str
    sha256: str
    created_at: datetime
    render: str | None = None


@dataclass(frozen=True)
class NeuronSetEntry:
    """One row of the ``neuron_sets`` table."""

    set_id: int
    model_id: str
    model_revision: str | None
    label: str
    site: str
    method: str
    pairs: list[str]
    n_units: int
    source: str
    layer_convention: str
    created_at: datetime


Entry = TypeVar("Entry", VectorEntry, MeansEntry, NeuronSetEntry)


def utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def as_utc(value: datetime | None) -> datetime:
    """``value`` as a naive UTC datetime (now if None)."""
    if value is None:
        return utcnow()
    if value.tzinfo is not None:
        return value.astimezone(UTC).replace(tzinfo=None)
    return value


def schema_version(conn: duckdb.DuckDBPyConnection, db: str) -> int:
    """The schema version of the attached database ``db`` (0 for a new file)."""
    exists = conn.execute(
        "SELECT count(*) FROM duckdb_tables() WHERE database_name = ? AND table_name = ?",
        [db, "migrations"],
    ).fetchone()
    if not exists or not exists[0]:
        return 0
    row = conn.execute(f"SELECT coalesce(max(version), 0) FROM {db}.migrations").fetchone()
    return int(row[0]) if row else 0


def check_version(catalog: Path, version: int) -> None:
    """Refuse a catalog this code cannot read, saying whether to upgrade the code or the file."""
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"{catalog} has schema version {version} but this personachat reads up "
            f"to {SCHEMA_VERSION}; upgrade personachat"
        )
    if version < SCHEMA_VERSION:
        raise StoreError(
            f"{catalog} has schema version {version}, this code needs "
            f"{SCHEMA_VERSION}; upgrade it with `python scripts/store.py migrate` (it opens "
            "the store writable once)"
        )


def create_schema(conn: duckdb.DuckDBPyConnection) -> None:
    """The tables of an empty catalog, as of SCHEMA_VERSION, without recording the migrations."""
    for statement in [MIGRATIONS_DDL, *(s for _, _, stmts in MIGRATIONS for s in stmts)]:
        conn.execute(statement)


def migrate(conn: duckdb.DuckDBPyConnection, catalog: Path, root: Path) -> bool:
    """Bring the catalog ``cat`` (the default database of ``conn``) to SCHEMA_VERSION, all
    pending migrations in one transaction; whether there were any."""
    version = schema_version(conn, "cat")
    if version > SCHEMA_VERSION:
        check_version(catalog, version)
    pending = [m for m in MIGRATIONS if m[0] > version]
    if not pending:
        return False
    with transaction(conn):
        conn.execute(MIGRATIONS_DDL)
        for number, description, statements in pending:
            for statement in statements:
                conn.execute(statement)
            conn.execute("INSERT INTO migrations VALUES (?, ?, ?)", [number, description, utcnow()])
            log.info("store %s: applied migration %d (%s)", root, number, description)
    return True
