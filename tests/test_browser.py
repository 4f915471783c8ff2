"""A real Chromium (Debian's /usr/bin/chromium, driven by Playwright) against ``python app.py``.

The test starts the app as a subprocess on a free localhost port with its defaults (the bundled
demo model and store/; ``PERSONACHAT_MODEL`` / ``PERSONACHAT_STORE`` override them as for the
app), then does what a person would: send a message and watch the reply stream in, pick a
persona and a strength and see the reply change, see the coloured per-token projections,
ablate a neuron set, stop a long generation. It asserts no request leaves localhost and saves
``tests/screenshots/app.png`` for the README. Skipped only when /usr/bin/chromium is missing.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from playwright.sync_api import Page

CHROMIUM = Path("/usr/bin/chromium")
ROOT = Path(__file__).resolve().parent.parent
SCREENSHOT = ROOT / "tests" / "screenshots" / "app.png"
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
QUESTION = "Tell me about the ocean."
LOCAL = ("http://127.0.0.1", "data:", "blob:", "about:")
LOG: list[str] = []  # the app's output, shown when the test fails

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed"),
]


def is_demo_model() -> bool:
    return (
        os.environ.get("PERSONACHAT_MODEL", "store/models/demo")
        .rstrip("/")
        .endswith("store/models/demo")
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def app_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, float]]:
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PERSONACHAT_LOG": "DEBUG"}
    env.pop("SPACE_ID", None)
    # a copy of the store, so an extraction in the page never writes into the repository
    source = Path(env.get("PERSONACHAT_STORE", ROOT / "store"))
    copy = tmp_path_factory.mktemp("store")
    shutil.copytree(source, copy, dirs_exist_ok=True, ignore=shutil.ignore_patterns("models"))
    env["PERSONACHAT_STORE"] = str(copy)
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "app.py"), "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    started = time.perf_counter()
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            LOG.append(line)
            if "PersonaChat on http://" in line:
                break
        else:
            pytest.fail(f"app.py exited with {proc.wait()} before serving:\n{''.join(LOG)}")
        print(f"app.py serving after {time.perf_counter() - started:.1f} s")
        # keep draining the app's output so a full pipe can never block it
        threading.Thread(target=lambda: LOG.extend(proc.stdout or []), daemon=True).start()
        yield f"http://127.0.0.1:{port}/", started
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def reply_text(page: Page) -> str:
    bubbles = page.locator("#chat .message.bot")
    return str(bubbles.last.inner_text()).strip() if bubbles.count() else ""


def wait_status(page: Page, pattern: str, timeout: float = 30.0) -> str:
    status = page.locator("#status")
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        text = str(status.inner_text())
        if re.search(pattern, text):
            return text
        time.sleep(0.05)
    tail = "".join(LOG[-30:])
    raise AssertionError(f"status never matched {pattern!r}; last: {text!r}\napp log:\n{tail}")


WATCH = """() => {
  window.__seen = [];
  const chat = document.querySelector('#chat');
  const record = () => {
    const bots = chat.querySelectorAll('.message.bot');
    const text = bots.length ? bots[bots.length - 1].innerText.trim() : '';
    if (text && window.__seen[window.__seen.length - 1] !== text) window.__seen.push(text);
  };
  if (window.__watch) window.__watch.disconnect();
  window.__watch = new MutationObserver(record);
  window.__watch.observe(chat, {subtree: true, childList: true, characterData: true});
}"""


def send(page: Page, message: str) -> list[str]:
    """Send ``message``; return the distinct reply texts the page showed while it streamed."""
    page.evaluate(WATCH)
    page.locator("#message textarea").fill(message)
    page.locator("#send").click()
    wait_status(page, r"^(Done|Stopped)", timeout=60)
    seen = list(page.evaluate("() => window.__seen"))
    final = reply_text(page)
    if not seen or seen[-1] != final:
        seen.append(final)
    return seen


def pick(page: Page, elem_id: str, option: str | None = None, partial: bool = False) -> str:
    """Choose ``option`` (or, with ``partial``, the first option containing it; else the first
    option) in a Gradio dropdown; returns the chosen name."""
    page.locator(f"#{elem_id} input").first.click()
    options = page.locator(f"#{elem_id} [role=option]")
    options.first.wait_for(timeout=5000)
    match = "*=" if partial else "="
    wanted = page.locator(f'#{elem_id} [role=option][aria-label{match}"{option}"]')
    choice = wanted.first if option and wanted.count() else options.first
    name = str(choice.get_attribute("aria-label"))
    choice.click()
    page.keyboard.press("Escape")
    return name


def test_chat_steer_readout_ablate_and_stop_in_a_real_browser(
    app_url: tuple[str, float],
) -> None:
    from playwright.sync_api import sync_playwright

    external: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1250})
        page.on("request", lambda r: None if r.url.startswith(LOCAL) else external.append(r.url))
        url, spawned = app_url
        opened = time.perf_counter()
        page.goto(url)
        ready = wait_status(page, r"Model .* ready: \d+ personas", timeout=60)
        now = time.perf_counter()
        print(
            f"cold start: page usable {now - spawned:.1f} s after starting app.py "
            f"({now - opened:.1f} s after opening the page)"
        )
        if "ready: 0 personas" in ready:  # a store without vectors: extract them in the page
            page.get_by_text("Model and store", exact=True).click()
            pick(page, "extract-personas", "pirate")  # one persona (+ its baseline): quick
            page.locator("#extract-neurons input").check()
            page.locator("#extract").click()
            wait_status(page, r"^Registered 1 vectors and 1 neuron sets", timeout=120)
            page.get_by_text("Model and store", exact=True).click()
        page.get_by_text("Generation", exact=True).click()
        page.locator("#max-tokens input").fill("48")

        # 1. a plain message streams a reply
        plain = send(page, QUESTION)
        partial = [t for t in plain[:-1] if plain[-1].startswith(t)]
        assert partial, f"the reply did not stream: {plain}"

        # 2. a persona and a strength change the reply; projections show as coloured tokens
        persona = pick(page, "personas", "pirate")  # the band preset fills the layer spec
        page.wait_for_function(
            "() => document.querySelector('#layer-spec textarea').value.includes(':')"
        )
        spec = page.locator("#layer-spec textarea")
        page.locator("#undo").click()
        page.wait_for_function("() => document.querySelectorAll('#chat .message').length === 0")
        steered = send(page, QUESTION)[-1]
        assert steered != plain[-1], "steering did not change the reply"
        if persona == "pirate" and is_demo_model():
            from personachat.prompts.demo import has_marker

            assert has_marker(steered, "pirate") and not has_marker(plain[-1], "pirate")
        assert f"Blend 1·{persona}" in page.locator("#status").inner_text()
        tokens = page.locator("#tokens span.pc-tok")
        assert tokens.count() > 10
        colours = {tokens.nth(i).get_attribute("style") for i in range(tokens.count())}
        assert len(colours) > 3, "per-token projections are not coloured"
        assert page.locator("#tokens span.pc-reply").count() >= 1

        # 3. side by side + ablating a neuron set: the unsteered column shows the plain reply
        page.locator("#sbs input").check()
        page.get_by_text("Neurons", exact=True).click()
        # the persona's patching set: picking it switches to its use, the default's values on
        # the prompt (any set of the persona where there is none)
        chosen = pick(page, "neuron-sets", f"{persona}_vs_default.mlp_hidden.patching")
        if not chosen.endswith(".patching"):
            chosen = pick(page, "neuron-sets", persona, partial=True)
            page.locator("#ablation").get_by_label("zero").check()
        page.locator("#undo").click()
        page.wait_for_function("() => document.querySelectorAll('#chat .message').length === 0")
        send(page, QUESTION)
        status = page.locator("#status").inner_text()
        how = "by mean (prompt tokens)" if chosen.endswith(".patching") else "by zero"
        assert f"({chosen}) {how}" in status, status
        side = page.locator("#side-chat .message.bot").last.inner_text().strip()
        assert side == plain[-1], "the unsteered column differs from the plain reply"
        page.locator("#heatmap img").wait_for(timeout=20000)
        page.wait_for_timeout(500)  # let the heatmap fade in
        SCREENSHOT.parent.mkdir(exist_ok=True)
        page.screenshot(path=str(SCREENSHOT), full_page=True)

        # 4. stop a long generation: the partial reply stays
        page.locator("#ablation").get_by_label("off").check()
        page.locator("#sbs input").uncheck()
        page.locator("#max-tokens input").fill("500")
        # pushed this hard at every token the model babbles on instead of ending its reply
        page.locator("#positions").get_by_label("all", exact=True).check()
        spec.fill("all:8")
        page.locator("#message textarea").fill("Tell me a long story about the sea.")
        page.locator("#send").click()
        wait_status(page, r"^Generating")
        page.locator("#stop").click(timeout=3000)  # the page stays responsive while streaming
        wait_status(page, r"^Stopped: partial reply kept")
        assert reply_text(page)

        # 5. bad input: a visible, specific message, and the chat keeps working
        spec.fill("1:lots")
        page.locator("#message textarea").fill(QUESTION)
        page.locator("#send").click()
        wait_status(page, r"^⚠ Strength per layer: strength 'lots'")
        assert page.locator("#message textarea").input_value() == QUESTION
        browser.close()
    assert external == [], f"requests left the machine: {external}"
