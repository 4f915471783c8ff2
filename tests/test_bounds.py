"""The bounds on one request's work (``personachat.app.limits``), through the real HTTP API.

The page and the API are served in this process on a free localhost port, as ``app.py`` serves
them; every request past a bound is refused with a message naming the bound and the value,
through the page's ``/chat`` (``gradio_client``) and the OpenAI-compatible API (``httpx``),
and the server goes on answering. A history in a wrong shape says what is wrong with it;
Gradio 6's content parts and plain text are both accepted. Fitting a long conversation into the
model's context tokenizes it a bounded number of times, and the server keeps the state of at
most ``BOUNDS.sessions_kept`` sessions.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

from personachat.app import main as app
from personachat.app.api.server import build_app, serve
from personachat.app.backend import Backend
from personachat.app.generation import fit_context
from personachat.app.limits import BOUNDS
from personachat.app.page import CSS, build_ui
from tests.test_client import CONFIG, QUESTION, call_chat, free_port, store_copy, text

pytestmark = pytest.mark.skipif(
    bool(app.missing(CONFIG)), reason="the app's model or store is missing"
)
__all__ = ["store_copy"]  # a fixture, used by name
TURN = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
PARTS = [{"role": m["role"], "content": [{"type": "text", "text": m["content"]}]} for m in TURN]
SYSTEM = {"role": "system", "content": "x" * 9000}


@pytest.fixture(scope="module")
def served(store_copy: Path) -> Iterator[tuple[str, Any, Backend]]:
    backend = Backend(CONFIG.model, store_copy)
    demo = build_ui(backend)
    demo.queue()
    server = serve(build_app(demo, backend, css=CSS), "127.0.0.1", free_port())
    try:
        yield server.url, demo, backend
    finally:
        server.close()
        backend.close()


@pytest.fixture(scope="module")
def page(served: tuple[str, Any, Backend]) -> Any:
    from gradio_client import Client

    return Client(served[0] + "/", verbose=False, download_files=False)


PAGE_REFUSALS = [
    ({"message": "x" * 9000}, "9000 characters; the limit is 8000 (message_chars)"),
    ({"system_prompt": "x" * 9000}, "9000 characters; the limit is 8000 (system_prompt_chars)"),
    ({"history": TURN * 101}, "holds 202 messages; the limit is 200 (history_messages)"),
    ({"history": [TURN[0] | {"content": "y" * 9000}]}, "9000 characters; the limit is 8000"),
    ({"max_new_tokens": 513}, "max tokens (new_tokens) must be between 1 and 512, got 513"),
    ({"neurons": "1:0-9," * 500, "ablation": "zero"}, "5000 neurons; the limit is 4096"),
    ({"personas": ["pirate"], "layer_spec": "1:1e12"}, "the limit is 10000x (push)"),
    ({"history": "hello"}, "must be a list of messages, got str"),
    ({"history": [42]}, "history[0] must be a message"),
    ({"history": [{"role": "system", "content": "x"}]}, "history[0] has role 'system'"),
    ({"history": [{"role": "user", "content": 5}]}, "history[0] has content of type int"),
    ({"history": [{"role": "user", "content": [{"type": "x"}]}]}, "has a content part"),
]


@pytest.mark.parametrize(("settings", "words"), PAGE_REFUSALS)
def test_the_page_refuses_past_each_bound_naming_it(
    page: Any, settings: dict[str, Any], words: str
) -> None:
    out = call_chat(page, **{"max_new_tokens": 4, **settings})
    status = str(out[3])
    assert status.startswith("⚠") and words in status, status
    assert "Traceback" not in status


def test_histories_of_text_and_of_content_parts_are_both_read(page: Any) -> None:
    parts = PARTS
    as_text = call_chat(page, history=TURN, max_new_tokens=4)
    as_parts = call_chat(page, history=parts, max_new_tokens=4)
    assert str(as_text[3]).startswith("Done.") and str(as_parts[3]).startswith("Done.")
    assert text(as_text[0][-1]) == text(as_parts[0][-1]) != ""
    # a long conversation: the oldest turns are left out, the reply comes
    long = call_chat(page, history=TURN * 99, max_new_tokens=4)
    assert str(long[3]).startswith("Done.") and "oldest turns left out" in str(long[3])


def test_the_persona_map_and_undo_read_plain_conversations_and_refuse_bad_ones(
    page: Any,
) -> None:
    """/persona_map and /undo take a conversation as /chat does (text or content parts) and
    refuse a wrong shape or one past the bound, saying what is wrong."""
    from gradio_client.exceptions import AppError

    args = {"model_id": CONFIG.model, "layer": 1, "personas": [], "vectors_from": ""}
    for history in (TURN, PARTS):
        plot = page.predict(history=history, **args, api_name="/persona_map")
        assert "this chat" in json.dumps(plot)
        shown, _, message, status = page.predict(history=history, api_name="/undo")
        assert shown == [] and message == TURN[0]["content"] and status == "Last turn removed."
    refusals = [
        (TURN * 101, "holds 202 messages; the limit is 200 (history_messages)"),
        ("hello", "must be a list of messages, got str"),
        ([{"role": "system", "content": "x"}], "history[0] has role 'system'"),
    ]
    for history, words in refusals:
        with pytest.raises(AppError, match=re.escape(words)):
            page.predict(history=history, **args, api_name="/persona_map")
        status = page.predict(history=history, api_name="/undo")[3]
        assert status.startswith("⚠") and words in status, status


API_REFUSALS = [
    ({"messages": [{"role": "user", "content": "x" * 9000}]}, "messages[0]", "(message_chars)"),
    (
        {
            "messages": [
                {"role": "system", "content": "x" * 9000},
                {"role": "user", "content": "hi"},
            ]
        },
        "messages[0]",
        "the limit is 8000 (system_prompt_chars)",
    ),
    ({"messages": [*TURN * 101, TURN[0]]}, "messages", "203 messages; the limit is 201"),
    ({"max_tokens": 513}, "max_tokens", "is 513; the limit is 512 tokens per reply (new_tokens)"),
    (
        {"steering": {"ablation": {"neurons": "1:0-9," * 500}}},
        "steering.ablation.neurons",
        "names 5000 neurons; the limit is 4096 per request (neurons)",
    ),
    (
        {"steering": {"personas": {"pirate": 1.0}, "layers": {"1": 900000}}},
        "steering.strength",
        "the limit is 10000x (push)",
    ),
]


def test_the_api_refuses_past_each_bound_naming_it(served: tuple[str, Any, Backend]) -> None:
    url = served[0] + "/v1/chat/completions"
    good = {"model": CONFIG.model, "messages": [{"role": "user", "content": QUESTION}]}
    for fields, param, words in API_REFUSALS:
        response = httpx.post(url, json={**good, "max_tokens": 4, **fields}, timeout=60)
        assert response.status_code == 400, (fields, response.text[:300])
        error = response.json()["error"]
        assert error["param"] == param and words in error["message"], error
    response = httpx.post(url, json={**good, "max_tokens": 4}, timeout=60)
    assert response.status_code == 200 and response.json()["choices"][0]["message"]["content"]


class CountingTokenizer:
    """The model's tokenizer, counting the characters it is asked to tokenize."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer, self.chars = tokenizer, 0

    def __call__(self, text: Any, *args: Any, **kwargs: Any) -> Any:
        texts = [text] if isinstance(text, str) else list(text)
        self.chars += sum(len(t) for t in texts)
        return self.tokenizer(text, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.tokenizer, name)


