"""Serving many sessions: the scheduler's shared batches vs one ``generate`` thread per session.

    python scripts/benchmark.py --only serving
    python scripts/bench_serving.py            # this section alone

Measures, on the bundled demo model (its store vectors), the dispatch-bound tiny 24x64 model and
a random Qwen2.5-0.5B-shaped model (random vectors; no download):
- aggregate tokens/s of 8 concurrent sessions with 8 different settings (steering at one layer,
  at all layers, a blend at generated tokens only, at the prompt's last tokens only; neuron
  ablation; directional ablation; readouts; a side-by-side pair) through ``Scheduler`` against
  the same 8 through ``ChatEngine.stream`` in 8 threads, the per-request path a ZeroGPU Space
  takes (goal >= 4x on the demo and tiny models, >= 2x on the 0.5B-shaped one). Every reply
  is exactly ``tokens`` long (``min_new_tokens = max_new_tokens``), and both ways must give the
  same tokens;
- time to the first token of a request arriving while 7 sessions decode, against the same
  request alone (through the idle scheduler, and through ``ChatEngine`` per request; goal
  <= 1.5x).

Times are wall-clock (the work spreads over threads) with one intra-op thread per op; the two
ways run interleaved in this process (A/B then B/A), each pair gives a ratio, and the median is
reported. On a machine shared with other jobs the wall-clock ratio leans towards the threads:
8 runnable threads get a larger share of the busy CPUs than the scheduler's one, so the same
runs are also given per CPU second of this process (tokens / ``time.process_time``), a ratio
that other jobs' load does not move. The load average is printed beside the ratio.
"""

from __future__ import annotations

import os
import random
import statistics
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from bench_runtime import PERSONAS, qwen05_shaped, random_vectors

from personachat.chat import ChatEngine, ChatUpdate, GenerationSettings, Scheduler
from personachat.interventions import AblationSpec, DirectionSpec, SteeringSpec
from personachat.model import LoadedModel, load_model
from personachat.model.tiny import tiny_model
from personachat.records import PersonaVector

Row = tuple[str, float, str]
Kwargs = dict[str, Any]
QUESTIONS = [
    "Tell me about the sea.",
    "Who are you?",
    "What do you like to eat?",
    "Hello! How was your day?",
    "Tell me a story about the stars.",
    "Why is the sky blue?",
    "What is your favourite book?",
    "Count to ten, please.",
]


@dataclass(frozen=True)
class Case:
    """One model to serve, and how long to measure it."""

    name: str
    lm: LoadedModel
    vectors: Sequence[PersonaVector]
    tokens: int
    reps: int
    goal: float
    first_token_reps: int = 9


def sessions(lm: LoadedModel, personas: Sequence[str]) -> list[Kwargs]:
    """Eight sessions with different settings."""
    a, b, c = personas[:3]
    n = lm.info.n_layers
    mid = n // 2
    return [
        {"steering": SteeringSpec({a: 1.0}, layers=f"{mid}:4")},
        {},
        {"steering": SteeringSpec({b: 2.0}, layers="all"), "readout": [a, b]},
        {"ablation": AblationSpec(neurons=f"0:0-15,{mid}:3-9")},
        {"direction": DirectionSpec(c, layers="all", mode="zero")},
        {"steering": SteeringSpec({c: 1.0, a: -0.5}, layers=f"0-{n - 1}:1", positions="generated")},
        {"steering": SteeringSpec({a: 2.0}, layers=f"{mid}"), "side_by_side": True, "readout": [c]},
        {"steering": SteeringSpec({b: 3.0}, layers="1", positions="prompt", last_n=4)},
    ]


