"""Runtime cost of live interventions, as paired ratios against plain decoding.

    python scripts/benchmark.py --only runtime
    python scripts/bench_runtime.py            # this section alone

Measures, on random models (no download):
- a decode step with the full stack (steer at 8 layers + ablate 64 neurons + readout of 3
  vectors at every layer) against a plain decode step, on a dispatch-bound tiny model
  (24 layers, hidden 64; goal <= 1.03x) and on a random Qwen2.5-0.5B-shaped model (goal
  <= 1.01x);
- the same decode step with empty handlers at the same sites: the floor that attaching
  alone costs (``personachat.hooks``' dispatching forward), and with empty PyTorch forward
  hooks there instead (PyTorch's hooked call path), the design ``hooks`` replaced;
- a side-by-side pair (unsteered + steered rows in one batch) against one steered reply, through
  ``ChatEngine`` on the tiny model (goal <= 1.25x; two separate runs would cost 2x).

Times are CPU time with one intra-op thread (``time.thread_time`` for decode steps,
``time.process_time`` for whole replies, whose generation runs in a worker thread): on a
machine shared with other jobs, wall-clock ratios of 1-3% drown in scheduling noise.

Plain and intervened work alternates A/B, B/A in this process (decode steps one by one, each
side with its own KV cache; replies one by one); each pair gives a ratio and the median ratio is
reported, so machine noise hits both sides alike.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Literal

import torch

from personachat.chat import ChatEngine, GenerationSettings
from personachat.hooks import Handler, Site, intervene, registered
from personachat.interventions import AblationSpec, SteeringSpec, build_plan
from personachat.model import LoadedModel, wrap_model
from personachat.model.tiny import tiny_model, tiny_tokenizer
from personachat.records import PersonaVector

Row = tuple[str, float, str]
PERSONAS = ("pirate", "philosopher", "cynic")


def qwen05_shaped() -> LoadedModel:
    """A random model with Qwen2.5-0.5B's shapes (24 layers, hidden 896, MLP 4864)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "qwen2",
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return wrap_model(model, tiny_tokenizer(), "random-qwen2.5-0.5b-shape")


def random_vectors(lm: LoadedModel) -> dict[str, PersonaVector]:
    g = torch.Generator().manual_seed(0)
    shape = (lm.info.n_layers, lm.info.hidden_size)
    return {
        p: PersonaVector(lm.info.model_id, p, torch.randn(shape, generator=g) * 0.01)
        for p in PERSONAS
    }


def full_stack(lm: LoadedModel) -> dict[str, object]:
    """Steer at 8 layers + ablate 64 neurons (8 at each of 8 layers) + read out 3 vectors."""
    n = lm.info.n_layers
    steer_layers = f"{n // 2 - 4}-{n // 2 + 3}:1"
    neurons = ",".join(f"{layer}:{8 * k}-{8 * k + 7}" for k, layer in enumerate(range(4, 20, 2)))
    return {
        "steering": SteeringSpec({"pirate": 0.7, "philosopher": 0.5}, layers=steer_layers),
        "ablation": AblationSpec(neurons=neurons),
        "readout": list(PERSONAS),
    }


class EmptyHandler:
    """Does nothing at the given sites: the floor cost of having hooks there at all."""

    def __init__(self, keys: list[tuple[Site, int]]) -> None:
        self.keys = keys

    def wants(self) -> list[tuple[Site, int]]:
        return self.keys

    def __call__(self, site: Site, layer: int, x: torch.Tensor) -> None:
        return None


def torch_hooks(lm: LoadedModel, keys: Sequence[tuple[Site, int]]) -> AbstractContextManager[Any]:
    """Empty PyTorch forward hooks at the same sites: what ``intervene`` would cost with them."""
    specs: list[tuple[torch.nn.Module, Literal["forward", "forward_pre"], Callable[..., Any]]] = []
    for site, layer in keys:
        if site == "residual":
            specs.append((lm.sites.layers[layer], "forward", lambda m, a, o: None))
        else:
            specs.append((lm.sites.mlp_down[layer], "forward_pre", lambda m, a: None))
    return registered(specs)


