"""Extraction speed and memory, measured side by side: our capture vs the naive hidden-states
loop, and whole extractions: replies and activations in one pass vs generate-then-capture.

    python scripts/bench_extract.py            # or: python scripts/benchmark.py --only extract
    python scripts/bench_extract.py --part e2e # the whole extractions only

The naive loop is ``model(..., output_hidden_states=True)`` per batch followed by the same
response-span pooling; ours runs the base model without the LM head through
``personachat.hooks`` and stops after the last layer needed. Both see the same padded batches
of the same samples, interleaved, on a random model shaped like Qwen2.5-0.5B (24 layers, hidden
896, MLP 4864, vocab 151936, tied head) on a GPU; on a CPU the same depth at half width and half
vocabulary (hidden 448, MLP 2432, vocab 75968) so that the run stays under two minutes. Goals:
>= 1.4x with all layers, >= 2.5x with the first half. Peak memory is measured for two sample
counts (GPU: ``max_memory_allocated``; CPU: the process's peak RSS in a fresh subprocess).
Times are the best of a few interleaved runs (the least disturbed by other work on the machine).

The whole extractions (``--part e2e``) run a slice of the README's first example, 4 personas of
the built-in ``personas`` dataset (``default`` the baseline) x 5 questions, 32 new tokens, greedy,
``response_avg`` + ``question_span``, on a random model with Qwen2.5-0.5B's shapes (24 layers,
hidden 896, 14 heads, 2 KV heads, MLP 4864) and the real Qwen2.5 tokenizer, chat template and
generation config (``../shared/fixtures/chat-models``): ``extract_vectors`` as it runs now (one
pass, ``--batch-size auto``) against generate-then-capture at batch 8 (``one_pass=False``, how
extraction ran before), interleaved, each with an empty response cache. Goals: >= 3x, and the
same vectors (both read the same greedy replies' ids; cosine > 0.9999). Times are CPU seconds
on one thread (``time.process_time``: steady under other work on the machine) and wall seconds
on every thread (what a run takes, but shaken by other work). The cost per row of one decode
step by batch size shows where ``--batch-size auto`` comes from. The full example (23 x 20, 64
new tokens) is projected from one full batch of each way at 64 new tokens (48 replies in one
pass; 8 replies generated, then captured), times the batches the example needs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT.parent / "shared" / "fixtures" / "chat-models" / "qwen2.5-0.5b-instruct"

from personachat.activations import (  # noqa: E402
    CaptureSpec,
    GenerationConfig,
    Sample,
    build_samples,
    capture,
    pad_batch,
)
from personachat.model import LoadedModel, wrap_model  # noqa: E402
from personachat.model.tiny import tiny_tokenizer  # noqa: E402
from personachat.pipeline import ExtractionResult, extract_vectors  # noqa: E402
from personachat.prompts import PersonaDataset, from_json, load_dataset  # noqa: E402

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


def capture_rows() -> list[Row]:
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


def qwen05_chat(device: torch.device) -> LoadedModel:
    """A random model with Qwen2.5-0.5B's shapes and the real tokenizer, template, generation
    config (the fixture's config scaled back up)."""
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoTokenizer,
        GenerationConfig as HubGenerationConfig,
    )

    config = json.loads((FIXTURE / "config.json").read_text())
    config.pop("layer_types", None)  # recomputed for 24 layers
    config.update(
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        max_window_layers=24,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config), dtype=torch.float32)
    model.generation_config = HubGenerationConfig.from_pretrained(FIXTURE)
    tokenizer = AutoTokenizer.from_pretrained(FIXTURE)
    return wrap_model(model.to(device), tokenizer, "random-qwen2.5-0.5b-shape")


def slice_of(data: PersonaDataset, n_personas: int, n_questions: int) -> PersonaDataset:
    """The first ``n_personas`` personas (``default`` first) with the first ``n_questions``."""
    names = ["default", *[n for n in data.persona_names if n != "default"]][:n_personas]
    picked = data.select(names).to_json()
    picked["questions"] = picked["questions"][:n_questions]
    return from_json(picked)


def extraction(lm: LoadedModel, data: PersonaDataset, new_tokens: int, new: bool) -> tuple:
    """(CPU s, wall s, result) of one whole extraction with an empty response cache."""
    gen = GenerationConfig(max_new_tokens=new_tokens, temperature=0.0)
    with tempfile.TemporaryDirectory() as cache:
        cpu, wall = time.process_time(), time.perf_counter()
        result = extract_vectors(
            lm,
            data,
            positions=["response_avg", "question_span"],
            generation=gen,
            cache_dir=cache,
            progress=False,
            batch_size=None if new else 8,
            one_pass=new,
        )
        return time.process_time() - cpu, time.perf_counter() - wall, result


def min_cosine(a: ExtractionResult, b: ExtractionResult) -> float:
    """The smallest cosine between matching vectors of two runs, over every layer."""
    cos = [
        torch.nn.functional.cosine_similarity(x.vector, y.vector, dim=-1).min()
        for x, y in zip(a.vectors, b.vectors, strict=True)
    ]
    return float(torch.stack(cos).min())


