"""Real chat models: each family's real tokenizer, chat template and config, random weights.

For every folder of ``../shared/fixtures/chat-models`` (real tokenizer, template,
generation_config; config scaled down; no weights) a model with random weights is saved once per
test session and loaded through ``load_model`` as a user's model would be. The prompt spans are
checked token by token, then extraction, neurons, steered chat, bf16 and every EOS id.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig as HubGenerationConfig

from personachat.activations import build_samples
from personachat.app.backend import Backend
from personachat.app.main import parse_args
from personachat.app.settings import ChatInputs, parse_settings
from personachat.chat import ChatEngine, GenerationSettings as Decode
from personachat.hooks import hook_count, registered
from personachat.interventions import SteeringSpec
from personachat.model import LoadedModel, load_model
from personachat.pipeline import extract_vectors, find_neurons, register_results
from personachat.pipeline.responses import GenerationConfig
from personachat.prompts import conditions, from_json, prompt_spans
from personachat.store import Store
from tests.scripts import cli_module

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "chat-models"
FAMILIES = sorted(p.name for p in FIXTURES.iterdir() if p.is_dir()) if FIXTURES.is_dir() else []
pytestmark = [
    pytest.mark.skipif(not FAMILIES, reason=f"no chat-model fixtures at {FIXTURES}"),
    pytest.mark.slow,
]

SYSTEM = "You are a pirate. Speak like one."
QUESTION = "What is the capital of France?"
# What each family's template writes around the question (the whole question span): the user
# turn's header, the question and the assistant header; folded families (the system text is in
# the user turn) start at the user's own text when a system prompt is given.
EXPECTED = {
    "qwen2.5-0.5b-instruct": (
        "native",
        "<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n",
        "<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n",
    ),
    "llama-3.2-1b-instruct": (
        "native",
        "<|start_header_id|>user<|end_header_id|>\n\n{q}<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
        "<|start_header_id|>user<|end_header_id|>\n\n{q}<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
    ),
    "gemma-2-2b-it": (
        "folded",
        "<start_of_turn>user\n{q}<end_of_turn>\n<start_of_turn>model\n",
        "{q}<end_of_turn>\n<start_of_turn>model\n",
    ),
    "mistral-7b-instruct": ("folded", " [INST] {q} [/INST]", "{q} [/INST]"),
    "gpt2": ("native", "User: {q}\n\nAssistant:", "User: {q}\n\nAssistant:"),
}
DATASET = from_json(
    {
        "name": "compat",
        "personas": [
            {"name": "default", "system_prompt": ""},
            {"name": "pirate", "system_prompt": SYSTEM},
        ],
        "questions": [QUESTION, "Tell me about the ocean.", "Why is the sky blue?"],
        "pairs": [{"name": "pirate_default", "high": "pirate", "low": "default"}],
    }
)


@functools.cache
def saved_model(family: str, root: str) -> Path:
    """The family's fixture with random weights (seeded), saved as a user's model folder."""
    folder = Path(root) / family
    if not (folder / "config.json").exists():
        shutil.copytree(FIXTURES / family, folder, dirs_exist_ok=True)
        config = AutoConfig.from_pretrained(FIXTURES / family)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        with torch.no_grad():  # a visible signal through every layer
            for name, param in model.named_parameters():
                if param.dim() >= 2 and "embed" not in name and "wte" not in name:
                    param.normal_(0.0, 0.2)
        model.generation_config = HubGenerationConfig.from_pretrained(FIXTURES / family)
        model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def models_root(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("chat-models"))


@functools.cache
def loaded(family: str, root: str, dtype: str = "float32") -> LoadedModel:
    return load_model(str(saved_model(family, root)), dtype=dtype)


@pytest.fixture(params=FAMILIES)
def family(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def test_spans_token_by_token(family: str, models_root: str) -> None:
    lm = loaded(family, models_root)
    tok = lm.tokenizer
    mode, default_q, persona_q = EXPECTED[family]
    for system, expected in ((SYSTEM, persona_q), (None, default_q)):
        spans = prompt_spans(tok, system, QUESTION)
        assert spans.system_mode == mode
        q0, q1 = spans.question
        ids, want = spans.input_ids, expected.format(q=QUESTION).strip()
        # the span holds exactly these tokens: one fewer at the start loses text, one more adds
        assert tok.decode(ids[q0:q1]).strip() == want, tok.convert_ids_to_tokens(ids[q0:q1])
        assert tok.decode(ids[q0 + 1 : q1]).strip() != want
        before = tok.decode(ids[q0 - 1 : q0]).strip() if q0 else ""
        assert not before or not want.startswith(before)  # no token of the header left out
        assert q1 == len(spans.input_ids) and spans.prompt_last == q1 - 1
        if system is None:
            assert spans.system is None
        else:
            assert spans.system is not None
            s0, s1 = spans.system
            assert tok.decode(spans.input_ids[s0:s1]).strip() == SYSTEM
            assert q0 >= s1


def test_extraction_registers_vectors_with_their_render_conditions(
    family: str, models_root: str, tmp_path: Path
) -> None:
    lm = loaded(family, models_root)
    kinds = ("question_span", "prompt_last", "response_avg")
    result = extract_vectors(
        lm,
        DATASET,
        positions=kinds,
        progress=False,
        cache_dir=tmp_path / "cache",
        generation=_short(),
    )
    assert {v.positions for v in result.vectors} == set(kinds)
    with Store(tmp_path / "store") as store:
        register_results(store, lm, DATASET.personas, result)
        stored = store.load_vector(lm.info.model_id, "pirate", positions="question_span")
    assert stored.render == conditions(lm.tokenizer).to_json()
    assert json.loads(stored.render)["system_mode"] == EXPECTED[family][0]


def test_gate_neurons_where_the_model_has_a_gate(
    family: str, models_root: str, tmp_path: Path
) -> None:
    lm = loaded(family, models_root)
    site = "gate" if lm.sites.gates is not None else "mlp_hidden"
    sets = find_neurons(
        lm,
        DATASET,
        site=site,
        method="effect",
        k=4,
        positions="question_span",
        progress=False,
        cache_dir=tmp_path,
    )
    assert sets and all(len(s) == 4 and s.site == site for s in sets)


def test_steered_chat_with_a_system_prompt(family: str, models_root: str) -> None:
    lm = loaded(family, models_root)
    result = extract_vectors(
        lm, DATASET, positions="question_span", progress=False, generation=_short()
    )
    engine = ChatEngine(lm, result.vectors)
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}]
    before = hook_count(lm.model)
    update = engine.reply(
        messages,
        Decode(max_new_tokens=6),
        steering=SteeringSpec({"pirate": 1.0}, layers="all:4", positions="prompt"),
        readout=["pirate"],
        side_by_side=True,
    )
    assert update.done and update.readout is not None and not update.warnings
    assert update.tokens != update.baseline_tokens  # steering changed the reply
    assert hook_count(lm.model) == before
    ids = engine.prompt_ids(messages)[0].tolist()
    assert ids == prompt_spans(lm.tokenizer, SYSTEM, QUESTION).input_ids


def test_bf16_chat_and_capture(family: str, models_root: str) -> None:
    lm = loaded(family, models_root, "bfloat16")
    assert next(lm.model.parameters()).dtype == torch.bfloat16
    result = extract_vectors(
        lm, DATASET, positions="prompt_last", progress=False, generation=_short()
    )
    assert all(bool(torch.isfinite(v.vector).all()) for v in result.vectors)
    update = ChatEngine(lm, result.vectors).reply(
        [{"role": "user", "content": QUESTION}],
        Decode(max_new_tokens=4),
        steering=SteeringSpec({"pirate": 1.0}, layers="all:2"),
    )
    assert update.done and len(update.tokens) >= 1


def test_every_eos_id_stops_and_is_stripped(family: str, models_root: str) -> None:
    lm = loaded(family, models_root)
    eos = lm.model.generation_config.eos_token_id
    ids = [eos] if isinstance(eos, int) else list(eos)
    engine = ChatEngine(lm)
    for eos_id in ids:
        with registered([(lm.model.get_output_embeddings(), "forward", _force(eos_id, 2))]):
            update = engine.reply([{"role": "user", "content": QUESTION}], Decode(16))
        assert update.tokens[-1] == eos_id and len(update.tokens) == 3, (eos_id, update.tokens)
        assert lm.tokenizer.decode([eos_id]) not in update.text or not update.text


def test_extraction_scripts_run_on_every_family(
    family: str, models_root: str, tmp_path: Path
) -> None:
    folder = str(saved_model(family, models_root))
    common = ["--model", folder, "--dataset", str(tmp_path / "compat.json"), "--quiet"]
    (tmp_path / "compat.json").write_text(json.dumps(DATASET.to_json()))
    store = ["--store", str(tmp_path / "store"), "--cache-dir", str(tmp_path / "cache")]
    extract = cli_module("extract_vectors").main(
        [*common, *store, "--positions", "question_span,prompt_last", "--max-new-tokens", "4"]
    )
    assert extract == 0
    neurons = cli_module("find_neurons").main(
        [*common, *store, "--method", "effect", "--k", "4", "--positions", "question_span"]
    )
    assert neurons == 0
    assert Store(tmp_path / "store", read_only=True).vectors()


def test_a_tokenizer_without_template_adds_its_bos_everywhere(
    models_root: str, tmp_path: Path
) -> None:
    if "mistral-7b-instruct" not in FAMILIES:
        pytest.skip("needs the mistral fixture (a tokenizer that adds a BOS)")
    lm = loaded("mistral-7b-instruct", models_root)
    tok = copy.deepcopy(lm.tokenizer)
    tok.chat_template = None
    bare = replace(lm, tokenizer=tok)
    spans = prompt_spans(tok, SYSTEM, QUESTION)
    assert spans.input_ids[0] == tok.bos_token_id and spans.input_ids.count(tok.bos_token_id) == 1
    assert conditions(tok).bos == "tokenizer"
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}]
    assert ChatEngine(bare).prompt_ids(messages)[0].tolist() == spans.input_ids
    samples = build_samples(tok, [(0, SYSTEM, QUESTION, "Paris.")], ("prompt_last",))
    assert list(samples[0].ids[: samples[0].n_prompt]) == spans.input_ids


def test_app_chat_with_a_system_prompt_and_steering(
    family: str, models_root: str, tmp_path: Path
) -> None:
    """The page's path: the backend loads the model, reads the store, parses the settings."""
    folder = str(saved_model(family, models_root))
    lm = loaded(family, models_root)
    result = extract_vectors(
        lm, DATASET, positions="question_span", progress=False, generation=_short()
    )
    with Store(tmp_path / "store") as store:
        register_results(store, lm, DATASET.personas, result)
    backend = Backend(folder, tmp_path / "store", models={folder: lm})
    inputs = ChatInputs(
        folder,
        personas=["pirate"],
        layer_spec="all:4",
        positions="prompt",
        system_prompt=SYSTEM,
        max_new_tokens=4,
        side_by_side=True,
    )
    settings = parse_settings(backend.limits(folder), inputs)
    steps = list(backend.generate(folder, settings, [{"role": "user", "content": QUESTION}]))
    last = steps[-1]
    assert last.done and last.readout is not None and not last.render_warnings
    n_prompt = len(prompt_spans(lm.tokenizer, SYSTEM, QUESTION).input_ids)
    assert last.readout.n_prompt == n_prompt  # the system prompt went in, folded or not


