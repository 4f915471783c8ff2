"""``--engine vllm``'s path, tested on the CPU through interp-engine's eager backend.

``InterpChatEngine`` plans a request as ``ChatEngine`` does and hands the plan to interp-engine
(``personachat.chat.interp_specs``); its eager backend runs the same transformers model, so
greedy replies must equal PersonaChat's own runtime token for token: additive steering at all,
prompt (and last-n prompt) and generated positions, directional ablation and caps, side by side,
on the demo model and on a tiny one. What the engine cannot express is refused by name.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import pytest
import torch

from personachat.app.backend import Backend
from personachat.app.models import DEMO_ID
from personachat.app.serving import Serving, for_environment, on_zero_gpu
from personachat.app.settings import ChatInputs, parse_settings
from personachat.chat import ChatEngine, GenerationSettings
from personachat.interventions import (
    AblationSpec,
    CapSpec,
    DirectionSpec,
    InterventionError,
    SteeringSpec,
)
from personachat.model import LoadedModel, load_model
from personachat.model.tiny import tiny_model
from personachat.records import PersonaVector

pytest.importorskip("interp_engine", reason="interp-engine is a test dependency (pip install)")
from personachat.chat.interp import InterpChatEngine, eager_model

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "store" / "models" / "demo"
USER = [{"role": "user", "content": "Tell me about the ocean."}]
GREEDY = GenerationSettings(max_new_tokens=16)


@functools.cache
def demo() -> tuple[LoadedModel, dict[str, PersonaVector]]:
    from personachat.store import Store

    lm = load_model(str(DEMO))
    with Store(ROOT / "store", read_only=True) as store:
        vectors = {
            name: store.load_vector("store/models/demo", name, positions="question_span")
            for name in ("pirate", "cynic")
        }
    return lm, vectors


@functools.cache
def tiny() -> tuple[LoadedModel, dict[str, PersonaVector]]:
    lm = tiny_model("llama", n_layers=4, hidden=32)
    g = torch.Generator().manual_seed(5)
    shape = (lm.info.n_layers, lm.info.hidden_size)

    def vector(name: str) -> PersonaVector:
        v = torch.randn(shape, generator=g) * 2.0
        base = torch.randn(shape, generator=g)
        return PersonaVector(
            lm.info.model_id, name, v, positions="question_span", baseline_mean=base
        )

    return lm, {"pirate": vector("pirate"), "cynic": vector("cynic")}


MODELS = {"demo": demo, "tiny": tiny}
CASES: dict[str, dict[str, Any]] = {
    "all": {"steering": SteeringSpec({"pirate": 1.0}, layers="1-2:4")},
    "prompt": {"steering": SteeringSpec({"pirate": 1.0}, layers="1-2:4", positions="prompt")},
    "last 3": {
        "steering": SteeringSpec({"pirate": 1.5}, layers="0-2:3", positions="prompt", last_n=3)
    },
    "generated": {"steering": SteeringSpec({"pirate": 1.0}, layers="1-3:4", positions="generated")},
    "blend": {"steering": SteeringSpec({"pirate": 0.7, "cynic": -0.5}, layers={1: 3.0, 2: 5.0})},
    "direction mean": {"direction": DirectionSpec("pirate", "1-2", mode="mean")},
    "direction zero, steered": {
        "steering": SteeringSpec({"cynic": 1.0}, layers="1:4"),
        "direction": DirectionSpec("pirate", "0-2", mode="zero"),
    },
    "cap": {
        "steering": SteeringSpec({"pirate": 1.0}, layers="1-2:6"),
        "cap": CapSpec("pirate", "2-3", side="below", threshold=1.0, percentile=None),
    },
}


def engines(model: str) -> tuple[ChatEngine, InterpChatEngine]:
    lm, vectors = MODELS[model]()
    return ChatEngine(lm, vectors), InterpChatEngine(lm, eager_model(lm), vectors)


@pytest.mark.parametrize("model", sorted(MODELS))
@pytest.mark.parametrize("case", sorted(CASES))
def test_greedy_tokens_equal_personachats_own_runtime(model: str, case: str) -> None:
    ours, theirs = engines(model)
    want = ours.reply(USER, GREEDY, **CASES[case])
    got = theirs.reply(USER, GREEDY, **CASES[case])
    plain = ours.reply(USER, GREEDY)
    assert got.tokens == want.tokens and got.text == want.text
    if "steering" in CASES[case] and case != "generated":
        assert want.tokens != plain.tokens  # the case changes the reply
    assert got.readout is None and any("--engine hf" in w for w in got.warnings)


@pytest.mark.parametrize("model", sorted(MODELS))
def test_side_by_side_rows_are_their_own_requests(model: str) -> None:
    ours, theirs = engines(model)
    spec = SteeringSpec({"pirate": 1.0}, layers="1-2:4", positions="prompt")
    want = ours.reply(USER, GREEDY, steering=spec, side_by_side=True)
    got = theirs.reply(USER, GREEDY, steering=spec, side_by_side=True)
    assert (got.tokens, got.baseline_tokens) == (want.tokens, want.baseline_tokens)
    assert got.text != got.baseline_text
    streamed = [u.text for u in theirs.stream(USER, GREEDY, steering=spec)]
    assert streamed[-1] == want.text and len(streamed) > 2  # it streams token by token


REFUSED = [
    ({"ablation": AblationSpec(neurons="1:3,2:5")}, "neuron ablation"),
    ({"readout": ["pirate"]}, "the per-token readout"),
    (
        {
            "steering": SteeringSpec({"pirate": 1.0}, layers="1:2", positions="prompt"),
            "cap": CapSpec("pirate", "2", threshold=1.0, percentile=None),
        },
        "interventions at different positions (steering at the prompt, the cap at all tokens)",
    ),
    ({"handlers": [object()]}, "extra hook handler"),
]


@pytest.mark.parametrize(("kwargs", "words"), REFUSED)
def test_what_the_engine_cannot_express_is_refused_by_name(kwargs: Any, words: str) -> None:
    _, theirs = engines("tiny")
    with pytest.raises(InterventionError) as caught:
        theirs.stream(USER, GREEDY, **kwargs)
    assert words in str(caught.value) and "use --engine hf" in str(caught.value)
    penalty = GenerationSettings(max_new_tokens=4, repetition_penalty=1.2)
    with pytest.raises(InterventionError, match="a repetition penalty"):
        theirs.stream(USER, penalty)


def test_the_app_serves_the_page_through_the_engine() -> None:
    """``Serving(engine_kind="vllm")`` with the eager backend as its loader: the page's reply
    (no readout, a warning saying so) equals PersonaChat's own."""
    lm, vectors = demo()
    serving = Serving("vllm", loader=lambda lm, n: eager_model(lm))
    backend = Backend(DEMO_ID, ROOT / "store", models={DEMO_ID: lm}, serving=serving)
    engine = backend.engine(DEMO_ID)
    assert isinstance(engine, InterpChatEngine) and not engine.reads_out
    inputs = ChatInputs(DEMO_ID, ["pirate"], "", "1-2:4", max_new_tokens=12)
    settings = parse_settings(backend.limits(DEMO_ID), inputs)
    steps = list(backend.generate(DEMO_ID, settings, USER))
    spec = SteeringSpec({"pirate": 1.0}, "1-2:4")
    want = ChatEngine(lm, vectors).reply(USER, GenerationSettings(max_new_tokens=12), steering=spec)
    assert steps[-1].text == want.text and steps[-1].readout is None
    assert any("--engine hf" in w for w in steps[-1].render_warnings)
    backend.close()


def test_zero_gpu_takes_the_per_request_path() -> None:
    assert on_zero_gpu({"SPACES_ZERO_GPU": "true"}) and not on_zero_gpu({})
    space = for_environment("hf", env={"SPACES_ZERO_GPU": "true"})
    assert not space.shared_batch and "ZeroGPU" in space.path
    assert for_environment("hf", env={}).shared_batch
    with pytest.raises(ValueError, match="cannot run on a ZeroGPU Space"):
        for_environment("vllm", env={"SPACES_ZERO_GPU": "1"})
