"""scripts/extract_vectors.py under ``accelerate launch`` (2 CPU processes) equals one process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from personachat.model.tiny import tiny_model
from tests.test_extract_scripts import DATA

pytestmark = pytest.mark.slow  # two processes under torchrun

ROOT = Path(__file__).resolve().parent.parent


def one_and_two(
    tmp_path: Path,
    script: str,
    args: list[str],
    one_args: list[str],
    two_args: list[str],
    port: int,
) -> str:
    """Run ``scripts/{script}.py`` on a tiny saved model and the small dataset, alone (with
    ``one_args``) and under ``accelerate launch`` with 2 CPU processes (with ``two_args``), side
    by side; both must succeed. Returns the 2-process log."""
    lm = tiny_model("gpt2")
    lm.model.save_pretrained(tmp_path / "model")
    lm.tokenizer.save_pretrained(tmp_path / "model")
    (tmp_path / "small.json").write_text(json.dumps(DATA))
    path = str(ROOT / "scripts" / f"{script}.py")
    common = ["--model", str(tmp_path / "model"), "--dataset", str(tmp_path / "small.json")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    launch = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines"]
    launch += ["1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port"]
    launch += [str(port), path]
    two = subprocess.Popen(
        [*launch, *common, *args, *two_args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    one = subprocess.run(
        [sys.executable, path, *common, *args, *one_args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    log, _ = two.communicate(timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    assert two.returncode == 0, log[-3000:]
    return log


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("accelerate") is None, reason="accelerate CLI not installed")
def test_two_processes_equal_one(tmp_path: Path) -> None:
    log = one_and_two(
        tmp_path,
        "extract_vectors",
        ["--positions", "response_avg,prompt_last", "--baseline", "mean", "--quiet"],
        ["--out", str(tmp_path / "one"), "--no-store"],
        ["--out", str(tmp_path / "two"), "--store", str(tmp_path / "store2")],
        port=29517,
    )
    assert "process 1/2: 6 samples" in log and "process 2/2: 6 samples" in log
    for kind in ("response_avg", "prompt_last"):
        a = load_file(str(tmp_path / "one" / f"vectors_{kind}.safetensors"))
        b = load_file(str(tmp_path / "two" / f"vectors_{kind}.safetensors"))
        assert (
            sorted(a)
            == sorted(b)
            == [f"{p}.mean" for p in sorted(["default", "pirate", "student", "teacher"])]
        )
        for name in a:
            assert (a[name] - b[name]).abs().max() < 1e-5
    rows_one = json.loads((tmp_path / "one" / "summary.json").read_text())
    rows_two = json.loads((tmp_path / "two" / "summary.json").read_text())
    for r1, r2 in zip(rows_one, rows_two, strict=True):
        assert r1["persona"] == r2["persona"] and r1["best_layer"] == r2["best_layer"]
        assert abs(r1["auc"] - r2["auc"]) < 1e-5 and abs(r1["separation"] - r2["separation"]) < 1e-3
    # only the main process wrote: one catalog, every vector once
    assert (tmp_path / "store2" / "catalog.duckdb").exists()
    assert log.count("registered 8 vectors") == 1


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("accelerate") is None, reason="accelerate CLI not installed")
def test_exact_neurons_shared_out_between_two_processes_equal_one(tmp_path: Path) -> None:
    """``find_neurons.py --method exact`` under 2 processes patches half the units in each and
    finds the same sets, scores and means as one process."""
    args = ["--method", "exact", "--k", "8", "--no-store", "--quiet"]
    one = ["--out", str(tmp_path / "one")]
    one_and_two(tmp_path, "find_neurons", args, one, ["--out", str(tmp_path / "two")], port=29518)
    sets_one = json.loads((tmp_path / "one" / "neurons.json").read_text())
    sets_two = json.loads((tmp_path / "two" / "neurons.json").read_text())
    assert [s["label"] for s in sets_one] == [s["label"] for s in sets_two]
    assert any(s["label"].endswith(".exact") for s in sets_one)
    for a, b in zip(sets_one, sets_two, strict=True):
        assert (a["layers"], a["indices"]) == (b["layers"], b["indices"]), a["label"]
        assert a["scores"] == b["scores"] and a["means"] == b["means"], a["label"]
