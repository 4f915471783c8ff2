"""The OpenAI-compatible API, driven by the real ``openai`` client, beside the page in one server.

The page and the API are served in this process on a free localhost port, as ``app.py`` serves
them (``personachat.app.api.server``); replies are compared with the page's own ``/chat``
endpoint (``gradio_client``) and with a ``ChatEngine`` built straight from the model and store.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from personachat.app import main as app
from personachat.app.api.server import build_app, serve
from personachat.app.backend import Backend
from personachat.app.page import CSS, build_ui
from personachat.chat import ChatEngine, GenerationSettings
from personachat.interventions import AblationSpec, CapSpec, DirectionSpec, SteeringSpec
from tests.test_client import CONFIG, QUESTION, call_chat, free_port, store_copy, text

openai = pytest.importorskip("openai", reason="the openai client is a test dependency")
pytestmark = pytest.mark.skipif(
    bool(app.missing(CONFIG)), reason="the app's model or store is missing"
)
__all__ = ["store_copy"]  # a fixture, used by name
PIRATE = {"personas": {"pirate": 1.0}, "layers": "1-2:4", "positions": "prompt"}


@pytest.fixture(scope="module")
def served(store_copy: Path) -> Iterator[tuple[str, Backend]]:
    backend = Backend(CONFIG.model, store_copy)
    demo = build_ui(backend)
    demo.queue()
    server = serve(build_app(demo, backend, css=CSS), "127.0.0.1", free_port())
    try:
        yield server.url, backend
    finally:
        server.close()
        backend.close()


@pytest.fixture(scope="module")
def client(served: tuple[str, Backend]) -> Any:
    return openai.OpenAI(base_url=served[0] + "/v1", api_key="unused", max_retries=0)


def ask(client: Any, steering: Any = None, **fields: Any) -> Any:
    extra = {"steering": steering} if steering is not None else {}
    extra.update(fields.pop("extra", {}))
    args = {"max_tokens": 40, "temperature": 0, **fields}
    return client.chat.completions.create(
        model=CONFIG.model,
        messages=fields.pop("messages", None) or [{"role": "user", "content": QUESTION}],
        extra_body=extra,
        **{k: v for k, v in args.items() if k != "messages"},
    )


def test_a_steered_request_gives_the_pages_reply(served: tuple[str, Backend], client: Any) -> None:
    from gradio_client import Client

    page = Client(served[0] + "/", verbose=False)
    history, side, *_ = call_chat(
        page, personas=["pirate"], layer_spec="1-2:4", side_by_side=True, max_new_tokens=40
    )
    reply = ask(client, PIRATE, extra={"side_by_side": True})
    assert reply.object == "chat.completion" and len(reply.choices) == 2
    assert reply.choices[0].message.content == text(history[-1])  # steered
    assert reply.choices[1].message.content == text(side[-1]) != text(history[-1])  # unsteered
    assert reply.choices[0].message.role == "assistant"
    used = reply.usage
    assert used.prompt_tokens > 0 and used.completion_tokens > 0
    assert used.total_tokens == used.prompt_tokens + used.completion_tokens
    # the same strengths as numbers, and plain chat without steering
    numbers = ask(client, {**PIRATE, "layers": {"1": 4, "2": 4.0}})
    assert numbers.choices[0].message.content == text(history[-1])
    assert ask(client).choices[0].message.content == text(side[-1])
    assert ask(client, None, extra={"steering": None}).choices[0].message.content == text(side[-1])


def test_streamed_deltas_make_the_whole_reply(client: Any) -> None:
    whole = ask(client, PIRATE, extra={"side_by_side": True})
    stream = ask(
        client,
        PIRATE,
        extra={"side_by_side": True},
        stream=True,
        stream_options={"include_usage": True},
    )
    texts, finish, usage = ["", ""], [None, None], None
    for chunk in stream:
        assert chunk.object == "chat.completion.chunk"
        usage = chunk.usage or usage
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            finish[choice.index] = choice.finish_reason or finish[choice.index]
    assert texts == [c.message.content for c in whole.choices]
    assert finish == [c.finish_reason for c in whole.choices]
    assert usage is not None and usage.completion_tokens == whole.usage.completion_tokens


def test_stop_sequences_and_the_raw_event_stream(served: tuple[str, Backend], client: Any) -> None:
    whole = ask(client, PIRATE).choices[0].message.content
    word = whole.split()[2]
    cut = ask(client, PIRATE, stop=[word])
    assert cut.choices[0].message.content == whole[: whole.index(word)]
    assert cut.choices[0].finish_reason == "stop"
    assert ask(client, max_tokens=3).choices[0].finish_reason == "length"
    body = {
        "model": CONFIG.model,
        "messages": [{"role": "user", "content": [{"type": "text", "text": QUESTION}]}],
        "max_tokens": 5,
        "stream": True,
    }
    with httpx.stream("POST", served[0] + "/v1/chat/completions", json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)
    first = json.loads(lines[0][6:])
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}


def test_every_setting_maps_to_the_runtimes_specs(served: tuple[str, Backend], client: Any) -> None:
    backend = served[1]
    engine: ChatEngine = backend.engine(CONFIG.model)
    label = sorted(engine.neuron_sets)[0]
    steering = {
        **PIRATE,
        "units": "raw",
        "last_n": 3,
        "ablation": {"neuron_sets": [label], "mode": "zero", "positions": "prompt"},
        "direction": {"persona": "cynic", "layers": [0, 1], "mode": "zero"},
        "cap": {"persona": "pirate", "layers": "2-3", "side": "below", "threshold": 5.0},
    }
    reply = ask(client, steering).choices[0].message.content
    expected = ChatEngine(engine.lm, engine.vectors, engine.neuron_sets).reply(
        [{"role": "user", "content": QUESTION}],
        GenerationSettings(max_new_tokens=40, temperature=0.0),
        steering=SteeringSpec({"pirate": 1.0}, layers="1-2:4", positions="prompt", last_n=3),
        ablation=AblationSpec(label, mode="zero", positions="prompt"),
        direction=DirectionSpec("cynic", [0, 1], mode="zero"),
        cap=CapSpec("pirate", "2-3", side="below", threshold=5.0, percentile=None),
    )
    assert reply == expected.text


def test_holding_the_assistant_axis_gives_the_pages_reply(
    served: tuple[str, Backend], client: Any
) -> None:
    """``steering.cap`` on ``assistant_axis`` holds the model's own axis, as the page's hold
    panel does: the same reply as the page under the pirate's own system prompt."""
    from gradio_client import Client

    from tests.test_client import axis_of

    if axis_of(served[1]) is None:
        pytest.skip("the store has no assistant axis for this model")
    prompt = "You are a pirate."
    page = Client(served[0] + "/", verbose=False)
    history = call_chat(page, system_prompt=prompt, cap="assistant_axis", max_new_tokens=40)[0]
    cap = {
        "persona": "assistant_axis",
        "layers": [0],
        "side": "above",
        "percentile": 5,
        "reference": "persona",
        "positions": "prompt",
        "last_n": 1,
    }
    messages = [{"role": "system", "content": prompt}, {"role": "user", "content": QUESTION}]
    reply = ask(client, {"cap": cap}, messages=messages).choices[0].message.content
    assert reply == text(history[-1])
    plain = ask(client, messages=messages).choices[0].message.content
    assert plain != reply