def test_the_app_loads_models_in_the_dtype_asked_for(family: str, models_root: str) -> None:
    folder = str(saved_model(family, models_root))
    config = parse_args(["--model", folder, "--dtype", "bfloat16", "--device", "cpu"], env={})
    backend = Backend(config.model, config.store, dtype=config.dtype, device=config.device)
    assert next(backend.lm(folder).model.parameters()).dtype == torch.bfloat16


RACE = """
import sys, threading
from personachat.app.backend import Backend
folder, store = sys.argv[1], sys.argv[2]
backend = Backend(folder, store)
start = threading.Barrier(2)
errors = []

def run(call):
    start.wait()
    try:
        call()
    except Exception as err:
        errors.append(repr(err))

calls = [
    lambda: backend.engine(folder),  # what the page's background warm-up does
    lambda: print(backend.extract(folder, "personas", "prompt_last", ("default", "assistant"))),
]
threads = [threading.Thread(target=run, args=(call,)) for call in calls]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
print(errors)
sys.exit(1 if errors else 0)
"""


def test_extract_right_after_start_while_the_model_loads(models_root: str, tmp_path: Path) -> None:
    """Fresh processes: the model loads in the background while the first request extracts,
    both starting at once; the first imports of the library must not race (unserialised, two
    threads importing transformers' modules at once fail most of the time)."""
    family = "qwen2.5-0.5b-instruct" if "qwen2.5-0.5b-instruct" in FAMILIES else FAMILIES[0]
    folder = saved_model(family, models_root)
    (tmp_path / "store").mkdir()
    env = {**os.environ, "PERSONACHAT_CACHE": str(tmp_path / "cache")}
    for _ in range(3):
        proc = subprocess.run(
            [sys.executable, "-c", RACE, str(folder), str(tmp_path / "store")],
            capture_output=True,
            text=True,
            timeout=600,
            env=env,
        )
        assert proc.returncode == 0, proc.stdout[-1000:] + proc.stderr[-2000:]
        assert "Registered" in proc.stdout


def _force(token: int, after: int) -> Any:
    """A forward hook on the LM head that makes ``token`` the only choice from the ``after``-th
    generated token on (the prefill counts as step 0)."""
    calls = {"n": 0}

    def hook(module: Any, args: Any, out: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] <= after:
            return out
        forced = torch.full_like(out, -1e4)
        forced[..., token] = 1e4
        return forced

    return hook


def _short() -> GenerationConfig:
    return GenerationConfig(max_new_tokens=4, temperature=0.0)
