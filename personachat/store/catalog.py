"""The catalog: brief DuckDB attachments, lock retries, a read snapshot.

DuckDB lets one process hold a catalog file for writing, and then no other process may open it
at all; attaching a file to an open in-memory connection is much cheaper than opening it. So
nothing keeps the file open. Writes attach it read-write, run one transaction, replace
``generation`` (the change marker, a unique content per write) and detach: the marker moves
before the lock is released, so before any file of a replaced row is deleted. Reads, user SQL
included, go to an in-memory *snapshot*: every table copied over one brief read-only ``ATTACH``
and then sealed (``sandbox.py``), re-copied when the marker (the content of ``generation`` and
the catalog file's stat) shows that another process wrote, and swapped in whole (tables, marker
and ``Index``, the Python dicts the hot lookups use). A busy lock is retried with jittered
exponential backoff for ``lock_timeout`` seconds, then ``StoreLockedError`` names the process
DuckDB says holds it; a reader that still cannot get in serves its previous snapshot and tries
again on the next call."""

from __future__ import annotations

import contextlib
import logging
import os
import random
import re
import secrets
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import duckdb

from personachat.records import ModelInfo
from personachat.store.errors import StoreError, StoreLockedError
from personachat.store.sandbox import SQL_MAX_ROWS, SQL_TIMEOUT, lock_down, run_query
from personachat.store.schema import (
    TABLES,
    Entry,
    VectorEntry,
    check_version,
    create_schema,
    schema_version,
)
from personachat.store.staging import STAGING

log = logging.getLogger(__name__)

CATALOG_FILE = "catalog.duckdb"
GENERATION_FILE = "generation"
MODEL_COLUMNS = (
    "model_id, revision, architecture, n_layers, hidden_size, mlp_width, layer_convention"
)

_ATTACH_LOCK = threading.RLock()  # serialises attachments of catalog files within this process


def lock_holder(message: str) -> str:
    """The process a DuckDB lock error names, or a sentence saying it named none."""
    match = re.search(r"held in (.+?) \(PID (\d+)\)", message)
    if match:
        return f"{match.group(1)} (PID {match.group(2)})"
    return "another process (DuckDB did not say which)"


