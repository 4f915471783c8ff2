"""Two real processes on one store: a batch writer and the app's long-lived reader (one that
registers batches, one that replaces vectors, means and personas in a loop: the reader never
fails), and what happens when another process holds the DuckDB lock."""

from __future__ import annotations

import multiprocessing
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from personachat.records import ModelInfo, Persona, PersonaMeans, PersonaVector
from personachat.store import Store, StoreLockedError

pytestmark = pytest.mark.slow  # writer and reader processes

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


STABLE = [f"s{i}" for i in range(6)]
SECONDS = 6.0


def value(name: str, i: int) -> torch.Tensor:
    seed = int.from_bytes(name.encode(), "little") % 100_000 * 10_000 + i
    return torch.randn(3, 8, generator=torch.Generator().manual_seed(seed))


def batch(store: Store, names: list[str], i: int) -> None:
    """One transaction: the personas' vectors (against the baseline 'base'), their means and
    the base's, and the personas themselves; iteration ``i`` is in every value."""
    store.register_vectors(
        [PersonaVector(INFO.model_id, n, value(n, i), baseline="base", n_samples=i) for n in names],
        [PersonaMeans(INFO.model_id, n, "response_avg", value(n, -i), i) for n in [*names, "base"]],
        [Persona(n, f"prompt {i}") for n in names],
    )


def replace_in_a_loop(root: str, seconds: float) -> None:
    store = Store(root, lock_timeout=30)
    rng = random.Random(7)
    end, i = time.monotonic() + seconds, 0
    while time.monotonic() < end:
        i += 1
        batch(store, [*rng.sample(STABLE, 3), *([f"new{i}"] if i % 3 == 0 else [])], i)


def test_a_reader_never_fails_while_a_writer_replaces(tmp_path: Path) -> None:
    root = tmp_path / "store"
    writer = Store(root)
    writer.register_model(INFO)
    batch(writer, STABLE, 0)
    reader = Store(root, read_only=True)  # the app's: opened once, before the writer starts
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "duckdb", "personachat.store"])
    proc = ctx.Process(target=replace_in_a_loop, args=(str(root), SECONDS), daemon=True)
    proc.start()
    failures: list[str] = []
    loads, seen = 0, set()
    pick = random.Random(3)
    deadline = time.monotonic() + SECONDS + 60
    while (proc.is_alive() or loads == 0) and time.monotonic() < deadline:
        listed = [p.name for p in reader.personas() if p.system_prompt]  # 'base' has none
        newest = max(listed, key=lambda n: (n.startswith("new"), len(n), n))
        for name in {newest, pick.choice(listed)}:  # listed in one snapshot, loaded from later
            try:
                got = reader.load_vector(INFO.model_id, name)
                means = reader.load_means(INFO.model_id, name)
                assert torch.equal(got.vector, value(name, got.n_samples))
                assert torch.equal(means.mean, value(name, -means.n_samples))
                assert got.baseline_mean is not None
                loads += 1
                seen.add(got.n_samples)
            except Exception as err:
                failures.append(f"{name}: {type(err).__name__}: {err}")
    proc.join(timeout=60)
    assert proc.exitcode == 0, "the writer failed"
    assert failures == [], f"{len(failures)} of {loads + len(failures)} loads failed"
    assert loads > 20 and len(seen) > 3, (loads, seen)  # the reader followed the writer


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
