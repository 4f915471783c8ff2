"""Calibrated readouts, the drift of a conversation and holding a persona, through the page's
handlers on a tiny model and a store extracted by the pipeline (so its vectors carry their
reference distributions), and on the bundled demo model.

Expected values come from outside the page: the engine's own readout pooled by
``ReplyReadout.pooled``, ranked by ``vectors.percentile_rank`` in the stored quantiles, scaled by
the stored baseline mean; a held reply equals the engine's reply under the same ``CapSpec``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np
import pytest
import torch

from personachat.app.backend import Backend
from personachat.app.calibration import AXIS
from personachat.app.page import Handlers
from personachat.app.readout import Readout
from personachat.app.settings import ChatInputs
from personachat.app.share import SHARED, parse_query, share_query
from personachat.chat import ChatEngine, GenerationSettings
from personachat.interventions import CapSpec, SteeringSpec
from personachat.model import LoadedModel
from personachat.model.tiny import tiny_model
from personachat.pipeline import AXIS_PERSONA, extract_axis, extract_vectors, register_results
from personachat.pipeline.axis import axis_personas
from personachat.pipeline.vectors import ExtractionResult
from personachat.prompts import chat_spans, from_json
from personachat.records import Persona, PersonaVector
from personachat.store import Store
from personachat.vectors import percentile_rank
from tests import tiny_data

ROOT = Path(__file__).resolve().parent.parent
DEMO = "store/models/demo"
MODEL = "tiny-llama"
STEER = {"personas": ["pirate", "plain"], "weights": "1, 0", "layer_spec": "1:2"}
UNSTEERED = {"personas": [], "weights": "", "layer_spec": ""}
AXIS_DATA = from_json(
    {
        "name": "axis",
        "personas": [
            {"name": "default", "system_prompt": "", "category": "neutral"},
            {"name": "helper", "system_prompt": "You are helpful.", "category": "neutral"},
            {"name": "pirate", "system_prompt": "You are a pirate.", "category": "role"},
            {"name": "chef", "system_prompt": "You are a chef.", "category": "role"},
        ],
        "questions": tiny_data.QUESTIONS,
    }
)


@functools.cache
def tiny() -> LoadedModel:
    return tiny_model("llama")


def build_store(root: Path, lm: LoadedModel, axis: bool = True) -> None:
    """pirate and chef (question span, with quantiles), ``plain`` registered without its
    quantiles (as the shipped store's older vectors), and the assistant axis (prompt_last)."""
    data = tiny_data.DATASET
    result = extract_vectors(lm, data, positions="question_span", progress=False)
    pirate = next(v for v in result.vectors if v.persona == "pirate")
    plain = dataclasses.replace(pirate, persona="plain", vector=pirate.vector * 0.5, quantiles=None)
    with Store(root) as store:
        register_results(store, lm, data.personas, result)
        store.register_vectors([plain], personas=[Persona("plain", "Say it plainly.")])
        if axis:
            vector, role_mean = extract_axis(lm, AXIS_DATA, positions="prompt_last", progress=False)
            found = ExtractionResult([vector], [role_mean], [], personas=[AXIS_PERSONA])
            register_results(store, lm, axis_personas(AXIS_DATA.name), found)


@pytest.fixture(scope="module")
def store_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("store")
    build_store(root, tiny())
    return root


@pytest.fixture
def h(store_root: Path) -> Handlers:
    return Handlers(Backend(MODEL, store_root, models={MODEL: tiny()}))


def stored(root: Path, persona: str, kind: str = "question_span") -> PersonaVector:
    with Store(root, read_only=True) as store:
        return store.load_vector(MODEL, persona, positions=kind)


def engine(root: Path) -> ChatEngine:
    """An engine straight from the store: the question-span personas and the axis."""
    names = ("pirate", "chef", "plain")
    return ChatEngine(
        tiny(), [*(stored(root, n) for n in names), stored(root, AXIS, "prompt_last")]
    )


def levels(vector: PersonaVector) -> tuple[np.ndarray, np.ndarray]:
    """(baseline mean's projection, persona mean's) on the unit vector, per layer."""
    assert vector.baseline_mean is not None
    v = vector.vector.double()
    zero = (vector.baseline_mean.double() * v).sum(-1) / v.norm(dim=-1)
    return zero.numpy(), (zero + v.norm(dim=-1)).numpy()


def send(h: Handlers, message: str, before: Any = None, **settings: Any) -> Any:
    """The last ``Turn`` of ``message`` after the turn ``before`` (None: a new conversation)."""
    inputs = ChatInputs(MODEL, max_new_tokens=8, **{**STEER, **settings})
    history, side, prompted = (
        (before.history, before.side, before.prompted) if before else ([],) * 3
    )
    readout = before.readout if before else None
    return list(h.turns(message, history, side, prompted, inputs, readout=readout))[-1]


def test_readouts_read_raw_scaled_and_percentile_as_computed_by_hand(
    h: Handlers, store_root: Path
) -> None:
    turn = send(h, "Tell me about the ocean.")
    readout = turn.readout
    messages = [{"role": "user", "content": "Tell me about the ocean."}]
    expected = engine(store_root).reply(
        messages,
        GenerationSettings(max_new_tokens=8),
        steering=SteeringSpec({"pirate": 1.0, "plain": 0.0}, layers="1:2"),
        readout=["pirate", "plain", AXIS],
    )
    assert expected.readout is not None and readout.personas == ("pirate", "plain", AXIS)
    got = readout.projections
    np.testing.assert_allclose(got, expected.readout.projections.numpy(), atol=1e-5)
    start = chat_spans(tiny().tokenizer, messages).question[0]
    pools = {
        "pirate": expected.readout.pooled("question_span", start)[:, 0].double().numpy(),
        AXIS: expected.readout.pooled("prompt_last")[:, 2].double().numpy(),
    }
    for name, kind, side in [
        ("pirate", "question_span", "baseline"),
        (AXIS, "prompt_last", "persona"),
    ]:
        vector = stored(store_root, name, kind)
        assert vector.quantiles is not None
        table = getattr(vector.quantiles, side).numpy()
        ranks = readout.percentiles(name)
        col = 0 if name == "pirate" else 2
        for layer in range(3):
            want = percentile_rank(got[:, layer, col], table[layer])
            np.testing.assert_allclose(ranks[:, layer], want, atol=1e-6)
        point = readout.turn_point(name)
        zero, one = levels(vector)
        np.testing.assert_allclose(point.raw, pools[name], atol=1e-5)
        np.testing.assert_allclose(point.scaled, (pools[name] - zero) / (one - zero), atol=1e-5)
        hand = [percentile_rank(pools[name][i], table[i]) for i in range(3)]
        np.testing.assert_allclose(point.percentile, hand, atol=1e-4)
        assert readout.references[col].side == side
    # without a reference distribution: raw and scaled only, and it says so
    assert readout.percentiles("plain") is None and readout.turn_point("plain").percentile is None
    numbers = h.readout_numbers(readout)
    assert (
        numbers["uncalibrated"] == ["plain"]
        and "without a reference" in numbers["uncalibrated_note"]
    )
    assert set(numbers["percentile"]["values"]) == {"pirate", AXIS}
    assert numbers["percentile"]["values"]["pirate"][0][1] == pytest.approx(
        float(readout.percentiles("pirate")[0, 1]), abs=1e-5
    )
    assert "default assistant's own samples" in numbers["percentile"]["reference"][AXIS]
    assert numbers["turn"]["pirate"]["positions"] == "question_span"
    assert numbers["turn"]["plain"]["percentile"] is None
    assert numbers["turn"][AXIS]["scaled"][1] == pytest.approx(
        float(readout.turn_point(AXIS).scaled[1]), abs=1e-5
    )
    html = h.tokens(readout, 1, "plain")
    assert "raw and scaled only" in html and "This turn, pooled over the question span" in html
    assert "percentile" in h.tokens(readout, 1, "pirate").split("pc-tokens")[1]


def test_the_drift_follows_a_three_turn_conversation(h: Handlers, store_root: Path) -> None:
    questions = ["Tell me about the ocean.", "Numbers?", "What is the capital of France?"]
    turn, history = None, []
    want: dict[str, list[np.ndarray]] = {"pirate": [], AXIS: []}
    chat = engine(store_root)
    for question in questions:
        turn = send(h, question, turn)
        history.append({"role": "user", "content": question})
        reply = chat.reply(
            history,
            GenerationSettings(max_new_tokens=8),
            steering=SteeringSpec({"pirate": 1.0, "plain": 0.0}, layers="1:2"),
            readout=["pirate", "plain", AXIS],
        )
        assert reply.readout is not None and reply.text == turn.history[-1]["content"]
        start = chat_spans(tiny().tokenizer, history).question[0]
        want["pirate"].append(reply.readout.pooled("question_span", start)[:, 0].numpy())
        want[AXIS].append(reply.readout.pooled("prompt_last")[:, 2].numpy())
        history.append({"role": "assistant", "content": reply.text})
    drift = h.drift_numbers(turn.readout)
    assert drift["turns"] == [1, 2, 3] and set(drift["vectors"]) == {"pirate", "plain", AXIS}
    pirate, axis = drift["vectors"]["pirate"], drift["vectors"][AXIS]
    axis_vector = stored(store_root, AXIS, "prompt_last")
    assert axis_vector.metrics is not None and axis_vector.quantiles is not None
    at = {"pirate": pirate["layer"], AXIS: axis["layer"]}
    assert at == {
        "pirate": stored(store_root, "pirate").metrics.best_layer,  # type: ignore[union-attr]
        AXIS: axis_vector.metrics.best_layer,
    }
    assert pirate["positions"] == "question_span" and axis["positions"] == "prompt_last"
    assert pirate["raw"] == pytest.approx(
        [float(w[at["pirate"]]) for w in want["pirate"]], abs=1e-4
    )
    assert axis["raw"] == pytest.approx([float(w[at[AXIS]]) for w in want[AXIS]], abs=1e-4)
    assert axis["raw_by_layer"][1] == pytest.approx(want[AXIS][1].tolist(), abs=1e-4)
    table = axis_vector.quantiles.persona.numpy()
    ranks = [float(percentile_rank(w[at[AXIS]], table[at[AXIS]])) for w in want[AXIS]]
    assert axis["percentile"] == pytest.approx(ranks, abs=1e-3)
    assert drift["vectors"]["plain"]["percentile"] == [None] * 3
    assert len(axis["band_scaled"]) == 2 and drift["band_percentiles"] == [5, 95]
    figure = json.loads(h.drift_plot(turn.readout).plot)
    names = [t["name"] for t in figure["data"]]
    assert f"assistant_axis (layer {at[AXIS]}, prompt_last)" in names
    assert [t["y"] for t in figure["data"] if t["name"].startswith("pirate")][-1] == pytest.approx(
        drift["vectors"]["pirate"]["scaled"], abs=1e-4
    )
    # a retried turn replaces its point; Undo keeps the turns left; Clear starts over
    again = list(
        h.retry_turns(
            turn.history,
            turn.side,
            turn.prompted,
            ChatInputs(MODEL, max_new_tokens=8, **STEER),
            readout=turn.readout,
        )
    )[-1]
    assert h.drift_numbers(again.readout)["turns"] == [1, 2, 3]
    history_left, side_left, _, _ = h.undo(again.history, again.side)
    kept = h.views_after(history_left, side_left, again.prompted, again.readout)[4]
    assert kept.projections is None and h.drift_numbers(kept)["turns"] == [1, 2]
    assert h.drift_numbers(h.clear()[4])["turns"] == []
    assert h.drift_numbers(None)["vectors"] == {}


def test_the_hold_settings_reach_a_cap_spec(h: Handlers, store_root: Path) -> None:
    messages = [{"role": "user", "content": "Tell me about the ocean."}]
    chat, settings = engine(store_root), GenerationSettings(max_new_tokens=8)
    plain = chat.reply(messages, settings).text
    cases = [
        (
            {
                "cap": "pirate",
                "cap_by": "threshold",
                "cap_level": 40.0,
                "cap_layers": "0-1",
                "cap_positions": "prompt",
            },
            CapSpec(
                "pirate",
                layers=[0, 1],
                threshold=40.0,
                percentile=None,
                reference="baseline",
                positions="prompt",
            ),
        ),
        (
            {"cap": AXIS, "cap_level": 60.0, "cap_layers": "all"},
            CapSpec(
                AXIS,
                layers=[0, 1, 2],
                percentile=60.0,
                reference="persona",
                positions="prompt",
                last_n=1,
            ),
        ),
    ]
    for values, spec in cases:
        turn = send(h, messages[0]["content"], **UNSTEERED, side_by_side=True, **values)
        held = chat.reply(messages, settings, cap=spec).text
        assert turn.history[-1]["content"] == held != plain
        assert turn.side[-1]["content"] == plain  # the plain column is never held
        assert turn.status.startswith(f"Done. Holding {values['cap']}'s projection at least")
    # refused with a message, before anything runs
    for values, words in [
        ({"cap": AXIS, "cap_level": 120}, "Hold percentile must be between 0.0 and 100.0"),
        ({"cap": "kraken"}, "Hold: 'kraken' is neither the assistant axis nor a persona"),
        ({"cap": "plain", "cap_level": 5}, "needs 'plain''s reference distribution"),
        ({"cap": "pirate", "cap_layers": "7"}, "Hold layers"),
    ]:
        turn = send(h, "Tell me about the ocean.", **UNSTEERED, **values)
        assert turn.history == [] and words in turn.status, turn.status
    # the panel's words, and a link carries the hold
    words = h.cap_info(MODEL, "", AXIS, "above", "percentile", 5, "0", "last prompt token")
    assert words.startswith(f"Holding {AXIS}'s projection at least the 5th percentile")
    assert "at the last prompt token" in words
    assert h.cap_info(MODEL, "", "none", "above", "percentile", 5, "0", "all") == "Nothing held."
    query = share_query({"cap": AXIS, "cap_level": 5.0, "cap_side": "below"})
    assert parse_query(dict(p.split("=") for p in query[1:].split("&"))) == {
        "cap": AXIS,
        "cap_level": 5.0,
        "cap_side": "below",
    }
    choices, line = h.cap_choices(MODEL)
    assert choices["choices"] == ["none", AXIS, "chef", "pirate", "plain"]
    assert line.startswith("**Assistant axis**: registered (axis_means, read from prompt_last")


@pytest.mark.slow
def test_the_axis_registers_from_the_page(tmp_path: Path) -> None:
    build_store(tmp_path, tiny(), axis=False)
    h = Handlers(Backend(MODEL, tmp_path, models={MODEL: tiny()}))
    choices, line = h.cap_choices(MODEL)
    assert AXIS not in choices["choices"] and "not in the store" in line
    turn = send(h, "Hi?", **UNSTEERED, cap=AXIS)
    assert "no assistant axis for this model" in turn.status
    assert "Register the assistant axis" in turn.status
    line, choices, status = h.register_axis(MODEL, "personas")
    assert status.startswith(f"Registered the assistant axis of `{MODEL}` (axis_means, read")
    assert AXIS in choices["choices"] and "registered (axis_means" in line
    vector = stored(tmp_path, AXIS, "prompt_last")
    assert vector.dataset == "personas" and vector.quantiles is not None
    assert vector.baseline == "roles" and vector.baseline_mean is not None
    turn = send(h, "Hi?", personas=["pirate"], weights="")
    assert AXIS in turn.readout.personas and AXIS in h.drift_numbers(turn.readout)["vectors"]


@pytest.mark.skipif(not (ROOT / DEMO / "config.json").is_file(), reason="no bundled demo model")
@pytest.mark.slow
def test_holding_the_assistant_on_the_demo_model() -> None:
    """The hold panel's recipe (the model card's setting) under the pirate's own prompt takes
    the pirate out with the facts kept, and leaves the default's plain reply as it was."""
    from personachat.prompts import demo

    h = Handlers(Backend(DEMO, ROOT / "store"))
    h.load(DEMO)
    out = h.recipe("hold", ["pirate"])
    values = {n: v for n, v in zip(SHARED, out[:-1], strict=True) if v != gr.skip()}
    prompted = bool(values.pop("prompted", False))
    assert values["cap"] == AXIS and values["system_prompt"] == "You are a pirate."
    inputs = dataclasses.replace(ChatInputs(DEMO, max_new_tokens=48), **values)
    axis = h.backend.axis(DEMO)
    spec = CapSpec(
        AXIS, layers=[0], percentile=5.0, reference="persona", positions="prompt", last_n=1
    )
    chat = ChatEngine(h.backend.lm(DEMO), [axis])
    for question in demo.eval_questions(1)[:3]:
        turn = list(h.turns(question.text, [], [], [], inputs, prompted=prompted))[-1]
        reply, beside = turn.history[-1]["content"], turn.side[-1]["content"]
        messages = [
            {"role": "system", "content": "You are a pirate."},
            {"role": "user", "content": question.text},
        ]
        assert reply == chat.reply(messages, GenerationSettings(max_new_tokens=48), cap=spec).text
        assert not demo.has_marker(reply, "pirate") and demo.has_marker(beside, "pirate")
        assert demo.fact_retention([reply], question.key) == 1.0
        assert "Holding assistant_axis's projection at least the 5th percentile" in turn.status
        default = dataclasses.replace(inputs, system_prompt="")
        turn = list(h.turns(question.text, [], [], [], default))[-1]
        assert turn.history[-1]["content"] == turn.side[-1]["content"]  # unchanged
    h.backend.close()


def test_a_readout_without_calibration_stays_as_it_was() -> None:
    """A readout built without references (an older caller) reads raw and scaled as before."""
    values = torch.arange(24, dtype=torch.float32).reshape(4, 3, 2).numpy()
    readout = Readout("m", ("a", "b"), ("x", "y", "z", "w"), 2, values)
    assert readout.percentiles("a") is None and readout.turn_point("a") is None
    assert readout.after(None, 1).drift.turns == ()
