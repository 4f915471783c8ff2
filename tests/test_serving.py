"""How the app serves replies: one shared scheduler per model, a bound on requests at once, and
the per-request path a ZeroGPU Space takes (under ``spaces.GPU``, the identity off a Space)."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gradio as gr
import pytest

from personachat.app.backend import Backend
from personachat.app.chat_handlers import ChatHandlers
from personachat.app.generation import Step
from personachat.app.handler_base import gpu
from personachat.app.handlers import Handlers
from personachat.app.prompted import NO_PROMPT
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


class Slots(threading.BoundedSemaphore):
    """The gate's semaphore, counting the slots taken."""

    taken = 0

    def __enter__(self) -> bool:
        return self.acquire()

    def acquire(self, blocking: bool = True, timeout: float | None = None) -> bool:
        got = super().acquire(blocking, timeout)
        self.taken += got
        return got


def test_a_stop_reaches_a_request_waiting_for_a_slot() -> None:
    gate = Gate(1)
    gate._slots = slots = Slots(1)
    closed: list[str] = []

    def reply(name: str) -> Iterator[str]:
        try:
            yield name
        finally:
            closed.append(name)

    first = gate.through(reply("first"))
    assert next(first) == "first" and slots.taken == 1  # the only slot is held
    waiting = reply("waiting")
    stop, got = threading.Event(), []

    def wait() -> None:
        got.extend(gate.through(waiting, stop))
        got.append("ended")

    waiter = threading.Thread(target=wait)
    waiter.start()
    time.sleep(0.3)
    assert waiter.is_alive()  # waits for the slot
    asked = time.monotonic()
    stop.set()
    waiter.join(5)
    assert not waiter.is_alive() and time.monotonic() - asked < 1.0
    assert got == ["ended"] and slots.taken == 1  # nothing came, and the slot was never taken
    assert inspect.getgeneratorstate(waiting) == inspect.GEN_CLOSED and closed == []  # unrun
    assert list(gate.through(reply("late"), stop)) == [] and slots.taken == 1  # stopped before
    first.close()  # the holder leaves: its items end and its slot is given back, once
    assert closed == ["first"]
    assert slots.acquire(blocking=False) and not slots.acquire(blocking=False)
    slots.release()
    left = gate.through(reply("left"), threading.Event())
    left.close()  # a reader that leaves before its first item takes and gives back nothing
    assert slots.acquire(blocking=False) and slots.taken == 3
    slots.release()
    again = gate.through(reply("again"), threading.Event())
    assert next(again) == "again" and slots.taken == 4  # with the slot free, no stop: it runs
    again.close()
    assert closed == ["first", "again"]
    with pytest.raises(ValueError):
        slots.release()  # every slot is back, none twice


def test_stop_on_the_page_reaches_a_reply_waiting_for_a_slot(store_root: Path) -> None:
    """One request at a time: a reply held after its first tokens keeps the only slot; another
    session's Stop ends its reply while it waits, and the page says it never began."""
    backend = Backend(MODEL, store_root, models={MODEL: tiny()}, serving=Serving(max_requests=1))
    backend.hold_message = "Hold on."
    h = Handlers(backend)
    holder, waiter = gr.Request(session_hash="holder"), gr.Request(session_hash="waiter")
    held = h.turns("Hold on.", [], [], [], inputs(max_new_tokens=50), request=holder)
    next(held)  # the user turn
    assert next(held).history[-1]["content"]  # its first tokens: it holds the slot
    turns: list[Any] = []
    thread = threading.Thread(
        target=lambda: turns.extend(h.turns("Hi", [], [], [], inputs(), request=waiter))
    )
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not turns and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.3)  # the waiter's reply is past its first turn, waiting for the slot
        assert h.stop(waiter) == "Stopping…"
        thread.join(3)
        assert not thread.is_alive()  # it did not wait for the held reply
    finally:
        h.stop(holder)
        rest = list(held)  # the held reply ends and gives its slot back
        thread.join(30)
    assert turns[-1].status.startswith("Stopped before the reply began: nothing was generated.")
    assert turns[-1].history[-1] == {"role": "assistant", "content": ""} and not turns[-1].running
    assert rest[-1].status.startswith("Stopped: partial reply kept.")
    assert backend.serving.gate._slots.acquire(blocking=False)  # the slot is free again


def test_the_status_of_a_stopped_reply_says_whether_it_had_begun() -> None:
    stop = threading.Event()
    stop.set()
    chats = ([*USER, {"role": "assistant", "content": ""}], [], [])

    def status(step: Step | None) -> str:
        return str(ChatHandlers._done(MODEL, step, stop, "", 0, chats, {}).status)

    before = "Stopped before the reply began: nothing was generated."
    assert status(None) == before  # stopped while waiting for a slot
    assert status(Step("", done=True, stopped=True)) == before  # stopped in the prompt
    assert status(Step("", prompted_text=NO_PROMPT, done=True, stopped=True)) == before
    assert status(Step("Arr", done=True, stopped=True)) == "Stopped: partial reply kept."
    assert status(Step("", side_text="Plain", done=True)) == "Stopped: partial reply kept."


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