def test_eight_clients_at_once_get_their_solo_replies(client: Any) -> None:
    asks = [
        (PIRATE, {}),
        (None, {}),
        ({"personas": ["cynic"], "layers": "all:2"}, {}),
        ({**PIRATE, "positions": "generated"}, {"side_by_side": True}),
        ({"personas": {"pirate": 0.5, "cynic": 0.5}, "layers": [1, 2], "strength": 3}, {}),
        ({"direction": {"persona": "pirate", "mode": "zero"}}, {}),
        (PIRATE, {"side_by_side": True}),
        ({"personas": {"pirate": 2}, "layers": {"0": 1}}, {}),
    ]

    def texts(reply: Any) -> list[str]:
        return [c.message.content for c in reply.choices]

    solo = [texts(ask(client, s, extra=e)) for s, e in asks]
    together: list[Any] = [None] * len(asks)

    def one(i: int) -> None:
        together[i] = texts(ask(client, asks[i][0], extra=asks[i][1]))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(asks))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert together == solo
    assert len({t[0] for t in solo}) > 3  # the settings really differ


BAD = [
    ({"steering": {"personas": {"nobody": 1}}}, "steering", "unknown persona 'nobody'"),
    ({"steering": {**PIRATE, "layers": "9:2"}}, "steering", "layer 9 in '9:2' is out of range"),
    ({"steering": {**PIRATE, "layers": "1-x"}}, "steering", "cannot read '1-x'"),
    ({"steering": {**PIRATE, "layers": {"one": 2}}}, "steering.layers", "not a layer number"),
    ({"steering": {**PIRATE, "units": "big"}}, "steering.units", "use one of raw, calibrated"),
    ({"steering": {**PIRATE, "last_n": 0}}, "steering.last_n", "must be in 1.."),
    ({"steering": {"persona": "pirate"}}, "steering", "unknown field 'persona' in steering"),
    ({"steering": {"cap": {"persona": "pirate"}}}, "steering.cap", "a threshold or a percentile"),
    ({"steering": {"ablation": {"neuron_sets": ["none"]}}}, "steering", "unknown neuron set"),
    ({"steering": {"direction": {"persona": "x"}}}, "steering", "unknown persona 'x'"),
    ({"steering": {"vectors_from": "elsewhere"}}, "steering.vectors_from", "no vectors read"),
    ({"temperature": 3}, "temperature", "must be in [0, 2]"),
    ({"top_p": 0}, "top_p", "must be in (0, 1]"),
    ({"max_tokens": 0}, "max_tokens", "must be in 1..512"),
    ({"max_completion_tokens": 10_000}, "max_completion_tokens", "the limit is 512"),
    ({"n": 2}, "n", "n must be 1"),
    ({"seed": -1}, "seed", "must be in 0.."),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4 strings"),
    ({"stream": "yes"}, "stream", "must be true or false"),
    ({"messages": []}, "messages", "non-empty list"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0]", "is not served"),
    ({"messages": [{"role": "assistant", "content": "x"}]}, "messages", "the user's"),
    ({"messages": [{"role": "user", "content": 3}]}, "messages[0]", "must be text"),
    ({"tools": [{"type": "function"}]}, "tools", "not supported"),
    ({"side_by_side": 1}, "side_by_side", "must be true or false"),
]