def e2e_rows(repeats: int = 2) -> list[Row]:
    """The slice both ways on one thread (CPU time) and on every thread (wall time), the cost of
    a decode step by batch size, and the projection of the README example."""
    if not FIXTURE.is_dir():
        return [("extract e2e: skipped", float("nan"), f"no Qwen2.5 fixture at {FIXTURE}")]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    threads = torch.get_num_threads()
    lm = qwen05_chat(device)
    full = load_dataset("personas")
    part = slice_of(full, 4, 5)
    settings = [1, threads] if device.type == "cpu" and threads > 1 else [threads]
    rows: list[Row] = []
    try:
        for n in settings:
            torch.set_num_threads(n)
            rows += slice_rows(lm, part, repeats, cpu=n == 1 and device.type == "cpu")
        if device.type == "cpu":
            torch.set_num_threads(1)
            rows += batch_rows(lm)
        for n in settings:
            torch.set_num_threads(n)
            rows += projection_rows(lm, full, cpu=n == 1 and device.type == "cpu")
    finally:
        torch.set_num_threads(threads)
    return rows


def slice_rows(lm: LoadedModel, part: PersonaDataset, repeats: int, cpu: bool) -> list[Row]:
    """Both ways, interleaved, best of ``repeats``: CPU seconds (``cpu``) or wall seconds."""
    times: dict[bool, list[float]] = {True: [], False: []}
    results: dict[bool, ExtractionResult] = {}
    for _ in range(repeats):
        for new in (False, True):
            cpu_s, wall_s, results[new] = extraction(lm, part, 32, new)
            times[new].append(cpu_s if cpu else wall_s)
    old, new_t = min(times[False]), min(times[True])
    unit = "CPU s, 1 thread" if cpu else f"wall s, {torch.get_num_threads()} threads"
    phases = {
        new: ", ".join(f"{k} {v:.0f} s" for k, v in results[new].seconds.items())
        for new in (False, True)
    }
    what = "4 personas x 5 questions, 32 new tokens, greedy"
    return [
        (f"extract e2e: generate-then-capture, batch 8 ({unit})", old, f"{what}; {phases[False]}"),
        (f"extract e2e: one pass, batch auto ({unit})", new_t, phases[True]),
        (f"extract e2e: speed-up ({unit}) (x)", old / new_t, "goal >= 3"),
        (
            "extract e2e: min cosine one pass vs generate-then-capture",
            min_cosine(results[True], results[False]),
            "goal > 0.9999; the same greedy replies",
        ),
    ]


def batch_rows(lm: LoadedModel, sizes: Sequence[int] = (8, 16, 32, 64, 96, 128)) -> list[Row]:
    """CPU ms per row of one decode step (60 tokens cached) by batch size: ``--batch-size auto``."""
    rows: list[Row] = []
    vocab = int(lm.model.config.vocab_size)
    with torch.inference_mode():
        for size in sizes:
            ids = torch.randint(0, vocab, (size, 60), generator=torch.Generator().manual_seed(0))
            out = lm.model(input_ids=ids, use_cache=True, logits_to_keep=1)
            cache, step = out.cache, out.logits[:, -1].argmax(-1, keepdim=True)
            best = float("inf")
            for _ in range(3):
                start = time.process_time()
                lm.model(input_ids=step, cache=cache, use_cache=True)
                best = min(best, time.process_time() - start)
                cache.crop(-1)
            rows.append(
                (
                    f"extract e2e: decode step per row, batch {size} (CPU ms)",
                    best / size * 1e3,
                    "1 thread, best of 3",
                )
            )
    return rows


def projection_rows(lm: LoadedModel, full: PersonaDataset, cpu: bool) -> list[Row]:
    """The README example (23 x 20 = 460 replies, 64 new tokens), from one full batch each:
    128 replies in one pass (batch auto on a CPU) and 8 generated then captured (batch 8)."""
    n = len(full.personas) * len(full.questions)
    pick = 0 if cpu else 1
    new = extraction(lm, slice_of(full, 8, 16), 64, True)[pick] / 128 * n
    old = extraction(lm, slice_of(full, 2, 4), 64, False)[pick] / 8 * n
    unit = "CPU min, 1 thread" if cpu else f"wall min, {torch.get_num_threads()} threads"
    note = f"{n} replies, 64 new tokens"
    return [
        (f"extract e2e: README example projected, generate-then-capture ({unit})", old / 60, note),
        (f"extract e2e: README example projected, one pass ({unit})", new / 60, "batch 128"),
        (f"extract e2e: README example projected speed-up ({unit}) (x)", old / new, "goal >= 3"),
    ]


def run(parts: Sequence[str] = ("capture", "e2e")) -> list[Row]:
    rows: list[Row] = []
    if "capture" in parts:
        rows += capture_rows()
    if "e2e" in parts:
        rows += e2e_rows()
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", default="capture,e2e", help="capture, e2e or both")
    args = parser.parse_args()
    torch.set_num_threads(max(1, min(4, torch.get_num_threads())))
    for name, value, note in run(args.part.split(",")):
        print(f"{name:<58} {value:>10.3f}  {note}", flush=True)
