"""Replies and activations in one pass equal generate-then-capture; vLLM is refused without it.

The one pass (``generate_live``) must read exactly what a teacher-forced capture of the rendered
prompt plus the generated ids reads, pool it the same way, and generate the same greedy replies
as ``responses.generate``, also when rows end early on an EOS or answer nothing at all.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from personachat.activations import (
    Capture,
    CaptureSpec,
    GenerationConfig,
    LivePrompt,
    Reply,
    build_samples,
    capture,
    encode,
    generate_live,
    open_capture,
)
from personachat.activations.prefix import shared_prefix
from personachat.model import LoadedModel
from personachat.model.tiny import TINY_ARCHITECTURES, tiny_model
from personachat.pipeline import EngineError, check_engine, extract_vectors, format_run
from personachat.pipeline.options import parse_batch_size
from personachat.pipeline.responses import generate
from personachat.prompts import from_json
from personachat.records import POSITIONS
from tests.scripts import cli_module

SYSTEMS = {"default": "", "pirate": "You are a pirate.", "chef": "You are a chef."}
QUESTIONS = [
    "What is the capital of France?",
    "Tell me about the ocean.",
    "Numbers?",
    "History and cooking?",
    "The stars?",
]
GREEDY = GenerationConfig(max_new_tokens=9, temperature=0.0)
DATA = from_json(
    {
        "name": "live",
        "personas": [{"name": n, "system_prompt": s} for n, s in SYSTEMS.items()],
        "questions": QUESTIONS,
    }
)


def _prompts(lm: LoadedModel) -> list[LivePrompt]:
    return [
        LivePrompt(i, j, encode(lm.tokenizer, system, q, None))
        for i, system in enumerate(SYSTEMS.values())
        for j, q in enumerate(QUESTIONS)
    ]


def _teacher_forced(lm: LoadedModel, replies: list[Reply], spec: CaptureSpec) -> Capture:
    """The plain capture of prompt + generated ids, of the replies that read something."""
    systems = list(SYSTEMS.values())
    convs = [
        (r.persona, systems[r.persona], QUESTIONS[r.question], r.ids) for r in replies if r.ids
    ]
    samples = build_samples(lm.tokenizer, convs, spec.positions, questions=QUESTIONS)
    return capture(lm, samples, spec, len(SYSTEMS), batch_size=4, progress=False)


def _by_sample(cap: Capture) -> dict[tuple[int, int], torch.Tensor]:
    rows = torch.cat([pooled for _, pooled in cap.iter_pooled()])
    keys = zip(cap.sample_personas, cap.sample_questions, strict=True)
    return {key: rows[n] for n, key in enumerate(keys)}


def _check_equal(live: Capture, ref: Capture) -> None:
    assert torch.equal(live.counts, ref.counts)
    assert (live.means() - ref.means()).abs().max() < 1e-4
    cos = torch.nn.functional.cosine_similarity(
        live.means().flatten(2), ref.means().flatten(2), dim=-1
    )
    assert cos.min() > 0.9999
    assert (live.norm_sums - ref.norm_sums).abs().max() < 1e-3
    got, want = _by_sample(live), _by_sample(ref)  # same samples, same questions
    assert got.keys() == want.keys()
    for key, row in got.items():
        assert (row - want[key]).abs().max() < 1e-4, key


def _live(lm: LoadedModel, spec: CaptureSpec, batch_size: int) -> tuple[Capture, list[Reply]]:
    cap = open_capture(lm, spec, len(SYSTEMS))
    replies = generate_live(lm, _prompts(lm), cap, GREEDY, batch_size=batch_size, progress=False)
    cap.finish()
    return cap, replies


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_one_pass_equals_teacher_forced_capture_and_plain_generation(arch: str) -> None:
    lm = tiny_model(arch)
    spec = CaptureSpec(layers=tuple(range(lm.sites.n_layers)), positions=POSITIONS)
    live, replies = _live(lm, spec, batch_size=4)  # batches mix personas (several prefixes)
    with live, _teacher_forced(lm, replies, spec) as ref:
        _check_equal(live, ref)
    names = list(SYSTEMS)
    cells = [(names[r.persona], QUESTIONS[r.question]) for r in replies]
    plain = generate(lm, DATA, cells, GREEDY, progress=False)
    assert [plain[c] for c in cells] == [r.text for r in replies]


def test_rows_that_end_early_or_answer_nothing() -> None:
    """Rows stop reading at their EOS; a reply whose first token is an EOS reads nothing and
    comes back uncaptured, for the teacher-forced pass over its stored text."""
    lm = tiny_model("llama")
    spec = CaptureSpec(layers=(0, 1), positions=("response_avg", "prompt_last"))
    cap, first = _live(lm, spec, batch_size=15)
    cap.close()
    # the 4th token of one reply and the first token of another become EOS ids
    early, none = first[0].ids[3], first[7].ids[0]
    lm.model.generation_config.eos_token_id = [2, early, none]
    live, replies = _live(lm, spec, batch_size=6)
    lengths = {len(r.ids) for r in replies}
    assert 0 in lengths and len(lengths) > 2  # some end early, some answer nothing
    assert all(early not in r.ids and none not in r.ids for r in replies)
    with live, _teacher_forced(lm, replies, spec) as ref:
        _check_equal(live, ref)
    empty = [r for r in replies if not r.ids]
    assert all(r.text for r in empty)  # stored as text ("..." when it decodes to nothing)
    cells = [(list(SYSTEMS)[r.persona], QUESTIONS[r.question]) for r in replies]
    plain = generate(lm, DATA, cells, GREEDY, progress=False)
    assert [plain[c] for c in cells] == [r.text for r in replies]


def test_max_tokens_truncates_the_reply_read() -> None:
    lm = tiny_model("qwen2")
    spec = CaptureSpec(layers=(1,), positions=("response_avg",))
    cap = open_capture(lm, spec, len(SYSTEMS))
    prompts = _prompts(lm)
    longest = max(p.encoded.n_prompt for p in prompts)
    replies = generate_live(
        lm, prompts, cap, GREEDY, batch_size=8, max_tokens=longest + 2, progress=False
    )
    cap.finish()
    n_prompt = {(p.persona, p.question): p.encoded.n_prompt for p in prompts}
    for r in replies:
        limit = max(longest + 2 - n_prompt[(r.persona, r.question)], 1)
        assert len(r.ids) == min(limit, GREEDY.max_new_tokens)
    with cap, _teacher_forced(lm, replies, spec) as ref:
        _check_equal(cap, ref)


def test_shared_prefix_leaves_a_token_to_feed() -> None:
    assert shared_prefix([[1, 2, 3, 4], [1, 2, 5]]) == 2
    assert shared_prefix([[1, 2, 3], [1, 2, 3]]) == 2
    assert shared_prefix([[7]]) == 0
    assert shared_prefix([]) == 0


def test_extraction_in_one_pass_equals_generate_then_capture(tmp_path: Path) -> None:
    """Same greedy replies, same vectors; the cache keeps the ids, so a re-run (teacher-forced
    over the cached ids) gives the same vectors again."""
    lm = tiny_model("llama")
    kinds = ["response_avg", "question_span"]
    run = {"positions": kinds, "generation": GREEDY, "progress": False}
    new = extract_vectors(lm, DATA, cache_dir=tmp_path / "new", **run)  # type: ignore[arg-type]
    old = extract_vectors(
        lm,
        DATA,
        cache_dir=tmp_path / "old",
        one_pass=False,
        batch_size=4,
        **run,  # type: ignore[arg-type]
    )
    again = extract_vectors(lm, DATA, cache_dir=tmp_path / "new", **run)  # type: ignore[arg-type]
    assert list(new.seconds) == ["generation + capture", "metrics"]
    assert list(old.seconds) == ["generation", "capture", "metrics"]
    assert list(again.seconds) == ["capture", "metrics"]
    for a, b, c in zip(new.vectors, old.vectors, again.vectors, strict=True):
        assert (a.persona, a.positions) == (b.persona, b.positions)
        cos = torch.nn.functional.cosine_similarity(a.vector, b.vector, dim=-1)
        assert cos.min() > 0.9999 and (a.vector - b.vector).abs().max() < 1e-4
        assert (a.vector - c.vector).abs().max() < 1e-4
    (cached,) = (tmp_path / "new").glob("*.json")
    rows = json.loads(cached.read_text())
    assert len(rows) == len(SYSTEMS) * len(QUESTIONS) and all(r["ids"] for r in rows)
    assert "generation + capture" in format_run(new)


def test_vllm_is_refused_here_naming_what_is_missing(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the refusal is for machines without one")
    with pytest.raises(EngineError, match="needs a CUDA GPU") as err:
        check_engine("vllm")
    try:
        import vllm  # noqa: F401
    except ImportError:
        assert "the vllm package (pip install vllm)" in str(err.value)
    with pytest.raises(EngineError, match="--generate-with vllm needs"):
        extract_vectors(tiny_model("llama"), DATA, engine="vllm", progress=False)
    model = tmp_path / "model"
    lm = tiny_model("llama")
    lm.model.save_pretrained(model)
    lm.tokenizer.save_pretrained(model)
    argv = ["--model", str(model), "--dataset", "personas", "--quiet", "--generate-with", "vllm"]
    argv += ["--store", str(tmp_path / "store"), "--out", str(tmp_path / "out")]
    assert cli_module("extract_vectors").main(argv) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
    assert not (tmp_path / "store").exists() and not (tmp_path / "out").exists()


def test_the_script_prints_each_phase_and_what_chose_the_best_layers(
    tmp_path: Path,
    capsys,  # type: ignore[no-untyped-def]
) -> None:
    lm = tiny_model("llama")
    lm.model.save_pretrained(tmp_path / "model")
    lm.tokenizer.save_pretrained(tmp_path / "model")
    (tmp_path / "live.json").write_text(json.dumps(DATA.to_json()))
    argv = ["--model", str(tmp_path / "model"), "--dataset", str(tmp_path / "live.json")]
    argv += ["--quiet", "--no-store", "--max-new-tokens", "6", "--cache-dir", str(tmp_path)]
    assert cli_module("extract_vectors").main([*argv, "--batch-size", "auto"]) == 0
    out = capsys.readouterr().out
    assert "chosen by" in out and "AUC held out" in out
    assert "time: generation + capture" in out and "metrics" in out
    assert "best layers chosen by: " in out
    assert cli_module("extract_vectors").main(argv) == 0  # the cache: teacher-forced this time
    assert "time: capture" in capsys.readouterr().out


def test_batch_size_auto_or_a_whole_number() -> None:
    import argparse

    assert parse_batch_size("auto") is None and parse_batch_size("12") == 12
    for bad in ("0", "-3", "many"):
        with pytest.raises(argparse.ArgumentTypeError, match="whole number from 1 or auto"):
            parse_batch_size(bad)