def _stat(path: str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def tensor_files(conn: duckdb.DuckDBPyConnection) -> set[str]:
    """The files (relative to the store root) that rows of ``vectors`` and ``means`` name."""
    referenced = {r[0] for r in conn.execute("SELECT file FROM vectors").fetchall()}
    referenced |= {r[0] for r in conn.execute("SELECT file FROM means").fetchall()}
    return referenced


@dataclass(frozen=True)
class Index:
    """Python lookups over one snapshot for the hot reads (a dict get beats a query)."""

    models: dict[str, ModelInfo]
    vectors: list[VectorEntry]  # by model, persona, then newest first
    by_key: dict[tuple[str, str], list[VectorEntry]]  # (model_id, persona) -> vectors

    @classmethod
    def of(cls, snap: duckdb.DuckDBPyConnection) -> Index:
        models = {
            row[0]: ModelInfo(*row)
            for row in snap.execute(
                f"SELECT {MODEL_COLUMNS} FROM models ORDER BY model_id"
            ).fetchall()
        }
        names = ", ".join(f.name for f in fields(VectorEntry))
        vectors = [
            VectorEntry(*row)
            for row in snap.execute(
                f"SELECT {names} FROM vectors "
                "ORDER BY model_id, persona, created_at DESC, vector_id DESC"
            ).fetchall()
        ]
        by_key: dict[tuple[str, str], list[VectorEntry]] = {}
        for entry in vectors:
            by_key.setdefault((entry.model_id, entry.persona), []).append(entry)
        return cls(models, vectors, by_key)


class Catalog:
    """The catalog file ``catalog.duckdb`` under ``root``: writes, snapshot reads, user SQL."""

    def __init__(self, root: Path, *, read_only: bool, lock_timeout: float) -> None:
        self.root = root
        self.path = root / CATALOG_FILE
        self._generation = str(root / GENERATION_FILE)  # the change marker's paths, as str:
        self._catalog, self._wal = str(self.path), str(self.path) + ".wal"  # read per lookup
        self.read_only = read_only
        self.lock_timeout = lock_timeout
        self.lock = threading.RLock()
        self.snap: duckdb.DuckDBPyConnection | None = None
        self.snap_marker: tuple[Any, ...] | None = None
        self.index = Index({}, [], {})

    def close(self) -> None:
        with self.lock:
            if self.snap is not None:
                self.snap.close()
            self.snap = None
            self.snap_marker = None

    # --- locking and attachment ---------------------------------------------------------------

    def attach(self, conn: duckdb.DuckDBPyConnection, *, read_only: bool) -> None:
        """ATTACH the catalog as ``cat``, retrying a busy lock with backoff up to lock_timeout."""
        path = str(self.path).replace("'", "''")
        statement = f"ATTACH '{path}' AS cat" + (" (READ_ONLY)" if read_only else "")
        deadline = time.monotonic() + self.lock_timeout
        delay = 0.002
        while True:
            try:
                conn.execute(statement)
                return
            except duckdb.IOException as err:
                if "lock" not in str(err).lower():
                    raise
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise StoreLockedError(
                        f"store catalog {self.path} is locked by {lock_holder(str(err))}; "
                        f"still locked after {self.lock_timeout:.1f}s of retries. Another "
                        "process is writing or reading it: wait for it to finish, stop it, or "
                        "raise lock_timeout"
                    ) from err
                time.sleep(min(remaining, delay * (0.5 + random.random())))
                delay = min(delay * 2, 0.25)

    @contextlib.contextmanager
    def writing(self, *, mark: bool = True) -> Iterator[duckdb.DuckDBPyConnection]:
        """A connection on which ``cat`` (the catalog, read-write) is the default database.
        When the block ends the change marker is replaced before the lock is released, so any
        reader whose snapshot a write outdated sees a new marker before the files of replaced
        rows go. A block that raises rolled its transaction back and changed nothing, so the
        marker stays: a refused write leaves every file of the store as it was. With
        ``mark=False`` the block calls ``mark_changed`` itself if it changed the catalog."""
        if self.read_only:
            raise StoreError(
                f"Store({str(self.root)!r}, read-only) is read-only; open "
                "Store(..., read_only=False) to write"
            )
        with self.lock, _ATTACH_LOCK:
            conn = duckdb.connect()
            try:
                self.attach(conn, read_only=False)
                conn.execute("USE cat")
                try:
                    yield conn
                    if mark:
                        self.mark_changed()
                finally:
                    conn.execute("USE memory")
                    conn.execute("DETACH cat")
            finally:
                conn.close()

    def mark_changed(self) -> None:
        """Replace ``generation`` with a new, unique content (staged under ``.staging``); only
        inside ``writing``, after a commit."""
        staging = self.root / STAGING
        staging.mkdir(exist_ok=True)
        tmp = staging / f"generation.{os.getpid()}.tmp"
        tmp.write_text(f"{time.time_ns()} {os.getpid()} {secrets.token_hex(8)}\n")
        os.replace(tmp, self.root / GENERATION_FILE)

    # --- the read snapshot ---------------------------------------------------------------------

    def marker(self) -> tuple[Any, ...]:
        """What changes when any process writes: the content of ``generation`` (unique per
        write: a file's inode and coarse mtime can repeat) and the stat of the catalog file and
        of its write-ahead log (a writer killed after its commit never moved the marker)."""
        try:
            fd = os.open(self._generation, os.O_RDONLY)
        except FileNotFoundError:
            generation = None
        else:
            try:
                generation = os.read(fd, 256)
            finally:
                os.close(fd)
        return (generation, _stat(self._catalog), _stat(self._wal))

    def changed(self) -> bool:
        """Whether the catalog changed since the snapshot was taken."""
        return self.marker() != self.snap_marker

    def refresh(self, *, force: bool = False) -> None:
        """Re-read the catalog if another process changed it (reads call this themselves)."""
        with self.lock:
            marker = self.marker()
            if not force and self.snap is not None and marker == self.snap_marker:
                return
            snap = duckdb.connect()
            try:
                if marker[1] is None:  # no catalog yet: an empty snapshot
                    create_schema(snap)
                else:
                    self._copy(snap)
                lock_down(snap)  # user SQL runs here: no files, no network, no changes
                index = Index.of(snap)
            except StoreLockedError:
                snap.close()
                if self.snap is None:
                    raise
                log.warning("store %s stayed locked; serving the previous snapshot", self.root)
                return
            except BaseException:
                snap.close()
                raise
            old, self.snap = self.snap, snap  # swapped whole: snapshot, marker and index
            self.snap_marker, self.index = marker, index
            if old is not None:
                old.close()

    def current(self) -> Index:
        """The index of an up-to-date snapshot."""
        with self.lock:
            self.refresh()
            return self.index

    def _copy(self, snap: duckdb.DuckDBPyConnection) -> None:
        with _ATTACH_LOCK:
            self.attach(snap, read_only=True)
            try:
                check_version(self.path, schema_version(snap, "cat"))
                snap.begin()
                for table in TABLES:
                    snap.execute(f"CREATE TABLE memory.main.{table} AS SELECT * FROM cat.{table}")
                snap.commit()
            finally:
                snap.execute("DETACH cat")

    def rows(self, query: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Rows of a query on an up-to-date snapshot."""
        with self.lock:
            self.refresh()
            assert self.snap is not None
            return self.snap.execute(query, list(params)).fetchall()

    def entries(self, cls: type[Entry], table: str, where: dict[str, Any]) -> list[Entry]:
        """Rows of ``table`` as ``cls`` where the given columns equal the values that are not
        None; by model, then label (neuron sets) or persona and newest first."""
        names = [f.name for f in fields(cls)]
        clauses = [f"{k} = ?" for k, v in where.items() if v is not None]
        params = [v for v in where.values() if v is not None]
        query = f"SELECT {', '.join(names)} FROM {table}"
        if clauses:
            query += " WHERE " + " AND ".join(clauses)
        order = "label" if table == "neuron_sets" else "persona, created_at DESC"
        return [cls(*row) for row in self.rows(f"{query} ORDER BY model_id, {order}", params)]

    def model_map(self) -> dict[str, ModelInfo]:
        """The registered models. Writers validate against this before every batch, so when the
        snapshot is stale only ``models`` is read instead of re-copying the catalog."""
        with self.lock:
            if self.snap is not None and self.marker() == self.snap_marker:
                return dict(self.index.models)
            if not self.path.exists():
                return {}
            with _ATTACH_LOCK:
                conn = duckdb.connect()
                try:
                    self.attach(conn, read_only=True)
                    rows = conn.execute(f"SELECT {MODEL_COLUMNS} FROM cat.models").fetchall()
                finally:
                    conn.close()
            return {row[0]: ModelInfo(*row) for row in rows}

    # --- user SQL ------------------------------------------------------------------------------

    def query(
        self,
        query: str,
        params: Sequence[Any] = (),
        *,
        timeout: float = SQL_TIMEOUT,
        max_rows: int = SQL_MAX_ROWS,
    ) -> tuple[list[str], list[tuple]]:
        """Run one read-only query on an up-to-date snapshot (``sandbox.py``); returns (column
        names, rows)."""
        if not self.path.exists():
            raise StoreError(f"no catalog at {self.path}; register something first")
        with self.lock:
            self.refresh()
            assert self.snap is not None
            return run_query(self.snap, query, params, timeout=timeout, max_rows=max_rows)
