"""Capture equals the model's own hidden states, is padding-invariant, and keeps memory flat."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from personachat.activations import CaptureSpec, build_samples, capture, encode
from personachat.model import LoadedModel
from personachat.records import POSITIONS

CONVERSATIONS = [
    (0, "You are a pirate.", "What is the capital of France?", "Arr, the answer is Paris."),
    (1, "", "Tell me about the ocean.", "The ocean is deep and full of stars."),
    (0, "You are a pirate.", "Numbers?", "0 1 2 3 4 5 6 7 8 9"),
    (1, "", "What about history?", "I think, therefore I am."),
    (0, "You are a pirate.", "Cooking?", "Arr, matey!"),
]


def _unnormed(lm: LoadedModel) -> nn.Module:
    """A copy of the model whose final norm is the identity, so hidden_states[-1] is raw."""
    model = copy.deepcopy(lm.model)
    base = model.transformer if hasattr(model, "transformer") else model.model
    attr = "ln_f" if hasattr(base, "ln_f") else "norm"
    setattr(base, attr, nn.Identity())
    return model


def _direct_means(model: nn.Module, samples: list, n_personas: int, n_layers: int) -> torch.Tensor:
    """[n_pos, P, L, D] token-averaged hidden states, one sample at a time, no hooks."""
    sums: torch.Tensor | None = None
    counts = torch.zeros(n_personas)
    for s in samples:
        with torch.no_grad():
            out = model(input_ids=torch.tensor([s.ids]), output_hidden_states=True)
        hs = torch.stack(out.hidden_states[1 : n_layers + 1])[:, 0]  # [L, T, D]
        pooled = torch.stack([hs[:, a:b].mean(1) for a, b in s.spans])  # [n_pos, L, D]
        if sums is None:
            sums = torch.zeros((len(s.spans), n_personas, *pooled.shape[1:]), dtype=torch.float64)
        sums[:, s.persona] += pooled.double()
        counts[s.persona] += 1
    assert sums is not None
    return sums / counts[None, :, None, None]


def test_capture_equals_output_hidden_states(any_arch: LoadedModel) -> None:
    lm = any_arch
    samples = build_samples(lm.tokenizer, CONVERSATIONS, POSITIONS)
    layers = tuple(range(lm.sites.n_layers))
    spec = CaptureSpec(layers=layers, positions=POSITIONS)
    with capture(lm, samples, spec, 2, batch_size=2, progress=False) as cap:
        got = cap.means()
    want = _direct_means(_unnormed(lm), samples, 2, lm.sites.n_layers)
    assert got.shape == want.shape == (4, 2, lm.sites.n_layers, lm.sites.hidden_size)
    assert (got - want).abs().max() < 1e-5
    cos = torch.nn.functional.cosine_similarity(got.flatten(2), want.flatten(2), dim=-1)
    assert cos.min() > 0.9999


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_matches_batch_size_one(
    arch: str, side: str, request: pytest.FixtureRequest
) -> None:
    from tests.conftest import tiny

    lm = tiny(arch)
    samples = build_samples(lm.tokenizer, CONVERSATIONS, POSITIONS)
    assert len({len(s.ids) for s in samples}) > 1  # padding really happens
    spec = CaptureSpec(layers=(0, 2), positions=POSITIONS)
    with capture(lm, samples, spec, 2, batch_size=1, progress=False) as one:
        ref, ref_rows = one.means(), list(one.iter_pooled())
    with capture(lm, samples, spec, 2, batch_size=5, side=side, progress=False) as many:
        got, rows = many.means(), list(many.iter_pooled())
    assert (got - ref).abs().max() < 1e-5
    # the per-sample spill agrees too (same length-sorted order in both runs)
    assert torch.allclose(rows[0][1], ref_rows[0][1], atol=1e-5)
    assert (many.norm_sums - one.norm_sums).abs().max() < 1e-4


def test_spans_cover_the_right_tokens(llama: LoadedModel) -> None:
    tok = llama.tokenizer
    for system in ("You are a pirate.", ""):
        enc = encode(tok, system, "Tell me about the ocean.", "Arr, matey!")
        start, end = enc.span("response_avg")
        assert tok.decode(enc.ids[start:end]) == "Arr, matey!"
        q0, q1 = enc.span("question_span")
        assert tok.decode(enc.ids[q0:q1]) == (
            "<|im_start|>user\nTell me about the ocean.<|im_end|>\n<|im_start|>assistant\n"
        )
        last = enc.span("prompt_last")
        assert last == (enc.n_prompt - 1, enc.n_prompt)
        assert tok.decode(enc.ids[: enc.n_prompt]).endswith("<|im_start|>assistant\n")
    with pytest.raises(ValueError, match="unknown position"):
        enc.span("everything")


def test_question_span_with_an_injected_default_system_prompt(llama: LoadedModel) -> None:
    """Templates like Qwen2.5's add their own system turn when none is given."""
    tok = copy.deepcopy(llama.tokenizer)
    tok.chat_template = (
        "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are Qwen.<|im_end|>\n"
        "{% endif %}" + tok.chat_template
    )
    for system in ("", "You are a pirate."):
        enc = encode(tok, system, "Tell me about the ocean.", "Arr!")
        q0, q1 = enc.span("question_span")
        assert tok.decode(enc.ids[q0:q1]).startswith("<|im_start|>user\nTell me about the ocean.")
        assert "system" in tok.decode(enc.ids[:q0])