def test_fitting_a_long_history_tokenizes_it_a_bounded_number_of_times(
    served: tuple[str, Any, Backend],
) -> None:
    lm = served[2].lm(CONFIG.model)
    counting = CountingTokenizer(lm.tokenizer)
    model = SimpleNamespace(tokenizer=counting, model=lm.model)
    turns = [
        {"role": "user", "content": f"question {i} " + "about the sea " * 20}
        if i % 2 == 0
        else {"role": "assistant", "content": f"answer {i} " + "waves and tides " * 20}
        for i in range(BOUNDS.history_messages - 1)
    ]
    size = sum(len(m["content"]) for m in turns)
    kept, dropped = fit_context(model, turns, 8, system="Be brief.")
    assert kept[0] == {"role": "system", "content": "Be brief."} and kept[-1] == turns[-1]
    assert dropped > 90 and len(kept) == 1 + len(turns) - 2 * dropped
    assert counting.chars < 3 * size  # linear: not once per dropped turn


@pytest.mark.slow
def test_the_server_keeps_the_state_of_a_bounded_number_of_sessions(
    served: tuple[str, Any, Backend], page: Any
) -> None:
    demo = served[1]
    call_chat(page, max_new_tokens=2)
    for _ in range(BOUNDS.sessions_kept + 16):
        page.reset_session()
        page.predict(api_name="/clear")
    assert len(demo.state_holder.session_data) == BOUNDS.sessions_kept


def test_one_sessions_state_does_not_grow_with_its_replies(
    served: tuple[str, Any, Backend], page: Any
) -> None:
    """The session's copy of the page's components stays the same size reply after reply
    (a skipped HTML output used to leave one more component in it per reply)."""
    demo = served[1]
    page.reset_session()
    call_chat(page, max_new_tokens=4)
    session = demo.state_holder.session_data[page.session_hash]
    size = len(session.blocks_config.blocks)
    for _ in range(4):
        call_chat(page, max_new_tokens=4)
    assert len(session.blocks_config.blocks) == size


def test_conversation_downloads_keep_a_bounded_number_of_files(
    served: tuple[str, Any, Backend],
) -> None:
    """A conversation file is written after every reply: the oldest are deleted beyond
    ``MAX_EXPORTS``, and Gradio's copies of served files are cleaned every hour."""
    from personachat.app import export

    history = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": "Hi."}]
    paths = [export.conversation_file(history, [], [], None) for _ in range(export.MAX_EXPORTS + 8)]
    alive = [p for p in paths if p is not None and p.exists()]
    assert len(alive) == export.MAX_EXPORTS and alive[0] == paths[8]
    assert served[1].delete_cache == (3600, 3600)
