"""Hooks under the chat runtime: none left behind, none leaked, none shared between sessions."""

from __future__ import annotations

import gc
import threading
import weakref
from collections.abc import Iterable

import pytest
import torch

from personachat.chat import ChatEngine, GenerationSettings, engine as chat
from personachat.hooks import Site, hook_count, intervene
from personachat.interventions import AblationSpec, SteeringSpec, build_plan
from personachat.interventions.handlers import Ablate, Readout, Steer
from personachat.records import PersonaVector
from tests.conftest import tiny

MESSAGES = [{"role": "user", "content": "Tell me about the stars"}]
SHORT = GenerationSettings(max_new_tokens=6)
STEER = SteeringSpec({"pirate": 1.0, "cynic": -0.5}, layers="0-2:2")
ABLATE = AblationSpec(neurons="0:1,1:2-5")


class Boom(RuntimeError):
    pass


class RaiseAfter:
    """A handler that raises on its n-th call (inside a hook, mid-generation)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.calls = 0

    def wants(self) -> Iterable[tuple[Site, int]]:
        return [("residual", 1)]

    def __call__(self, site: Site, layer: int, x: torch.Tensor) -> None:
        self.calls += 1
        if self.calls >= self.n:
            raise Boom(f"hook failure on call {self.calls}")


def engine_for(arch: str = "llama") -> ChatEngine:
    lm = tiny(arch)
    g = torch.Generator().manual_seed(2)
    shape = (lm.info.n_layers, lm.info.hidden_size)
    vectors = [
        PersonaVector(lm.info.model_id, n, torch.randn(shape, generator=g))
        for n in ("pirate", "cynic")
    ]
    return ChatEngine(lm, vectors)


def live(kind: type) -> int:
    gc.collect()
    return sum(1 for obj in gc.get_objects() if type(obj) is kind)


def test_hook_counts_normal_nested_exception() -> None:
    engine = engine_for()
    lm = engine.lm
    before = hook_count(lm.model)
    plan = build_plan(lm, engine.vectors, steering=STEER, ablation=ABLATE, readout=["pirate"])
    ids = engine.prompt_ids(MESSAGES)
    with intervene(lm.sites, plan.handlers):
        inside = hook_count(lm.model)
        with torch.no_grad():
            lm.model(ids)
        inner = build_plan(lm, engine.vectors, readout=["cynic"])
        with intervene(lm.sites, inner.handlers):
            assert hook_count(lm.model) == inside + lm.info.n_layers
        assert hook_count(lm.model) == inside
    assert inside == before + lm.info.n_layers + 2  # residual at 3 layers, mlp_hidden at 2
    assert hook_count(lm.model) == before
    with pytest.raises(Boom), intervene(lm.sites, [*plan.handlers, RaiseAfter(1)]):
        with torch.no_grad():
            lm.model(ids)
    assert hook_count(lm.model) == before


@pytest.mark.slow
def test_cancelled_and_raising_generations_leave_nothing_behind() -> None:
    engine = engine_for()
    lm = engine.lm
    before = hook_count(lm.model)
    threads_before = threading.active_count()
    refs: list[weakref.ref[object]] = []
    long = GenerationSettings(max_new_tokens=50)
    for i in range(100):
        if i % 2 == 0:  # consumer stops iterating midway
            it = engine.stream(MESSAGES, long, steering=STEER, ablation=ABLATE, readout=["pirate"])
            for n, _update in enumerate(it):
                if n == 2:
                    assert hook_count(lm.model) > before  # generation is live, hooks are on
                    break
            it.close()
        else:  # a hook raises mid-generation
            boom = RaiseAfter(3)
            refs.append(weakref.ref(boom))
            with pytest.raises(Boom):
                engine.reply(MESSAGES, long, steering=STEER, readout=["pirate"], handlers=[boom])
            del boom
        assert hook_count(lm.model) == before
    assert threading.active_count() == threads_before
    gc.collect()
    assert all(ref() is None for ref in refs)
    for kind in (Steer, Readout, Ablate, chat._Job):
        assert live(kind) == 0, kind
    # the engine still works and gives the same reply as before
    assert engine.reply(MESSAGES, SHORT).tokens == engine.reply(MESSAGES, SHORT).tokens


@pytest.mark.slow
def test_dropping_a_stream_unregisters_its_hooks() -> None:
    engine = engine_for("gpt2")
    before = hook_count(engine.lm.model)
    it = engine.stream(MESSAGES, GenerationSettings(max_new_tokens=40), steering=STEER)
    next(it)
    assert hook_count(engine.lm.model) > before
    del it  # refcount drops to zero: the generator closes, joins its worker, removes its hooks
    gc.collect()
    assert hook_count(engine.lm.model) == before
    assert live(Steer) == 0


def test_stream_never_iterated_starts_nothing() -> None:
    engine = engine_for()
    before = hook_count(engine.lm.model)
    threads_before = threading.active_count()
    it = engine.stream(MESSAGES, SHORT, steering=STEER)
    assert hook_count(engine.lm.model) == before and threading.active_count() == threads_before
    del it


def test_two_threads_with_different_steering_get_their_solo_outputs() -> None:
    engine = engine_for("gpt2")
    specs = [SteeringSpec({"pirate": 2.0}, layers="all"), SteeringSpec({"cynic": 3.0}, layers="1")]
    settings = GenerationSettings(max_new_tokens=12)
    solo = [engine.reply(MESSAGES, settings, steering=s) for s in specs]
    assert solo[0].tokens != solo[1].tokens
    for _ in range(3):
        got: list[tuple[int, ...]] = [(), ()]
        barrier = threading.Barrier(2)

        def work(i: int, barrier: threading.Barrier = barrier, got: list = got) -> None:
            barrier.wait()
            got[i] = engine.reply(MESSAGES, settings, steering=specs[i]).tokens

        threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert got == [solo[0].tokens, solo[1].tokens]
