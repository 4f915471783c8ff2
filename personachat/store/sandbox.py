"""User SQL in a sandbox: one read-only query on the in-memory snapshot of the catalog.

User queries (``Store.sql``, ``Store.query``, ``scripts/store.py sql``) never touch the catalog
file: they run on the reader's snapshot (``catalog.py``), an in-memory copy of its tables that
``lock_down`` seals as soon as the copy is made: no file system (no ``read_text``, ``read_csv``,
``glob``, ``COPY``, ``EXPORT`` or ``ATTACH``), no extensions installed or loaded (so no network),
no spilling to disk, a memory cap, and the configuration locked so that no statement undoes it.
``run_query`` then takes one statement, and only a SELECT (``WITH``, ``DESCRIBE``, ``SHOW``,
``SUMMARIZE`` and ``FROM ...`` are SELECTs too) or an EXPLAIN of one; it is interrupted after
``timeout`` seconds and refused past ``max_rows`` rows. Every refusal is a
``QueryRefusedError`` whose one-line message says what was refused and what may be asked.
"""

from __future__ import annotations

import contextlib
import re
import threading
from collections.abc import Sequence
from typing import Any

import duckdb

from personachat.store.errors import QueryRefusedError

SQL_TIMEOUT = 30.0  # seconds a user query may run
SQL_MAX_ROWS = 1_000_000  # rows a user query may return
SQL_MEMORY_LIMIT = "2GB"  # memory a snapshot (its copy of the catalog and the query) may use
LOCKDOWN = (
    "SET temp_directory = ''",  # never spill to disk
    "SET enable_external_access = false",  # no files, ATTACH, COPY, EXPORT or network
    "SET autoinstall_known_extensions = false",
    "SET autoload_known_extensions = false",
    f"SET memory_limit = '{SQL_MEMORY_LIMIT}'",
    "SET lock_configuration = true",  # no SET or RESET undoes the lines above
)
WHAT_MAY_RUN = (
    "It runs one SELECT (or EXPLAIN SELECT) on the catalog's tables; change the store with "
    "Store's methods or scripts/store.py"
)


def lock_down(conn: duckdb.DuckDBPyConnection) -> None:
    """Seal an in-memory snapshot: no file, extension or network access; configuration locked."""
    for statement in LOCKDOWN:
        conn.execute(statement)


def _bare(text: str) -> str:
    """The text without SQL comments."""
    return re.sub(r"--[^\n]*|/\*.*?\*/", " ", text, flags=re.DOTALL).strip()


def check_statement(conn: duckdb.DuckDBPyConnection, query: str) -> None:
    """Refuse anything but one SELECT, or an EXPLAIN of one (parsed by DuckDB's own parser:
    ``EXPLAIN ANALYZE`` runs the statement it explains, so that must be a SELECT too)."""
    statements = conn.extract_statements(query)
    if len(statements) != 1:
        raise QueryRefusedError(
            f"refused: store SQL takes one statement per query, got {len(statements)}; "
            "run them one at a time"
        )
    kind = statements[0].type.name
    if kind == "EXPLAIN":
        explained = re.sub(r"^EXPLAIN\s+((\([^)]*\)|ANALY[SZ]E)\s*)*", "", _bare(query), flags=re.I)
        try:
            inner = conn.extract_statements(explained)
        except duckdb.ParserException:
            inner = []
        if len(inner) == 1 and inner[0].type.name == "SELECT":
            return
        kind = f"EXPLAIN of {inner[0].type.name}" if len(inner) == 1 else "EXPLAIN"
    if kind != "SELECT":
        word = (_bare(query).split() or [kind])[0].upper()
        raise QueryRefusedError(
            f"refused: {word} statements (DuckDB type {kind}) are not allowed: store SQL is "
            f"read-only and sandboxed. {WHAT_MAY_RUN}"
        )


def _interrupt(cursor: duckdb.DuckDBPyConnection) -> None:
    with contextlib.suppress(duckdb.Error):  # the query ended and the cursor closed meanwhile
        cursor.interrupt()


def run_query(
    conn: duckdb.DuckDBPyConnection,
    query: str,
    params: Sequence[Any] = (),
    *,
    timeout: float = SQL_TIMEOUT,
    max_rows: int = SQL_MAX_ROWS,
) -> tuple[list[str], list[tuple[Any, ...]]]:
    """(column names, rows) of one checked query on a locked-down connection."""
    check_statement(conn, query)
    cursor = conn.cursor()
    timer = threading.Timer(timeout, _interrupt, [cursor])
    timer.start()
    try:
        cursor.execute(query, list(params))
        columns = [d[0] for d in cursor.description or []]
        rows = cursor.fetchmany(max_rows + 1)
    except duckdb.InterruptException as err:
        raise QueryRefusedError(
            f"refused: the query ran longer than {timeout:g} s and was stopped; narrow it "
            "(WHERE, LIMIT) or pass a longer timeout"
        ) from err
    except duckdb.OutOfMemoryException as err:
        raise QueryRefusedError(
            f"refused: the query needed more than the sandbox's {SQL_MEMORY_LIMIT} of memory; "
            "narrow it (WHERE, LIMIT, fewer joins)"
        ) from err
    except duckdb.PermissionException as err:
        reason = str(err).splitlines()[0].removeprefix("Permission Error: ")
        raise QueryRefusedError(
            f"refused: {reason}; store SQL reads only the catalog's tables (no files, no "
            "network, no extensions)"
        ) from err
    finally:
        timer.cancel()
        cursor.close()
    if len(rows) > max_rows:
        raise QueryRefusedError(
            f"refused: the query returned more than {max_rows} rows; add a LIMIT or aggregate "
            "(or pass a larger max_rows)"
        )
    return columns, rows
