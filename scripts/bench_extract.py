"""Extraction speed and memory, measured side by side: our capture vs the naive hidden-states loop.

    python scripts/bench_extract.py            # or: python scripts/benchmark.py --only extract

The naive loop is ``model(..., output_hidden_states=True)`` per batch followed by the same
response-span pooling; ours runs the base model without the LM head through
``personachat.hooks`` and stops after the last layer needed. Both see the same padded batches
of the same samples, interleaved, on a random model shaped like Qwen2.5-0.5B (24 layers, hidden
896, MLP 4864, vocab 151936, tied head) on a GPU; on a CPU the same depth at half width and half
vocabulary (hidden 448, MLP 2432, vocab 75968) so that the run stays under two minutes. Goals:
>= 1.4x with all layers, >= 2.5x with the first half. Peak memory is measured for two sample
counts (GPU: ``max_memory_allocated``; CPU: the process's peak RSS in a fresh subprocess).
Times are the best of a few interleaved runs (the least disturbed by other work on the machine).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent

from personachat.activations import CaptureSpec, Sample, build_samples, capture, pad_batch  # noqa: E402
from personachat.model import LoadedModel, wrap_model  # noqa: E402
from personachat.model.tiny import tiny_tokenizer  # noqa: E402

Row = tuple[str, float, str]


def qwen_like(device: torch.device) -> tuple[LoadedModel, str]:
    """A random Qwen2-architecture model: 0.5B-shaped on GPU, half width and vocab on CPU."""
    from transformers import AutoConfig, AutoModelForCausalLM

    full = device.type == "cuda"
    hidden, mlp, vocab = (896, 4864, 151936) if full else (448, 2432, 75968)
    config = AutoConfig.for_model(
        "qwen2",
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=mlp,
        num_hidden_layers=24,
        num_attention_heads=14 if full else 7,
        num_key_value_heads=2 if full else 1,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
    )
    dtype = torch.bfloat16 if full else torch.float32
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).to(device)
    name = "Qwen2.5-0.5B-shaped" if full else "Qwen2.5-0.5B depth, half width+vocab"
    return wrap_model(model, tiny_tokenizer(), name), f"{name}, {dtype}, {device.type}"


def make_samples(lm: LoadedModel, n: int, reply_words: int = 40) -> list[Sample]:
    words = ["the", "ocean", "stars", "Paris", "history", "cooking", "numbers", "matey"]
    convs = []
    for i in range(n):
        reply = " ".join(words[(i + j) % len(words)] for j in range(reply_words + i % 7))
        convs.append((i % 4, "You are a pirate." if i % 2 else "", f"Question {i}?", reply))
    return build_samples(lm.tokenizer, convs, ("response_avg",))


def naive(lm: LoadedModel, samples: Sequence[Sample], batch_size: int) -> torch.Tensor:
    """The baseline: full model with output_hidden_states, then pool every layer."""
    n_layers = lm.sites.n_layers
    sums = torch.zeros((4, n_layers, lm.sites.hidden_size), dtype=torch.float64)
    pad = int(lm.tokenizer.pad_token_id or 0)
    with torch.inference_mode():
        for start in range(0, len(samples), batch_size):
            chunk = samples[start : start + batch_size]
            batch = pad_batch(chunk, pad, "right", lm.device)
            out = lm.model(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                position_ids=batch.position_ids,
                output_hidden_states=True,
            )
            w = torch.zeros(batch.input_ids.shape, device=lm.device)
            for b, s in enumerate(chunk):
                a, e = s.spans[0]
                w[b, a:e] = 1.0 / (e - a)
            hs = torch.stack(out.hidden_states[1:])  # [L, B, T, D]
            pooled = torch.einsum("bt,lbtd->bld", w, hs.float()).double().cpu()
            sums.index_add_(0, torch.tensor([s.persona for s in chunk]), pooled)
    return sums


def ours(lm: LoadedModel, samples: Sequence[Sample], batch_size: int, layers: int) -> torch.Tensor:
    spec = CaptureSpec(layers=tuple(range(layers)))
    with capture(lm, samples, spec, 4, batch_size=batch_size, progress=False) as cap:
        return cap.sums


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    torch.set_num_threads(1)
    from personachat.activations import CaptureSpec, build_samples, capture
    from personachat.model.tiny import tiny_model
    lm = tiny_model("llama", n_layers=4, hidden=256)
    conv = (0, "You are a pirate.", "Tell me about the ocean?", "Arr, matey! Paris. " * 6)
    spec = CaptureSpec(layers=(0, 1, 2, 3))

    def peak_mb():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM"):
                return int(line.split()[1]) / 1024

    out = []
    for n in (16, 64, 64, 512):
        samples = build_samples(lm.tokenizer, [conv] * n, spec.positions)
        with capture(lm, samples, spec, 1, batch_size=16, progress=False):
            pass
        out.append((n, peak_mb(), len(samples[0].ids)))
    print(json.dumps(out))
    """
)