def concurrent_replies(
    engine: ChatEngine, calls: Sequence[Kwargs], settings: GenerationSettings
) -> tuple[float, float, list[ChatUpdate]]:
    """Wall and process CPU seconds for ``calls`` started together from one thread each, and
    their replies."""
    out: list[ChatUpdate | None] = [None] * len(calls)
    gate = threading.Barrier(len(calls) + 1)

    def work(i: int) -> None:
        gate.wait()
        out[i] = engine.reply([{"role": "user", "content": QUESTIONS[i]}], settings, **calls[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    gate.wait()
    start, cpu = time.perf_counter(), time.process_time()
    for t in threads:
        t.join()
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    return seconds, cpu, [u for u in out if u is not None]


def tokens_of(replies: Sequence[ChatUpdate]) -> int:
    return sum(len(u.tokens) + len(u.baseline_tokens or ()) for u in replies)


def throughput_rows(case: Case, plain: ChatEngine, shared: ChatEngine) -> list[Row]:
    """Tokens per wall second and per CPU second, threads (A) and scheduler (B) alternating
    A/B then B/A; the median of each and of the per-pair ratios."""
    calls = sessions(case.lm, [v.persona for v in case.vectors])
    settings = GenerationSettings(max_new_tokens=case.tokens, min_new_tokens=case.tokens)
    _, _, first = concurrent_replies(plain, calls, settings)  # warm up; the reference replies
    reference = [u.tokens for u in first]
    concurrent_replies(shared, calls, settings)
    mismatches = 0
    rates: dict[str, list[tuple[float, float]]] = {"threads": [], "scheduler": []}
    for i in range(case.reps):
        order = [("threads", plain), ("scheduler", shared)]
        for name, engine in order if i % 2 == 0 else order[::-1]:
            seconds, cpu_seconds, replies = concurrent_replies(engine, calls, settings)
            mismatches += [u.tokens for u in replies] != reference
            n = tokens_of(replies)
            rates[name].append((n / seconds, n / cpu_seconds))
    wall = [b[0] / a[0] for a, b in zip(rates["threads"], rates["scheduler"], strict=True)]
    cpu = [b[1] / a[1] for a, b in zip(rates["threads"], rates["scheduler"], strict=True)]
    same = "replies equal" if mismatches == 0 else f"{mismatches} runs DIFFER"
    load = f"load average {os.getloadavg()[0]:.1f}"
    return [
        (
            f"{case.name}: 8 sessions, one thread each (tokens/s)",
            statistics.median(r[0] for r in rates["threads"]),
            f"{case.tokens} tokens each, median of {case.reps}",
        ),
        (
            f"{case.name}: 8 sessions, scheduler (tokens/s)",
            statistics.median(r[0] for r in rates["scheduler"]),
            same,
        ),
        (
            f"{case.name}: scheduler / threads (paired ratio)",
            statistics.median(wall),
            f"goal >= {case.goal:g}; {load}",
        ),
        (
            f"{case.name}: the same per CPU second (paired ratio)",
            statistics.median(cpu),
            "immune to other jobs' load",
        ),
    ]


def first_token_seconds(engine: ChatEngine, call: Kwargs) -> float:
    """Wall seconds from asking to the first update of a one-token reply."""
    settings = GenerationSettings(max_new_tokens=1)
    start = time.perf_counter()
    stream = engine.stream([{"role": "user", "content": QUESTIONS[7]}], settings, **call)
    next(stream)
    seconds = time.perf_counter() - start
    stream.close()
    return seconds


def while_seven_decode(case: Case, engine: ChatEngine, call: Kwargs, phase: float) -> float:
    """First-token seconds of ``call`` arriving while 7 sessions decode, ``phase`` (0 to 1) of
    a decode step after one of their steps ended (so the arrivals sample the whole step)."""
    background = sessions(case.lm, [v.persona for v in case.vectors])[:7]
    long = GenerationSettings(max_new_tokens=200, min_new_tokens=200)
    stops = [threading.Event() for _ in background]
    started = threading.Barrier(len(background) + 1)
    steps: list[float] = []  # when session 0's updates came
    ticked = threading.Condition()

    def work(i: int) -> None:
        stream = engine.stream(
            [{"role": "user", "content": QUESTIONS[i]}], long, stop=stops[i], **background[i]
        )
        for n, _ in enumerate(stream):
            if i == 0:
                with ticked:
                    steps.append(time.perf_counter())
                    ticked.notify_all()
            if n == 1:
                started.wait()
        stream.close()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(background))]
    for t in threads:
        t.start()
    try:
        started.wait(timeout=600)
        with ticked:
            seen = len(steps)
            ticked.wait_for(lambda: len(steps) >= seen + 2, timeout=600)
            step = steps[-1] - steps[-2]
        time.sleep(phase * step)
        return first_token_seconds(engine, call)
    finally:
        for stop in stops:
            stop.set()
        for t in threads:
            t.join()


