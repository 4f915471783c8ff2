"""Benchmark the persona store: registration throughput and lookup latency.

    python scripts/bench_store.py

``run()`` returns (name, value, unit/goal) rows for ``scripts/benchmark.py``. It registers
1,000 vectors in one batch (goal <= 5 s), fills the store to 10,000 vectors and measures the
lookup of a vector by (model, persona) on an open Store (goal p50 <= 1 ms), side by side with
the same lookup as SQL on the in-memory snapshot and with a connection opened per request.
Small sizes (4 layers x 64 dims) keep it well under a minute.
"""

from __future__ import annotations

import random
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import duckdb
import torch
from tqdm import tqdm

from personachat.records import LayerMetrics, ModelInfo, PersonaVector
from personachat.store import Store

INFO = ModelInfo("bench/model", None, "llama", 4, 64, 128)
BATCH = 1_000
TOTAL = 10_000


def make_batch(start: int, n: int, with_metrics: bool = True) -> list[PersonaVector]:
    g = torch.Generator().manual_seed(start)
    return [
        PersonaVector(
            INFO.model_id,
            f"persona{i}",
            torch.randn(4, 64, generator=g),
            metrics=LayerMetrics(torch.rand(4), torch.randn(4), torch.rand(4), torch.rand(4))
            if with_metrics
            else None,
            n_samples=10,
        )
        for i in range(start, start + n)
    ]


def p50_ms(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def run() -> list[tuple[str, float, str]]:
    rows: list[tuple[str, float, str]] = []
    with tempfile.TemporaryDirectory(prefix="bench_store_") as tmp:
        store = Store(Path(tmp) / "store")
        store.register_model(INFO)
        batch = make_batch(0, BATCH)
        start = time.perf_counter()
        store.register_vectors(batch)
        rows.append(
            (
                "store: register 1,000 vectors (one batch)",
                time.perf_counter() - start,
                "s (goal <= 5)",
            )
        )
        for first in tqdm(range(BATCH, TOTAL, BATCH), desc="filling to 10,000", unit="batch"):
            store.register_vectors(make_batch(first, BATCH, with_metrics=False))

        reader = Store(store.root, read_only=True)
        start = time.perf_counter()
        assert len(reader.vectors()) == TOTAL
        rows.append(
            (
                "store: reader refresh after a write, 10,000 vectors",
                (time.perf_counter() - start) * 1000,
                "ms",
            )
        )
        rng = random.Random(0)
        names = [f"persona{rng.randrange(TOTAL)}" for _ in range(2000)]
        it = iter(names * 3)
        lookup = p50_ms(lambda: reader.vectors(INFO.model_id, next(it)), 2000)
        rows.append(
            ("store: lookup p50 by (model, persona), 10,000 vectors", lookup, "ms (goal <= 1)")
        )
        snap = reader._catalog.snap
        assert snap is not None
        sql = "SELECT * FROM vectors WHERE model_id = ? AND persona = ?"
        by_sql = p50_ms(lambda: snap.execute(sql, [INFO.model_id, next(it)]).fetchall(), 500)
        rows.append(("store: same lookup as SQL on the snapshot connection", by_sql, "ms"))

        def per_request() -> None:
            con = duckdb.connect(str(store.catalog), read_only=True)
            con.execute(sql, [INFO.model_id, next(it)]).fetchall()
            con.close()

        opened = p50_ms(per_request, 30)
        rows.append(("store: same lookup opening a connection per request", opened, "ms"))
        rows.append(
            ("store: ratio per-request connection / open-Store lookup", opened / lookup, "x")
        )
        load = p50_ms(lambda: reader.load_vector(INFO.model_id, next(it)), 300)
        rows.append(("store: load_vector p50 (read + sha256 + shape check)", load, "ms"))
    return rows


def main() -> None:
    for name, value, unit in run():
        print(f"{name:60s} {value:10.3f} {unit}")


if __name__ == "__main__":
    main()
