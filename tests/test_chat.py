"""ChatEngine: streaming, side by side in one batch, per-session isolation, seeds, stop, readout."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from personachat.chat import ChatEngine, ChatUpdate, GenerationSettings
from personachat.hooks import hook_count
from personachat.interventions import AblationSpec, InterventionError, SteeringSpec
from personachat.model import LoadedModel
from personachat.records import PersonaVector
from tests.conftest import tiny
from tests.scripts import cli_module

ROOT = Path(__file__).resolve().parent.parent
GREEDY = GenerationSettings(max_new_tokens=10)
MESSAGES = [
    {"role": "system", "content": "You are a pirate."},
    {"role": "user", "content": "Tell me about the ocean"},
]


def engine_for(arch: str) -> ChatEngine:
    lm = tiny(arch)
    g = torch.Generator().manual_seed(1)
    shape = (lm.info.n_layers, lm.info.hidden_size)
    vectors = [
        PersonaVector(lm.info.model_id, name, torch.randn(shape, generator=g))
        for name in ("pirate", "cynic", "philosopher")
    ]
    return ChatEngine(lm, vectors)


def greedy_continuation(lm: LoadedModel, ids: torch.Tensor, n: int) -> list[int]:
    """Reference greedy decoding without cache or hooks: argmax of a full forward per token."""
    seq = ids.clone()
    out: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(lm.model(seq).logits[0, -1].argmax())
            out.append(nxt)
            if nxt == lm.tokenizer.eos_token_id:
                break
            seq = torch.cat([seq, torch.tensor([[nxt]])], dim=1)
    return out


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_stream_grows_and_matches_plain_greedy(arch: str) -> None:
    engine = engine_for(arch)
    updates = list(engine.stream(MESSAGES, GREEDY))
    final = updates[-1]
    assert final.done and not final.stopped
    assert [len(u.tokens) for u in updates[:-1]] == list(range(1, len(final.tokens) + 1))
    expected = greedy_continuation(engine.lm, engine.prompt_ids(MESSAGES), GREEDY.max_new_tokens)
    assert list(final.tokens) == expected
    text = engine.lm.tokenizer.decode(expected, skip_special_tokens=True)
    assert final.text == text


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_side_by_side_equals_two_separate_runs(arch: str) -> None:
    engine = engine_for(arch)
    steer = SteeringSpec({"pirate": 0.7, "cynic": -0.3}, layers="0-2:3")
    ablate = AblationSpec(neurons="1:3,1:9,2:5")
    alone_plain = engine.reply(MESSAGES, GREEDY, readout=["pirate"])
    alone_steered = engine.reply(
        MESSAGES, GREEDY, steering=steer, ablation=ablate, readout=["pirate"]
    )
    assert alone_plain.tokens != alone_steered.tokens  # the steering changes the reply
    pair = engine.reply(
        MESSAGES, GREEDY, steering=steer, ablation=ablate, readout=["pirate"], side_by_side=True
    )
    assert pair.baseline_tokens == alone_plain.tokens
    assert pair.tokens == alone_steered.tokens
    assert pair.baseline_text == alone_plain.text and pair.text == alone_steered.text
    assert pair.readout is not None and pair.baseline_readout is not None
    assert alone_steered.readout is not None and alone_plain.readout is not None
    torch.testing.assert_close(
        pair.readout.projections,
        alone_steered.readout.projections,
        equal_nan=True,
        rtol=1e-4,
        atol=1e-4,
    )
    torch.testing.assert_close(
        pair.baseline_readout.projections,
        alone_plain.readout.projections,
        equal_nan=True,
        rtol=1e-4,
        atol=1e-4,
    )


def test_readout_covers_prompt_and_reply_and_matches_hooks_free_states() -> None:
    engine = engine_for("llama")
    lm = engine.lm
    final = engine.reply(MESSAGES, GREEDY, readout=["pirate", "cynic"])
    ro = final.readout
    assert ro is not None
    n_prompt = engine.prompt_ids(MESSAGES).shape[1]
    assert ro.prompt_len == n_prompt
    assert ro.projections.shape == (n_prompt + len(final.tokens), lm.info.n_layers, 2)
    assert ro.reply.shape[0] == len(final.tokens)
    pieces = engine.token_pieces(ro.tokens)
    assert len(pieces) == len(ro.tokens) and "".join(pieces[n_prompt:]) == lm.tokenizer.decode(
        list(final.tokens)
    )
    assert torch.isnan(ro.projections[-1]).all() and not torch.isnan(ro.projections[:-1]).any()
    seq = torch.tensor([ro.tokens[:-1]])
    with torch.no_grad():
        hidden = lm.model(seq, output_hidden_states=True).hidden_states
    for layer in range(lm.info.n_layers - 1):
        for k, name in enumerate(ro.personas):
            v = engine.vectors[name].vector[layer]
            expected = hidden[layer + 1][0] @ (v / v.norm())
            torch.testing.assert_close(
                ro.projections[:-1, layer, k], expected, rtol=1e-4, atol=1e-4
            )


def test_gradio_content_parts_and_history() -> None:
    engine = engine_for("llama")
    parts: list[dict[str, Any]] = [
        {
            "role": "user",
            "content": [{"type": "text", "text": "Tell me "}, {"type": "text", "text": "a story"}],
        },
        {"role": "assistant", "content": [{"type": "text", "text": "Arr"}]},
        {"role": "user", "content": "More"},
    ]
    plain = [
        {"role": "user", "content": "Tell me a story"},
        {"role": "assistant", "content": "Arr"},
        {"role": "user", "content": "More"},
    ]
    assert torch.equal(engine.prompt_ids(parts), engine.prompt_ids(plain))
    assert engine.reply(parts, GREEDY).tokens == engine.reply(plain, GREEDY).tokens


def test_sampling_is_seeded_and_independent_of_global_rng() -> None:
    engine = engine_for("llama")
    hot = GenerationSettings(max_new_tokens=8, temperature=1.5, seed=7)
    first = engine.reply(MESSAGES, hot)
    torch.manual_seed(123)
    torch.rand(100)
    again = engine.reply(MESSAGES, hot)
    other = engine.reply(MESSAGES, GenerationSettings(max_new_tokens=8, temperature=1.5, seed=8))
    assert first.tokens == again.tokens
    assert first.tokens != other.tokens
    pair = engine.reply(MESSAGES, hot, side_by_side=True)
    assert pair.baseline_tokens == first.tokens  # row 0 draws the same stream as a solo run


def test_stop_event_ends_generation_early() -> None:
    engine = engine_for("llama")
    hooks_before = hook_count(engine.lm.model)
    stop = threading.Event()
    updates: list[ChatUpdate] = []
    for update in engine.stream(MESSAGES, GenerationSettings(max_new_tokens=200), stop=stop):
        updates.append(update)
        if len(update.tokens) == 3:
            stop.set()
    assert updates[-1].done and updates[-1].stopped
    # the reader lags the generating thread by however many tokens the scheduler lets through
    assert 3 <= len(updates[-1].tokens) < 200
    assert hook_count(engine.lm.model) == hooks_before


def test_stop_event_is_seen_at_the_next_decoding_step() -> None:
    """Set from inside the model's third forward (the one that yields the third token), the
    stop event ends generation right there: exactly three tokens, whatever the thread timing."""
    engine = engine_for("llama")
    stop = threading.Event()
    forwards = 0

    def count(*_: object) -> None:
        nonlocal forwards
        forwards += 1
        if forwards == 3:
            stop.set()

    handle = engine.lm.model.register_forward_hook(count)
    try:
        updates = list(engine.stream(MESSAGES, GenerationSettings(max_new_tokens=200), stop=stop))
    finally:
        handle.remove()
    assert updates[-1].done and updates[-1].stopped
    assert len(updates[-1].tokens) == 3


def test_bad_settings_raise_before_generation() -> None:
    engine = engine_for("llama")
    hooks_before = hook_count(engine.lm.model)
    with pytest.raises(
        InterventionError, match=r"unknown persona 'wizard'.*cynic, philosopher, pirate"
    ):
        engine.stream(MESSAGES, GREEDY, steering=SteeringSpec({"wizard": 1.0}))
    with pytest.raises(InterventionError, match="max_new_tokens"):
        engine.stream(MESSAGES, GenerationSettings(max_new_tokens=0))
    with pytest.raises(InterventionError, match="temperature"):
        engine.stream(MESSAGES, GenerationSettings(temperature=float("nan")))
    assert hook_count(engine.lm.model) == hooks_before


def test_eight_concurrent_sessions_match_their_solo_runs() -> None:
    engine = engine_for("llama")
    hooks_before = hook_count(engine.lm.model)
    settings = [
        (SteeringSpec({"pirate": s}, layers=f"{s % 3}:{2 * s - 3}") if s % 4 else None, s)
        for s in range(8)
    ]

    def run(spec: SteeringSpec | None, seed: int) -> tuple[tuple[int, ...], torch.Tensor]:
        gen = GenerationSettings(max_new_tokens=8, temperature=1.0 if seed % 2 else 0.0, seed=seed)
        final = engine.reply(MESSAGES, gen, steering=spec, readout=["cynic"])
        assert final.readout is not None
        return final.tokens, final.readout.projections

    solo = [run(spec, seed) for spec, seed in settings]
    assert len({tokens for tokens, _ in solo}) > 4  # the sessions really differ
    results: list[tuple[tuple[int, ...], torch.Tensor] | None] = [None] * 8
    barrier = threading.Barrier(8)

    def worker(i: int) -> None:
        barrier.wait()
        results[i] = run(*settings[i])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for (tokens, proj), got in zip(solo, results, strict=True):
        assert got is not None
        assert got[0] == tokens
        torch.testing.assert_close(got[1], proj, equal_nan=True, rtol=1e-5, atol=1e-5)
    assert hook_count(engine.lm.model) == hooks_before


def test_sweep_rows_equal_separate_runs_at_each_strength() -> None:
    engine = engine_for("llama")
    spec = SteeringSpec({"pirate": 1.0, "cynic": 0.5}, layers="1:1.5, 2:0.5")
    rows = engine.sweep(MESSAGES, GREEDY, spec, [-2.0, 0.0, 2.0], readout=["pirate"])
    assert [r.done for r in rows] == [True] * 3
    plain = engine.reply(MESSAGES, GREEDY, readout=["pirate"])
    assert rows[1].tokens == plain.tokens
    for row, s in ((rows[0], -2.0), (rows[2], 2.0)):
        scaled = SteeringSpec(spec.blend, layers=f"1:{1.5 * s}, 2:{0.5 * s}")
        alone = engine.reply(MESSAGES, GREEDY, steering=scaled, readout=["pirate"])
        assert row.tokens == alone.tokens and row.text == alone.text
        assert row.readout is not None and alone.readout is not None
        torch.testing.assert_close(
            row.readout.projections, alone.readout.projections, equal_nan=True, rtol=1e-4, atol=1e-4
        )
    assert len({r.tokens for r in rows}) == 3


def test_steer_script_writes_a_jsonl_sweep(tmp_path: Path) -> None:
    script = cli_module("steer")
    out = tmp_path / "sweep.jsonl"
    argv = ["--tiny", "llama", "--personas", "pirate,cynic", "--prompt", "Hi", "--layers", "1:2"]
    assert (
        script.main([*argv, "--strengths=-1,0,1", "--max-new-tokens", "4", "--out", str(out)]) == 0
    )
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(x["persona"], x["strength"]) for x in lines] == [
        (p, s) for p in ("pirate", "cynic") for s in (-1.0, 0.0, 1.0)
    ]
    assert lines[0]["layers"] == {"1": -2.0}
    first = lines[0]
    assert len(first["projections"]) == len(first["token_ids"])
    assert len(first["projections"][0]) == 3 and len(first["projections"][0][0]) == 2
    assert first["projections"][-1][0] == [None, None]  # last token never fed back
    lm = tiny("llama")
    plain = ChatEngine(lm).reply(
        [{"role": "user", "content": "Hi"}], GenerationSettings(max_new_tokens=4)
    )
    assert lines[1]["token_ids"] == list(plain.tokens)  # strength 0 is the unsteered reply