def decode_pairs(
    lm: LoadedModel,
    handlers: Callable[[], Sequence[Handler]],
    steps: int,
    around: Callable[[], AbstractContextManager[Any]] | None = None,
) -> tuple[list[float], list[float]]:
    """CPU seconds of ``steps`` plain and hooked decode steps, alternating step by step.

    Two greedy decodes run side by side, each with its own KV cache: a plain one and one under
    ``handlers()`` (and inside ``around()`` if given; both set up outside the timed region).
    Their steps alternate, A/B then B/A. Time is this thread's CPU time (one intra-op thread),
    so other processes on a shared machine do not count.
    """
    ids = torch.arange(3, 11).unsqueeze(0)
    hooked = list(handlers())
    plain: list[float] = []
    stacked: list[float] = []

    def step(out: Any, chain: list[Handler], sink: list[float]) -> Any:
        nxt = out.logits[:, -1:].argmax(-1)
        ctx = around() if around is not None and sink is stacked else nullcontext()
        with intervene(lm.sites, chain), ctx:
            start = time.thread_time()
            out = lm.model(nxt, past_key_values=out.past_key_values, use_cache=True)
            sink.append(time.thread_time() - start)
        return out

    with torch.no_grad():
        out_a = lm.model(ids, use_cache=True)
        with intervene(lm.sites, hooked):
            out_b = lm.model(ids, use_cache=True)
        for i in range(steps):
            if i % 2 == 0:
                out_a = step(out_a, [], plain)
                out_b = step(out_b, hooked, stacked)
            else:
                out_b = step(out_b, hooked, stacked)
                out_a = step(out_a, [], plain)
    return plain, stacked


def decode_rows(name: str, lm: LoadedModel, goal: float, steps: int) -> list[Row]:
    vectors = random_vectors(lm)

    def stack() -> list[Handler]:
        return build_plan(lm, vectors, **full_stack(lm)).handlers  # type: ignore[arg-type]

    keys = sorted({key for handler in stack() for key in handler.wants()})
    decode_pairs(lm, stack, 4)  # warm up
    plain, stacked = decode_pairs(lm, stack, steps)
    plain_again, empty = decode_pairs(lm, lambda: [EmptyHandler(keys)], steps)
    plain_torch, hooked = decode_pairs(lm, list, steps, around=lambda: torch_hooks(lm, keys))
    ratio = statistics.median(b / a for a, b in zip(plain, stacked, strict=True))
    floor = statistics.median(b / a for a, b in zip(plain_again, empty, strict=True))
    torch_floor = statistics.median(b / a for a, b in zip(plain_torch, hooked, strict=True))
    return [
        (
            f"{name}: plain decode step (CPU ms)",
            statistics.median(plain) * 1e3,
            f"median of {steps}",
        ),
        (
            f"{name}: full-stack decode step (CPU ms)",
            statistics.median(stacked) * 1e3,
            "steer 8 + ablate 64 + readout 3",
        ),
        (f"{name}: full stack / plain (paired ratio)", ratio, f"goal <= {goal:.2f}"),
        (
            f"{name}: {len(keys)} empty handlers / plain (paired ratio)",
            floor,
            "floor: same sites, handlers do nothing",
        ),
        (
            f"{name}: {len(keys)} empty PyTorch hooks / plain (paired ratio)",
            torch_floor,
            "what forward hooks would cost there",
        ),
    ]


def paired(a: Callable[[], float], b: Callable[[], float], reps: int) -> tuple[float, float, float]:
    """Median of A, median of B, median of the per-pair ratios B/A (A/B then B/A order)."""
    a(), b()  # warm up
    times_a, times_b, ratios = [], [], []
    for i in range(reps):
        if i % 2 == 0:
            ta, tb = a(), b()
        else:
            tb, ta = b(), a()
        times_a.append(ta)
        times_b.append(tb)
        ratios.append(tb / ta)
    return statistics.median(times_a), statistics.median(times_b), statistics.median(ratios)


def pair_rows(name: str, lm: LoadedModel, tokens: int, reps: int) -> list[Row]:
    engine = ChatEngine(lm, random_vectors(lm))
    stack = full_stack(lm)
    settings = GenerationSettings(max_new_tokens=tokens, min_new_tokens=tokens)
    messages = [{"role": "user", "content": "Tell me about the ocean"}]

    def timed(side_by_side: bool) -> float:  # process CPU time: the worker thread counts
        start = time.process_time()
        engine.reply(messages, settings, side_by_side=side_by_side, **stack)  # type: ignore[arg-type]
        return time.process_time() - start

    one, _, ratio = paired(lambda: timed(False), lambda: timed(True), reps)
    return [
        (f"{name}: one steered reply, {tokens} tokens (CPU ms)", one * 1e3, "full stack"),
        (
            f"{name}: side-by-side pair / one reply (paired ratio)",
            ratio,
            "goal <= 1.25 (2 runs: 2)",
        ),
    ]


def run() -> list[Row]:
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # CPU time of one thread: immune to other processes' load
        tiny = tiny_model("qwen2", n_layers=24, hidden=64)
        rows = decode_rows("tiny 24x64", tiny, 1.03, steps=300)
        rows += pair_rows("tiny 24x64", tiny, tokens=16, reps=9)
        rows += decode_rows("qwen2.5-0.5b-shaped", qwen05_shaped(), 1.01, steps=40)
    finally:
        torch.set_num_threads(threads)
    return rows


if __name__ == "__main__":
    begin = time.perf_counter()
    for row_name, value, note in run():
        print(f"  {row_name:<60} {value:>10.3f}  {note}", flush=True)
    print(f"  ({time.perf_counter() - begin:.0f} s)")
