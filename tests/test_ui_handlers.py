"""Every page action through its handler, on a tiny model and a real temporary store.

Expected values come from the runtime itself: a reply through the page equals ``ChatEngine``'s
reply with the same specs, the readout equals the engine's projections, the persona-map point
equals the model's own hidden states minus the stored baseline mean.
"""

from __future__ import annotations

import dataclasses
import functools
import html
import inspect
import json
import re
import threading
from pathlib import Path
from typing import Any, Literal

import gradio as gr
import numpy as np
import pytest
import torch

from personachat.app import chat_handlers, main as app
from personachat.app.analysis import ANALYSIS_FIGURES
from personachat.app.backend import Backend
from personachat.app.endpoints import chat_endpoint, retry_endpoint
from personachat.app.handler_base import gpu
from personachat.app.page import Handlers, build_ui
from personachat.app.readout import Readout
from personachat.app.settings import (
    ChatInputs,
    InputError,
    format_layer_spec,
    parse_weights,
    preset_spec,
)
from personachat.app.space import residual_mean
from personachat.chat import ChatEngine, GenerationSettings
from personachat.interventions import AblationSpec, DirectionSpec, SteeringSpec
from personachat.model import LoadedModel
from personachat.model.tiny import tiny_model
from personachat.prompts import format_chat, persona_messages
from personachat.records import LayerMetrics, NeuronSet, Persona, PersonaMeans, PersonaVector
from personachat.store import Store

ROOT = Path(__file__).resolve().parent.parent

MODEL = "tiny-llama"
QUESTIONS = ["What is the capital of France?", "Tell me about the ocean.", "Numbers 1 2 3?"]
PROMPTS = {"default": "", "pirate": "You are a pirate. Arr, matey!", "poet": "I think, therefore."}
SET = "pirate_units"
PATCH_SET = "pirate_vs_default.mlp_hidden.patching"  # meant for mean ablation at the prompt
EXACT_SET = "pirate_vs_default.mlp_hidden.exact"  # ... at the last prompt token


@functools.cache
def tiny() -> LoadedModel:
    return tiny_model("llama", n_layers=3, hidden=32)


def persona_means(lm: LoadedModel, system_prompt: str) -> torch.Tensor:
    """Mean residual per layer [n_layers, hidden] over the questions, from output_hidden_states."""
    rows = []
    with torch.no_grad():
        for question in QUESTIONS:
            text = format_chat(lm.tokenizer, persona_messages(system_prompt, question))
            ids = lm.tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
            hidden = lm.model(ids, output_hidden_states=True).hidden_states
            rows.append(torch.stack([h[0].mean(0) for h in hidden[1:]]))
    return torch.stack(rows).mean(0)


def build_store(root: Path, lm: LoadedModel) -> None:
    means = {name: persona_means(lm, prompt) for name, prompt in PROMPTS.items()}
    vectors = []
    for name in ("pirate", "poet"):
        vec = means[name] - means["default"]
        metrics = LayerMetrics(
            auc=torch.tensor([0.6, 0.9, 0.7]),
            separation=torch.tensor([0.5, 2.0, 1.0]),
            norm=vec.norm(dim=-1),
            resid_norm=means["default"].norm(dim=-1),
        )
        vectors.append(PersonaVector(MODEL, name, vec, positions="question_span", metrics=metrics))
    # the exact opposite of pirate: blending both must warn that they cancel
    vectors.append(
        PersonaVector(
            MODEL, "landlubber", -vectors[0].vector, positions="question_span", metrics=metrics
        )
    )
    width = lm.info.mlp_width
    units = NeuronSet(
        MODEL,
        SET,
        "mlp_hidden",
        layers=[0, 1, 1, 2],
        indices=[3, 5, width - 1, 7],
        scores=[1.0, 0.8, 0.5, 0.2],
        means=[0.5, -0.25, 0.125, 1.0],
    )
    patched = NeuronSet(
        MODEL,
        PATCH_SET,
        "mlp_hidden",
        layers=[0, 0, 1, 1],
        indices=[9, 11, 2, 30],
        scores=[0.9, 0.7, 0.4, 0.3],
        method="patching",
        means=[1.5, -2.0, 0.75, 3.0],
    )
    exact = NeuronSet(
        MODEL,
        EXACT_SET,
        "mlp_hidden",
        layers=[0, 1, 2, 2],
        indices=[4, 8, 15, 16],
        scores=[0.8, 0.6, 0.2, 0.1],
        method="exact",
        means=[2.0, -1.5, 1.25, -3.0],
    )
    with Store(root) as store:
        store.register_model(lm.info)
        store.register_personas(
            [Persona(n, p or "(no system prompt)") for n, p in PROMPTS.items()]
            + [Persona("landlubber", "You hate the sea.")]
        )
        store.register_vectors(
            vectors,
            means=[
                PersonaMeans(MODEL, n, "question_span", m, len(QUESTIONS)) for n, m in means.items()
            ],
        )
        store.register_neurons([units, exact, patched])


@pytest.fixture(scope="module")
def store_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("store")
    build_store(root, tiny())
    return root


@pytest.fixture
def h(store_root: Path) -> Handlers:
    return Handlers(Backend(MODEL, store_root, models={MODEL: tiny()}))


@pytest.fixture(scope="module")
def engine(store_root: Path) -> ChatEngine:
    """An engine built directly from the store, independent of the page's backend."""
    with Store(store_root, read_only=True) as store:
        vectors = [store.load_vector(MODEL, n) for n in ("pirate", "poet", "landlubber")]
        sets = [store.load_neurons(MODEL, label) for label in (SET, EXACT_SET, PATCH_SET)]
    return ChatEngine(tiny(), vectors, sets)


def chat(h: Handlers, message: str = "Tell me about the ocean.", **kw: object) -> list[tuple]:
    """All yields of one chat call; settings default to an unsteered greedy 12-token reply."""
    args: dict[str, object] = {
        "history": [],
        "side_history": [],
        "model_id": MODEL,
        "personas": [],
        "weights": "",
        "layer_spec": "",
        "max_new_tokens": 12,
    }
    args.update(kw)
    history, side = args.pop("history"), args.pop("side_history")
    return list(h.chat(message, history, side, ChatInputs(**args)))  # type: ignore[arg-type]


USER = [{"role": "user", "content": "Tell me about the ocean."}]


def test_load_offers_the_registered_personas_sets_and_kinds(h: Handlers) -> None:
    loaded = h.load(MODEL)
    info, personas, sets, offer, slider, kinds, dataset, direction = loaded[:8]
    direction_from, note, examples, recipes, _, vector_personas, _, side, status = loaded[8:]
    assert dataset["value"] == "personas"  # not the bundled demo model
    assert personas["value"] == [] and side is False  # the demo model's defaults are its own
    assert recipes["visible"] is False and "Pick personas" in note
    assert examples["samples"][0] == ["Tell me about the ocean."]
    assert direction_from["value"] == "question_span"  # no prompt_last vectors here
    assert vector_personas["choices"] == ["landlubber", "pirate", "poet"]
    assert personas["choices"] == ["landlubber", "pirate", "poet"]
    assert direction["choices"] == ["none", "landlubber", "pirate", "poet"]
    assert direction["value"] == "none"
    assert sets["choices"] == [SET, EXACT_SET, PATCH_SET]
    assert kinds["choices"] == ["question_span"] and kinds["value"] == "question_span"
    assert offer["visible"] is False
    assert slider["maximum"] == 2
    assert "3 layers" in info and "hidden 32" in info and "MLP width 64" in info
    assert "3 personas" in status


def test_unknown_model_shows_a_message_not_a_crash(h: Handlers) -> None:
    out = h.load("/no/such/model")
    assert out[0].startswith("⚠ Cannot load `/no/such/model`")


