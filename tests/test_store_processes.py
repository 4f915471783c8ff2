"""Two real processes on one store: a batch writer and the app's long-lived reader, and what
happens when another process holds the DuckDB lock."""

from __future__ import annotations

import multiprocessing
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from personachat.records import ModelInfo, Persona, PersonaVector
from personachat.store import Store, StoreLockedError

INFO = ModelInfo("org/two-procs", None, "llama", 3, 8, 16)
BATCHES, PER_BATCH = 6, 40
HOLD = "import duckdb, sys, time; c = duckdb.connect(sys.argv[1]); print('locked', flush=True); "


def expected(batch: int, i: int) -> torch.Tensor:
    return torch.randn(3, 8, generator=torch.Generator().manual_seed(batch * 1000 + i))


def write_batches(root: str) -> None:
    store = Store(root)
    for batch in range(BATCHES):
        store.register_vectors(
            PersonaVector(INFO.model_id, f"w{batch}_{i}", expected(batch, i), n_samples=batch)
            for i in range(PER_BATCH)
        )
        time.sleep(0.15)


def test_reader_picks_up_a_writers_batches_without_restart(tmp_path: Path) -> None:
    root = tmp_path / "store"
    Store(root).register_model(INFO)
    reader = Store(root, read_only=True)  # the app: opened once, before the writer starts
    assert reader.personas(INFO.model_id) == []
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "duckdb", "personachat.store"])
    writer = ctx.Process(target=write_batches, args=(str(root),), daemon=True)
    writer.start()
    counts: list[int] = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        names = [p.name for p in reader.personas(INFO.model_id)]
        counts.append(len(names))
        if names:  # every persona the reader sees loads, checksummed, with the writer's values
            newest = max(names, key=lambda n: tuple(map(int, n[1:].split("_"))))
            batch, i = map(int, newest[1:].split("_"))
            got = reader.load_vector(INFO.model_id, newest).vector
            assert torch.equal(got, expected(batch, i))
        if len(names) == BATCHES * PER_BATCH:
            break
        time.sleep(0.01)
    writer.join(timeout=30)
    assert writer.exitcode == 0, "the writer failed (lock starvation?)"
    assert counts[-1] == BATCHES * PER_BATCH
    seen = sorted(set(counts))
    assert len(seen) >= 3, f"reader saw only {seen}: it did not follow the writer's batches"
    assert all(c % PER_BATCH == 0 for c in seen)  # each batch appears whole: one transaction


def hold_lock(catalog: Path, seconds: float) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD + "time.sleep(float(sys.argv[2]))", str(catalog), str(seconds)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    return proc


def test_lock_timeout_names_the_holder(tmp_path: Path) -> None:
    root = tmp_path / "store"
    writer = Store(root, lock_timeout=1.0)
    writer.register_personas([Persona("pirate", "Arr.")])
    warm_reader = Store(root, read_only=True, lock_timeout=0.5)
    assert [p.name for p in warm_reader.personas()] == ["pirate"]
    holder = hold_lock(root / "catalog.duckdb", 60)
    try:
        start = time.monotonic()
        with pytest.raises(StoreLockedError, match=rf"locked by .*python.* \(PID {holder.pid}\)"):
            writer.register_personas([Persona("ninja", "Hiya.")])
        waited = time.monotonic() - start
        assert 1.0 <= waited < 4.0, f"retried for {waited:.2f}s with lock_timeout=1.0"
        cold_reader = Store(root, read_only=True, lock_timeout=0.5)
        with pytest.raises(StoreLockedError, match=rf"PID {holder.pid}"):
            cold_reader.personas()
        start = time.monotonic()  # nothing changed: the warm reader answers from its snapshot
        assert [p.name for p in warm_reader.personas()] == ["pirate"]
        assert time.monotonic() - start < 0.2
    finally:
        holder.kill()
        holder.wait()
    writer.register_personas([Persona("ninja", "Hiya.")])
    assert [p.name for p in warm_reader.personas()] == ["ninja", "pirate"]


def test_writer_retries_until_the_lock_is_released(tmp_path: Path) -> None:
    root = tmp_path / "store"
    writer = Store(root, lock_timeout=20.0)
    holder = hold_lock(root / "catalog.duckdb", 1.0)
    start = time.monotonic()
    writer.register_personas([Persona("pirate", "Arr.")])
    waited = time.monotonic() - start
    holder.wait()
    assert waited >= 0.5, f"wrote after {waited:.2f}s although the lock was held for 1s"
    assert [p.name for p in Store(root, read_only=True).personas()] == ["pirate"]