def test_empty_response_is_an_error(llama: LoadedModel) -> None:
    with pytest.raises(ValueError, match="at least one token"):
        build_samples(llama.tokenizer, [(0, "", "Hi?", "")], ("response_avg",))


def test_layer_out_of_range_and_empty_input(llama: LoadedModel) -> None:
    samples = build_samples(llama.tokenizer, CONVERSATIONS[:1], ("prompt_last",))
    with pytest.raises(ValueError, match="out of range"):
        capture(llama, samples, CaptureSpec(layers=(7,), positions=("prompt_last",)), 1)
    with pytest.raises(ValueError, match="no samples"):
        capture(llama, [], CaptureSpec(layers=(0,), positions=("prompt_last",)), 1)


def test_stop_forward_skips_later_layers(llama: LoadedModel) -> None:
    """Capturing layer 0 only never runs block 1 (the forward stops after block 0)."""
    ran: list[int] = []

    def spy(module: nn.Module, args: object, output: object) -> None:
        ran.append(1)

    samples = build_samples(llama.tokenizer, CONVERSATIONS[:2], ("prompt_avg",))
    from personachat.hooks import registered

    with registered([(llama.sites.layers[1], "forward", spy)]):
        with capture(
            llama, samples, CaptureSpec(layers=(0,), positions=("prompt_avg",)), 2, progress=False
        ) as cap:
            assert cap.counts.tolist() == [1, 1]
    assert ran == []


MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    torch.set_num_threads(1)
    from personachat.activations import CaptureSpec, build_samples, capture
    from personachat.model.tiny import tiny_model
    lm = tiny_model("llama", n_layers=4, hidden=256)
    conv = (0, "You are a pirate.", "Tell me about the ocean and the stars?",
            "Arr, matey! The answer is Paris. " * 3)
    spec = CaptureSpec(layers=(0, 1, 2, 3), positions=("response_avg", "prompt_avg"))

    def peak_kb():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM"):
                return int(line.split()[1])

    out = []
    for n in (16, 32, 32, 256):
        samples = build_samples(lm.tokenizer, [conv] * n, spec.positions)
        with capture(lm, samples, spec, 1, batch_size=16, progress=False) as cap:
            spilled = cap.spill_path.stat().st_size
        out.append((n, peak_kb(), spilled))
    print(json.dumps(out))
    """
)


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_samples() -> None:
    root = Path(__file__).resolve().parent.parent
    # glibc keeps freed batch buffers in its heaps, so the high-water mark drifted by 0-17 MB from
    # run to run; large blocks from mmap and one arena make it follow what is live (0.6 MB here)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_ARENA_MAX": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT],
        capture_output=True,
        text=True,
        cwd=root,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    *_, (n1, peak1, spill1), (n2, peak2, spill2) = json.loads(proc.stdout)
    # per-sample vectors go to disk: 2 positions x 4 layers x 256 floats per sample
    assert spill1 == n1 * 2 * 4 * 256 * 4 and spill2 == n2 * 2 * 4 * 256 * 4
    # 8x the samples (after a warm-up run): keeping per-token activations would add
    # ~ 224 x 4 layers x 50 tokens x 256 x 4 B = 46 MB; pooled vectors in memory 1.8 MB
    assert peak2 - peak1 < 6_000, (peak1, peak2)