def test_bad_requests_get_openais_error_object_and_the_server_goes_on(
    served: tuple[str, Backend], client: Any
) -> None:
    url = served[0] + "/v1/chat/completions"
    good = {"model": CONFIG.model, "messages": [{"role": "user", "content": QUESTION}]}
    for fields, param, words in BAD:
        response = httpx.post(url, json={**good, "max_tokens": 4, **fields}, timeout=60)
        assert response.status_code == 400, (fields, response.text)
        error = response.json()["error"]
        assert error["type"] == "invalid_request_error" and error["param"] == param, error
        assert words in error["message"], (words, error["message"])
        assert set(error) == {"message", "type", "param", "code"}
    response = httpx.post(url, content=b"{not json", timeout=60)
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_json"
    response = httpx.post(url, json={**good, "model": "gpt-4o"}, timeout=60)
    assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as caught:
        ask(client, {"personas": {"nobody": 1}})
    assert caught.value.status_code == 400 and "unknown persona 'nobody'" in str(caught.value)
    assert ask(client, PIRATE).choices[0].message.content  # still serving


def test_models_are_listed_and_the_page_still_answers(served: tuple[str, Backend]) -> None:
    url = served[0]
    models = httpx.get(url + "/v1/models", timeout=30).json()
    assert models["object"] == "list" and CONFIG.model in [m["id"] for m in models["data"]]
    page = httpx.get(url + "/", timeout=30)
    assert page.status_code == 200 and "<html" in page.text.lower()
    assert httpx.get(url + "/gradio_api/info", timeout=30).status_code == 200


