"""How the app serves replies: one shared scheduler per model, a bound on requests at once, and
the per-request path a ZeroGPU Space takes (under ``spaces.GPU``, the identity off a Space)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from personachat.app.backend import Backend
from personachat.app.chat_handlers import ChatHandlers
from personachat.app.handler_base import gpu
from personachat.app.handlers import Handlers
from personachat.app.serving import Gate, Serving
from personachat.app.settings import ChatInputs
from personachat.chat import ChatEngine, GenerationSettings, Scheduler
from personachat.interventions import SteeringSpec
from personachat.store import Store
from tests.test_ui_handlers import MODEL, build_store, tiny

USER = [{"role": "user", "content": "Tell me about the ocean."}]


@pytest.fixture(scope="module")
def store_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("store")
    build_store(root, tiny())
    return root


def solo(store_root: Path, **kwargs: Any) -> Any:
    """The reply of a ``ChatEngine`` of its own (one ``generate``), from the store's vectors."""
    with Store(store_root, read_only=True) as store:
        vectors = [store.load_vector(MODEL, n) for n in ("pirate", "poet", "landlubber")]
    return ChatEngine(tiny(), vectors).reply(USER, GenerationSettings(max_new_tokens=12), **kwargs)


def inputs(**kw: Any) -> ChatInputs:
    return ChatInputs(**{"model_id": MODEL, "weights": "", "max_new_tokens": 12, **kw})


def test_every_engine_of_a_model_shares_its_scheduler(store_root: Path) -> None:
    backend = Backend(MODEL, store_root, models={MODEL: tiny()})
    engine = backend.engine(MODEL)
    assert isinstance(engine.scheduler, Scheduler)
    assert backend.engine(MODEL, "question_span").scheduler is engine.scheduler
    assert engine.with_vectors({}).scheduler is engine.scheduler
    backend.refresh()  # engines are rebuilt, the scheduler stays
    assert backend.engine(MODEL).scheduler is engine.scheduler
    backend.catalog._forget(MODEL)  # what dropping the model from the cache does
    assert backend.engine(MODEL).scheduler is not engine.scheduler


def test_sessions_side_by_side_and_the_prompted_column_share_forwards(store_root: Path) -> None:
    """Four sessions at once (one side by side with the prompted column): their rows meet in
    shared decode steps, and each reply equals its solo run."""
    h = Handlers(Backend(MODEL, store_root, models={MODEL: tiny()}))
    scheduler = h.backend.engine(MODEL).scheduler
    rows: list[int] = []
    step = scheduler._step

    def counted() -> None:
        rows.append(sum(r.rows for r in scheduler._batch))
        time.sleep(0.01)  # give the other sessions time to join
        step()

    scheduler._step = counted  # type: ignore[method-assign]
    asks = [
        inputs(personas=["pirate"], layer_spec="1-2:4", side_by_side=True),
        inputs(),
        inputs(personas=["poet"], layer_spec="0-2:3", positions="prompt"),
        inputs(personas=["pirate"], layer_spec="1:6", positions="generated"),
    ]
    turns: list[Any] = [None] * len(asks)

    def one(i: int) -> None:
        prompted = i == 0
        *_, last = h.turns(USER[0]["content"], [], [], [], asks[i], prompted=prompted)
        turns[i] = last

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(asks))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert max(rows) >= 4  # side by side (2 rows) + the prompted column + another session
    specs = [
        SteeringSpec({"pirate": 1.0}, {1: 4.0, 2: 4.0}),
        None,
        SteeringSpec({"poet": 1.0}, {0: 3.0, 1: 3.0, 2: 3.0}, positions="prompt"),
        SteeringSpec({"pirate": 1.0}, {1: 6.0}, positions="generated"),
    ]
    for turn, spec in zip(turns, specs, strict=True):
        assert turn.history[-1]["content"] == solo(store_root, steering=spec).text
    assert turns[0].side[-1]["content"] == solo(store_root).text
    assert turns[0].prompted[-1]["content"] not in ("", "—")


def test_the_gate_bounds_requests_at_once() -> None:
    gate = Gate(2)
    running, peak, lock = [0], [0], threading.Lock()

    def reply() -> Iterator[int]:
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.05)
        yield 1
        with lock:
            running[0] -= 1

    threads = [threading.Thread(target=lambda: list(gate.through(reply()))) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert peak[0] == 2 and running[0] == 0
    stream = gate.through(reply())
    next(stream)
    stream.close()  # a reader that leaves gives its slot back
    assert all(gate._slots.acquire(blocking=False) for _ in range(2))
    with pytest.raises(ValueError, match="at least 1"):
        Gate(0)


def test_spaces_gpu_is_the_identity_off_a_space() -> None:
    spaces = pytest.importorskip("spaces", reason="the spaces package is a requirement")

    def reply() -> Iterator[int]:
        yield 1

    assert spaces.GPU(reply) is reply and gpu(reply) is reply


def test_the_per_request_path_runs_and_streams_under_the_gpu_decorator(store_root: Path) -> None:
    """As on a ZeroGPU Space: no scheduler, each reply its own ``generate`` inside the decorated
    ``_reply`` (the call ``spaces.GPU`` lends the GPU to); it streams and equals the engine."""
    backend = Backend(
        MODEL, store_root, models={MODEL: tiny()}, serving=Serving(shared_batch=False)
    )
    h = Handlers(backend)
    assert backend.engine(MODEL).scheduler is None
    assert gpu(ChatHandlers._reply) is ChatHandlers._reply  # the decorated generator
    asked = inputs(personas=["pirate"], layer_spec="1-2:4")
    turns = list(h.turns("Tell me about the ocean.", [], [], [], asked))
    assert len(turns) > 2 and turns[0].running and not turns[-1].running
    expected = solo(store_root, steering=SteeringSpec({"pirate": 1.0}, {1: 4.0, 2: 4.0}))
    assert turns[-1].history[-1]["content"] == expected.text


@pytest.mark.slow
def test_the_gpu_check_fails_fast_without_a_gpu() -> None:
    script = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )
    assert done.returncode == 2, done.stderr
    assert (
        "gpu_check: cannot run: --engine vllm needs a CUDA GPU and this machine has none"
        in done.stderr
    )
    assert time.perf_counter() - started < 60  # before any model loads


def test_the_app_refuses_engine_vllm_without_a_gpu_at_start(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from personachat.app.main import main

    assert main(["--engine", "vllm", "--store", str(tmp_path)]) == 2
    assert "cannot start: --engine vllm needs a CUDA GPU" in capsys.readouterr().err
