"""``with steer(lm, vector): lm.model.generate(...)`` checked against the chat engine's steering.

The one-line form builds the same plan as ``ChatEngine`` without a prompt length (its windows
take the first forward as the prompt), leaves no hook behind, and reads every form of vectors and
layers the same way.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping

import pytest
import torch

import personachat
from personachat.chat import ChatEngine, GenerationSettings
from personachat.hooks import hook_count
from personachat.interventions import InterventionError, PositionMode, SteeringSpec, steer
from personachat.interventions.steering import Blend
from personachat.model import LoadedModel
from personachat.model.tiny import tiny_model
from personachat.records import PersonaVector

cached_tiny = functools.cache(tiny_model)
MESSAGES = [{"role": "user", "content": "Tell me about the ocean and the stars"}]
NEW_TOKENS = 8


class Boom(RuntimeError):
    pass


def vectors_for(lm: LoadedModel) -> dict[str, PersonaVector]:
    g = torch.Generator().manual_seed(3)
    shape = (lm.info.n_layers, lm.info.hidden_size)
    return {
        name: PersonaVector(lm.info.model_id, name, torch.randn(shape, generator=g))
        for name in ("pirate", "cynic")
    }


def generate(lm: LoadedModel, ids: torch.Tensor) -> list[int]:
    """Greedy new tokens of a plain ``generate`` call, stopping at the tokenizer's eos."""
    eos = lm.tokenizer.eos_token_id
    out = lm.model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=NEW_TOKENS,
        do_sample=False,
        eos_token_id=eos,
        pad_token_id=eos,
    )
    return [int(t) for t in out[0, ids.shape[1] :]]


def logits(lm: LoadedModel, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return lm.model(ids).logits


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("positions", ["all", "prompt", "generated"])
def test_steered_generate_equals_the_engines_steered_reply(
    arch: str, positions: PositionMode
) -> None:
    lm = cached_tiny(arch)
    vecs = vectors_for(lm)
    engine = ChatEngine(lm, vecs)
    spec = SteeringSpec({"pirate": 1.0, "cynic": -0.5}, layers="0-2:2", positions=positions)
    reply = engine.reply(MESSAGES, GenerationSettings(max_new_tokens=NEW_TOKENS), steering=spec)
    ids = engine.prompt_ids(MESSAGES)
    plain = generate(lm, ids)
    blend = {vecs["pirate"]: 1.0, vecs["cynic"]: -0.5}
    with steer(lm, blend, layers="0-2:2", positions=positions) as plan:
        steered = generate(lm, ids)
    assert steered == list(reply.tokens)
    assert steered != plain  # the steering changed the reply
    assert plan.steered_layers == reply.steered_layers == {0: 2.0, 1: 2.0, 2: 2.0}


def test_every_hook_is_removed_on_exit_on_error_and_on_bad_input() -> None:
    lm = cached_tiny("llama")
    pirate = vectors_for(lm)["pirate"]
    ids = lm.tokenizer("Tell me a story", return_tensors="pt")["input_ids"]
    before = hook_count(lm.model)
    clean = logits(lm, ids)
    with steer(lm, pirate, strength=2, layers=range(0, 3), positions="prompt"):
        assert hook_count(lm.model) == before + 3
        generate(lm, ids)
    assert hook_count(lm.model) == before
    with pytest.raises(Boom), steer(lm, pirate, layers="all"):
        assert hook_count(lm.model) == before + lm.info.n_layers
        logits(lm, ids)
        raise Boom("inside the block")
    assert hook_count(lm.model) == before
    with pytest.raises(InterventionError, match="out of range"), steer(lm, pirate, layers="0-99"):
        pytest.fail("the block must not run")
    assert hook_count(lm.model) == before
    assert torch.equal(logits(lm, ids), clean)


def test_layer_forms_equal_the_text_form() -> None:
    lm = cached_tiny("qwen2")
    pirate = vectors_for(lm)["pirate"]
    ids = lm.tokenizer("Tell me a story", return_tensors="pt")["input_ids"]
    with steer(lm, pirate, layers="0-2:2", positions="prompt") as plan:
        expected_logits = logits(lm, ids)
    with steer(lm, pirate, layers="0-2:2", positions="prompt"):
        expected_tokens = generate(lm, ids)
    forms: list[Mapping[int, float] | Iterable[int]] = [
        {0: 2.0, 1: 2.0, 2: 2.0},
        range(0, 3),
        [0, 1, 2],
    ]
    for layers in forms:
        with steer(lm, pirate, strength=2, layers=layers, positions="prompt") as other:
            assert torch.equal(logits(lm, ids), expected_logits), layers
        with steer(lm, pirate, strength=2, layers=layers, positions="prompt"):
            assert generate(lm, ids) == expected_tokens, layers
        assert other.steered_layers == plan.steered_layers == {0: 2.0, 1: 2.0, 2: 2.0}


def test_vector_forms_equal_the_mapping_form() -> None:
    lm = cached_tiny("llama")
    vecs = vectors_for(lm)
    pirate, cynic = vecs["pirate"], vecs["cynic"]
    ids = lm.tokenizer("Tell me a story", return_tensors="pt")["input_ids"]

    def steered(vectors: Blend) -> torch.Tensor:
        with steer(lm, vectors, layers="1-2:3"):
            return logits(lm, ids)

    one = steered({pirate: 1.0})
    assert not torch.equal(one, logits(lm, ids))
    for form in (pirate, [pirate], [(pirate, 1.0)]):
        assert torch.equal(steered(form), one)
    blend = steered({pirate: 0.7, cynic: -0.3})
    assert torch.equal(steered([(pirate, 0.7), (cynic, -0.3)]), blend)
    assert torch.equal(steered([pirate, cynic]), steered({pirate: 1.0, cynic: 1.0}))


def test_bad_vectors_are_refused() -> None:
    lm = cached_tiny("llama")
    pirate = vectors_for(lm)["pirate"]
    twin = PersonaVector(lm.info.model_id, "pirate", pirate.vector.clone())
    before = hook_count(lm.model)
    with pytest.raises(InterventionError, match="two vectors of persona 'pirate'"):
        with steer(lm, [pirate, twin], layers="0"):
            pass
    with pytest.raises(InterventionError, match="PersonaVector records"):
        with steer(lm, ["pirate"], layers="0"):  # type: ignore[list-item]
            pass
    with pytest.raises(InterventionError, match="blend is empty"):
        with steer(lm, [], layers="0"):
            pass
    wrong = PersonaVector("other", "pirate", torch.zeros(lm.info.n_layers, 3))
    with pytest.raises(InterventionError, match="another model"):
        with steer(lm, wrong, layers="0"):
            pass
    assert hook_count(lm.model) == before


def test_steer_is_public() -> None:
    assert personachat.steer is steer
    assert "steer" in personachat.__all__
