"""Hosting the app in public, through the real HTTP API of a served app (page and ``/v1``).

Each app here serves a copy of the app's store on a free localhost port, as ``app.py`` builds it
(``build_ui`` + ``build_app`` + ``serve``); ``gradio_client`` drives the page's endpoints, each
``Client`` its own session, and ``urllib`` the raw routes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from gradio_client import Client

from personachat.app import main as app
from personachat.app.api.server import Server, build_app, serve
from personachat.app.backend import Backend
from personachat.app.page import CSS, build_ui
from personachat.app.public import ADMIN_ENV
from personachat.store import Store

ROOT = Path(__file__).resolve().parent.parent
CONFIG = app.parse_args([], env={})
HOLD = "Hold this reply."
QUESTION = "Tell me about the ocean."
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        bool(app.missing(CONFIG)), reason=f"the app's model or store is missing: {CONFIG.model}"
    ),
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def store_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the app's store (its models folder left out)."""
    copy = tmp_path_factory.mktemp("store")
    shutil.copytree(CONFIG.store, copy, dirs_exist_ok=True, ignore=shutil.ignore_patterns("models"))
    return copy


def start(backend: Backend) -> tuple[Server, str]:
    """Serve ``backend``'s page and API on a free port; returns the server and its url."""
    demo = build_ui(backend)
    demo.queue(default_concurrency_limit=8)
    server = serve(build_app(demo, backend, css=CSS), "127.0.0.1", free_port())
    return server, server.url + "/"


@pytest.fixture(scope="module")
def local(store_copy: Path) -> Iterator[tuple[str, Backend]]:
    """The app as run locally, with the test aid that holds a reply until Stop."""
    backend = Backend(CONFIG.model, store_copy, hold_message=HOLD)
    server, url = start(backend)
    try:
        yield url, backend
    finally:
        server.close()
        backend.close()


def chat(client: Client, message: str, max_new_tokens: int = 40) -> Any:
    """A ``/chat`` job (not yet finished) of ``client``'s session."""
    return client.submit(
        message=message,
        history=[],
        side_history=[],
        model_id=CONFIG.model,
        max_new_tokens=max_new_tokens,
        api_name="/chat",
    )