def first_token_rows(case: Case, plain: ChatEngine, shared: ChatEngine) -> list[Row]:
    call = sessions(case.lm, [v.persona for v in case.vectors])[7]
    jitter = random.Random(0)
    first_token_seconds(shared, call)  # warm up
    alone, alone_engine, loaded, ratios, ratios_engine = [], [], [], [], []
    for _ in range(case.first_token_reps):
        solo = first_token_seconds(shared, call)
        solo_engine = first_token_seconds(plain, call)
        busy = while_seven_decode(case, shared, call, jitter.random())
        alone.append(solo)
        alone_engine.append(solo_engine)
        loaded.append(busy)
        ratios.append(busy / solo)
        ratios_engine.append(busy / solo_engine)
    ms = 1e3
    return [
        (f"{case.name}: first token alone, scheduler (ms)", statistics.median(alone) * ms, ""),
        (
            f"{case.name}: first token alone, ChatEngine (ms)",
            statistics.median(alone_engine) * ms,
            "today's path",
        ),
        (
            f"{case.name}: first token while 7 decode, scheduler (ms)",
            statistics.median(loaded) * ms,
            f"median of {case.first_token_reps}",
        ),
        (
            f"{case.name}: first token while 7 decode / alone (paired)",
            statistics.median(ratios),
            "goal <= 1.5 (alone: scheduler idle)",
        ),
        (
            f"{case.name}: first token while 7 decode / alone via ChatEngine",
            statistics.median(ratios_engine),
            "goal <= 1.5",
        ),
    ]


def serve(case: Case) -> list[Row]:
    plain = ChatEngine(case.lm, case.vectors)
    shared = ChatEngine(case.lm, case.vectors, scheduler=Scheduler(case.lm))
    return throughput_rows(case, plain, shared) + first_token_rows(case, plain, shared)


def demo_case() -> Case:
    from personachat.store import Store

    store = Store("store", read_only=True)
    vectors = [
        store.load_vector("store/models/demo", p, positions="question_span")
        for p in ("pirate", "poet", "robot")
    ]
    return Case("demo", load_model("store/models/demo"), vectors, 64, 5, 4.0)


def random_case(
    name: str, lm: LoadedModel, tokens: int, reps: int, goal: float, first_token_reps: int = 9
) -> Case:
    vectors = random_vectors(lm)
    return Case(name, lm, [vectors[p] for p in PERSONAS], tokens, reps, goal, first_token_reps)


def run() -> list[Row]:
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # one intra-op thread: two would spin against other jobs
        rows = serve(demo_case())
        tiny = tiny_model("llama", n_layers=24, hidden=64)
        rows += serve(random_case("tiny 24x64", tiny, 64, 5, 4.0))
        rows += serve(random_case("qwen2.5-0.5b-shaped", qwen05_shaped(), 16, 3, 2.0, 5))
    finally:
        torch.set_num_threads(threads)
    return rows


if __name__ == "__main__":
    begin = time.perf_counter()
    for row_name, value, note in run():
        print(f"  {row_name:<60} {value:>10.3f}  {note}", flush=True)
    print(f"  ({time.perf_counter() - begin:.0f} s)")
