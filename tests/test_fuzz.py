"""Random and adversarial inputs through the HTTP API and the store's CLI, seeded and bounded.

The page and the API are served in this process on a free localhost port (a copy of the app's
store); 60 requests with random values in the page's ``/chat`` and the API's chat completions,
and 12 runs of ``scripts/store.py`` with junk arguments, each with a timeout. Every answer must
be a reply or a clear message (no traceback text), the server must keep answering, and the
store's catalog must be byte for byte what it was (none of these calls writes).
"""

from __future__ import annotations

import hashlib
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from personachat.app import main as app
from personachat.app.api.server import build_app, serve
from personachat.app.backend import Backend
from personachat.app.page import CSS, build_ui
from tests.test_client import CONFIG, QUESTION, free_port, store_copy

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(bool(app.missing(CONFIG)), reason="the app's model or store is missing"),
]
__all__ = ["store_copy"]  # a fixture, used by name
ROOT = Path(__file__).resolve().parent.parent
JUNK: list[Any] = [
    "",
    " ",
    "\x00",
    "💥" * 50,
    "x" * 20_000,
    "-1",
    "1e308",
    "nan",
    "inf",
    "0:1e308",
    "1-999:2",
    "'; DROP TABLE vectors; --",
    "../../etc/passwd",
    -1,
    0,
    1.5,
    10**12,
    float("1e300"),
    None,
    True,
    [],
    {},
    [42],
    {"role": "system"},
]
FIELDS = ["message", "system_prompt", "layer_spec", "weights", "neurons", "max_new_tokens", "seed"]


def digest(folder: Path) -> str:
    """A hash of every file in the store (names and bytes)."""
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(path.relative_to(folder).as_posix().encode())
        h.update(path.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def served(store_copy: Path) -> Iterator[tuple[str, Path]]:
    backend = Backend(CONFIG.model, store_copy)
    demo = build_ui(backend)
    demo.queue()
    server = serve(build_app(demo, backend, css=CSS), "127.0.0.1", free_port())
    try:
        yield server.url, store_copy
    finally:
        server.close()
        backend.close()


def test_random_requests_get_replies_or_clear_messages_and_change_nothing(
    served: tuple[str, Path],
) -> None:
    from gradio_client import Client

    url, store = served
    before = digest(store)
    rng = random.Random(20)
    page = Client(url + "/", verbose=False, download_files=False)
    api = url + "/v1/chat/completions"
    for i in range(60):
        junk = rng.choice(JUNK)
        if i % 2 == 0:
            settings: dict[str, Any] = {"message": QUESTION, "history": [], "max_new_tokens": 4}
            settings[rng.choice([*FIELDS, "history", "personas"])] = junk
            try:
                out = page.predict(**settings, model_id=CONFIG.model, api_name="/chat")
                said = str(out[3])
                assert said.startswith(("Done", "⚠")), said
            except Exception as err:  # Gradio's own check of a value's type, said in words
                said = str(err)
        else:
            body: dict[str, Any] = {"model": CONFIG.model, "max_tokens": 4}
            body["messages"] = [{"role": "user", "content": QUESTION}]
            key = rng.choice(["messages", "max_tokens", "temperature", "seed", "steering", "stop"])
            body[key] = junk if key != "messages" else [{"role": "user", "content": junk}]
            response = httpx.post(api, json=body, timeout=60)
            assert response.status_code in (200, 400), response.text[:300]
            said = response.text
        assert "Traceback" not in said and "upstream app has raised" not in said, said[:300]
    assert digest(store) == before
    alive = httpx.post(
        api,
        json={
            "model": CONFIG.model,
            "max_tokens": 4,
            "messages": [{"role": "user", "content": QUESTION}],
        },
        timeout=60,
    )
    assert alive.status_code == 200


def test_junk_arguments_to_the_store_cli_give_messages_not_tracebacks(
    served: tuple[str, Path],
) -> None:
    store = served[1]
    before = digest(store)
    rng = random.Random(21)
    commands = ["list", "show", "sql", "verify"]
    for _ in range(12):
        args = [rng.choice(commands), *(str(rng.choice(JUNK))[:200] for _ in range(2))]
        run = subprocess.run(
            [sys.executable, str(ROOT / "scripts" / "store.py"), "--store", str(store), *args],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=ROOT,
        )
        assert "Traceback" not in run.stderr + run.stdout, (args, run.stderr[-500:])
    assert digest(store) == before
