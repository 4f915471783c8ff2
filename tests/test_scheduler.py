"""The scheduler: many sessions' requests as rows of shared forwards, each equal to its solo run.

Every reply through the scheduler is compared with the same request run alone through
``ChatEngine.stream`` (its own ``generate``): greedy tokens and texts equal, readouts within
float rounding. Threads join the running batch at staggered decode steps (counted by a hook on
the model), so prompts run while others decode and requests of different lengths share steps.
"""

from __future__ import annotations

import functools
import logging
import queue
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import pytest
import torch

from personachat.chat import ChatEngine, ChatUpdate, GenerationSettings, Scheduler
from personachat.chat.job import END, Failed, Request, prepare, run_generate
from personachat.hooks import Site, StopForward, hook_count, intervene
from personachat.interventions import AblationSpec, CapSpec, DirectionSpec, SteeringSpec, build_plan
from personachat.model import LoadedModel, load_model
from personachat.model.tiny import tiny_model
from personachat.records import NeuronSet, PersonaVector

cached_tiny = functools.cache(tiny_model)
PROMPTS = [
    "Tell me about the ocean",
    "Hi",
    "What is the capital of France? Answer in one word, please.",
    "stars",
    "cooking, history and the numbers 1 2 3 4 5 6 7 8 9",
    "Arr, matey!",
    "I think, therefore I am. What am I?",
    "Paris",
    "mathematics",
    "You are a helpful assistant. Tell me about history.",
]
Kwargs = dict[str, Any]


def tiny_engines(arch: str) -> tuple[ChatEngine, ChatEngine]:
    """A plain engine and one through a fresh scheduler, over one tiny model with 3 personas
    (baseline means for mean directional ablation) and a neuron set with means."""
    lm = cached_tiny(arch)
    g = torch.Generator().manual_seed(3)
    shape = (lm.info.n_layers, lm.info.hidden_size)
    vectors = [
        PersonaVector(
            lm.info.model_id,
            name,
            torch.randn(shape, generator=g),
            baseline_mean=torch.randn(shape, generator=g),
        )
        for name in ("pirate", "cynic", "philosopher")
    ]
    width = lm.info.mlp_width
    units = [(layer, (7 * layer + 3 * k) % width) for layer in range(3) for k in range(4)]
    nset = NeuronSet(
        lm.info.model_id,
        "pirate.mean",
        "mlp_hidden",
        [la for la, _ in units],
        [i for _, i in units],
        [1.0] * len(units),
        means=[0.5 - 0.1 * k for k in range(len(units))],
    )
    plain = ChatEngine(lm, vectors, [nset])
    return plain, ChatEngine(lm, vectors, [nset], scheduler=Scheduler(lm))


def mixed_requests() -> list[Kwargs]:
    """Twelve requests with different settings, all of which a plan can express."""
    return [
        {"steering": SteeringSpec({"pirate": 1.0}, layers="0-2:2")},
        {},
        {"ablation": AblationSpec(neurons="1:3,1:9,2:5"), "readout": ["pirate"]},
        {"direction": DirectionSpec("cynic", layers="all", mode="zero")},
        {
            "steering": SteeringSpec(
                {"pirate": 1.0, "cynic": -0.5}, layers="1:3", positions="prompt", last_n=3
            ),
            "side_by_side": True,
            "readout": ["cynic"],
        },
        {
            "steering": SteeringSpec({"cynic": 2.0}, layers="all", positions="generated"),
            "ablation": AblationSpec(neurons="0:1-5", positions="generated"),
        },
        {"readout": ["pirate", "cynic", "philosopher"]},
        {"direction": DirectionSpec("pirate", layers="1-2", mode="mean"), "side_by_side": True},
        {"ablation": AblationSpec(neuron_set="pirate.mean", mode="mean", positions="prompt")},
        {
            "steering": SteeringSpec({"philosopher": -1.5}, layers="2", positions="prompt"),
            "direction": DirectionSpec("cynic", layers="0", mode="mean", positions="generated"),
            "readout": ["philosopher"],
        },
        {"cap": CapSpec("pirate", layers="all", side="below", threshold=0.0, percentile=None)},
        {
            "steering": SteeringSpec({"cynic": 1.0}, layers="0-1:2"),
            "cap": CapSpec("cynic", layers="1", threshold=0.5, percentile=None),
            "side_by_side": True,
            "readout": ["cynic"],
        },
    ]