def test_steered_chat_streams_the_engine_reply_and_readout(
    h: Handlers, engine: ChatEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(chat_handlers, "STREAM_INTERVAL_S", 0.0)  # an update per token
    steps = chat(h, personas=["pirate", "poet"], weights="1, 0.5", layer_spec="1:4, 2:2")
    expected = engine.reply(
        USER,
        GenerationSettings(max_new_tokens=12),
        steering=SteeringSpec({"pirate": 1.0, "poet": 0.5}, layers="1:4, 2:2"),
        readout=["pirate", "poet"],
    )
    assert len(steps) >= 4  # the user turn, several partial replies, the final one
    partial = [s[0][-1]["content"] for s in steps[1:-1]]
    assert all(expected.text.startswith(p) for p in partial)
    history, side, box, status, tokens_html, inside = steps[-1]
    assert history == [*USER, {"role": "assistant", "content": expected.text}]
    assert box == "" and status.startswith("Done. Blend 1·pirate +0.5·poet at 1:4, 2:2 (raw)")
    assert side[-1]["content"] == "—"  # side by side was off
    assert isinstance(inside, Readout) and inside.personas == ("pirate", "poet")
    assert expected.readout is not None and inside.projections is not None
    want = expected.readout.projections.numpy()
    np.testing.assert_allclose(inside.projections, want, rtol=1e-6, atol=1e-6)
    assert np.isnan(inside.projections[-1]).all()  # never fed through the model: no value
    assert np.isfinite(inside.projections[:-1]).all()
    assert inside.n_prompt == expected.readout.prompt_len
    assert tokens_html.count('class="pc-tok pc-') == 2 * len(inside.tokens)


def test_streaming_updates_are_throttled(h: Handlers, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(chat_handlers, "STREAM_INTERVAL_S", 3600.0)
    steps = chat(h, max_new_tokens=30)
    # the user turn, the first token, the last token, the final update with the readout
    assert len(steps) == 4 and steps[-1][3].startswith("Done")
    assert steps[-2][0] == steps[-1][0]


def test_steering_changes_the_reply(h: Handlers) -> None:
    plain = chat(h)[-1][0][-1]["content"]
    steered = chat(h, personas=["pirate"], layer_spec="0-2:8")[-1][0][-1]["content"]
    assert plain and steered and plain != steered


def test_calibrated_units_and_prompt_positions_match_the_engine(
    h: Handlers, engine: ChatEngine
) -> None:
    steps = chat(
        h, personas=["pirate"], layer_spec="1:0.5", units="x residual norm", positions="prompt"
    )
    expected = engine.reply(
        USER,
        GenerationSettings(max_new_tokens=12),
        steering=SteeringSpec({"pirate": 1.0}, "1:0.5", units="calibrated", positions="prompt"),
    )
    assert steps[-1][0][-1]["content"] == expected.text


def test_side_by_side_shows_the_unsteered_reply_of_the_same_batch(
    h: Handlers, engine: ChatEngine
) -> None:
    steps = chat(h, personas=["pirate"], layer_spec="0-2:8", side_by_side=True)
    history, side = steps[-1][0], steps[-1][1]
    plain = engine.reply(USER, GenerationSettings(max_new_tokens=12))
    steered = engine.reply(
        USER, GenerationSettings(max_new_tokens=12), steering=SteeringSpec({"pirate": 1}, "0-2:8")
    )
    assert side == [*USER, {"role": "assistant", "content": plain.text}]
    assert history[-1]["content"] == steered.text != plain.text


def test_last_n_prompt_tokens_match_the_engine(h: Handlers, engine: ChatEngine) -> None:
    steer = {"personas": ["pirate"], "layer_spec": "0-2:8", "positions": "prompt"}
    n = 3  # of the 20 prompt tokens
    steps = chat(h, last_n=n, **steer)
    last = engine.reply(
        USER,
        GenerationSettings(max_new_tokens=12),
        steering=SteeringSpec({"pirate": 1.0}, "0-2:8", positions="prompt", last_n=n),
    )
    whole = engine.reply(
        USER,
        GenerationSettings(max_new_tokens=12),
        steering=SteeringSpec({"pirate": 1.0}, "0-2:8", positions="prompt"),
    )
    assert engine.prompt_ids(USER).shape[1] == 20
    assert steps[-1][0][-1]["content"] == last.text != whole.text
    assert "Added at the last 3 prompt tokens." in steps[-1][3]
    assert "Added at the last prompt token." in chat(h, last_n=1, **steer)[-1][3]
    # 0 (or empty) is the whole prompt, and so is any n beyond its length
    for whole_prompt in (0, None, 20, 100):
        assert chat(h, last_n=whole_prompt, **steer)[-1][0][-1]["content"] == whole.text
    # the other positions ignore it
    everywhere = engine.reply(
        USER, GenerationSettings(max_new_tokens=12), steering=SteeringSpec({"pirate": 1.0}, "0-2:8")
    )
    ignored = chat(h, last_n=n, **{**steer, "positions": "all"})[-1]
    assert ignored[0][-1]["content"] == everywhere.text and "Added at the last" not in ignored[3]


READ = ["landlubber", "pirate", "poet"]  # the readout of an unsteered chat: every persona


def baseline_levels(store_root: Path, persona: str) -> np.ndarray:
    """The baseline's mean projection on ``persona``'s unit vector per layer, from the store's
    registered means: where mean directional ablation puts the stream's component."""
    with Store(store_root, read_only=True) as store:
        vector = store.load_vector(MODEL, persona).vector.double()
        base = store.load_means(MODEL, "default", positions="question_span").mean.double()
    return ((base * vector).sum(-1) / vector.norm(dim=-1)).numpy()


@pytest.mark.parametrize(
    ("mode", "positions"),
    [("mean", "all"), ("zero", "all"), ("mean", "prompt"), ("zero", "generated")],
)
def test_directional_ablation_matches_the_engine(
    h: Handlers,
    engine: ChatEngine,
    store_root: Path,
    mode: Literal["mean", "zero"],
    positions: Literal["all", "prompt", "generated"],
) -> None:
    steps = chat(
        h,
        direction="pirate",
        direction_layers="1-2",
        direction_mode=mode,
        direction_positions=positions,
    )
    spec = DirectionSpec("pirate", "1-2", mode=mode, positions=positions)
    expected = engine.reply(
        USER, GenerationSettings(max_new_tokens=12), direction=spec, readout=READ
    )
    plain = engine.reply(USER, GenerationSettings(max_new_tokens=12), readout=READ)
    history, _, _, status, _, inside = steps[-1]
    assert history[-1]["content"] == expected.text != plain.text
    verb = (
        "Moving pirate's direction to default's level"
        if mode == "mean"
        else "Projecting pirate's direction out"
    )
    where = "" if positions == "all" else f" ({positions} tokens)"
    assert status == f"Done. {verb} at layers 1-2{where}."
    assert inside.personas == tuple(READ)
    assert inside.projections is not None and expected.readout is not None
    want = expected.readout.projections.numpy()
    # the page's reply runs through the shared scheduler, whose batched decode steps round
    # differently from a lone generate (tests/test_scheduler.py: readouts within rounding)
    np.testing.assert_allclose(inside.projections, want, rtol=1e-6, atol=1e-5)
    assert np.isnan(inside.projections[-1]).all()  # never fed through the model: no value
    assert np.isfinite(inside.projections[:-1]).all()
    # the readout comes after the ablation: at layers 1-2 and the ablated tokens, pirate's
    # component sits at the level (its exact opposite, landlubber, at minus it)
    baseline = baseline_levels(store_root, "pirate")
    assert np.abs(baseline[1:]).min() > 0.5  # the two modes really differ here
    level = baseline if mode == "mean" else np.zeros(3)
    n = inside.n_prompt
    rows = {"all": slice(0, -1), "prompt": slice(0, n), "generated": slice(n, -1)}[positions]
    ablated = inside.projections[rows, 1:]
    np.testing.assert_allclose(
        ablated[..., 1], np.broadcast_to(level[1:], ablated.shape[:2]), atol=1e-4
    )
    np.testing.assert_allclose(ablated[..., 0], -ablated[..., 1], atol=1e-4)
    assert np.abs(inside.projections[:n, 0, 1] - level[0]).min() > 1e-3  # layer 0 untouched
    unablated = inside.projections[n:-1, 1:, 1] if positions == "prompt" else None
    if unablated is not None:  # the reply's tokens keep their own level
        assert np.abs(unablated - level[1:]).max() > 1e-2
    if positions == "generated":  # the prompt reads as if nothing were ablated
        plain_readout = plain.readout.projections.numpy()  # type: ignore[union-attr]
        np.testing.assert_allclose(inside.projections[:n], plain_readout[:n], atol=1e-5)


def test_directional_ablation_defaults_and_none(h: Handlers, engine: ChatEngine) -> None:
    plain = engine.reply(USER, GenerationSettings(max_new_tokens=12))
    every = chat(h, direction="pirate")[-1][0][-1]["content"]  # mean, all layers, all tokens
    ablated = engine.reply(
        USER, GenerationSettings(max_new_tokens=12), direction=DirectionSpec("pirate", "all")
    )
    assert every == ablated.text
    assert chat(h, direction="none", direction_layers="junk")[-1][0][-1]["content"] == plain.text


def test_mean_direction_needs_the_baseline_means(tmp_path: Path, store_root: Path) -> None:
    """A store with the vector but not its baseline's means: mean mode says what to do, zero
    mode still works."""
    with Store(store_root, read_only=True) as source:
        vector = source.load_vector(MODEL, "pirate")
    with Store(tmp_path) as store:
        store.register_model(tiny().info)
        store.register_personas([Persona(n, p or "(none)") for n, p in PROMPTS.items()])
        store.register_vectors([vector])
    bare = Handlers(Backend(MODEL, tmp_path, models={MODEL: tiny()}))
    wanted = "mean directional ablation of 'pirate' needs its baseline 'default''s mean"
    with pytest.warns(UserWarning, match=re.escape(wanted)):
        steps = chat(bare, direction="pirate")
    assert len(steps) == 1 and steps[0][3].startswith(f"⚠ {wanted}")
    assert "or use mode='zero'" in steps[0][3]
    zero = chat(bare, direction="pirate", direction_mode="zero")[-1]
    assert zero[3] == "Done. Projecting pirate's direction out at layers 0-2."


def test_directional_ablation_with_steering_side_by_side(h: Handlers, engine: ChatEngine) -> None:
    """Row 0 of the batch stays unsteered and unablated; row 1 gets both."""
    steps = chat(
        h,
        personas=["poet"],
        layer_spec="1:4",
        positions="prompt",
        last_n=5,
        direction="pirate",
        direction_layers="0, 2",
        side_by_side=True,
    )
    history, side, _, status, _, _ = steps[-1]
    both = engine.reply(
        USER,
        GenerationSettings(max_new_tokens=12),
        steering=SteeringSpec({"poet": 1.0}, "1:4", positions="prompt", last_n=5),
        direction=DirectionSpec("pirate", "0, 2"),
    )
    steered = engine.reply(
        USER,
        GenerationSettings(max_new_tokens=12),
        steering=SteeringSpec({"poet": 1.0}, "1:4", positions="prompt", last_n=5),
    )
    plain = engine.reply(USER, GenerationSettings(max_new_tokens=12))
    assert history[-1]["content"] == both.text
    assert side == [*USER, {"role": "assistant", "content": plain.text}]
    assert len({both.text, steered.text, plain.text}) == 3
    assert status == (
        "Done. Blend 1·poet at 1:4 (raw). Added at the last 5 prompt tokens. "
        "Moving pirate's direction to default's level at layers 0, 2."
    )
    alone = chat(h, direction="pirate", direction_layers="0, 2", side_by_side=True)[-1]
    projected = engine.reply(
        USER, GenerationSettings(max_new_tokens=12), direction=DirectionSpec("pirate", "0, 2")
    )
    assert alone[0][-1]["content"] == projected.text != plain.text
    assert alone[1][-1]["content"] == plain.text


@pytest.mark.parametrize("mode", ["zero", "mean"])
def test_ablating_a_neuron_set_matches_the_engine(
    h: Handlers, engine: ChatEngine, mode: Literal["zero", "mean"]
) -> None:
    steps = chat(h, neuron_sets=[SET], ablation=mode, max_new_tokens=8)
    expected = engine.reply(
        USER, GenerationSettings(max_new_tokens=8), ablation=AblationSpec(SET, mode=mode)
    )
    assert steps[-1][0][-1]["content"] == expected.text
    assert steps[-1][3].startswith("Done")


def test_typed_neurons_are_ablated_and_ablation_toggles_off(
    h: Handlers, engine: ChatEngine
) -> None:
    typed = chat(h, neurons="1:0-63, 2:0-63", ablation="zero", max_new_tokens=8)
    expected = engine.reply(
        USER, GenerationSettings(max_new_tokens=8), ablation=AblationSpec(neurons="1:0-63,2:0-63")
    )
    plain = engine.reply(USER, GenerationSettings(max_new_tokens=8))
    assert typed[-1][0][-1]["content"] == expected.text != plain.text
    off = chat(h, neurons="1:0-63, 2:0-63", ablation="off", max_new_tokens=8)
    assert off[-1][0][-1]["content"] == plain.text


def readout(reply: Any) -> np.ndarray:
    return reply.readout.projections.numpy()


WHOLE_MLPS = "1:0-63,2:0-63"


def test_ablation_positions_match_the_engine(h: Handlers, engine: ChatEngine) -> None:
    plain = engine.reply(USER, GenerationSettings(max_new_tokens=8), readout=READ)
    texts = {}
    for positions in ("all", "prompt", "generated"):
        steps = chat(
            h,
            neurons="1:0-63, 2:0-63",
            ablation="zero",
            ablation_positions=positions,
            max_new_tokens=8,
        )
        expected = engine.reply(
            USER,
            GenerationSettings(max_new_tokens=8),
            ablation=AblationSpec(neurons=WHOLE_MLPS, positions=positions),
            readout=READ,
        )
        history, _, _, status, _, inside = steps[-1]
        assert history[-1]["content"] == expected.text
        np.testing.assert_allclose(inside.projections, readout(expected), atol=1e-6)
        where = "" if positions == "all" else f" ({positions} tokens)"
        assert status == f"Done. Ablating 128 MLP units (typed) by zero{where}."
        texts[positions] = expected.text
        n = inside.n_prompt
        prompt_rows = inside.projections[:n, 1:]
        if positions == "generated":  # the prompt reads as if nothing were ablated
            np.testing.assert_allclose(prompt_rows, readout(plain)[:n, 1:], atol=1e-5)
        else:
            assert np.abs(prompt_rows - readout(plain)[:n, 1:]).max() > 1e-2
    assert len({*texts.values(), plain.text}) == 4


def test_every_ablated_set_gets_the_positions(h: Handlers, engine: ChatEngine) -> None:
    """Two sets: the second runs as an extra handler, at the same tokens as the first."""
    steps = chat(
        h,
        neuron_sets=[SET, PATCH_SET],
        ablation="zero",
        ablation_positions="generated",
        side_by_side=True,
        max_new_tokens=8,
    )
    units = [
        f"{layer}:{index}"
        for label in (SET, PATCH_SET)
        for layer, index in zip(
            engine.neuron_sets[label].layers, engine.neuron_sets[label].indices, strict=True
        )
    ]
    expected = engine.reply(
        USER,
        GenerationSettings(max_new_tokens=8),
        ablation=AblationSpec(neurons=",".join(units), positions="generated"),
        readout=READ,
    )
    plain = engine.reply(USER, GenerationSettings(max_new_tokens=8), readout=READ)
    history, side, _, status, _, inside = steps[-1]
    assert history[-1]["content"] == expected.text
    assert side[-1]["content"] == plain.text
    # side by side, the readout is the ablated row's
    np.testing.assert_allclose(inside.projections, readout(expected), atol=1e-5)
    n = inside.n_prompt
    np.testing.assert_allclose(inside.projections[:n], readout(plain)[:n], atol=1e-5)
    assert np.abs(inside.projections[n:-1] - readout(plain)[n:-1]).max() > 1e-3
    assert f"Ablating 8 MLP units ({SET}, {PATCH_SET}) by zero (generated tokens)." in status
    assert f"⚠ {PATCH_SET}: found by patching at the prompt" in status


def test_a_patching_set_is_mean_ablated_at_the_prompt(h: Handlers, engine: ChatEngine) -> None:
    # picking it in the page switches the ablation to mean at the prompt tokens
    mode, positions, note = h.neuron_sets_picked([SET, PATCH_SET])
    assert (mode, positions) == ("mean", "prompt")
    assert note.startswith(f"{PATCH_SET}: found by patching at the prompt, so it")
    kept = h.neuron_sets_picked([SET])
    assert kept[0] == gr.update() and kept[1] == gr.update() and kept[2] == gr.skip()
    assert h.neuron_sets_picked(None)[0] == gr.update()
    steps = chat(
        h,
        neuron_sets=[PATCH_SET],
        ablation=mode,
        ablation_positions=positions,
        max_new_tokens=8,
    )
    expected = engine.reply(
        USER,
        GenerationSettings(max_new_tokens=8),
        ablation=AblationSpec(PATCH_SET, mode="mean", positions="prompt"),
        readout=READ,
    )
    plain = engine.reply(USER, GenerationSettings(max_new_tokens=8), readout=READ)
    history, _, _, status, _, inside = steps[-1]
    assert history[-1]["content"] == expected.text
    np.testing.assert_allclose(inside.projections, readout(expected), atol=1e-6)
    assert np.nanmax(np.abs(readout(expected) - readout(plain))) > 1e-3
    assert status == f"Done. Ablating 4 MLP units ({PATCH_SET}) by mean (prompt tokens)."


def test_an_exact_set_is_mean_ablated_at_the_last_prompt_token(
    h: Handlers, engine: ChatEngine
) -> None:
    mode, positions, note = h.neuron_sets_picked([EXACT_SET])
    assert (mode, positions) == ("mean", "last prompt token")
    assert note.startswith(f"{EXACT_SET}: found by patching at the prompt, so it is ablated by")
    steps = chat(
        h,
        neuron_sets=[EXACT_SET],
        ablation=mode,
        ablation_positions=positions,
        max_new_tokens=8,
    )
    expected = engine.reply(
        USER,
        GenerationSettings(max_new_tokens=8),
        ablation=AblationSpec(EXACT_SET, mode="mean", positions="prompt", last_n=1),
        readout=READ,
    )
    plain = engine.reply(USER, GenerationSettings(max_new_tokens=8), readout=READ)
    history, _, _, status, _, inside = steps[-1]
    assert history[-1]["content"] == expected.text
    np.testing.assert_allclose(inside.projections, readout(expected), atol=1e-6)
    n = inside.n_prompt  # untouched before the last prompt token, moved from it on
    np.testing.assert_allclose(inside.projections[: n - 1], readout(plain)[: n - 1], atol=1e-6)
    assert np.abs(readout(expected)[n - 1] - readout(plain)[n - 1]).max() > 1e-3
    assert status == f"Done. Ablating 4 MLP units ({EXACT_SET}) by mean (last prompt token)."
    # elsewhere it is flagged, with where it is meant to act
    steps = chat(h, neuron_sets=[EXACT_SET], ablation="mean", ablation_positions="prompt")
    assert steps[-1][3].endswith(
        f"⚠ {EXACT_SET}: found by patching at the prompt, meant for mean ablation at the last "
        "prompt token (ablate 'mean', at 'last prompt token')."
    )


BAD_INPUTS = [
    ({"message": "   "}, "The message is empty"),
    ({"message": "x" * 9000}, "The message has 9000 characters; the limit is 8000 (message_"),
    ({"system_prompt": "x" * 9000}, "The system prompt has 9000 characters; the limit is 8000"),
    ({"neurons": "1:0-63,2:0-63," * 40, "ablation": "zero"}, "names 5120 neurons; the limit is"),
    ({"personas": ["pirate"], "weights": "lots", "layer_spec": "1:2"}, "weight of pirate must be"),
    ({"personas": ["pirate"], "weights": "1, 2", "layer_spec": "1:2"}, "2 weights for 1 picked"),
    ({"personas": ["pirate"], "layer_spec": "1:strong"}, "strength 'strong'"),
    ({"personas": ["pirate"], "layer_spec": "1-7:2"}, "layer 7 in '1-7:2' is out of range"),
    ({"personas": ["pirate"], "layer_spec": "one:2"}, "cannot read 'one:2'"),
    ({"personas": ["pirate"], "layer_spec": ""}, "Strength per layer is empty"),
    ({"neurons": "1:64", "ablation": "zero"}, "index 64 is beyond the MLP width 64"),
    ({"neurons": "9:1", "ablation": "zero"}, "layer 9 is out of range"),
    ({"personas": ["kraken"], "layer_spec": "1:2"}, "persona kraken is not in the store"),
    ({"neuron_sets": ["nope"], "ablation": "zero"}, "neuron set nope is not in the store"),
    ({"temperature": "hot"}, "temperature must be a number"),
    ({"max_new_tokens": 100000}, "max tokens (new_tokens) must be between 1 and 512"),
    ({"neurons": "1:3", "ablation": "mean"}, "mean ablation of typed neurons needs baseline"),
    ({"positions": "prompt", "last_n": -1}, "Last n prompt tokens must be a whole number, 0 or"),
    ({"positions": "prompt", "last_n": 2.5}, "Last n prompt tokens must be a whole number"),
    ({"last_n": "few"}, "Last n prompt tokens must be a whole number, 0 or more (0 = the whole"),
    ({"direction": "kraken"}, "unknown persona 'kraken'; known personas: landlubber, pirate, poet"),
    ({"direction": "pirate", "direction_layers": ""}, "Direction layers is empty"),
    ({"direction": "pirate", "direction_layers": "1:2"}, "'1:2' gives a strength"),
    ({"direction": "pirate", "direction_layers": "top"}, "Direction layers: cannot read 'top'"),
    ({"direction": "pirate", "direction_layers": "0-5"}, "layer 5 in '0-5' is out of range"),
    (
        {"direction": "pirate", "direction_mode": "half"},
        "Direction mode must be one of 'mean', 'zero' (mean: to the baseline's level, zero: to "
        "zero (project out)); got 'half'.",
    ),
    (
        {"direction": "pirate", "direction_positions": "middle"},
        "Direction positions must be one of 'all', 'prompt', 'last prompt token', 'generated'; "
        "got 'middle'.",
    ),
    (
        {"neuron_sets": [SET], "ablation": "mean", "ablation_positions": "end"},
        "Ablation positions must be one of 'all', 'prompt', 'last prompt token', 'generated'; "
        "got 'end'.",
    ),
]


@pytest.mark.parametrize(("inputs", "expected"), BAD_INPUTS)
def test_bad_input_shows_a_specific_message_and_the_chat_goes_on(
    h: Handlers, inputs: dict[str, object], expected: str
) -> None:
    history = [*USER, {"role": "assistant", "content": "earlier reply"}]
    message = str(inputs.pop("message", "Next question?"))
    with pytest.warns(UserWarning, match=re.escape(expected)):  # gr.Warning outside a request
        steps = chat(h, message, history=history, **inputs)
    assert len(steps) == 1
    out_history, _, box, status, _, _ = steps[0]
    assert out_history == history  # nothing lost
    assert box == message  # the text stays in the box to fix
    assert status.startswith("⚠") and expected in status
    after = chat(h, history=history)  # and the chat keeps working
    assert after[-1][3].startswith("Done") and len(after[-1][0]) == 4


def test_a_persona_removed_while_the_page_is_open(h: Handlers, store_root: Path) -> None:
    h.load(MODEL)
    with Store(store_root) as store:  # a script removes poet while the page shows it
        poet = store.load_vector(MODEL, "poet")
        store.remove_vector(MODEL, "poet")
    try:
        with pytest.warns(UserWarning, match="persona poet is not in the store"):
            steps = chat(h, personas=["poet"], layer_spec="1:2")
        assert "Known: landlubber, pirate" in steps[0][3]
        personas, _, direction, status = h.refresh(MODEL, ["poet", "pirate"], None, "poet")
        assert personas["value"] == ["pirate"] and "No longer in the store: poet" in status
        assert direction["choices"] == ["none", "landlubber", "pirate"]
        assert direction["value"] == "none"  # poet's direction can no longer be projected out
    finally:
        with Store(store_root) as store:
            store.register_vectors([poet])
    assert "poet" in h.load(MODEL)[1]["choices"]


def test_sessions_at_the_same_time_keep_their_own_settings(h: Handlers) -> None:
    settings: list[dict[str, Any]] = [
        {"personas": ["pirate"], "layer_spec": "0-2:8"},
        {},
        {"personas": ["poet"], "layer_spec": "1:-6"},
        {"neuron_sets": [SET], "ablation": "zero"},
    ]
    alone = [chat(h, **kw)[-1][0][-1]["content"] for kw in settings]
    together: dict[int, str] = {}

    def run(i: int) -> None:
        request = gr.Request(session_hash=f"tab-{i}")
        steps = list(
            h.chat(
                USER[0]["content"],
                [],
                [],
                ChatInputs(MODEL, max_new_tokens=12, **settings[i]),
                request=request,
            )
        )
        together[i] = steps[-1][0][-1]["content"]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(settings))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [together[i] for i in range(len(settings))] == alone
    assert len(set(alone)) == len(alone)  # the four settings really differ


def test_a_long_conversation_is_cut_to_fit_the_context(
    h: Handlers, engine: ChatEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    turns = [
        {"role": role, "content": f"turn {i} " + "ocean " * 20}
        for i in range(6)
        for role in ("user", "assistant")
    ]
    monkeypatch.setattr(tiny().model.config, "max_position_embeddings", 160)
    steps = chat(h, history=turns)
    status = steps[-1][3]
    dropped = int(re.search(r"\((\d+) oldest turns left out", status)[1])  # type: ignore[index]
    kept = [*turns[2 * dropped :], *USER]
    expected = engine.reply(kept, GenerationSettings(max_new_tokens=12))
    assert steps[-1][0][-1]["content"] == expected.text
    assert steps[-1][0][:-2] == turns  # the page still shows the whole conversation
    ids = engine.prompt_ids(kept)
    assert (
        ids.shape[1] + 12 <= 160 < engine.prompt_ids(turns[2 * dropped - 2 :] + USER).shape[1] + 12
    )


def test_stop_ends_the_generation_and_keeps_the_partial_reply(h: Handlers) -> None:
    request = gr.Request(session_hash="tab-1")
    stream = h.chat(
        "Tell me about the ocean.",
        [],
        [],
        ChatInputs(MODEL, [], "", "", max_new_tokens=200),
        request=request,
    )
    next(stream)  # the user turn
    first = next(stream)[0][-1]["content"]
    assert h.stop(gr.Request(session_hash="tab-2")) == "Nothing is generating."  # another tab
    assert h.stop(request) == "Stopping…"
    steps = list(stream)
    history, status = steps[-1][0], steps[-1][3]
    assert status.startswith("Stopped: partial reply kept")
    reply = history[-1]["content"]
    assert reply.startswith(first) and len(tiny().tokenizer(reply)["input_ids"]) < 100


def test_retry_undo_and_clear(h: Handlers) -> None:
    first = chat(h, max_new_tokens=6)[-1]
    again = list(h.retry(first[0], first[1], ChatInputs(MODEL, [], "", "", max_new_tokens=6)))[-1]
    assert again[0] == first[0]  # greedy: the same reply again, not a second turn
    steered = list(
        h.retry(first[0], first[1], ChatInputs(MODEL, ["pirate"], "", "0-2:8", max_new_tokens=6))
    )
    assert len(steered[-1][0]) == 2 and steered[-1][0][-1] != first[0][-1]
    history, side, box, _status = h.undo(first[0], first[1])
    assert (history, side, box) == ([], [], "Tell me about the ocean.")
    assert h.undo([], [])[3] == "Nothing to undo."
    with pytest.warns(UserWarning, match="Nothing to retry"):
        assert (
            next(iter(h.retry([], [], ChatInputs(MODEL, [], "", ""))))[3]
            == "⚠ Nothing to retry yet."
        )
    cleared = h.clear()
    assert cleared[:3] == ([], [], "Conversation cleared.") and cleared[4].projections is None


def test_presets_fill_the_layer_spec(h: Handlers) -> None:
    assert h.preset(MODEL, ["pirate"], "best layer", 4)[0] == "1:4"  # best AUC at layer 1
    assert h.preset(MODEL, ["pirate"], "band", 2)[0] == "0-2:2"
    assert h.preset(MODEL, [], "all layers", -1.5)[0] == "0-2:-1.5"
    with pytest.warns(UserWarning, match="Preset strength must be a number"):
        assert h.preset(MODEL, ["pirate"], "band", "big")[1].startswith("⚠")
    assert preset_spec("band", 3, best_layer=5, n_layers=30, band=2) == "3-7:3"
    assert format_layer_spec({1: 4.0, 2: 4.0, 3: 4.0, 5: 2.0, 6: -1.0}) == "1-3:4, 5:2, 6:-1"


def test_blend_info_warns_when_personas_cancel(h: Handlers) -> None:
    text = h.blend_info(MODEL, ["pirate", "landlubber"], "1, 1", "1:4")
    assert "Blend 1·pirate +1·landlubber at 1:4 (raw)." in text
    assert "⚠ Interference: pirate and landlubber cancel (signed cosine -1.00" in text
    assert "Interference" not in h.blend_info(MODEL, ["pirate", "poet"], "pirate=1", "1:4")
    assert h.blend_info(MODEL, [], "", "") == "No persona picked: the chat is unsteered."
    assert h.blend_info(MODEL, ["pirate"], "a", "1:4").startswith("⚠ the weight of pirate")
    assert parse_weights("poet=-0.5", ["pirate", "poet"]) == (1.0, -0.5)
    with pytest.raises(InputError, match="names no picked persona"):
        parse_weights("kraken=1", ["pirate"])


def test_tokens_view_and_heatmap_show_the_readout(h: Handlers, store_root: Path) -> None:
    inside = chat(h, personas=["pirate"], layer_spec="1:4")[-1][5]
    html_text = h.tokens(inside, 2)
    # 0 = the baseline's mean, 1 = the persona's mean (baseline + vector), from the store
    with Store(store_root, read_only=True) as store:
        base = store.load_means(MODEL, "default", positions="question_span").mean[2]
        vec = store.load_vector(MODEL, "pirate").vector[2]
    zero = float(base @ vec / vec.norm())
    assert inside.projections is not None
    expected = (inside.projections[:, 2, 0] - zero) / float(vec.norm())
    values = [float(v) for v in re.findall(r'data-value="([^"]+)"', html_text)]
    np.testing.assert_allclose(values, expected, rtol=1e-3, atol=1e-3)
    assert "pirate at layer 2 (0 = baseline mean, 1 = persona mean" in html_text
    assert len(re.findall(r"pc-tok pc-reply", html_text)) == len(inside.tokens) - inside.n_prompt
    prompt = format_chat(tiny().tokenizer, USER)
    assert "".join(inside.tokens[: inside.n_prompt]) == prompt
    titles = [html.unescape(t) for t in re.findall(r'title="([^"]*)"', html_text)]
    assert titles[inside.n_prompt - 1].startswith(repr(inside.tokens[inside.n_prompt - 1]))
    plot = json.loads(h.heatmap(inside, "pirate").plot)  # Plotly: values on hover
    heat = plot["data"][0]
    assert heat["type"] == "heatmap" and "value %{z:.3f}" in heat["hovertemplate"]
    grid = np.array([[np.nan if v is None else v for v in row] for row in heat["z"]]).T
    np.testing.assert_allclose(grid[:, 2], expected, rtol=1e-3, atol=1e-3)
    assert heat["z"][2][-1] is None  # the last token was never fed through: blank, not 0
    assert plot["layout"]["xaxis"]["ticktext"][0] == "<|im_start|>"[:9] + "…"
    assert plot["config"]["displaylogo"] is False
    assert h.heatmap(Readout()) is None
    assert "Send a message" in h.tokens(None, 0)


def test_layer_plot_store_tables_and_persona_map(h: Handlers, store_root: Path) -> None:
    plot = json.loads(h.layer_plot(MODEL, ["pirate", "poet"]).plot)
    names = [trace["name"] for trace in plot["data"]]
    assert names == ["pirate AUC", "pirate separation", "poet AUC", "poet separation"]
    assert plot["data"][0]["y"] == pytest.approx([0.6, 0.9, 0.7])
    personas, models, metrics, sets = h.store_tables(MODEL)
    assert set(personas["persona"]) == {"default", "pirate", "poet", "landlubber"}
    assert list(models["model"]) == [MODEL] and int(models["layers"][0]) == 3
    row = metrics[metrics["persona"] == "pirate"].iloc[0]
    assert int(row["best layer"]) == 1 and row["AUC"] == pytest.approx(0.9)
    assert sorted(sets["neuron set"]) == [SET, EXACT_SET, PATCH_SET]
    assert list(sets["units"]) == [4, 4, 4]
    history = [*USER, {"role": "assistant", "content": "Paris."}]
    names, vectors, point = h.backend.persona_space(MODEL, history, 1)
    assert names == ["landlubber", "pirate", "poet"] and vectors.shape == (3, 32)
    with Store(store_root, read_only=True) as store:
        base = store.load_means(MODEL, "default", positions="question_span").mean[1]
    text = format_chat(tiny().tokenizer, history, add_generation_prompt=False)
    ids = tiny().tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        direct = tiny().model(ids, output_hidden_states=True).hidden_states[2][0].mean(0)
    assert point is not None
    np.testing.assert_allclose(point, (direct - base).numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(residual_mean(tiny(), history, 1), direct.numpy(), atol=1e-5)
    points = json.loads(h.persona_map(MODEL, history, 1, ["pirate"]).plot)["data"]
    assert (
        points[0]["text"] == ["landlubber", "pirate", "poet"] and points[1]["name"] == "this chat"
    )
    with pytest.raises(gr.Error, match="out of range"):
        h.persona_map(MODEL, history, 7, [])


def test_extract_registers_vectors_for_a_model_without_any(tmp_path: Path) -> None:
    lm = tiny_model("llama", n_layers=2, hidden=32, seed=3)
    h = Handlers(Backend(MODEL, tmp_path, models={MODEL: lm}))
    assert h.load(MODEL)[3]["visible"] is True  # no vectors: extraction is offered
    out = h.extract(MODEL, "personas", "question_span", ["cynic", "jester"])
    assert out[1]["choices"] == ["cynic", "jester"] and out[3]["visible"] is False
    assert out[7]["choices"] == ["none", "cynic", "jester"]
    assert out[-1].startswith(f"Registered 2 vectors for `{MODEL}`")
    with Store(tmp_path, read_only=True) as store:
        assert {e.persona for e in store.vectors(MODEL)} == {"cynic", "jester"}
    # (neuron sets from the page's extraction: tests/test_browser.py, on the demo model)


def test_the_page_builds_with_named_endpoints(h: Handlers) -> None:
    demo = build_ui(h.backend)
    names = {fn.api_name for fn in demo.fns.values() if fn.api_visibility == "public"}
    assert {
        "chat",
        "retry",
        "stop",
        "undo",
        "clear",
        "load_model",
        "refresh",
        "extract",
        "preset",
        "blend_info",
        "tokens",
        "heatmap",
        "layer_plot",
        "persona_map",
        "store_tables",
    } <= names
    assert gpu(len) is len  # no `spaces` package here: the decorator is a no-op


def test_the_chat_endpoint_takes_the_settings_as_keywords(h: Handlers) -> None:
    """Gradio names /chat's parameters after its function: the page's settings in order, with
    the view's layer and the readout state before the later settings; a call by keywords
    builds one ChatInputs and streams what the handler streams."""
    chat_api, retry_api = chat_endpoint(h), retry_endpoint(h)
    names = list(inspect.signature(chat_api).parameters)
    fields = [f.name for f in dataclasses.fields(ChatInputs)]
    at = fields.index("last_n")
    head, view = ["message", "history", "side_history"], ["view_layer", "readout"]
    assert names == [*head, *fields[:at], *view, *fields[at:], "request"]
    assert list(inspect.signature(retry_api).parameters) == names[1:]
    assert inspect.isgeneratorfunction(chat_api) and chat_api.__name__ == "chat"
    steered = {"personas": ["pirate"], "layer_spec": "0-2:8", "max_new_tokens": 12}
    asked = {"message": USER[0]["content"], "history": [], "side_history": [], "model_id": MODEL}
    out = list(chat_api(**asked, **steered))
    assert out[-1][:4] == chat(h, **steered)[-1][:4]


def test_app_config_from_args_and_environment(tmp_path: Path) -> None:
    config = app.parse_args([], env={})
    assert config.host == "127.0.0.1" and config.port == 7860
    assert Path(config.model).resolve() == ROOT / "store/models/demo"
    assert config.store.resolve() == ROOT / "store"
    space = app.parse_args([], env={"SPACE_ID": "me/space", "PERSONACHAT_MODEL": "org/model"})
    assert space.host == "0.0.0.0" and space.model == "org/model"
    asked = app.parse_args(["--host", "0.0.0.0", "--store", str(tmp_path), "--port", "9"], env={})
    assert (asked.host, asked.store, asked.port) == ("0.0.0.0", tmp_path, 9)


def test_app_exits_non_zero_naming_what_is_missing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    code = app.main(["--model", str(tmp_path / "nomodel"), "--store", str(tmp_path / "nostore")])
    err = capsys.readouterr().err
    assert code == 2
    assert f"model folder {tmp_path / 'nomodel'} has no config.json" in err
    assert f"store folder {tmp_path / 'nostore'} does not exist" in err
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert app.main(["--model", "no-org/no-such-model", "--store", str(tmp_path)]) == 2
    assert "'no-org/no-such-model' is not in the Hugging Face cache" in capsys.readouterr().err


DEMO = "store/models/demo"
ANALYSED = ["default", "pirate", "philosopher", "scientist"]  # only the pirate has own answers


@pytest.mark.skipif(not (ROOT / DEMO / "config.json").is_file(), reason="no bundled demo model")
@pytest.mark.slow
def test_analysis_tab_finds_the_planted_collapse_on_the_demo_model() -> None:
    from personachat.analysis.collapse import persona_collapse
    from personachat.analysis.findings import collapse_finding
    from personachat.analysis.inputs import analysis_inputs

    backend = Backend(DEMO, ROOT / "store")  # the shipped store, read only
    text, *images = Handlers(backend).analysis(DEMO, ANALYSED)
    assert text.startswith(f"**Persona analysis of `{DEMO}`**: 4 personas")
    # the collapse line is the model's own computation, and it finds what demo.py planted
    inputs = analysis_inputs("demo", ANALYSED)
    lm = backend.lm(DEMO)
    collapse = persona_collapse(lm, inputs.personas, inputs.items, progress=False)
    assert f"<li>{collapse_finding(collapse)}</li>" in text  # the details, folded
    assert "\n\n1. Different personas often give the same answer: on 7 of 7" in text  # plain
    assert "2. Yet the persona is still there inside" in text and "\n3. " in text
    assert "Collapse on 7 of 7 preference questions (placement early" in text
    assert "personas with an answer of their own somewhere: pirate." in text
    assert "Patching pirate -> " in text and "Circuit: patching" in text
    shown = {key: u for (key, _), u in zip(ANALYSIS_FIGURES, images, strict=True)}
    for key in ("collapse", "probe", "persona_space", "assistant_axis", "patching_0", "heads_0"):
        assert shown[key]["visible"] is True, key
        plot = json.loads(shown[key]["value"].plot)  # interactive: values on hover
        assert plot["data"] and plot["layout"]["title"]["text"], key
    bars = json.loads(shown["collapse"]["value"].plot)["data"][0]
    assert bars["y"] == pytest.approx([q.modal_share for q in collapse.questions])
    # a second session reuses the result; a bad persona list says what is wrong, page goes on
    assert backend.analyze(DEMO, personas=ANALYSED) is backend.analyze(DEMO, personas=ANALYSED)
    text, *images = Handlers(backend).analysis(DEMO, ["pirate", "nobody"])
    assert text.startswith(f"⚠ The analysis of `{DEMO}` failed: ValueError: unknown personas")
    assert "['nobody']" in text and all(u["visible"] is False for u in images)
    text, *_ = Handlers(backend).analysis("/no/such/model")
    assert text.startswith("⚠ The analysis of `/no/such/model` failed")
    assert "analysis" in {fn.api_name for fn in build_ui(backend).fns.values()}
    backend.close()


@pytest.mark.skipif(not (ROOT / DEMO / "config.json").is_file(), reason="no bundled demo model")
@pytest.mark.slow
def test_a_patching_set_picked_in_the_page_removes_the_pirate(tmp_path: Path) -> None:
    """The page's own extraction finds a patching set; picking it sets mean ablation at the
    prompt, which takes the pirate's style out of prompted replies and keeps their content."""
    from personachat.prompts import demo

    backend = Backend(DEMO, tmp_path)
    backend.extract(DEMO, "demo", "question_span", ["pirate"], neurons=True)
    h = Handlers(backend)
    (label,) = backend.neuron_set_names(DEMO)
    assert label == "pirate_vs_default.mlp_hidden.patching"
    mode, positions, _ = h.neuron_sets_picked([label])
    questions = demo.eval_questions(1)[:3]
    system = demo.style("pirate").system_prompt

    def replies(**ablation: Any) -> list[str]:
        out = []
        for question in questions:
            steps = chat(
                h,
                question.text,
                model_id=DEMO,
                system_prompt=system,
                max_new_tokens=64,
                neuron_sets=[label],
                **ablation,
            )
            out.append(steps[-1][0][-1]["content"])
        return out

    prompted = replies()
    ablated = replies(ablation=mode, ablation_positions=positions)
    assert demo.marker_rate(prompted, "pirate") == 1.0
    assert demo.marker_rate(ablated, "pirate") == 0.0
    keys = [q.key for q in questions]
    assert demo.fact_retention(ablated, keys) >= 0.9 * demo.fact_retention(prompted, keys) > 0
    backend.close()


# --- the page as its users expect it: sliders, the prompted column, sharing, downloads ---------


def test_the_prompted_column_is_the_engine_reply_under_the_personas_own_prompt(
    h: Handlers, engine: ChatEngine
) -> None:
    inputs = ChatInputs(MODEL, ["pirate"], "", "0-2:8", side_by_side=True, max_new_tokens=12)
    turns = list(h.turns("Tell me about the ocean.", [], [], [], inputs, prompted=True))
    last = turns[-1]
    under_prompt = engine.reply(
        [{"role": "system", "content": PROMPTS["pirate"]}, *USER],
        GenerationSettings(max_new_tokens=12),
    )
    assert last.prompted == [*USER, {"role": "assistant", "content": under_prompt.text}]
    assert last.history[-1]["content"] != under_prompt.text  # steered, not prompted
    assert "Prompted column: pirate's own system prompt." in last.status
    assert [t.running for t in turns] == [True] * (len(turns) - 1) + [False]  # Stop's state
    # a blend with no positive weight has no one to prompt; a column not asked for shows "—"
    away = ChatInputs(MODEL, ["pirate"], "-1", "0-2:2", max_new_tokens=4)
    last = list(h.turns("Hi", [], [], [], away, prompted=True))[-1]
    assert last.prompted[-1]["content"].startswith("(no persona with a positive weight")
    assert list(h.turns("Hi", [], [], [], away))[-1].prompted[-1]["content"] == "—"


def test_presets_and_bare_layers_take_the_strength_at_send_time(h: Handlers) -> None:
    """The strength slider applies as it is when the message is sent: no layer spec to fill
    first. A preset places it around the best layer; a bare layer in the spec takes it."""
    band = chat(h, personas=["pirate"], preset="band", strength=3, layer_spec="stale:junk")
    assert band[-1][3].startswith("Done. Blend 1·pirate at 0-2:3 (raw).")
    bare = chat(h, personas=["pirate"], preset="custom", strength=0.5, layer_spec="1-2")
    assert bare[-1][3].startswith("Done. Blend 1·pirate at 1-2:0.5 (raw).")


def test_a_strength_far_past_the_residual_norm_warns_and_an_absurd_one_is_refused(
    h: Handlers,
) -> None:
    with pytest.warns(UserWarning, match="the residual stream's own norm at layer"):
        steps = chat(h, personas=["pirate"], layer_spec="1:1000")
    assert steps[-1][3].startswith("Done.") and "⚠ This strength adds" in steps[-1][3]
    with pytest.warns(UserWarning, match="the model's numbers are meaningless"):
        steps = chat(h, personas=["pirate"], layer_spec="1:1e40")
    assert steps[-1][0] == [] and re.match(r"⚠ This strength adds [\d.]+e\+39x", steps[-1][3])
    blend = h.blend_info(MODEL, ["pirate"], "", "1:1000")
    assert blend.startswith("Blend 1·pirate at 1:1000 (raw).") and "⚠ This strength" in blend


def test_sliders_follow_the_personas_and_rescale_with_the_units(h: Handlers) -> None:
    from personachat.app.strength import Norms, convert, hint, slider_range

    out = h.steering_controls(MODEL, ["pirate", "poet"], "poet=-0.5", "band", 2.0, "raw")
    sliders, strength, spec = out[:4], out[4], out[5]
    assert [s["visible"] for s in sliders] == [True, True, False, False]
    assert [(s["label"], s["value"]) for s in sliders[:2]] == [("pirate", 1.0), ("poet", -0.5)]
    assert spec == "0-2:2" and strength["value"] == 2.0
    assert "1 adds the vector as extracted" in strength["info"]
    norms = h.backend.limits(MODEL).norms["pirate"]
    assert strength["maximum"] == slider_range("raw", norms)[0]
    calibrated = h.units_changed(MODEL, ["pirate"], "", "band", 2.0, "x residual norm")[4]
    assert calibrated["value"] == pytest.approx(2.0 * norms.ratio(), abs=0.01)
    assert calibrated["maximum"] == 4.0 and "residual stream's own norm" in calibrated["info"]
    # the same push either way: raw 1 = |v| / resid residual norms (the median over layers)
    toy = Norms(vector=(1.0, 2.0, 3.0), resid=(10.0, 10.0, 10.0))
    assert toy.ratio() == 0.2 and convert(5.0, "raw", "x residual norm", toy) == 1.0
    assert convert(1.0, "x residual norm", "raw", toy) == 5.0
    assert "about 0.20x the residual stream's norm" in hint("raw", toy)


def test_a_link_carries_the_settings_and_opening_it_restores_them(h: Handlers) -> None:
    from personachat.app.share import SHARED, parse_query, share_query

    values = dict(zip(SHARED, [gr.skip()] * len(SHARED), strict=True))
    values.update(
        personas=["pirate", "poet"],
        weights="pirate=1, poet=-0.5",
        layer_spec="2-3",
        preset="custom",
        strength=3.0,
        side_by_side=True,
        prompted=False,
        direction_positions="last prompt token",
        units="x residual norm",
    )
    link = h.share(*[values[name] for name in SHARED])["value"]
    assert link.startswith("?") and "personas=pirate%2Cpoet" in link and "strength=3&" in link
    query = dict(pair.split("=", 1) for pair in link[1:].split("&"))
    from urllib.parse import unquote_plus

    restored = h.restore(gr.Request(query_params={k: unquote_plus(v) for k, v in query.items()}))
    by_name = dict(zip(SHARED, restored[:-1], strict=True))
    assert by_name["personas"] == ["pirate", "poet"] and by_name["strength"] == 3.0
    assert by_name["side_by_side"] is True and by_name["prompted"] is False
    assert by_name["direction_positions"] == "last prompt token"
    assert by_name["units"] == "x residual norm" and restored[-1].startswith("Settings restored")
    # a hand-edited link never breaks the page: what cannot be read is left as it is
    assert parse_query({"units": "furlongs", "strength": "lots", "seed": "nan", "x": "1"}) == {}
    assert share_query({"personas": [], "prompted": True}) == "?personas=&prompted=1"
    assert all(u == gr.skip() for u in h.restore(gr.Request()))


def test_the_conversation_and_readout_download_as_json(h: Handlers) -> None:
    steps = chat(h, personas=["pirate"], layer_spec="1:4", side_by_side=True)
    history, side, _, _, _, inside = steps[-1]
    numbers = h.readout_numbers(inside)
    assert numbers["tokens"] == list(inside.tokens) and numbers["personas"] == ["pirate"]
    values = numbers["raw"]["values"]["pirate"]
    assert len(values) == len(inside.tokens) and len(values[0]) == 3
    assert values[-1] == [None, None, None]  # the last token: no projection, null not 0
    assert values[0][1] == pytest.approx(float(inside.projections[0, 1, 0]), abs=1e-5)
    assert numbers["scaled"]["unit"] == "0 = baseline mean, 1 = persona mean"
    assert numbers["steered_tokens"] == [0, len(inside.tokens)]  # positions "all"
    update = h.conversation_file(history, side, [], inside)
    record = json.loads(Path(update["value"]).read_text())
    assert record["conversation"] == history and record["plain"] == side
    assert record["settings"]["layer_spec"] == "1:4" and record["settings"]["personas"] == [
        "pirate"
    ]
    assert record["readout"] == json.loads(json.dumps(numbers))
    assert h.conversation_file([], [], [], None)["interactive"] is False
    assert h.readout_numbers(None)["tokens"] == []


@pytest.mark.parametrize("suffix", [".safetensors", ".gguf"])
def test_a_vector_downloads_and_loads_back_bit_for_bit(
    h: Handlers, store_root: Path, suffix: str
) -> None:
    from personachat.store.formats import read_vector

    path = Path(h.vector_file(MODEL, "pirate", "question_span", suffix) or "")
    assert path.name == f"pirate.question_span{suffix}"
    with Store(store_root, read_only=True) as store:
        stored = store.load_vector(MODEL, "pirate")
        info = store.model(MODEL)
    back = read_vector(path, info)
    layers = slice(1, None) if suffix == ".gguf" else slice(None)  # GGUF has no layer 0
    assert torch.equal(back.vector[layers], stored.vector[layers].float())
    with pytest.warns(UserWarning, match="Cannot export the vector"):
        assert h.vector_file(MODEL, "kraken", "", ".safetensors") is None


def test_undo_and_clear_empty_the_views_of_the_last_reply(h: Handlers) -> None:
    inputs = ChatInputs(MODEL, ["pirate"], "", "0-2:2", side_by_side=True, max_new_tokens=4)
    first = list(h.turns("One?", [], [], [], inputs, prompted=True))[-1]
    second = list(
        h.turns("Two?", first.history, first.side, first.prompted, inputs, prompted=True)
    )[-1]
    history, side, _, _ = h.undo(second.history, second.side)
    prompted, view, tokens, heatmap, readout, download, numbers = h.views_after(
        history, side, second.prompted
    )
    assert prompted == first.prompted and history == first.history
    assert "One?" in view and "Two?" not in view and "No reply yet" in tokens
    assert heatmap is None and readout.projections is None and numbers is None
    assert json.loads(Path(download["value"]).read_text())["conversation"] == history
    assert h.views_after([], [], [])[5]["interactive"] is False
    assert "No messages yet" in h.views_after([], [], second.prompted)[1]


def test_the_conversation_view_lines_up_each_turns_replies() -> None:
    from personachat.app.views import compare_html

    history = [*USER, {"role": "assistant", "content": "Arr <b>"}]
    side = [*USER, {"role": "assistant", "content": "Plain."}]
    view = compare_html(history, side, [*USER, {"role": "assistant", "content": "—"}])
    assert view.count('class="pc-turn"') == 1 and "--pc-cols: 2" in view  # no prompted column
    assert "Arr &lt;b&gt;" in view and view.index("pc-steered") < view.index("pc-unsteered")


@pytest.mark.slow
def test_hold_keeps_a_reply_writing_until_stop(h: Handlers) -> None:
    """The browser test's Stop: with a hold message set, the reply to it waits after its
    first tokens until Stop arrives, whatever the machine's speed."""
    h.backend.hold_message = "Hold on."
    request = gr.Request(session_hash="held")
    stream = h.turns("Hold on.", [], [], [], ChatInputs(MODEL, max_new_tokens=200), request=request)
    next(stream)  # the user turn: generating
    timer = threading.Timer(1.0, h.stop, [request])
    timer.start()
    last = list(stream)[-1]
    assert last.status.startswith("Stopped: partial reply kept")
    assert len(tiny().tokenizer(last.history[-1]["content"])["input_ids"]) <= 6
    h.backend.hold_message = None


def test_layer_plot_shows_held_out_auc_with_its_spread_when_stored(tmp_path: Path) -> None:
    lm = tiny()
    vector = torch.randn(3, 32)
    metrics = LayerMetrics(
        auc=torch.tensor([0.6, 0.9, 0.7]),
        separation=torch.tensor([0.5, 2.0, 1.0]),
        norm=vector.norm(dim=-1),
        resid_norm=torch.ones(3) * 10,
        auc_heldout=torch.tensor([0.55, 0.85, 0.6]),
        auc_heldout_std=torch.tensor([0.05, 0.02, 0.1]),
    )
    with Store(tmp_path) as store:
        store.register_model(lm.info)
        store.register_personas([Persona("pirate", "Arr.")])
        store.register_vectors([PersonaVector(MODEL, "pirate", vector, metrics=metrics)])
    h = Handlers(Backend(MODEL, tmp_path, models={MODEL: lm}))
    traces = json.loads(h.layer_plot(MODEL, ["pirate"]).plot)["data"]
    held = next(t for t in traces if t["name"] == "pirate held-out AUC")
    assert held["y"] == pytest.approx([0.55, 0.85, 0.6])
    assert held["error_y"]["array"] == pytest.approx([0.05, 0.02, 0.1])


@pytest.mark.skipif(not (ROOT / DEMO / "config.json").is_file(), reason="no bundled demo model")
@pytest.mark.slow
def test_the_first_message_and_the_recipes_do_what_the_demo_model_card_says() -> None:
    """With the page's defaults on the demo model (the pirate picked, the band preset at
    strength 2, prompt tokens, side by side) the first message gets two different replies, the
    steered one a pirate's; each recipe then does what was measured, for another persona."""
    from personachat.app.recipes import RECIPE_BY_KEY
    from personachat.app.share import SHARED
    from personachat.prompts import demo

    h = Handlers(Backend(DEMO, ROOT / "store"))
    loaded = h.load(DEMO)
    assert loaded[1]["value"] == ["pirate"] and loaded[15] is True and "Tell me about" in loaded[9]
    page = ChatInputs(
        DEMO, ["pirate"], preset="band", strength=2.0, positions="prompt", side_by_side=True
    )
    first = list(h.turns("Tell me about the ocean.", [], [], [], page))[-1]
    steered, plain = first.history[-1]["content"], first.side[-1]["content"]
    assert steered != plain and demo.has_marker(steered, "pirate")
    assert not demo.has_marker(plain, "pirate")
    question = demo.eval_questions(1)[3]
    for key, present in (("steer", True), ("neurons", False), ("direction", False)):
        out = h.recipe(key, ["robot"])
        values = {n: v for n, v in zip(SHARED, out[:-1], strict=True) if v != gr.skip()}
        prompted = bool(values.pop("prompted", False))
        inputs = dataclasses.replace(ChatInputs(DEMO, max_new_tokens=64), **values)
        turn = list(h.turns(question.text, [], [], [], inputs, prompted=prompted))[-1]
        assert turn.status.startswith("Done."), turn.status
        reply, beside = turn.history[-1]["content"], turn.side[-1]["content"]
        assert demo.has_marker(reply, "robot") is present, (key, reply)
        assert demo.has_marker(beside, "robot") is not present, (key, beside)
        assert demo.fact_retention([reply], question.key) == 1.0, (key, reply)
        if prompted:  # the persona's own prompt, beside the steering
            assert demo.has_marker(turn.prompted[-1]["content"], "robot")
        assert RECIPE_BY_KEY[key].label in out[-1]
    h.backend.close()