def memory_rows(lm: LoadedModel, device: torch.device) -> list[Row]:
    if device.type == "cuda":
        rows = []
        for n in (32, 256):
            samples = make_samples(lm, n)
            torch.cuda.reset_peak_memory_stats(device)
            ours(lm, samples, 16, lm.sites.n_layers)
            peak = torch.cuda.max_memory_allocated(device) / 2**20
            rows.append((f"extract: peak GPU memory, {n} samples (MiB)", peak, "all layers"))
        growth = rows[1][1] - rows[0][1]
        rows.append(("extract: peak GPU memory growth 32 -> 256 samples (MiB)", growth, "goal ~0"))
        return rows
    proc = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if proc.returncode != 0:
        return [("extract: peak memory subprocess failed", float("nan"), proc.stderr[-200:])]
    *_, (n1, peak1, _), (n2, peak2, tokens) = json.loads(proc.stdout)
    per_token = (n2 - n1) * 4 * tokens * 256 * 4 / 2**20
    return [
        (f"extract: peak RSS, {n1} samples (MiB)", peak1, "tiny llama, 4 layers, hidden 256"),
        (f"extract: peak RSS, {n2} samples (MiB)", peak2, "same model, 16x the samples"),
        (
            f"extract: peak RSS growth {n1} -> {n2} samples (MiB)",
            peak2 - peak1,
            f"goal ~0; keeping per-token activations would add {per_token:.0f} MiB",
        ),
    ]


def run() -> list[Row]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    lm, what = qwen_like(device)
    n, batch, repeats = (128, 16, 5) if device.type == "cuda" else (8, 8, 5)
    samples = make_samples(lm, n, 40 if device.type == "cuda" else 24)
    half = lm.sites.n_layers // 2
    # warm up (allocator, kernels) and check both paths agree on the layers they share
    ref = naive(lm, samples[:batch], batch)
    got = ours(lm, samples[:batch], batch, lm.sites.n_layers)[0]
    agree = float((ref[:, :-1] - got[:, :-1]).abs().max() / ref[:, :-1].abs().max())
    times: dict[str, list[float]] = {"naive": [], "all": [], "half": []}
    for _ in range(repeats):
        times["naive"].append(timed(lambda: naive(lm, samples, batch), device))
        times["all"].append(timed(lambda: ours(lm, samples, batch, lm.sites.n_layers), device))
        times["half"].append(timed(lambda: ours(lm, samples, batch, half), device))
    med = {k: min(v) for k, v in times.items()}  # the least disturbed run of each
    tokens = sum(len(s.ids) for s in samples)
    note = f"{what}; {n} samples, {tokens} tokens, batch {batch}, best of {repeats}"
    rows: list[Row] = [
        ("extract: naive output_hidden_states loop (s)", med["naive"], note),
        ("extract: ours, all 24 layers (s)", med["all"], "no LM head, hooks"),
        (f"extract: ours, first {half} layers (s)", med["half"], "stops after layer 11"),
        ("extract: speed-up vs naive, all layers (x)", med["naive"] / med["all"], "goal >= 1.4"),
        ("extract: speed-up vs naive, first half (x)", med["naive"] / med["half"], "goal >= 2.5"),
        ("extract: max relative difference ours vs naive", agree, "layers 0..22, same sums"),
    ]
    return rows + memory_rows(lm, device)


if __name__ == "__main__":
    torch.set_num_threads(max(1, min(4, torch.get_num_threads())))
    for name, value, note in run():
        print(f"{name:<58} {value:>10.3f}  {note}", flush=True)
