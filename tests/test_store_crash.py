"""Registration is atomic under SIGKILL: kill a registering process at 20 random moments; after
each kill the store opens, every row points to an existing file with the right sha256, and no
file is left that no row references. Right after each kill, before any recovery, readers (one
opened before the kills, one fresh) load every listed vector and means, ``verify`` finds no
problem, and ``leftovers`` accounts for exactly the files no row names."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import random
import signal
import time
from pathlib import Path

import duckdb
import pytest
import torch

from personachat.records import ModelInfo, PersonaMeans, PersonaVector
from personachat.store import Store

pytestmark = pytest.mark.slow  # writers killed at random moments

INFO = ModelInfo("org/crash-model", None, "llama", 3, 8, 16)
KILLS = 20


def write_forever(root: str, seed: int) -> None:
    """Register random batches (new, replacing and removing vectors) until killed."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    store = Store(root, lock_timeout=30)
    while True:
        batch: dict[tuple[str, str], PersonaVector] = {}
        for _ in range(rng.randint(1, 16)):
            persona, baseline = f"p{rng.randrange(24)}", rng.choice(["default", "mean"])
            batch[persona, baseline] = PersonaVector(
                INFO.model_id, persona, torch.randn(3, 8), baseline=baseline, n_samples=seed
            )
        means = [
            PersonaMeans(INFO.model_id, p, "response_avg", torch.randn(3, 8), 1)
            for p in {p for p, _ in batch}
        ]
        store.register_vectors(batch.values(), means)
        if rng.random() < 0.25 and store.vectors():
            store.remove_persona(rng.choice(store.vectors()).persona)


def on_disk(root: Path) -> set[str]:
    found = {p.name for p in root.glob("*.tmp")}
    for sub in ("vectors", "means", ".staging"):
        if (root / sub).is_dir():
            found |= {
                p.relative_to(root).as_posix() for p in (root / sub).rglob("*") if p.is_file()
            }
    return found


def catalog_rows(root: Path) -> tuple[list[tuple[str, str]], int]:
    """(file, sha256) of every row, and the number of metric rows without a vector row."""
    con = duckdb.connect(str(root / "catalog.duckdb"), read_only=True)
    try:
        rows = con.execute(
            "SELECT file, sha256 FROM vectors UNION ALL SELECT file, sha256 FROM means"
        ).fetchall()
        dangling = con.execute(
            "SELECT count(*) FROM vector_layer_metrics "
            "WHERE vector_id NOT IN (SELECT vector_id FROM vectors)"
        ).fetchone()
    finally:
        con.close()
    return rows, int(dangling[0]) if dangling else 0


def what_readers_see(kill: int, readers: list[Store], debris: set[str]) -> None:
    """Every listed vector and means loads, nothing is a problem, the debris is all leftovers."""
    for reader in readers:
        for entry in reader.vectors():
            reader.load_vector(entry.model_id, entry.persona, baseline=entry.baseline)
        for mean in reader.means():
            reader.load_means(mean.model_id, mean.persona, positions=mean.positions)
        assert reader.verify() == [], f"kill {kill}: a reader sees problems"
        left = set(reader.leftovers())
        assert left == debris, f"kill {kill}: not accounted for: {debris ^ left}"


def test_sigkill_at_random_moments_leaves_a_consistent_store(tmp_path: Path) -> None:
    root = tmp_path / "store"
    Store(root).register_model(INFO)
    long_lived = Store(root, read_only=True)
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "duckdb", "personachat.store"])
    rng = random.Random(1234)
    debris_kills = 0
    rows_seen = 0
    for kill in range(KILLS):
        proc = ctx.Process(target=write_forever, args=(str(root), kill), daemon=True)
        proc.start()
        time.sleep(rng.uniform(0.05, 0.7))
        assert proc.is_alive(), f"writer {kill} died on its own (exit code {proc.exitcode})"
        assert proc.pid is not None
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
        assert proc.exitcode == -signal.SIGKILL

        before, _ = catalog_rows(root)
        debris = on_disk(root) - {f for f, _ in before}
        debris_kills += bool(debris)
        fresh = Store(root, read_only=True)
        what_readers_see(kill, [long_lived, fresh], debris)
        fresh.close()

        Store(root).close()  # opening writable recovers
        rows, dangling = catalog_rows(root)
        assert dangling == 0
        for rel, sha in rows:
            path = root / rel
            assert path.is_file(), f"kill {kill}: row points to missing {path}"
            assert hashlib.sha256(path.read_bytes()).hexdigest() == sha, f"kill {kill}: {path}"
        assert on_disk(root) == {f for f, _ in rows}, f"kill {kill}: orphan files"
        assert long_lived.leftovers() == []
        rows_seen = max(rows_seen, len(rows))

    reader = Store(root, read_only=True)
    assert reader.verify() == []
    for entry in reader.vectors()[:5]:
        reader.load_vector(entry.model_id, entry.persona, baseline=entry.baseline)
    assert rows_seen > 0  # the writers got work committed
    assert debris_kills >= 1  # some kills landed mid-write and left files to recover