def test_a_vector_read_under_other_render_conditions_warns_in_the_reply(
    served: tuple[str, Backend],
) -> None:
    """The runtime's render warning reaches the completion and the stream's last chunk."""
    import dataclasses

    from personachat.app.api.mapping import Call
    from personachat.app.api.replies import completion, events
    from personachat.app.api.schema import parse_request
    from personachat.chat.job import eos_ids
    from personachat.prompts import RenderConditions

    engine: ChatEngine = served[1].engine(CONFIG.model)
    vector = engine.vectors["pirate"]
    then = RenderConditions.from_json(vector.render)
    other = dataclasses.replace(then, template_sha256="0" * 64).to_json()
    moved = ChatEngine(engine.lm, {"pirate": dataclasses.replace(vector, render=other)})
    body = {
        "model": CONFIG.model,
        "messages": [{"role": "user", "content": QUESTION}],
        "max_tokens": 8,
        "temperature": 0,
    }
    request = parse_request(body)

    def call() -> Call:
        spec = SteeringSpec({"pirate": 1.0}, layers="1-2:4", positions="prompt")
        updates = moved.stream(
            [dict(m) for m in request.messages], GenerationSettings(max_new_tokens=8), steering=spec
        )
        return Call(iter(updates), 1, frozenset(eos_ids(engine.lm)))

    whole = completion(request, call())
    assert len(whole["warnings"]) == 1 and whole["warnings"][0].startswith("pirate was read from")
    chunks = [json.loads(e[6:]) for e in events(request, call()) if e != "data: [DONE]\n\n"]
    assert chunks[-1]["warnings"] == whole["warnings"]
    assert "warnings" not in completion(
        request,
        Call(
            iter(
                engine.stream(
                    [dict(m) for m in request.messages], GenerationSettings(max_new_tokens=8)
                )
            ),
            1,
            frozenset(),
        ),
    )


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_gone_while_its_request_waits_for_a_slot_ends_the_wait(
    served: tuple[str, Backend], stream: bool
) -> None:
    """Every generation slot is held; a client sends a request and goes away while it waits:
    the request stops waiting at once, and nothing of it is generated."""
    url, backend = served
    gate = backend.serving.gate
    held = [gate.through(iter([0])) for _ in range(gate.limit)]
    for slot in held:
        next(slot)  # each holds a slot until closed
    through = gate.through
    ended = threading.Event()
    came: list[Any] = []

    def watched(items: Iterator[Any], stop: threading.Event | None = None) -> Iterator[Any]:
        try:
            for item in through(items, stop):
                came.append(item)
                yield item
        finally:
            ended.set()

    gate.through = watched  # type: ignore[method-assign]
    body = {
        "model": CONFIG.model,
        "max_tokens": 8,
        "messages": [{"role": "user", "content": QUESTION}],
        "stream": stream,
    }
    try:
        with httpx.Client(timeout=httpx.Timeout(1.0)) as web:
            if stream:
                with web.stream("POST", url + "/v1/chat/completions", json=body) as reply:
                    assert next(reply.iter_lines()).startswith("data: ")  # the role's chunk
            else:
                with pytest.raises(httpx.ReadTimeout):
                    web.post(url + "/v1/chat/completions", json=body)
        assert ended.wait(5), "the request still waits for a slot after its client left"
        assert came == []
    finally:
        gate.through = through  # type: ignore[method-assign]
        for slot in held:
            slot.close()
