"""User SQL on the store is sandboxed: one read-only query on the catalog's tables, no file or
network access, no way to change the catalog, bounded in time and rows."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from types import ModuleType

import duckdb
import pytest
import torch

from personachat.records import ModelInfo, NeuronSet, Persona, PersonaMeans, PersonaVector
from personachat.store import Store, StoreError
from personachat.store.errors import QueryRefusedError

REPO = Path(__file__).resolve().parent.parent
INFO = ModelInfo("org/sql-model", None, "llama", 3, 8, 16)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = tmp_path / "store"
    with Store(root) as store:
        store.register_model(INFO)
        store.register_personas([Persona("pirate", "Arr.")])
        store.register_vectors(
            [
                PersonaVector(INFO.model_id, p, torch.randn(3, 8), n_samples=i)
                for i, p in enumerate(["pirate", "robot"])
            ],
            [PersonaMeans(INFO.model_id, "pirate", "response_avg", torch.randn(3, 8), 4)],
        )
        store.register_neurons(
            [NeuronSet(INFO.model_id, "units", "gate", [0, 1], [3, 4], [0.5, 0.25])]
        )
    return root


def snapshot(root: Path) -> tuple[dict[str, list[tuple]], dict[str, bytes]]:
    """Every row of every table (read directly from the file) and every file in the tree."""
    con = duckdb.connect(str(root / "catalog.duckdb"), read_only=True)
    try:
        tables = [r[0] for r in con.execute("SELECT table_name FROM duckdb_tables()").fetchall()]
        rows = {t: sorted(map(repr, con.execute(f"SELECT * FROM {t}").fetchall())) for t in tables}
    finally:
        con.close()
    files = {
        p.relative_to(root.parent).as_posix(): p.read_bytes()
        for p in sorted(root.parent.rglob("*"))
        if p.is_file() and p.name not in {"catalog.duckdb", "generation"}
    }
    return rows, files  # type: ignore[return-value]


def escapes(root: Path) -> list[tuple[str, str]]:
    outside = root.parent / "outside.csv"
    outside.write_text("secret\n42\n")
    catalog = str(root / "catalog.duckdb")
    return [
        ("read_text", "SELECT * FROM read_text('/etc/passwd')"),
        ("read_csv", f"SELECT * FROM read_csv('{outside}')"),
        ("file_scan", f"SELECT * FROM '{outside}'"),
        ("read_blob", f"SELECT * FROM read_blob('{outside}')"),
        ("glob", "SELECT * FROM glob('/root/*')"),
        ("glob_store", f"SELECT * FROM glob('{root}/*')"),
        ("copy_to", f"COPY (SELECT * FROM vectors) TO '{root.parent / 'leak.csv'}'"),
        ("copy_table", f"COPY vectors TO '{root.parent / 'leak2.csv'}'"),
        ("export", f"EXPORT DATABASE '{root.parent / 'dump'}'"),
        ("attach_new", f"ATTACH '{root.parent / 'new.duckdb'}' AS n"),
        (
            "attach_and_write",
            f"ATTACH '{root.parent / 'new2.duckdb'}' AS n2; CREATE TABLE n2.t AS SELECT 1 AS x",
        ),
        ("install", "INSTALL httpfs"),
        ("load", "LOAD httpfs"),
        ("remote", "SELECT * FROM read_csv('https://example.com/x.csv')"),
        (
            "detach_reattach_drop",
            f"USE memory; DETACH cat; ATTACH '{catalog}' AS cat; DROP TABLE cat.vectors",
        ),
        ("detach", "DETACH cat"),
        ("attach_catalog", f"ATTACH '{catalog}' AS rw"),
        ("drop", "DROP TABLE vectors"),
        ("delete", "DELETE FROM vectors"),
        ("update", "UPDATE vectors SET persona = 'evil'"),
        ("insert", "INSERT INTO personas VALUES ('x', '', '', '', '', now())"),
        ("create", "CREATE TABLE extra AS SELECT 1 AS x"),
        ("alter", "ALTER TABLE vectors ADD COLUMN x INTEGER"),
        ("two_statements", "SELECT 1; DELETE FROM vectors"),
        ("set_access", "SET enable_external_access = true"),
        ("reset", "RESET enable_external_access"),
        ("pragma", "PRAGMA enable_external_access"),
        ("use", "USE memory"),
        ("checkpoint", "CHECKPOINT"),
        ("transaction", "BEGIN TRANSACTION"),
        ("call", "CALL pragma_version()"),
        ("macro", "CREATE MACRO leak() AS 1"),
        ("secret", "CREATE SECRET s (TYPE s3, KEY_ID 'a', SECRET 'b')"),
        ("explain_analyze_delete", "EXPLAIN ANALYZE DELETE FROM vectors"),
        ("explain_analyze_copy", f"EXPLAIN ANALYZE COPY vectors TO '{root.parent / 'leak3.csv'}'"),
        ("explain_options_drop", "EXPLAIN (ANALYZE, FORMAT json) DROP TABLE vectors"),
        ("explain_analyze_options", "EXPLAIN ANALYZE (FORMAT json) DELETE FROM vectors"),
        ("commented", "/* SELECT */ -- SELECT\n DELETE FROM vectors"),
    ]


def test_every_escape_is_refused_and_the_catalog_is_unchanged(root: Path) -> None:
    cases = escapes(root)
    before = snapshot(root)
    for store in (Store(root, read_only=True), Store(root)):
        seen = (store.sql("SELECT count(*) FROM vectors"), store.vectors(), store.personas())
        for name, query in cases:
            with pytest.raises(StoreError) as err:
                store.sql(query)
            message = str(err.value)
            assert isinstance(err.value, QueryRefusedError), f"{name}: {message}"
            assert "\n" not in message and "refused" in message, f"{name}: {message}"
            with pytest.raises(QueryRefusedError):
                store.query(query)
        assert snapshot(root) == before, "an escape changed the store or wrote a file"
        assert (store.sql("SELECT count(*) FROM vectors"), store.vectors(), store.personas()) == (
            seen
        ), "an escape changed what the store answers"
        store.close()
    assert not any((root.parent / n).exists() for n in ("leak.csv", "new.duckdb", "dump"))


def test_refusals_say_what_is_wrong_and_what_to_do(root: Path) -> None:
    store = Store(root, read_only=True)
    with pytest.raises(QueryRefusedError, match=r"DELETE.*read-only.*SELECT"):
        store.sql("DELETE FROM vectors")
    with pytest.raises(duckdb.Error, match="read-only"):  # still a DuckDB error, as before
        store.sql("DROP TABLE vectors")
    with pytest.raises(QueryRefusedError, match=r"one statement.*got 2"):
        store.sql("SELECT 1; SELECT 2")
    with pytest.raises(QueryRefusedError, match=r"/etc/passwd.*only the catalog's tables"):
        store.sql("SELECT * FROM read_text('/etc/passwd')")
    with pytest.raises(QueryRefusedError, match=r"ATTACH"):
        store.sql("ATTACH 'x.duckdb'")


def test_time_and_row_limits(root: Path) -> None:
    store = Store(root, read_only=True)
    with pytest.raises(QueryRefusedError, match=r"longer than 0.5 s"):
        store.query(
            "SELECT sum(a.range * b.range) FROM range(100000000) a, range(100000000) b", timeout=0.5
        )
    with pytest.raises(QueryRefusedError, match=r"more than 10 rows.*LIMIT"):
        store.query("SELECT * FROM range(11)", max_rows=10)
    assert len(store.query("SELECT * FROM range(10)", max_rows=10)[1]) == 10
    assert store.sql("SELECT count(*) FROM vectors") == [(2,)]  # the store still answers


def test_reading_queries_still_work(root: Path) -> None:
    store = Store(root, read_only=True)
    cols, rows = store.query(
        "SELECT persona, n_samples FROM vectors WHERE model_id = ? ORDER BY persona",
        [INFO.model_id],
    )
    assert (cols, rows) == (["persona", "n_samples"], [("pirate", 0), ("robot", 1)])
    joined = store.sql(
        "WITH best AS (SELECT vector_id, max(norm) AS top FROM vector_layer_metrics "
        "GROUP BY vector_id) SELECT v.persona, count(m.layer) FROM vectors v "
        "JOIN vector_layer_metrics m USING (vector_id) JOIN best b USING (vector_id) "
        "WHERE v.persona = $1 GROUP BY v.persona",
        ["pirate"],
    )
    assert joined == [("pirate", 3)]
    assert store.sql("DESCRIBE personas")[0][0] == "name"
    assert ("vectors",) in store.sql("SHOW TABLES")
    assert store.sql("EXPLAIN SELECT * FROM vectors")
    assert store.sql("EXPLAIN ANALYZE SELECT count(*) FROM vectors")
    assert store.sql("SELECT max(version) FROM migrations")
    assert {r[0] for r in store.sql("SELECT table_name FROM duckdb_tables()")} >= {"vectors"}


def test_the_readme_example_queries_run(root: Path) -> None:
    readme = (REPO / "README.md").read_text()
    store_section = readme[readme.index("## The store") :]
    block = store_section.split("```sql")[1].split("```")[0]
    queries = [q for q in re.split(r";\s*\n", block) if q.strip()]
    assert len(queries) == 2
    store = Store(root, read_only=True)
    for query in queries:
        store.sql(query)
    store.sql(queries[0].replace("'store/models/demo'", "?"), [INFO.model_id])


def cli() -> ModuleType:
    spec = importlib.util.spec_from_file_location("store_cli", REPO / "scripts" / "store.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_cli_sql_refuses_escapes_in_one_line(
    root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    main = cli().main
    cases = escapes(root)
    before = snapshot(root)
    for _, query in cases:
        assert main(["sql", query, "--store", str(root)]) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and "refused" in err, err
    assert snapshot(root) == before
    assert main(["sql", "SELECT persona FROM vectors ORDER BY 1", "--store", str(root)]) == 0
    assert "robot" in capsys.readouterr().out
