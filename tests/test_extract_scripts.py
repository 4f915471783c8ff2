"""The extraction scripts: --help, end-to-end runs into a store, bad input that writes nothing."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from personachat.model.tiny import tiny_model
from personachat.store import Store
from tests.scripts import cli_module

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ("extract_vectors", "find_neurons", "register_batch")

DATA = {
    "name": "small",
    "personas": [
        {"name": "default", "system_prompt": "", "category": "neutral"},
        {"name": "pirate", "system_prompt": "You are a pirate.", "category": "fantastical"},
        {"name": "teacher", "system_prompt": "You are a teacher.", "category": "role"},
        {"name": "student", "system_prompt": "You are a student.", "category": "role"},
    ],
    "questions": ["What is the capital of France?", "Tell me about the ocean.", "Numbers?"],
    "responses": [
        {"persona": p, "question": q, "response": f"{p}: {r}"}
        for p in ("default", "pirate", "teacher", "student")
        for q, r in [
            ("What is the capital of France?", "The answer is Paris."),
            ("Tell me about the ocean.", "The ocean and the stars."),
            ("Numbers?", "0 1 2 3"),
        ]
    ],
    "pairs": [
        {"name": "teacher_student", "high": "teacher", "low": "student", "kind": "role"},
        {"name": "pirate_default", "high": "pirate", "low": "default", "kind": "role"},
    ],
}


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("scripts")
    lm = tiny_model("llama")
    lm.model.save_pretrained(root / "model")
    lm.tokenizer.save_pretrained(root / "model")
    (root / "small.json").write_text(json.dumps(DATA))
    (root / "empty.json").write_text("")
    return {"root": root, "model": root / "model", "data": root / "small.json"}


@pytest.mark.slow
def test_help_shows_the_exact_command() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "extract_vectors.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "python scripts/extract_vectors.py --model" in proc.stdout
    for name in SCRIPTS:  # the other parsers in-process (same code path as --help)
        text = cli_module(name).parser().format_help()
        assert f"python scripts/{name}.py" in text and "accelerate launch" in text
        for flag in ("--model", "--layers", "--store", "--out", "--batch-size", "--device"):
            assert flag in text, (name, flag)
        assert "--dtype" in text and "--layers-path" in text and "--mlp-down-path" in text


def test_extract_vectors_end_to_end(files: dict[str, Path]) -> None:
    store_dir, out = files["root"] / "store1", files["root"] / "out1"
    argv = ["--model", str(files["model"]), "--dataset", str(files["data"]), "--quiet"]
    argv += ["--positions", "response_avg,question_span", "--personas", "pirate,teacher"]
    argv += ["--store", str(store_dir), "--out", str(out), "--batch-size", "3"]
    assert cli_module("extract_vectors").main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [(r["persona"], r["positions"]) for r in summary] == [
        ("pirate", "response_avg"),
        ("teacher", "response_avg"),
        ("pirate", "question_span"),
        ("teacher", "question_span"),
    ]
    for png in ("layer_metrics", "cosine", "pca"):
        assert (out / f"question_span_{png}.png").stat().st_size > 1000
    saved = load_file(str(out / "vectors_response_avg.safetensors"))
    with Store(store_dir, read_only=True) as store:
        entries = store.vectors(str(files["model"]), positions="response_avg")
        assert sorted(e.persona for e in entries) == ["pirate", "teacher"]
        vec = store.load_vector(str(files["model"]), "pirate", positions="response_avg")
        assert (vec.vector - saved["pirate.default"]).abs().max() == 0
        assert vec.baseline == "default" and vec.n_samples == 3
        assert {m.persona for m in store.means(str(files["model"]))} == {
            "default",
            "pirate",
            "teacher",
        }


def test_find_neurons_and_batch_end_to_end(files: dict[str, Path]) -> None:
    store_dir, out = files["root"] / "store2", files["root"] / "out2"
    common = ["--model", str(files["model"]), "--dataset", str(files["data"]), "--quiet"]
    argv = [*common, "--site", "gate", "--method", "effect", "--k", "4", "--layers", "1-2"]
    find_neurons = cli_module("find_neurons")
    assert find_neurons.main([*argv, "--store", str(store_dir), "--out", str(out)]) == 0
    rows = json.loads((out / "neurons.json").read_text())
    assert [r["label"] for r in rows] == [
        "teacher_student.gate.effect",
        "pirate_default.gate.effect",
        "role.gate.effect",
    ]
    assert all(set(r["layers"]) <= {1, 2} and len(r["indices"]) == 4 for r in rows)
    argv = [*common, "--store", str(store_dir), "--out", str(out), "--layers", "0,2"]
    assert cli_module("register_batch").main([*argv, "--baseline", "auto"]) == 0
    with Store(store_dir, read_only=True) as store:
        labels = {s.label for s in store.neuron_sets(str(files["model"]))}
        assert labels == {r["label"] for r in rows}
        # a dataset with a 'default' persona gets persona vectors against it
        assert {e.persona for e in store.vectors(str(files["model"]))} == {
            "pirate",
            "teacher",
            "student",
        }
    folder = out / re.sub(r"[^A-Za-z0-9_.-]+", "_", str(files["model"])) / "small"
    assert "pirate" in (folder / "summary.txt").read_text()
    assert (folder / "response_avg_pca.png").stat().st_size > 1000


def _bad(files: dict[str, Path], script: str, extra: list[str], message: str, capsys) -> None:  # type: ignore[no-untyped-def]
    out, store_dir = files["root"] / "bad_out", files["root"] / "bad_store"
    argv = ["--model", str(files["model"]), "--quiet", "--out", str(out), "--store", str(store_dir)]
    assert cli_module(script).main([*argv, *extra]) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert not out.exists() and not store_dir.exists()


@pytest.mark.parametrize(
    ("script", "extra", "message"),
    [
        ("extract_vectors", ["--personas", "ghost"], "unknown persona 'ghost'"),
        ("extract_vectors", ["--baseline", "nobody"], "unknown persona 'nobody'"),
        ("extract_vectors", ["--dataset", "EMPTY"], "is empty"),
        ("extract_vectors", ["--layers", "7"], "layer 7 is out of range"),
        ("extract_vectors", ["--positions", "everywhere"], "unknown positions"),
        (
            "extract_vectors",
            ["--layers-path", "model.nothing", "--mlp-down-path", "mlp.down_proj"],
            "cannot find the sites",
        ),
        ("extract_vectors", ["--layers-path", "model.layers"], "give both --layers-path"),
        ("find_neurons", ["--pairs", "nope"], "unknown pair 'nope'"),
        ("find_neurons", ["--layers", "3-4"], "layer 3 is out of range"),
        ("register_batch", ["--datasets", "no_such_set"], "neither a built-in dataset"),
    ],
)
def test_bad_input_writes_nothing(
    files: dict[str, Path], script: str, extra: list[str], message: str, capsys
) -> None:  # type: ignore[no-untyped-def]
    extra = [str(files["root"] / "empty.json") if e == "EMPTY" else e for e in extra]
    if "--dataset" not in extra and "--datasets" not in extra:
        extra = [*extra, "--dataset", str(files["data"])]
    _bad(files, script, extra, message, capsys)
