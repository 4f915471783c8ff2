"""SQL helpers: one transaction, one multi-row INSERT from columns."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import duckdb


@contextlib.contextmanager
def transaction(conn: duckdb.DuckDBPyConnection) -> Iterator[None]:
    """BEGIN; COMMIT when the block ends, ROLLBACK when it raises."""
    conn.begin()
    try:
        yield
    except BaseException:
        conn.rollback()
        raise
    conn.commit()


def insert(
    conn: duckdb.DuckDBPyConnection,
    table: str,
    columns: list[str],
    rows: list[tuple[Any, ...]],
    conflict: str = "",
) -> None:
    """One multi-row INSERT: each column is passed as a list parameter and unnested."""
    if not rows:
        return
    cols = [list(c) for c in zip(*rows, strict=True)]
    select = ", ".join(f"unnest(${i + 1}) AS {c}" for i, c in enumerate(columns))
    statement = f"INSERT INTO {table} ({', '.join(columns)}) SELECT {select}"
    if conflict:
        statement += f" ON CONFLICT {conflict}"
    conn.execute(statement, cols)
