"""``gradio_client`` drives the app's named endpoints over HTTP and gets the Python API's reply.

The page is served in this process on a free localhost port (the app's model and store, as
``app.py`` resolves them); the expected reply comes from a ``ChatEngine`` built directly from
the model and the store, not from the page's backend.
"""

from __future__ import annotations

import json
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from gradio_client.exceptions import AppError

from personachat.app import main as app
from personachat.app.backend import Backend
from personachat.app.page import CSS, build_ui
from personachat.chat import ChatEngine, GenerationSettings
from personachat.interventions import AblationSpec, CapSpec, DirectionSpec, SteeringSpec
from personachat.model import load_model
from personachat.store import Store

ROOT = Path(__file__).resolve().parent.parent

CONFIG = app.parse_args([])
QUESTION = "Tell me about the ocean."
pytestmark = pytest.mark.skipif(
    bool(app.missing(CONFIG)), reason=f"the app's model or store is missing: {app.missing(CONFIG)}"
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def store_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the app's store (never written by the tests), with vectors and a neuron set
    extracted for one persona when it has none for this model (as the page offers)."""
    copy = tmp_path_factory.mktemp("store")
    shutil.copytree(CONFIG.store, copy, dirs_exist_ok=True, ignore=shutil.ignore_patterns("models"))
    backend = Backend(CONFIG.model, copy)
    if not backend.persona_names(CONFIG.model) or not backend.neuron_set_names(CONFIG.model):
        dataset = "demo" if backend.is_demo(CONFIG.model) else "personas"
        persona = "pirate" if dataset == "demo" else "cynic"
        backend.extract(CONFIG.model, dataset, "question_span", [persona], neurons=True)
    backend.close()
    return copy


@pytest.fixture(scope="module")
def served(store_copy: Path) -> Iterator[tuple[Any, Backend]]:
    from gradio_client import Client

    backend = Backend(CONFIG.model, store_copy)
    demo = build_ui(backend)
    demo.queue()
    port = free_port()
    demo.launch(
        server_name="127.0.0.1", server_port=port, css=CSS, prevent_thread_lock=True, quiet=True
    )
    try:
        yield Client(f"http://127.0.0.1:{port}/", verbose=False), backend
    finally:
        demo.close()
        backend.close()


@pytest.fixture(scope="module")
def engine(served: tuple[Any, Backend]) -> tuple[ChatEngine, str, str]:
    """An engine straight from the model folder and the store, plus a persona and a set."""
    backend = served[1]
    lm = load_model(CONFIG.model)
    store_id = backend.store_id(CONFIG.model)
    kind = backend.vector_kinds(CONFIG.model)[0]
    with Store(backend.store_path, read_only=True) as store:
        names = sorted({e.persona for e in store.vectors(store_id, positions=kind)})
        vectors = [store.load_vector(store_id, n, positions=kind) for n in names]
        sets = [store.load_neurons(store_id, e.label) for e in store.neuron_sets(store_id)]
    persona = "pirate" if "pirate" in names else names[-1]
    return ChatEngine(lm, vectors, sets), persona, sets[0].label if sets else ""


def call_chat(client: Any, **settings: Any) -> tuple[Any, ...]:
    args = {
        "message": QUESTION,
        "history": [],
        "side_history": [],
        "model_id": CONFIG.model,
        "weights": "",
        "positions": "prompt",
        "max_new_tokens": 40,
    }
    args.update(settings)
    return tuple(client.predict(**args, api_name="/chat"))


def text(message: dict[str, Any]) -> str:
    content = message["content"]
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if isinstance(part, dict))


def test_chat_endpoint_with_steering_matches_the_python_api(
    served: tuple[Any, Backend], engine: tuple[ChatEngine, str, str]
) -> None:
    client, _ = served
    chat_engine, persona, _ = engine
    history, side, box, status, tokens_html = call_chat(
        client, personas=[persona], layer_spec="1-2:4", side_by_side=True
    )
    messages = [{"role": "user", "content": QUESTION}]
    steered = chat_engine.reply(
        messages,
        GenerationSettings(max_new_tokens=40),
        steering=SteeringSpec({persona: 1.0}, layers="1-2:4", positions="prompt"),
    )
    plain = chat_engine.reply(messages, GenerationSettings(max_new_tokens=40))
    assert text(history[-1]) == steered.text
    assert text(side[-1]) == plain.text != steered.text
    assert box == "" and status.startswith(f"Done. Blend 1·{persona} at 1-2:4 (raw).")
    assert 'class="pc-tok pc-reply"' in tokens_html


def test_last_n_and_directional_ablation_over_the_api(
    served: tuple[Any, Backend], engine: tuple[ChatEngine, str, str]
) -> None:
    client, _ = served
    chat_engine, persona, _ = engine
    other = next(p for p in sorted(chat_engine.vectors) if p != persona)
    history, side, _, status, _ = call_chat(
        client,
        personas=[persona],
        layer_spec="1-2:4",
        last_n=3,
        direction=other,
        direction_layers="0-1",
        side_by_side=True,
    )
    messages = [{"role": "user", "content": QUESTION}]
    expected = chat_engine.reply(
        messages,
        GenerationSettings(max_new_tokens=40),
        steering=SteeringSpec({persona: 1.0}, layers="1-2:4", positions="prompt", last_n=3),
        direction=DirectionSpec(other, "0-1"),
    )
    plain = chat_engine.reply(messages, GenerationSettings(max_new_tokens=40))
    assert text(history[-1]) == expected.text
    assert text(side[-1]) == plain.text  # the other row: neither steered nor ablated
    assert "Added at the last 3 prompt tokens." in status
    baseline = chat_engine.vectors[other].baseline
    assert f"Moving {other}'s direction to {baseline}'s level at layers 0-1." in status
    # projected out at the prompt tokens only
    history, _, _, status, _ = call_chat(
        client,
        direction=persona,
        direction_layers="all",
        direction_mode="zero",
        direction_positions="prompt",
    )
    projected = chat_engine.reply(
        messages,
        GenerationSettings(max_new_tokens=40),
        direction=DirectionSpec(persona, "all", mode="zero", positions="prompt"),
    )
    assert text(history[-1]) == projected.text
    assert status.startswith(f"Done. Projecting {persona}'s direction out at layers 0-")
    assert status.endswith(" (prompt tokens).")
    out = call_chat(client, direction="no_such_persona")
    assert out[0] == [] and out[3].startswith("⚠ unknown persona 'no_such_persona'; known")
    # a value outside a radio's choices is refused by Gradio before the handler runs
    with pytest.raises(AppError, match=r"'half' .* not in the list of choices: \['mean', 'zero'\]"):
        call_chat(client, direction=persona, direction_mode="half")
    # the new parameters come last, with defaults: calls that leave them out keep working
    api = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    for name in ("/chat", "/retry"):
        params = [
            (p["parameter_name"], p["parameter_has_default"], p["parameter_default"])
            for p in api[name]["parameters"]
        ]
        at = [p[0] for p in params].index("last_n")
        tail = params[at : at + 9]
        assert tail == [
            ("last_n", True, 0),
            ("direction", True, "none"),
            ("direction_layers", True, "all"),
            ("direction_mode", True, "mean"),
            ("direction_positions", True, "all"),
            ("ablation_positions", True, "all"),
            ("preset", True, "custom"),  # the layer spec as typed
            ("strength", True, 1),  # what a bare layer in the spec takes
            ("direction_from", True, ""),  # the steering's kind of vector
        ]
        assert params[at + 9 :] == [  # holding a persona: nothing held, else the measured setting
            ("cap", True, "none"),
            ("cap_side", True, "above"),
            ("cap_by", True, "percentile"),
            ("cap_level", True, 5),
            ("cap_layers", True, "0"),
            ("cap_positions", True, "last prompt token"),
        ]


def test_ablation_and_bad_input_over_the_api(
    served: tuple[Any, Backend], engine: tuple[ChatEngine, str, str]
) -> None:
    client, _ = served
    chat_engine, _, label = engine
    if not label:
        pytest.skip("the store has no neuron set for this model")
    history = call_chat(client, neuron_sets=[label], ablation="zero")[0]
    expected = chat_engine.reply(
        [{"role": "user", "content": QUESTION}],
        GenerationSettings(max_new_tokens=40),
        ablation=AblationSpec(label, mode="zero"),
    )
    assert text(history[-1]) == expected.text
    history, _, _, status, _ = call_chat(
        client, neuron_sets=[label], ablation="mean", ablation_positions="prompt"
    )
    at_prompt = chat_engine.reply(
        [{"role": "user", "content": QUESTION}],
        GenerationSettings(max_new_tokens=40),
        ablation=AblationSpec(label, mode="mean", positions="prompt"),
    )
    assert text(history[-1]) == at_prompt.text
    assert status.endswith(f"({label}) by mean (prompt tokens).")
    choices = r"\['all', 'prompt', 'last prompt token', 'generated'\]"
    with pytest.raises(AppError, match=rf"'end' .* choices: {choices}"):
        call_chat(client, neuron_sets=[label], ablation="mean", ablation_positions="end")
    out = call_chat(client, personas=["no_such_persona"], layer_spec="1:2")
    assert out[0] == [] and out[3].startswith("⚠ persona no_such_persona is not in the store")


def test_readout_gives_the_numbers_and_tokens_still_the_html(
    served: tuple[Any, Backend], engine: tuple[ChatEngine, str, str]
) -> None:
    """A client's /chat, then /readout: every token's projection at every layer for each persona
    (null where the model never saw the token); /tokens still draws the same as HTML."""
    client, _ = served
    _, persona, _ = engine
    call_chat(client, personas=[persona], layer_spec="1-2:4")
    numbers = client.predict(api_name="/readout")
    axis = ["assistant_axis"] if axis_of(served[1]) is not None else []  # read out too
    assert numbers["personas"] == [persona, *axis] and numbers["n_prompt"] > 0
    values = numbers["raw"]["values"][persona]
    assert len(values) == len(numbers["tokens"]) and len(values[0]) == len(numbers["layers"])
    assert values[-1] == [None] * len(numbers["layers"])
    assert all(v is not None for row in values[:-1] for v in row)
    html = client.predict(layer=1, api_name="/tokens")
    assert html.count('class="pc-tok pc-') == len(numbers["tokens"])
    # the strength of a preset over the API, and a strength far past the residual norm
    _, _, _, status, _ = call_chat(
        client, personas=[persona], preset="all layers", strength=1000, max_new_tokens=4
    )
    assert status.startswith(f"Done. Blend 1·{persona} at 0-") and ":1000 (raw)" in status
    assert "⚠ This strength adds" in status


def axis_of(backend: Backend) -> Any:
    """The model's assistant axis as the store holds it, or None."""
    store_id = backend.store_id(CONFIG.model)
    with Store(backend.store_path, read_only=True) as store:
        kinds = [e.positions for e in store.vectors(store_id, "assistant_axis")]
        if not kinds:
            return None
        kind = "prompt_last" if "prompt_last" in kinds else kinds[0]
        return store.load_vector(store_id, "assistant_axis", positions=kind)


def test_drift_and_the_calibrated_readout_over_the_api(
    served: tuple[Any, Backend], engine: tuple[ChatEngine, str, str]
) -> None:
    """Two turns of a client's /chat: /drift gives each turn's projection on the persona and
    the assistant axis (pooled as each vector was read); /readout reads every token three
    ways and names the vectors without a reference distribution."""
    client, backend = served
    chat_engine, persona, _ = engine
    axis = axis_of(backend)
    settings: dict[str, Any] = {"personas": [persona], "layer_spec": "1-2:4", "max_new_tokens": 16}
    history = call_chat(client, **settings)[0]
    history = call_chat(client, message="Tell me about bees.", history=history, **settings)[0]
    drift = client.predict(api_name="/drift")
    assert drift["turns"] == [1, 2] and persona in drift["vectors"]
    numbers = client.predict(api_name="/readout")
    assert set(numbers["percentile"]["values"]) | set(numbers["uncalibrated"]) == set(
        numbers["personas"]
    )
    assert numbers["turn"][persona]["positions"] == chat_engine.vectors[persona].positions
    assert numbers["drift"] == drift
    if axis is None:
        return
    messages = [
        {"role": "user", "content": QUESTION},
        {"role": "assistant", "content": text(history[1])},
        {"role": "user", "content": "Tell me about bees."},
    ]
    reply = ChatEngine(chat_engine.lm, {**chat_engine.vectors, "assistant_axis": axis}).reply(
        messages,
        GenerationSettings(max_new_tokens=16),
        steering=SteeringSpec({persona: 1.0}, layers="1-2:4", positions="prompt"),
        readout=["assistant_axis"],
    )
    assert reply.readout is not None and reply.text == text(history[-1])
    track = drift["vectors"]["assistant_axis"]
    assert track["positions"] == axis.positions == "prompt_last"
    pooled = reply.readout.pooled("prompt_last")[:, 0].tolist()
    assert track["raw_by_layer"][1] == pytest.approx(pooled, abs=1e-3)
    assert track["percentile"][1] is not None and 0 <= track["percentile"][1] <= 100


def test_holding_the_assistant_over_the_api(
    served: tuple[Any, Backend], engine: tuple[ChatEngine, str, str]
) -> None:
    client, backend = served
    chat_engine, persona, _ = engine
    axis = axis_of(backend)
    if axis is None:
        pytest.skip("the store has no assistant axis for this model")
    prompt = "You are a pirate." if persona == "pirate" else f"You are a {persona}."
    history, side, _, status, _ = call_chat(
        client, system_prompt=prompt, cap="assistant_axis", side_by_side=True
    )
    messages = [{"role": "system", "content": prompt}, {"role": "user", "content": QUESTION}]
    spec = CapSpec(
        "assistant_axis",
        layers=[0],
        percentile=5.0,
        reference="persona",
        positions="prompt",
        last_n=1,
    )
    held = ChatEngine(chat_engine.lm, [axis]).reply(
        messages, GenerationSettings(max_new_tokens=40), cap=spec
    )
    plain = chat_engine.reply(messages, GenerationSettings(max_new_tokens=40))
    assert text(history[-1]) == held.text and text(side[-1]) == plain.text
    assert "Holding assistant_axis's projection at least the 5th percentile" in status
    out = call_chat(client, cap="assistant_axis", cap_by="percentile", cap_level=150)
    assert out[0] == [] and out[3].startswith("⚠ Hold percentile must be between 0.0 and 100.0")
    with pytest.raises(AppError, match=r"'sideways' .* not in the list of choices"):
        call_chat(client, cap="assistant_axis", cap_side="sideways")


@pytest.mark.slow
def test_the_axis_registers_over_the_api(served: tuple[Any, Backend]) -> None:
    client, backend = served
    dataset = "demo" if backend.is_demo(CONFIG.model) else "personas"
    line, _, status = client.predict(
        model_id=CONFIG.model, dataset=dataset, api_name="/register_axis"
    )
    assert status.startswith("Registered the assistant axis of"), status
    assert line.startswith("**Assistant axis**: registered (axis_means, read from prompt_last")
    axis = axis_of(backend)
    assert axis is not None and axis.quantiles is not None and axis.positions == "prompt_last"


def test_other_endpoints_answer(served: tuple[Any, Backend]) -> None:
    client, _ = served
    info = client.predict(model_id=CONFIG.model, api_name="/load_model")
    assert "ready" in info[-1]
    spec, _note = client.predict(
        model_id=CONFIG.model, personas=[], preset="all layers", strength=2, api_name="/preset"
    )
    assert spec.startswith("0-") and spec.endswith(":2")
    assert client.predict(api_name="/stop") == "Nothing is generating."
    endpoints = set(client.view_api(print_info=False, return_format="dict")["named_endpoints"])
    assert {"/chat", "/retry", "/undo", "/clear", "/tokens", "/persona_map"} <= endpoints
    assert {"/readout", "/heatmap", "/layer_plot", "/vector_file", "/blend_info"} <= endpoints
    assert {"/drift", "/register_axis"} <= endpoints


@pytest.mark.slow
def test_analysis_endpoint_answers_with_findings_and_figures(served: tuple[Any, Backend]) -> None:
    from personachat.analysis.inputs import analysis_inputs, default_dataset

    client, backend = served
    dataset = "demo" if backend.is_demo(CONFIG.model) else default_dataset(CONFIG.model)
    names = [p.name for p in analysis_inputs(dataset).personas[:3]]
    text, *images = client.predict(model_id=CONFIG.model, personas=names, api_name="/analysis")
    assert text.startswith("**Persona analysis of") and f"({', '.join(names)})" in text
    assert "preference questions (placement early" in text
    collapse = images[0]  # ui.ANALYSIS_FIGURES starts with the collapse figure
    assert collapse["visible"] is True and collapse["value"]["type"] == "plotly"
    plot = json.loads(collapse["value"]["plot"])
    assert plot["layout"]["title"]["text"].startswith("Persona collapse: ")
    text, *images = client.predict(model_id=CONFIG.model, personas=["nobody"], api_name="/analysis")
    assert text.startswith("⚠ The analysis of") and "unknown personas ['nobody']" in text
    assert all(u["visible"] is False and u.get("value") is None for u in images)