def settings_for(i: int) -> GenerationSettings:
    return GenerationSettings(max_new_tokens=40 if i == 0 else 5 + 3 * i)


def messages(i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]


class Steps:
    """Counts the model's decode forwards (one token per row), for threads to join at a step,
    and records every forward's batch shape."""

    def __init__(self) -> None:
        self.count = 0
        self.shapes: list[tuple[int, int]] = []
        self.cond = threading.Condition()

    def __call__(self, module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        shape = tuple(kwargs["input_ids"].shape)
        with self.cond:
            self.shapes.append((int(shape[0]), int(shape[1])))
            if shape[1] == 1:
                self.count += 1
                self.cond.notify_all()

    def wait(self, n: int, timeout: float = 5.0) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.count >= n, timeout)


@contextmanager
def counting(lm: LoadedModel) -> Iterator[Steps]:
    steps = Steps()
    handle = lm.model.register_forward_pre_hook(steps, with_kwargs=True)
    try:
        yield steps
    finally:
        handle.remove()


def concurrently(
    engine: ChatEngine, calls: Sequence[tuple[list[dict[str, str]], GenerationSettings, Kwargs]]
) -> tuple[list[ChatUpdate | BaseException], Steps]:
    """Run ``calls`` through ``engine`` from one thread each; thread i joins at decode step 2i."""
    results: list[ChatUpdate | BaseException | None] = [None] * len(calls)
    with counting(engine.lm) as steps:

        def work(i: int) -> None:
            steps.wait(2 * i)
            msgs, settings, kwargs = calls[i]
            try:
                results[i] = engine.reply(msgs, settings, **kwargs)
            except BaseException as err:  # compared by the test
                results[i] = err

        threads = [threading.Thread(target=work, args=(i,)) for i in range(len(calls))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert all(r is not None for r in results)
    return [r for r in results if r is not None], steps


def assert_same_reply(got: ChatUpdate | BaseException, alone: ChatUpdate) -> None:
    assert isinstance(got, ChatUpdate), got
    assert got.tokens == alone.tokens and got.text == alone.text
    assert got.baseline_tokens == alone.baseline_tokens
    assert got.baseline_text == alone.baseline_text
    assert got.stopped == alone.stopped and got.done
    assert got.steered_layers == alone.steered_layers
    for a, b in ((got.readout, alone.readout), (got.baseline_readout, alone.baseline_readout)):
        assert (a is None) == (b is None)
        if a is not None and b is not None:
            assert a.tokens == b.tokens and a.prompt_len == b.prompt_len
            torch.testing.assert_close(
                a.projections, b.projections, equal_nan=True, rtol=1e-4, atol=1e-4
            )


def assert_shared(steps: Steps, rows: int) -> None:
    """Decode steps really ran many rows at once, and prompts ran while others decoded."""
    decode = [b for b, t in steps.shapes if t == 1]
    assert max(decode) >= rows, steps.shapes
    first_decode = next(i for i, (_, t) in enumerate(steps.shapes) if t == 1)
    later_prompts = [s for s in steps.shapes[first_decode:] if s[1] > 1]
    assert len(later_prompts) >= 3, steps.shapes


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_twelve_staggered_mixed_requests_equal_their_solo_replies(arch: str) -> None:
    plain, shared = tiny_engines(arch)
    lm = plain.lm
    before = hook_count(lm.model)
    calls = [(messages(i), settings_for(i), kw) for i, kw in enumerate(mixed_requests())]
    alone = [plain.reply(m, s, **kw) for m, s, kw in calls]
    assert len({r.tokens for r in alone}) > 6  # the settings really differ
    got, steps = concurrently(shared, calls)
    for g, a in zip(got, alone, strict=True):
        assert_same_reply(g, a)
    assert_shared(steps, rows=5)
    assert hook_count(lm.model) == before


def test_sampling_penalties_and_min_tokens_match_solo_and_stay_seeded() -> None:
    plain, shared = tiny_engines("llama")
    steer = SteeringSpec({"pirate": 1.0}, layers="1:2")
    calls = [
        (messages(i), GenerationSettings(max_new_tokens=12, temperature=0.8 + 0.1 * i, seed=i), kw)
        for i, kw in enumerate([{}, {"steering": steer}, {"side_by_side": True, "steering": steer}])
    ]
    calls += [
        (messages(5), GenerationSettings(max_new_tokens=10, repetition_penalty=1.5), {}),
        (messages(6), GenerationSettings(max_new_tokens=10, min_new_tokens=10), {}),
        (messages(7), GenerationSettings(max_new_tokens=20, top_p=0.5, temperature=1.0), {}),
    ]
    alone = [plain.reply(m, s, **kw) for m, s, kw in calls]
    got, _ = concurrently(shared, calls)
    for g, a in zip(got, alone, strict=True):
        assert_same_reply(g, a)
    again, _ = concurrently(shared, calls[::-1])
    assert [r.tokens for r in again if isinstance(r, ChatUpdate)] == [r.tokens for r in alone][::-1]


class StopAt:
    """An extra handler that sets ``event`` on its n-th call (call 1 is the prompt's forward),
    so the request ends after exactly n tokens whatever the thread timing."""

    def __init__(self, event: threading.Event, n: int) -> None:
        self.event, self.n, self.calls = event, n, 0

    def wants(self) -> Iterable[tuple[Site, int]]:
        return [("residual", 1)]

    def __call__(self, site: Site, layer: int, x: torch.Tensor) -> None:
        self.calls += 1
        if self.calls == self.n:
            self.event.set()


class Boom(RuntimeError):
    pass


class RaiseAt(StopAt):
    def __call__(self, site: Site, layer: int, x: torch.Tensor) -> None:
        self.calls += 1
        if self.calls >= self.n:
            raise Boom(f"hook failure on call {self.calls}")


def test_a_stopped_and_two_failing_requests_end_alone_while_the_others_complete() -> None:
    plain, shared = tiny_engines("llama")
    lm = plain.lm
    before = hook_count(lm.model)
    requests = mixed_requests()[:8]
    calls = [(messages(i), settings_for(i), kw) for i, kw in enumerate(requests)]
    alone = [plain.reply(m, s, **kw) for m, s, kw in calls]
    stop = threading.Event()
    calls[3] = (calls[3][0], GenerationSettings(max_new_tokens=200), {"stop": stop})
    calls[3][2]["handlers"] = [StopAt(stop, 7)]
    boom = RaiseAt(threading.Event(), 4)  # mid-way, in a shared step
    calls[5] = (calls[5][0], calls[5][1], {**calls[5][2], "handlers": [boom]})
    early = RaiseAt(threading.Event(), 1)  # in its own prompt's forward
    calls[6] = (calls[6][0], calls[6][1], {**calls[6][2], "handlers": [early]})
    got, _ = concurrently(shared, calls)
    stopped = got[3]
    assert isinstance(stopped, ChatUpdate) and stopped.stopped and len(stopped.tokens) == 7
    solo_stop = threading.Event()
    solo = plain.reply(
        messages(3),
        GenerationSettings(max_new_tokens=200),
        stop=solo_stop,
        handlers=[StopAt(solo_stop, 7)],
    )
    assert stopped.tokens == solo.tokens
    assert isinstance(got[5], Boom) and isinstance(got[6], Boom)
    for i, (g, a) in enumerate(zip(got, alone, strict=True)):
        if i not in (3, 5, 6):
            assert_same_reply(g, a)
    assert hook_count(lm.model) == before


def test_a_reader_that_leaves_early_frees_its_rows_and_hooks() -> None:
    plain, shared = tiny_engines("llama")
    lm = plain.lm
    before = hook_count(lm.model)
    long = GenerationSettings(max_new_tokens=60)
    spec = SteeringSpec({"pirate": 1.0}, layers="0-2:2")
    solo = plain.reply(messages(0), long, steering=spec)
    streams = [shared.stream(messages(i), long, steering=spec, readout=["cynic"]) for i in range(3)]
    for n, _update in enumerate(streams[1]):
        if n == 2:
            break
    streams[1].close()  # returns once the scheduler has let its rows go
    finals = [list(s)[-1] for s in (streams[0], streams[2])]
    assert finals[0].tokens == solo.tokens
    assert hook_count(lm.model) == before
    never = shared.stream(messages(0), long)  # never iterated: starts nothing
    del never
    assert hook_count(lm.model) == before


def test_a_scheduled_request_runs_its_own_interventions_only() -> None:
    plain, shared = tiny_engines("llama")
    spec = SteeringSpec({"pirate": 1.0}, layers="0-2:2")
    settings = GenerationSettings(max_new_tokens=8)
    outer = build_plan(plain.lm, plain.vectors, steering=SteeringSpec({"cynic": 3.0}, layers="all"))
    with intervene(plain.lm.sites, outer.handlers):
        inside = shared.reply(messages(0), settings, steering=spec)
        wrapped = plain.reply(messages(0), settings, steering=spec)
    assert inside.tokens == plain.reply(messages(0), settings, steering=spec).tokens
    assert wrapped.tokens != inside.tokens  # the plain engine's thread carries the context


def test_sweep_and_side_by_side_through_the_scheduler_equal_the_plain_engine() -> None:
    plain, shared = tiny_engines("gpt2")
    spec = SteeringSpec({"pirate": 1.0, "cynic": 0.5}, layers="1:1.5, 2:0.5")
    settings = GenerationSettings(max_new_tokens=10)
    want = plain.sweep(messages(0), settings, spec, [-2.0, 0.0, 2.0], readout=["pirate"])
    got = shared.sweep(messages(0), settings, spec, [-2.0, 0.0, 2.0], readout=["pirate"])
    for g, w in zip(got, want, strict=True):
        assert_same_reply(g, w)


def test_a_model_whose_cache_cannot_merge_runs_one_at_a_time(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="personachat.chat.scheduler"):
        plain, shared = tiny_engines("mistral")
    assert "one request at a time" in caplog.text and "DynamicSlidingWindowLayer" in caplog.text
    calls = [(messages(i), settings_for(i), kw) for i, kw in enumerate(mixed_requests()[:4])]
    alone = [plain.reply(m, s, **kw) for m, s, kw in calls]
    got, steps = concurrently(shared, calls)
    for g, a in zip(got, alone, strict=True):
        assert_same_reply(g, a)
    assert max(b for b, _ in steps.shapes) <= 2  # never more rows than one request's


@functools.cache
def demo_engines() -> tuple[ChatEngine, ChatEngine]:
    from personachat.store import Store

    lm = load_model("store/models/demo")
    store = Store("store", read_only=True)
    personas = ("pirate", "poet", "robot", "cynic")
    vectors = [
        store.load_vector("store/models/demo", p, positions="question_span") for p in personas
    ]
    sets = [store.load_neurons("store/models/demo", "pirate_vs_default.mlp_hidden.patching")]
    return ChatEngine(lm, vectors, sets), ChatEngine(lm, vectors, sets, scheduler=Scheduler(lm))


def demo_requests() -> list[Kwargs]:
    return [
        {"steering": SteeringSpec({"pirate": 1.0}, layers="band", strength=4.0)},
        {},
        {
            "steering": SteeringSpec({"poet": 2.0}, layers="all", units="calibrated"),
            "side_by_side": True,
        },
        {
            "ablation": AblationSpec(
                neuron_set="pirate_vs_default.mlp_hidden.patching", mode="mean", positions="prompt"
            )
        },
        {
            "direction": DirectionSpec("pirate", layers="all", mode="mean"),
            "readout": ["pirate", "poet"],
        },
        {
            "steering": SteeringSpec(
                {"robot": 3.0, "cynic": -1.0}, layers="1-2:3", positions="generated"
            )
        },
        {
            "readout": ["robot"],
            "side_by_side": True,
            "steering": SteeringSpec({"robot": 6.0}, layers="1"),
        },
        {"steering": SteeringSpec({"cynic": 5.0}, layers="0-3:2", positions="prompt", last_n=4)},
    ]


def test_demo_model_eight_staggered_requests_equal_their_solo_replies() -> None:
    plain, shared = demo_engines()
    lm = plain.lm
    before = hook_count(lm.model)
    questions = ["What do you like to eat?", "Tell me about the sea.", "Who are you?", "Hello!"]
    calls = [
        ([{"role": "user", "content": questions[i % 4]}], settings_for(i), kw)
        for i, kw in enumerate(demo_requests())
    ]
    alone = [plain.reply(m, s, **kw) for m, s, kw in calls]
    assert len({r.text for r in alone}) > 5
    got, steps = concurrently(shared, calls)
    for g, a in zip(got, alone, strict=True):
        assert_same_reply(g, a)
    assert_shared(steps, rows=4)
    assert hook_count(lm.model) == before


class Calls:
    """An extra handler that counts its calls at one layer's residual output."""

    def __init__(self, layer: int) -> None:
        self.layer, self.calls = layer, 0

    def wants(self) -> Iterable[tuple[Site, int]]:
        return [("residual", self.layer)]

    def __call__(self, site: Site, layer: int, x: torch.Tensor) -> None:
        self.calls += 1


def test_a_stop_while_the_prompt_runs_ends_it_before_its_last_layer() -> None:
    _, shared = tiny_engines("llama")
    lm = shared.lm
    before = hook_count(lm.model)
    stop = threading.Event()
    last = Calls(lm.info.n_layers - 1)
    long = [{"role": "user", "content": " ".join(PROMPTS * 8)}]
    handlers = [StopAt(stop, 1), last]  # Stop pressed while layer 1 of the prompt runs
    reply = shared.reply(long, GenerationSettings(max_new_tokens=50), stop=stop, handlers=handlers)
    assert lm.info.n_layers > 2
    assert reply.stopped and reply.tokens == () and reply.text == ""
    assert last.calls == 0  # the layers after the stop never ran
    assert hook_count(lm.model) == before
    stop.set()  # a request stopped before its prompt runs runs nothing
    again = shared.reply(long, GenerationSettings(max_new_tokens=50), stop=stop, handlers=[last])
    assert again.stopped and again.tokens == () and last.calls == 0


@pytest.mark.parametrize("path", ["scheduler one at a time", "engine alone"])
def test_a_stop_while_a_lone_generate_runs_the_prompt_ends_it_before_its_last_layer(
    path: str,
) -> None:
    """The path through transformers' ``generate`` (a model whose cache cannot merge, or an
    engine without a scheduler) stops inside the prompt's forward too: no token, no failure."""
    plain, shared = tiny_engines("mistral")
    engine = shared if path == "scheduler one at a time" else plain
    assert shared.scheduler is not None and shared.scheduler.one_at_a_time
    lm = engine.lm
    before = hook_count(lm.model)
    stop = threading.Event()
    last = Calls(lm.info.n_layers - 1)
    long = [{"role": "user", "content": " ".join(PROMPTS * 8)}]
    handlers = [StopAt(stop, 1), last]  # Stop pressed while layer 1 of the prompt runs
    settings = GenerationSettings(max_new_tokens=50)
    updates = list(engine.stream(long, settings, stop=stop, handlers=handlers))
    assert lm.info.n_layers > 2
    assert [u.done for u in updates] == [True]  # no partial update: no token came
    assert updates[-1].stopped and updates[-1].tokens == () and updates[-1].text == ""
    assert last.calls == 0  # the layers after the stop never ran
    assert hook_count(lm.model) == before


class Raises(Calls):
    """An extra handler that ends the forward on its own (``StopForward``) at layer 0."""

    def __init__(self) -> None:
        super().__init__(0)

    def __call__(self, site: Site, layer: int, x: torch.Tensor) -> None:
        raise StopForward


def test_a_lone_generate_ends_with_no_token_and_no_failure_when_stopped_in_the_prompt() -> None:
    lm = cached_tiny("mistral")
    request = Request([{"role": "user", "content": "Hi"}], GenerationSettings())
    job = prepare(lm, {}, {}, request, None)
    stop = threading.Event()
    job.extras = (StopAt(stop, 1),)
    sink: queue.Queue[Any] = queue.Queue()
    run_generate(lm, job, sink, [stop])
    assert [sink.get_nowait() for _ in range(sink.qsize())] == [END]
    job.extras = (Raises(),)  # a handler's own StopForward, with no stop asked: a failure
    run_generate(lm, job, sink, [threading.Event()])
    failed, end = (sink.get_nowait() for _ in range(2))
    assert isinstance(failed, Failed) and isinstance(failed.error, StopForward) and end is END