def post(url: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> Any:
    """POST ``body`` as JSON; (status, parsed reply)."""
    data = json.dumps(body).encode()
    request = urllib.request.Request(
        url, data, {"Content-Type": "application/json", **(headers or {})}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"null")


def test_stop_ends_only_the_callers_own_reply(local: tuple[str, Backend]) -> None:
    """Session A's reply is held after its first tokens (the shared batch waits with it);
    session B's reply joins. A stop without a session is refused, a stop from a third session
    stops nothing, and A's own stop ends A alone: B's reply completes exactly as alone."""
    url, _ = local
    solo_client = Client(url, verbose=False)
    solo = chat(solo_client, QUESTION).result()
    a, b, c = (Client(url, verbose=False) for _ in range(3))
    held = chat(a, HOLD, max_new_tokens=200)
    time.sleep(2.0)  # A is past its prefill and holds the batch
    other = chat(b, QUESTION)
    time.sleep(2.0)
    status, reply = post(url + "gradio_api/run/stop", {"data": []})
    assert status != 200 or "error" in json.dumps(reply), reply
    assert "Stop needs the session that is generating" in json.dumps(reply)
    assert c.predict(api_name="/stop") == "Nothing is generating."
    assert not held.done() and not other.done()
    assert a.predict(api_name="/stop") == "Stopping…"
    history, _, _, a_status, *_ = held.result(timeout=60)
    assert a_status.startswith("Stopped: partial reply kept")
    b_history, _, _, b_status, *_ = other.result(timeout=60)
    assert b_status.startswith("Done.")
    assert b_history == solo[0]
    assert history[-1]["content"] != b_history[-1]["content"]


def test_a_corrupt_catalog_stops_the_app_with_one_line_and_status_2(tmp_path: Path) -> None:
    store = tmp_path / "store"
    shutil.copytree(CONFIG.store, store, ignore=shutil.ignore_patterns("models"))
    catalog = store / "catalog.duckdb"
    data = bytearray(catalog.read_bytes())
    data[100:5000] = bytes(range(256)) * 19 + bytes(36)
    catalog.write_bytes(bytes(data))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    args = ["--model", CONFIG.model, "--store", str(store), "--port", str(free_port())]
    done = subprocess.run(
        [sys.executable, str(ROOT / "app.py"), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"personachat: cannot start: the store's catalog in {store}")
    assert f"Restore {catalog} from a backup" in lines[0]


@pytest.fixture
def own_store(tmp_path: Path) -> Path:
    """A copy of the app's store for one test to damage."""
    copy = tmp_path / "store"
    shutil.copytree(CONFIG.store, copy, ignore=shutil.ignore_patterns("models"))
    return copy


@pytest.fixture
def served_on(own_store: Path) -> Iterator[tuple[str, Backend]]:
    """The app over ``own_store``; the test damages the store before its first request."""
    backend = Backend(CONFIG.model, own_store)
    server, url = start(backend)
    try:
        yield url, backend
    finally:
        server.close()
        backend.close()


def vector_file(store: Path, persona: str, kind: str = "question_span") -> Path:
    with Store(store, read_only=True) as opened:
        (entry,) = [e for e in opened.vectors(positions=kind) if e.persona == persona]
        return store / entry.file


def test_a_missing_or_damaged_vector_file_disables_that_vector_alone(
    own_store: Path, served_on: tuple[str, Backend]
) -> None:
    url, _ = served_on
    vector_file(own_store, "chef").unlink()
    vector_file(own_store, "cowboy").write_bytes(b"not a safetensors file")
    client = Client(url, verbose=False)
    status = client.predict(model_id=CONFIG.model, api_name="/load_model")[-1]
    repair = "repair the store with `python scripts/store.py verify --repair`, or register it again"
    assert status == (
        f"Model `{CONFIG.model}` ready: 9 personas, 33 neuron sets. "
        "⚠ the question_span vector of 'chef' is disabled: its file is missing. "
        f"To use it, {repair}. the question_span vector of 'cowboy' is disabled: its file does "
        f"not match the catalog (changed or damaged). To use it, {repair}."
    )
    plain = client.predict(
        message=QUESTION, history=[], side_history=[], model_id=CONFIG.model, api_name="/chat"
    )
    assert plain[3].startswith("Done.") and plain[0][-1]["content"]
    steered = client.predict(
        message=QUESTION,
        history=[],
        side_history=[],
        model_id=CONFIG.model,
        personas=["pirate"],
        layer_spec="1-2:4",
        api_name="/chat",
    )
    assert steered[3].startswith("Done. Blend 1·pirate at 1-2:4"), steered[3]
    refused = client.predict(
        message=QUESTION,
        history=[],
        side_history=[],
        model_id=CONFIG.model,
        personas=["chef"],
        layer_spec="1-2:4",
        api_name="/chat",
    )
    assert refused[3].startswith("⚠ persona chef is not in the store"), refused[3]


def test_a_persona_removed_while_the_engine_reads_does_not_fail_a_chat(
    own_store: Path, served_on: tuple[str, Backend]
) -> None:
    """Another process removes a persona after the catalog listed it and before its vector is
    read: the engine reads again from the catalog as it is now (no persona reported missing),
    and the chat goes on without it."""
    url, backend = served_on
    store = backend.store()
    read = store.load_vector
    removed: list[int] = []

    def racing(model_id: str, persona: str, **filters: Any) -> Any:
        if persona == "chef" and not removed:  # listed, not yet read: another process removes
            with Store(own_store) as writer:
                removed.append(writer.remove_persona("surfer"))
        return read(model_id, persona, **filters)

    store.load_vector = racing
    client = Client(url, verbose=False)
    status = client.predict(model_id=CONFIG.model, api_name="/load_model")[-1]
    assert status == f"Model `{CONFIG.model}` ready: 10 personas, 33 neuron sets."
    out = client.predict(
        message=QUESTION,
        history=[],
        side_history=[],
        model_id=CONFIG.model,
        personas=["pirate"],
        layer_spec="1-2:4",
        api_name="/chat",
    )
    assert out[3].startswith("Done. Blend 1·pirate at 1-2:4"), out[3]
    assert removed[0] > 0
    assert "surfer" not in backend.persona_names(CONFIG.model)


def test_the_engine_holds_one_version_of_the_catalog_when_a_batch_lands_while_it_reads(
    own_store: Path,
) -> None:
    """A script replaces two vectors in one batch after the engine read the first and before it
    reads the second: the engine holds both new ones (never the old one beside the new one)."""
    backend = Backend(CONFIG.model, own_store)
    try:
        store = backend.store()
        read = store.load_vector
        kind = "question_span"
        with Store(own_store, read_only=True) as opened:
            old = {
                p: opened.load_vector(CONFIG.model, p, positions=kind) for p in ("chef", "surfer")
            }
        new = {p: dataclasses.replace(v, vector=v.vector * 2) for p, v in old.items()}
        landed: list[bool] = []

        def racing(model_id: str, persona: str, **filters: Any) -> Any:
            if persona == "cowboy" and not landed:  # chef read, surfer not yet: a batch lands
                with Store(own_store) as writer:
                    writer.register_vectors(new.values())
                landed.append(True)
            return read(model_id, persona, **filters)

        store.load_vector = racing
        builds: list[int] = []
        build = backend.catalog.serving.engine

        def counted(*args: Any) -> Any:
            builds.append(1)
            return build(*args)

        backend.catalog.serving.engine = counted  # type: ignore[method-assign]
        engine = backend.catalog.engine(CONFIG.model, kind)
        assert landed and len(builds) == 1
        for persona in ("chef", "surfer"):
            assert torch.equal(engine.vectors[persona].vector, new[persona].vector), persona
        assert backend.catalog.problems(CONFIG.model, kind) == [] and len(builds) == 1
    finally:
        backend.close()


TOKEN = "s3cret-admin"


@pytest.fixture(scope="module")
def public(store_copy: Path) -> Iterator[tuple[str, Backend]]:
    """The app in public mode with an admin token and a 1000-byte upload cap."""
    config = app.parse_args(["--public", "--max-upload-bytes", "1000"], env={})
    backend = Backend(CONFIG.model, store_copy, access=app.access(config, {ADMIN_ENV: TOKEN}))
    demo = build_ui(backend)
    demo.queue()
    web = build_app(demo, backend, css=CSS, max_file_size=config.max_upload_bytes)
    server = serve(web, "127.0.0.1", free_port())
    try:
        yield server.url + "/", backend
    finally:
        server.close()
        backend.close()


def vector_count(store: Path) -> int:
    with Store(store, read_only=True) as opened:
        return len(opened.vectors())


def test_public_mode_limits_models_store_writes_paths_and_uploads(
    public: tuple[str, Backend], store_copy: Path
) -> None:
    url, _ = public
    client = Client(url, verbose=False)
    elsewhere = str(ROOT / "store" / "models")
    status = client.predict(model_id=elsewhere, api_name="/load_model")[-1]
    assert status == (
        "⚠ Cannot load `…/models`: model '…/models' is not offered on this public server; use "
        "one of: store/models/demo (the server's --allow-models)"
    )
    info, *_, status = client.predict(model_id=CONFIG.model, api_name="/load_model")
    assert "ready" in status and str(store_copy) not in info and "`…/" in info
    before = vector_count(store_copy)
    status = client.predict(model_id=CONFIG.model, dataset="demo", api_name="/register_axis")[-1]
    assert status == (
        "⚠ Registering the assistant axis failed: Registering the assistant axis needs the admin "
        "token on this public server: type it in the page's Admin token box (Model and store), "
        "or send it as an 'Authorization: Bearer TOKEN' header (gradio_client: Client(url, "
        "headers=...)); none was given."
    )
    wrong = Client(url, verbose=False, headers={"Authorization": "Bearer guess"})
    out = wrong.predict(
        model_id=CONFIG.model, dataset="demo", personas=["pirate"], api_name="/extract"
    )
    assert out[-1].endswith("the token given is wrong.")
    out = client.predict(
        model_id=CONFIG.model,
        dataset="demo",
        personas=["pirate"],
        admin_token="guess",
        api_name="/extract",
    )
    assert out[-1].endswith("the token given is wrong.")
    assert vector_count(store_copy) == before
    admin = Client(url, verbose=False, headers={"Authorization": f"Bearer {TOKEN}"})
    status = admin.predict(model_id=CONFIG.model, dataset="demo", api_name="/register_axis")[-1]
    assert status.startswith("Registered the assistant axis of"), status
    # the page's Admin token box does the same as the header
    status = client.predict(
        model_id=CONFIG.model, dataset="demo", admin_token=TOKEN, api_name="/register_axis"
    )[-1]
    assert status.startswith("Registered the assistant axis of"), status
    assert admin_box_visible(url) is True
    # an upload over the cap is refused, naming the limit
    body = b"x" * 2000
    boundary = "pcboundary"
    data = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="big.txt"\r\n'
            f"Content-Type: text/plain\r\n\r\n"
        ).encode()
        + body
        + f"\r\n--{boundary}--\r\n".encode()
    )
    request = urllib.request.Request(
        url + "gradio_api/upload",
        data,
        {"Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=30)
    assert refused.value.code == 413
    assert "1000" in refused.value.read().decode()


def admin_box_visible(url: str) -> bool:
    """Whether the served page shows its Admin token box (read from the page's config)."""
    with urllib.request.urlopen(url + "config", timeout=30) as reply:
        config = json.loads(reply.read())
    boxes = [c for c in config["components"] if c.get("props", {}).get("elem_id") == "admin-token"]
    assert len(boxes) == 1, boxes
    return bool(boxes[0]["props"].get("visible", True))


def test_local_mode_keeps_loading_any_folder_and_naming_paths(local: tuple[str, Backend]) -> None:
    url, _ = local
    assert admin_box_visible(url) is False
    client = Client(url, verbose=False)
    folder = str((ROOT / CONFIG.model).resolve())
    assert "ready" in client.predict(model_id=folder, api_name="/load_model")[-1]
    missing = str(ROOT / "no_such_model_folder")
    status = client.predict(model_id=missing, api_name="/load_model")[-1]
    assert status.startswith(f"⚠ Cannot load `{missing}`") and status.count(missing) >= 1


def test_a_fresh_session_takes_any_layer_of_the_model_without_load_model(
    local: tuple[str, Backend],
) -> None:
    """The layer slider's range is the model's from the start: a client that never called
    /load_model reads the persona map and the tokens at the model's last layer."""
    url, _ = local
    client = Client(url, verbose=False)
    history = [
        {"role": "user", "content": [{"type": "text", "text": QUESTION}]},
        {"role": "assistant", "content": [{"type": "text", "text": "The ocean is deep."}]},
    ]
    plot = client.predict(
        model_id=CONFIG.model, history=history, layer=3, personas=[], api_name="/persona_map"
    )
    assert "at layer 3" in json.dumps(plot)
    client = Client(url, verbose=False)
    assert client.predict(layer=3, api_name="/tokens").startswith("<")


def test_public_mode_is_on_for_a_space_and_off_locally() -> None:
    assert app.parse_args([], env={"SPACE_ID": "me/app"}).public is True
    assert app.parse_args(["--no-public"], env={"SPACE_ID": "me/app"}).public is False
    local = app.parse_args([], env={})
    assert local.public is False and app.access(local, {ADMIN_ENV: TOKEN}).public is False
    flags = ["--public", "--allow-models", "a/b,c/d", "--allow-models", "e"]
    config = app.parse_args(flags, env={})
    assert config.allow_models == ("a/b", "c/d", "e")
    assert app.access(config, {}).models == (CONFIG.model, "a/b", "c/d", "e")
    assert app.access(config, {}).admin_token is None


# Per named endpoint: the values of its parameters without a default, and a piece of its answer.
FRESH_CALLS: dict[str, tuple[dict[str, Any], str]] = {
    "/refresh": ({}, "Store re-read: 11 personas"),
    "/extract": ({}, "31 personas with vectors"),
    "/preset": ({}, "Preset 'band'"),
    "/blend_info": ({"weights": "", "layer_spec": "1-2:4"}, "No persona picked"),
    "/chat": ({"message": QUESTION}, "Done."),
    "/retry": ({}, "Nothing to retry yet."),
    "/stop": ({}, "Nothing is generating."),
    "/undo": ({}, "Nothing to undo."),
    "/clear": ({}, "Conversation cleared."),
    "/tokens": ({}, "Send a message to see per-token projections."),
    "/heatmap": ({}, "null"),
    "/readout": ({}, "no reply yet"),
    "/layer_plot": ({}, "AUC"),
    "/persona_map": ({}, "PC1"),
    "/store_tables": ({}, "system prompt"),
    "/vector_file": ({"persona": "pirate", "kind": "question_span"}, "pirate.question_span"),
    "/analysis": ({}, "Persona analysis of"),
    "/drift": ({}, "no turn yet"),
    "/register_axis": ({}, "Registered the assistant axis of"),
    "/load_model": ({}, "ready: 31 personas"),  # last: nothing before needed it
}


def test_every_named_endpoint_answers_with_its_defaults_on_a_fresh_session(
    tmp_path: Path,
) -> None:
    """A fresh server; each endpoint called once from a session of its own with only the
    parameters that have no default, /load_model last: each gives its real answer."""
    shutil.copytree(
        CONFIG.store, tmp_path, dirs_exist_ok=True, ignore=shutil.ignore_patterns("models")
    )
    backend = Backend(CONFIG.model, tmp_path)
    server, url = start(backend)
    try:
        api = Client(url, verbose=False).view_api(print_info=False, return_format="dict")
        assert set(api["named_endpoints"]) == set(FRESH_CALLS)
        for name, (required, expected) in FRESH_CALLS.items():
            params = api["named_endpoints"][name]["parameters"]
            assert {p["parameter_name"] for p in params if not p["parameter_has_default"]} == set(
                required
            ), name
            out = json.dumps(Client(url, verbose=False).predict(**required, api_name=name))
            assert expected in out, (name, out[:500])
            assert "⚠" not in out.replace("Nothing to retry", ""), (name, out[:500])
    finally:
        server.close()
        backend.close()
