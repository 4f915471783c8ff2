"""The persona store: bit-exact round trips, validation errors, replacement, removal, recovery,
migrations, user SQL and the CLI."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import duckdb
import pytest
import torch

from personachat.records import (
    QUANTILE_LEVELS,
    LayerMetrics,
    ModelInfo,
    NeuronSet,
    Persona,
    PersonaMeans,
    PersonaVector,
    ProjectionQuantiles,
)
from personachat.store import (
    SCHEMA_VERSION,
    IntegrityError,
    Store,
    StoreError,
    UnknownError,
    default_store_root,
    read_safetensors_metadata,
)
from personachat.store.schema import MIGRATIONS, MIGRATIONS_DDL
from personachat.store.tensorfile import HELDOUT_FIELDS
from personachat.store.vector_registry import VectorRegistry
from tests.scripts import cli_module

REPO = Path(__file__).resolve().parent.parent
INFO = ModelInfo("org/tiny-llama", "rev1", "llama", 3, 8, 16)


def metrics(seed: int) -> LayerMetrics:
    g = torch.Generator().manual_seed(seed)
    return LayerMetrics(
        auc=torch.rand(3, generator=g),
        separation=torch.randn(3, generator=g),
        norm=torch.rand(3, generator=g),
        resid_norm=torch.rand(3, generator=g) + 1,
    )


def vec(persona: str, seed: int = 0, **kw: object) -> PersonaVector:
    g = torch.Generator().manual_seed(seed)
    return PersonaVector(
        model_id=INFO.model_id,
        persona=persona,
        vector=torch.randn(3, 8, generator=g),
        metrics=metrics(seed),
        dataset="personas-v1",
        dataset_sha256="ab" * 32,
        n_samples=40,
        **kw,  # type: ignore[arg-type]
    )


def files_under(root: Path) -> set[str]:
    return {
        p.relative_to(root).as_posix()
        for sub in ("vectors", "means")
        if (root / sub).exists()
        for p in (root / sub).rglob("*")
        if p.is_file()
    }


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store(tmp_path / "store")
    s.register_model(INFO)
    s.register_personas([Persona("pirate", "You are a pirate.", category="fiction")])
    return s


def test_round_trip_is_bit_exact_with_provenance(store: Store) -> None:
    v = vec("pirate", 1)
    m = PersonaMeans(INFO.model_id, "pirate", "response_avg", torch.randn(3, 8), 40, "d", "cd")
    [vid] = store.register_vectors([v], [m])
    back = store.load_vector(INFO.model_id, "pirate")
    assert torch.equal(back.vector, v.vector)
    assert back.metrics is not None and v.metrics is not None
    for name in ("auc", "separation", "norm", "resid_norm"):
        assert torch.equal(getattr(back.metrics, name), getattr(v.metrics, name))
    assert (back.n_samples, back.dataset, back.dataset_sha256) == (40, "personas-v1", "ab" * 32)
    assert torch.equal(store.load_means(INFO.model_id, "pirate").mean, m.mean)
    [entry] = store.vectors(INFO.model_id, "pirate")
    assert entry.vector_id == vid
    assert entry.best_layer == v.metrics.best_layer
    assert (entry.model_revision, entry.dtype, entry.n_layers, entry.hidden_size) == (
        "rev1",
        "float32",
        3,
        8,
    )
    data = (store.root / entry.file).read_bytes()
    assert hashlib.sha256(data).hexdigest() == entry.sha256
    meta = read_safetensors_metadata(data)
    assert meta["model_id"] == INFO.model_id and meta["persona"] == "pirate"
    assert meta["layer_convention"] == INFO.layer_convention
    rows = store.sql(
        "SELECT layer, auc, separation, norm, resid_norm FROM vector_layer_metrics "
        "WHERE vector_id = ? ORDER BY layer",
        [vid],
    )
    expected = [
        (i, *(float(getattr(v.metrics, n)[i]) for n in ("auc", "separation", "norm", "resid_norm")))
        for i in range(3)
    ]
    assert rows == expected


def test_render_heldout_metrics_and_quantiles_round_trip_bit_for_bit(store: Store) -> None:
    g = torch.Generator().manual_seed(5)
    held = {f: torch.rand(3, generator=g) for f in HELDOUT_FIELDS}
    quantiles = ProjectionQuantiles(
        baseline=torch.randn(3, len(QUANTILE_LEVELS), generator=g).sort(-1).values,
        persona=torch.randn(3, len(QUANTILE_LEVELS), generator=g).sort(-1).values,
        n_baseline=20,
        n_persona=19,
    )
    render = '{"bos": "template", "system_mode": "folded"}'
    v = vec("pirate", 2, render=render, quantiles=quantiles)
    v.metrics = LayerMetrics(**vars(metrics(2)) | held | {"best_by": "separation_heldout"})
    m = PersonaMeans(INFO.model_id, "pirate", "response_avg", torch.randn(3, 8), 9, render=render)
    [vid] = store.register_vectors([v], [m])
    back = store.load_vector(INFO.model_id, "pirate")
    assert back.render == render and back.metrics is not None and back.quantiles is not None
    assert back.metrics.best_by == "separation_heldout"
    for name, value in held.items():
        assert torch.equal(getattr(back.metrics, name), value)
    assert torch.equal(back.quantiles.baseline, quantiles.baseline)
    assert torch.equal(back.quantiles.persona, quantiles.persona)
    assert (back.quantiles.n_baseline, back.quantiles.n_persona) == (20, 19)
    assert store.load_means(INFO.model_id, "pirate").render == render
    [entry] = store.vectors(INFO.model_id, "pirate")
    assert (entry.render, entry.best_layer_by) == (render, "separation_heldout")
    rows = store.sql(
        "SELECT layer, auc_heldout, separation_heldout_std FROM vector_layer_metrics "
        "WHERE vector_id = ? ORDER BY layer",
        [vid],
    )
    assert rows == [
        (i, float(held["auc_heldout"][i]), float(held["separation_heldout_std"][i]))
        for i in range(3)
    ]
    got = store.sql(
        "SELECT sample, n, quantiles FROM vector_quantiles WHERE vector_id = ? AND layer = 1 "
        "ORDER BY sample",
        [vid],
    )
    assert got == [
        ("baseline", 20, quantiles.baseline[1].double().tolist()),
        ("persona", 19, quantiles.persona[1].double().tolist()),
    ]
    store.remove_vector(INFO.model_id, "pirate")
    assert store.sql("SELECT count(*) FROM vector_quantiles") == [(0,)]


def test_a_version_1_catalog_gains_the_new_columns_and_keeps_its_rows(tmp_path: Path) -> None:
    root = tmp_path / "old"
    root.mkdir()
    con = duckdb.connect(str(root / "catalog.duckdb"))
    con.execute(MIGRATIONS_DDL)
    for statement in MIGRATIONS[0][2]:
        con.execute(statement)
    con.execute("INSERT INTO migrations VALUES (1, 'initial schema', now())")
    con.execute(
        "INSERT INTO models VALUES ('org/m', NULL, 'llama', 3, 8, 16, 'block_output', now())"
    )
    con.close()
    with pytest.raises(StoreError, match="schema version 1, this code needs"):
        Store(root, read_only=True).models()
    with Store(root) as store:  # a writable open migrates
        assert store.sql("SELECT max(version) FROM migrations") == [(SCHEMA_VERSION,)]
        assert [m.model_id for m in store.models()] == ["org/m"]
        columns = {r[0] for r in store.sql("SELECT column_name FROM duckdb_columns()")}
        assert {"render", "best_layer_by", "auc_heldout", "quantiles"} <= columns
    assert [m.model_id for m in Store(root, read_only=True).models()] == ["org/m"]


def test_the_shipped_store_is_at_the_current_schema() -> None:
    store = Store(REPO / "store", read_only=True)
    assert store.sql("SELECT max(version) FROM migrations") == [(SCHEMA_VERSION,)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_round_trip(store: Store, dtype: torch.dtype) -> None:
    v = PersonaVector(INFO.model_id, "pirate", torch.randn(3, 8).to(dtype))
    store.register_vectors([v])
    back = store.load_vector(INFO.model_id, "pirate", hidden_size=8)
    assert back.vector.dtype == dtype and torch.equal(back.vector, v.vector)
    assert store.vectors()[0].dtype == str(dtype).removeprefix("torch.")


def test_imported_vector_gets_norms_but_no_auc(store: Store) -> None:
    v = PersonaVector(INFO.model_id, "pirate", torch.randn(3, 8), method="imported")
    [vid] = store.register_vectors([v])
    rows = store.layer_metrics(vid)
    assert [r[1] for r in rows] == [None, None, None]
    norms = v.vector.double().norm(dim=1).tolist()
    assert [r[3] for r in rows] == pytest.approx(norms, rel=1e-12)
    assert store.load_vector(INFO.model_id, "pirate").metrics is None


def test_replacing_a_vector_deletes_the_old_file(store: Store) -> None:
    store.register_vectors([vec("pirate", 1)])
    old = store.vectors()[0].file
    store.register_vectors([vec("pirate", 2)])
    [entry] = store.vectors()
    assert entry.file != old and not (store.root / old).exists()
    assert torch.equal(store.load_vector(INFO.model_id, "pirate").vector, vec("pirate", 2).vector)
    assert files_under(store.root) == {entry.file}
    assert store.verify() == []
    assert store.sql("SELECT count(*) FROM vector_layer_metrics") == [(3,)]


def test_several_baselines_and_filters(store: Store) -> None:
    store.register_vectors([vec("pirate", 1), vec("pirate", 2, baseline="mean")])
    assert len(store.vectors(INFO.model_id, "pirate")) == 2
    got = store.load_vector(INFO.model_id, "pirate", baseline="mean")
    assert torch.equal(got.vector, vec("pirate", 2).vector) and got.baseline == "mean"
    with pytest.raises(
        UnknownError, match=r"stored: .*'response_avg', 'mean'.*'response_avg', 'default'"
    ):
        store.load_vector(INFO.model_id, "pirate", positions="prompt_last")


def test_auto_persona_rows_and_persona_listing(store: Store) -> None:
    store.register_vectors([vec("ninja", 3)])
    assert [p.name for p in store.personas()] == ["ninja", "pirate"]
    assert [p.name for p in store.personas(INFO.model_id)] == ["ninja"]
    assert store.persona("pirate").system_prompt == "You are a pirate."
    assert store.persona("ninja").source == "registered with a vector"


def test_unknown_persona_and_model_errors_list_what_is_known(store: Store) -> None:
    store.register_vectors([vec("pirate", 1), vec("ninja", 2)])
    with pytest.raises(UnknownError, match=r"'robot'.*known personas.*\['ninja', 'pirate'\]"):
        store.load_vector(INFO.model_id, "robot")
    with pytest.raises(UnknownError, match=r"known models: \['org/tiny-llama'\]"):
        store.load_vector("org/other", "pirate")
    with pytest.raises(UnknownError, match=r"known personas: \['ninja', 'pirate'\]"):
        store.persona("robot")


@pytest.mark.parametrize(
    ("vector", "match"),
    [
        (torch.randn(3, 7), r"has 7 dims per layer but model 'org/tiny-llama' has hidden size 8"),
        (torch.randn(4, 8), r"has 4 layers but model 'org/tiny-llama' has 3"),
        (torch.randn(8), r"must be a 2-D"),
        (torch.tensor([[float("nan")] * 8] * 3), r"NaN or Inf at layers \[0, 1, 2\]"),
        (torch.zeros(3, 8).index_fill_(0, torch.tensor([1]), float("inf")), r"layers \[1\]"),
        (torch.zeros(3, 8, dtype=torch.int64), r"dtype torch.int64"),
    ],
)
def test_vector_validation(store: Store, vector: torch.Tensor, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        store.register_vectors([PersonaVector(INFO.model_id, "pirate", vector)])
    assert store.vectors() == [] and files_under(store.root) == set()


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"persona": "../evil"}, "persona name '../evil' is not allowed"),
        ({"persona": "a/b"}, "persona name 'a/b' is not allowed"),
        ({"persona": ".hidden"}, "not allowed"),
        ({"persona": "x" * 101}, "not allowed"),
        ({"baseline": "../../etc"}, "baseline '../../etc' is not allowed"),
        ({"method": "magic"}, "method 'magic' is not one of"),
        ({"positions": "everywhere"}, "positions 'everywhere' not one of"),
        ({"model_id": "org/unknown"}, r"model 'org/unknown' is not registered"),
    ],
)
def test_name_validation(store: Store, kw: dict[str, str], match: str) -> None:
    args = {"model_id": INFO.model_id, "persona": "pirate", "vector": torch.randn(3, 8)} | kw
    with pytest.raises((ValueError, UnknownError), match=match):
        store.register_vectors([PersonaVector(**args)])  # type: ignore[arg-type]
    assert files_under(store.root) == set()


def test_metric_validation_and_duplicates(store: Store) -> None:
    bad = vec("pirate", 1)
    assert bad.metrics is not None
    bad.metrics.auc = torch.tensor([0.5, float("nan"), 0.5])
    with pytest.raises(ValueError, match=r"metrics.auc .* NaN or Inf"):
        store.register_vectors([bad])
    bad.metrics.auc = torch.rand(4)
    with pytest.raises(ValueError, match=r"metrics.auc .* shape \(4,\); expected \(3,\)"):
        store.register_vectors([bad])
    with pytest.raises(ValueError, match="same key"):
        store.register_vectors([vec("pirate", 1), vec("pirate", 2)])
    with pytest.raises(ValueError, match="persona name"):
        store.register_personas([Persona("../x", "")])


def test_failed_transaction_leaves_no_file_and_no_row(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.register_vectors([vec("pirate", 1)])
    before_files, before_rows = files_under(store.root), store.sql("SELECT * FROM vectors")

    def fail(*args: object) -> list[str]:
        raise RuntimeError("disk full (injected)")

    monkeypatch.setattr(VectorRegistry, "_insert_means", fail)
    means = PersonaMeans(INFO.model_id, "ninja", "response_avg", torch.randn(3, 8), 1)
    with pytest.raises(RuntimeError, match="injected"):
        store.register_vectors([vec("ninja", 2), vec("pirate", 3)], [means])
    assert files_under(store.root) == before_files
    assert store.sql("SELECT * FROM vectors") == before_rows
    assert store.sql("SELECT count(*) FROM personas WHERE name = 'ninja'") == [(0,)]
    assert not list(store.root.rglob("*.tmp"))
    assert torch.equal(store.load_vector(INFO.model_id, "pirate").vector, vec("pirate", 1).vector)


def test_load_verifies_checksum_shape_and_model(store: Store) -> None:
    store.register_vectors([vec("pirate", 1)])
    [entry] = store.vectors()
    path = store.root / entry.file
    with pytest.raises(
        IntegrityError, match=r"has 8 dims per layer but the model in use has hidden size 16"
    ):
        store.load_vector(INFO.model_id, "pirate", hidden_size=16)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    actual = hashlib.sha256(bytes(data)).hexdigest()
    with pytest.raises(IntegrityError) as err:
        store.load_vector(INFO.model_id, "pirate")
    assert str(path) in str(err.value)
    assert actual in str(err.value) and entry.sha256 in str(err.value)
    assert store.verify() == [f"{path}: sha256 {actual} != catalog {entry.sha256}"]
    path.unlink()
    with pytest.raises(IntegrityError, match="is missing but the catalog lists it"):
        store.load_vector(INFO.model_id, "pirate")


def test_remove_vector_and_persona(store: Store) -> None:
    means = PersonaMeans(INFO.model_id, "pirate", "response_avg", torch.randn(3, 8), 1)
    store.register_vectors([vec("pirate", 1), vec("pirate", 2, baseline="mean")], [means])
    store.register_vectors([vec("ninja", 3)])
    assert store.remove_vector(INFO.model_id, "pirate", baseline="mean") == 1
    assert [e.baseline for e in store.vectors(INFO.model_id, "pirate")] == ["default"]
    assert store.remove_persona("pirate") == 2
    assert [p.name for p in store.personas()] == ["ninja"]
    assert files_under(store.root) == {e.file for e in store.vectors()}
    assert store.sql("SELECT count(*) FROM vector_layer_metrics") == [(3,)]
    with pytest.raises(UnknownError, match=r"known personas: \['ninja'\]"):
        store.remove_persona("pirate")


def test_register_model_refuses_shape_change_with_data(store: Store) -> None:
    store.register_model(ModelInfo(INFO.model_id, "rev2", "llama", 3, 8, 16))
    assert store.model(INFO.model_id).revision == "rev2"
    store.register_vectors([vec("pirate", 1)])
    with pytest.raises(StoreError, match=r"refusing to change it to \(3, 16, 16\)"):
        store.register_model(ModelInfo(INFO.model_id, None, "llama", 3, 16, 16))


def test_neuron_sets_round_trip_and_validation(store: Store) -> None:
    s = NeuronSet(
        model_id=INFO.model_id,
        label="teacher_student",
        site="gate",
        layers=[2, 0, 1],
        indices=[15, 3, 7],
        scores=[0.9, 0.5, 0.25],
        pairs=["teacher_vs_student", "doctor_vs_nurse"],
        means=[0.1, -0.2, 0.3],
        ranks={"teacher_vs_student": [0, 1, 2], "doctor_vs_nurse": [5, -1, 0]},
        stability=[1.0, 0.5, 1.0],
        source="unit test",
    )
    store.register_neurons([s])
    back = store.load_neurons(INFO.model_id, "teacher_student")
    for name in ("layers", "indices", "scores", "pairs", "means", "ranks", "stability", "source"):
        assert getattr(back, name) == getattr(s, name), name
    assert store.neuron_sets()[0].n_units == 3
    units = store.sql("SELECT rank, layer, idx FROM neurons ORDER BY rank")
    assert units == [(0, 2, 15), (1, 0, 3), (2, 1, 7)]
    bad = NeuronSet(INFO.model_id, "bad", "gate", [0], [16], [1.0])
    with pytest.raises(ValueError, match=r"index 16 at layer 0 is outside the MLP width 16"):
        store.register_neurons([bad])
    with pytest.raises(ValueError, match=r"layer 3 outside 0..2"):
        store.register_neurons([NeuronSet(INFO.model_id, "bad", "gate", [3], [1], [1.0])])
    with pytest.raises(ValueError, match="site 'resid'"):
        store.register_neurons([NeuronSet(INFO.model_id, "bad", "resid", [0], [1], [1.0])])
    with pytest.raises(ValueError, match="appears twice"):
        store.register_neurons([NeuronSet(INFO.model_id, "bad", "gate", [0, 0], [1, 1], [])])
    with pytest.raises(ValueError, match="not allowed"):
        store.register_neurons([NeuronSet(INFO.model_id, "../x", "gate", [0], [1], [])])
    store.remove_neurons(INFO.model_id, "teacher_student")
    assert store.neuron_sets() == [] and store.sql("SELECT count(*) FROM neurons") == [(0,)]


def test_recovery_removes_orphans_and_dead_tmp_files(store: Store, tmp_path: Path) -> None:
    store.register_vectors([vec("pirate", 1)])
    folder = store.root / "vectors" / "org--tiny-llama"
    orphan = folder / "ghost.response_avg.diff_means.default.0000.safetensors"
    orphan.write_bytes(b"x")
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        text=True,
        capture_output=True,
        check=True,
    ).stdout.strip()
    dead_tmp = folder / f"ghost.safetensors.{dead}.tmp"
    dead_tmp.write_bytes(b"partial")
    live_tmp = folder / f"busy.safetensors.{os.getpid()}.tmp"
    live_tmp.write_bytes(b"in progress")
    assert len(store.verify()) == 3
    Store(store.root)  # opening writable recovers
    assert not orphan.exists() and not dead_tmp.exists() and live_tmp.exists()
    live_tmp.unlink()
    assert store.verify() == []


def test_schema_version_checked_on_open(store: Store) -> None:
    assert store.sql("SELECT max(version) FROM migrations") == [(SCHEMA_VERSION,)]
    con = duckdb.connect(str(store.catalog))
    con.execute("INSERT INTO migrations VALUES (99, 'future', now())")
    con.close()
    with pytest.raises(StoreError, match=r"schema version 99 but this personachat reads up to"):
        Store(store.root)
    with pytest.raises(StoreError, match="schema version 99"):
        Store(store.root, read_only=True).models()


def test_user_sql_is_read_only(store: Store) -> None:
    store.register_vectors([vec("pirate", 1)])
    cols, rows = store.query(
        "SELECT persona, n_samples FROM vectors WHERE model_id = ?", [INFO.model_id]
    )
    assert (cols, rows) == (["persona", "n_samples"], [("pirate", 40)])
    with pytest.raises(duckdb.Error, match="read-only"):
        store.sql("DELETE FROM vectors")
    assert len(store.vectors()) == 1


def test_read_only_store_sees_new_writes_and_refuses_writes(store: Store, tmp_path: Path) -> None:
    empty = Store(tmp_path / "nothing", read_only=True)
    assert empty.models() == [] and empty.vectors() == [] and not empty.root.exists()
    reader = Store(store.root, read_only=True)
    assert reader.personas(INFO.model_id) == []
    store.register_vectors([vec("pirate", 1)])
    assert [p.name for p in reader.personas(INFO.model_id)] == ["pirate"]
    assert torch.equal(reader.load_vector(INFO.model_id, "pirate").vector, vec("pirate", 1).vector)
    with pytest.raises(StoreError, match="read-only"):
        reader.register_vectors([vec("ninja", 2)])


def test_default_root_follows_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("PERSONACHAT_STORE", raising=False)
    assert default_store_root() == REPO / "store"
    monkeypatch.setenv("PERSONACHAT_STORE", str(tmp_path / "elsewhere"))
    assert default_store_root() == tmp_path / "elsewhere"


# --- CLI -----------------------------------------------------------------------------------------


def cli() -> ModuleType:
    spec = importlib.util.spec_from_file_location("store_cli", REPO / "scripts" / "store.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("command", ["list", "show", "remove", "export", "import", "sql"])
def test_every_cli_command_has_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli().main([command, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert f"usage: python scripts/store.py {command}" in out and "--store" in out
    description = out.split("\n\n")[1]
    assert len(description.split()) >= 5  # a real description, not just usage


def test_cli_round_trip(store: Store, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main = cli().main
    root = str(store.root)
    store.register_vectors([vec("pirate", 1)])
    assert main(["--store", root, "list"]) == 0  # --store before or after the command
    assert "pirate" in capsys.readouterr().out
    assert main(["list", "--store", root]) == 0
    assert "pirate" in capsys.readouterr().out
    assert main(["show", "pirate", "--store", root]) == 0
    out = capsys.readouterr().out
    assert "You are a pirate." in out and "auc" in out
    out_file = tmp_path / "pirate.safetensors"
    assert (
        main(
            ["export", "pirate", "--model", INFO.model_id, "--out", str(out_file), "--store", root]
        )
        == 0
    )
    assert (
        main(
            [
                "import",
                str(out_file),
                "--model",
                INFO.model_id,
                "--persona",
                "copy",
                "--store",
                root,
            ]
        )
        == 0
    )
    assert torch.equal(store.load_vector(INFO.model_id, "copy").vector, vec("pirate", 1).vector)
    capsys.readouterr()
    assert (
        main(["sql", "SELECT persona FROM vectors ORDER BY persona", "--json", "--store", root])
        == 0
    )
    assert json.loads(capsys.readouterr().out) == [{"persona": "copy"}, {"persona": "pirate"}]
    assert main(["sql", "DROP TABLE vectors", "--store", root]) == 1
    assert "read-only" in capsys.readouterr().err
    assert main(["remove", "copy", "--store", root]) == 0
    assert [e.persona for e in store.vectors()] == ["pirate"]
    assert main(["show", "robot", "--store", root]) == 1
    assert "known personas" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_help_runs_as_a_script() -> None:
    out = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "store.py"), "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for command in ("list", "show", "remove", "export", "import", "sql"):
        assert command in out


@pytest.mark.parametrize("model_id", ["../../etc/passwd", "/abs/path/model", "org/name", "a/../b"])
def test_model_ids_become_one_safe_directory_name(model_id: str, tmp_path: Path) -> None:
    from personachat.store import model_slug

    slug = model_slug(model_id)
    assert "/" not in slug and not slug.startswith(".") and slug
    assert (tmp_path / slug).resolve().parent == tmp_path.resolve()


def test_cli_verify_and_repair_a_damaged_file(
    store: Store, capsys: pytest.CaptureFixture[str]
) -> None:
    store.register_vectors([vec("pirate", 1), vec("chef", 2)])
    [entry] = store.vectors(INFO.model_id, "pirate")
    (store.root / entry.file).write_bytes(b"damaged")
    cli = cli_module("store")
    assert cli.main(["--store", str(store.root), "verify"]) == 1
    assert entry.file in capsys.readouterr().out
    assert cli.main(["--store", str(store.root), "verify", "--repair"]) == 0
    assert "removed the row of damaged file" in capsys.readouterr().out
    assert cli.main(["--store", str(store.root), "verify"]) == 0
    fresh = Store(store.root, read_only=True)
    assert [e.persona for e in fresh.vectors(INFO.model_id)] == ["chef"]
    assert torch.equal(fresh.load_vector(INFO.model_id, "chef").vector, vec("chef", 2).vector)


def test_cli_migrate_upgrades_an_old_catalog(tmp_path: Path) -> None:
    root = tmp_path / "old"
    root.mkdir()
    con = duckdb.connect(str(root / "catalog.duckdb"))
    con.execute(MIGRATIONS_DDL)
    for statement in MIGRATIONS[0][2]:
        con.execute(statement)
    con.execute("INSERT INTO migrations VALUES (1, 'initial schema', now())")
    con.close()
    with pytest.raises(StoreError, match=r"scripts/store\.py migrate"):
        Store(root, read_only=True).models()
    assert cli_module("store").main(["--store", str(root), "migrate"]) == 0
    assert Store(root, read_only=True).models() == []
