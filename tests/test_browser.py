"""A real Chromium (Debian's /usr/bin/chromium, driven by Playwright) against ``python app.py``.

The test starts the app as a subprocess on a free localhost port with its defaults (the bundled
demo model and store/; ``PERSONACHAT_MODEL`` / ``PERSONACHAT_STORE`` override them as for the
app), then does what a person would, on a laptop (1366x768) and on a phone (390x844): pick an
example prompt and see the steered and the plain reply side by side, move the strength without
pressing Enter, switch units, add the prompted column, hover the heatmap, use a recipe, share
the settings and open the link, see the conversation's drift, hold the assistant with the hold
panel's recipe, download the conversation and a vector, stop a reply, undo it. It asserts no
request leaves localhost and saves ``tests/screenshots/app.png``, ``app_drift.png`` and
``app_phone.png`` for the README. Skipped only when /usr/bin/chromium is missing.

Stop is tested without a race: the app runs with ``PERSONACHAT_HOLD_MESSAGE`` set, so its
reply to that one message waits inside the model's forward pass, after a few tokens, until Stop
arrives (``personachat.app.hold``); the click always finds it generating, however fast or
loaded the machine.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from playwright.sync_api import Page

CHROMIUM = Path("/usr/bin/chromium")
ROOT = Path(__file__).resolve().parent.parent
SHOTS = ROOT / "tests" / "screenshots"
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
STORY = "Tell me a long story about the sea."  # the reply the app holds until Stop
LOCAL = ("http://127.0.0.1", "data:", "blob:", "about:")
LOG: list[str] = []  # the app's output, shown when the test fails
DESKTOP = {"width": 1366, "height": 768}
PHONE = {"width": 390, "height": 844}

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
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


@contextmanager
def running_app(store: Path, args: list[str], env_extra: dict[str, str]) -> Iterator[str]:
    """``python app.py`` over a copy of the app's store in ``store``, on a free port."""
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PERSONACHAT_LOG": "DEBUG", **env_extra}
    env.pop("SPACE_ID", None)
    # a copy of the store, so an extraction in the page never writes into the repository
    source = Path(env.get("PERSONACHAT_STORE", ROOT / "store"))
    shutil.copytree(source, store, dirs_exist_ok=True, ignore=shutil.ignore_patterns("models"))
    env["PERSONACHAT_STORE"] = str(store)
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "app.py"), "--port", str(port), *args],
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
        yield f"http://127.0.0.1:{port}/"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def app_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, float, Path]]:
    store = tmp_path_factory.mktemp("store")
    started = time.perf_counter()
    with running_app(store, [], {"PERSONACHAT_HOLD_MESSAGE": STORY}) as url:
        yield url, started, store


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        yield chromium
        chromium.close()


def wait_status(page: Page, pattern: str, timeout: float = 60.0) -> str:
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
  const view = document.querySelector('#compare');
  const record = () => {
    const cards = view.querySelectorAll('.pc-steered .pc-text');
    const text = cards.length ? cards[cards.length - 1].innerText.trim() : '';
    if (text && window.__seen[window.__seen.length - 1] !== text) window.__seen.push(text);
  };
  if (window.__watch) window.__watch.disconnect();
  window.__watch = new MutationObserver(record);
  window.__watch.observe(view, {subtree: true, childList: true, characterData: true});
}"""


def replies(page: Page) -> dict[str, str]:
    """The last turn's replies by column: steered, unsteered, prompted."""
    turn = page.locator("#compare .pc-turn").last
    out = {}
    for kind in ("steered", "unsteered", "prompted"):
        card = turn.locator(f".pc-{kind} .pc-text")
        if card.count():
            out[kind] = str(card.inner_text()).strip()
    return out


def send(page: Page, message: str | None = None) -> list[str]:
    """Send ``message`` (or press an example when None is given, the first one); return the
    distinct steered texts the page showed while it streamed."""
    page.evaluate(WATCH)
    if message is None:
        page.locator("#examples button").first.click()
    else:
        page.locator("#message textarea").fill(message)
        page.locator("#send").click()
    wait_status(page, r"^(Done|Stopped)", timeout=90)
    seen = list(page.evaluate("() => window.__seen"))
    final = replies(page)["steered"]
    if not seen or seen[-1] != final:
        seen.append(final)
    return seen


def ready(page: Page, url: str) -> str:
    page.goto(url)
    status = wait_status(page, r"Model .* ready: \d+ personas|restored", timeout=90)
    page.wait_for_function("() => !document.querySelector('#blend').innerText.includes('Loading')")
    page.wait_for_timeout(500)  # the defaults' follow-up events (sliders, blend line)
    return status


def extract_if_empty(page: Page, status: str) -> None:
    """A store without vectors for this model: extract the pirate's in the page (quick)."""
    if "ready: 0 personas" not in status:
        return
    page.get_by_text("Model and store", exact=True).click()
    page.locator("#extract-personas input").first.click()
    page.locator('#extract-personas [role=option][aria-label="pirate"]').first.click()
    page.keyboard.press("Escape")
    page.locator("#extract-neurons input").check()
    page.locator("#extract").click()
    wait_status(page, r"^Registered 1 vectors and 1 neuron sets", timeout=180)
    page.reload()
    ready(page, page.url)


def hover_value(page: Page) -> str:
    """Hover the middle of the heatmap's reply; return the hover box's text."""
    page.locator("#heatmap .nsewdrag").first.wait_for(timeout=20000)
    box = page.locator("#heatmap .nsewdrag").first.bounding_box()
    assert box is not None
    page.locator("#heatmap").scroll_into_view_if_needed()
    box = page.locator("#heatmap .nsewdrag").first.bounding_box()
    assert box is not None
    page.mouse.move(box["x"] + box["width"] * 0.6, box["y"] + box["height"] * 0.5)
    page.wait_for_timeout(300)
    return str(page.locator("#heatmap .hoverlayer").text_content())


def test_the_page_at_1366x768(
    app_url: tuple[str, float, Path], browser: Any, tmp_path: Path
) -> None:
    from personachat.prompts.demo import has_marker

    url, spawned, store = app_url
    external: list[str] = []
    context = browser.new_context(viewport=DESKTOP, accept_downloads=True)
    page = context.new_page()
    page.on("request", lambda r: None if r.url.startswith(LOCAL) else external.append(r.url))
    opened = time.perf_counter()
    status = ready(page, url)
    now = time.perf_counter()
    print(
        f"cold start: page usable {now - spawned:.1f} s after starting app.py "
        f"({now - opened:.1f} s after opening the page)"
    )
    extract_if_empty(page, status)
    demo = is_demo_model()

    # 1. example prompts on the empty chat; the first message, with the page's defaults, gets
    #    a steered and a plain reply, side by side in one turn
    assert page.locator("#examples button").count() >= 3
    if demo:
        assert "Tell me about" in page.locator("#model-note").inner_text()
    seen = send(page)
    first = replies(page)
    assert first["steered"] != first["unsteered"], first
    assert [t for t in seen[:-1] if seen[-1].startswith(t)], f"no streaming: {seen}"
    if demo:
        assert has_marker(first["steered"], "pirate") and not has_marker(
            first["unsteered"], "pirate"
        )
        assert "Blend 1·pirate at 0-2:2 (raw)." in page.locator("#status").inner_text()

    # 2. the tokens view is coloured; the heatmap shows a value on hover
    tokens = page.locator("#tokens span.pc-tok")
    colours = {tokens.nth(i).get_attribute("style") for i in range(min(tokens.count(), 40))}
    assert tokens.count() > 10 and len(colours) > 3
    assert re.search(r"layer \d+\s*value -?\d+\.\d{3}", hover_value(page))

    # 3. a strength typed into the slider applies without Enter; the units rescale it
    page.locator("#strength input[type=number]").fill("3")
    send(page, QUESTION)
    assert ":3 (raw)." in page.locator("#status").inner_text()
    page.get_by_label("x residual norm").check()
    page.wait_for_function(
        "() => document.querySelector('#strength input[type=number]').value !== '3'"
    )
    calibrated = float(page.locator("#strength input[type=number]").input_value())
    assert 0.5 < calibrated < 2.0, calibrated  # the same push in residual norms
    assert "residual stream's own norm" in page.locator("#strength").inner_text()
    page.get_by_label("raw", exact=True).check()
    page.wait_for_function(
        "() => Math.abs(document.querySelector('#strength input[type=number]').value - 3) < 0.15"
    )
    check_drift(page, demo)

    # 4. the persona's own prompt as a third column, in a new conversation (the demo model
    #    answers single questions); a recipe removes the persona
    page.locator("#clear").click()
    wait_status(page, r"^Conversation cleared")
    page.wait_for_function("() => !document.querySelector('#compare .pc-turn')")
    assert "No reply yet" in page.locator("#tokens").inner_text()
    page.locator("#prompted input").check()
    send(page, QUESTION)
    three = replies(page)
    assert set(three) == {"steered", "unsteered", "prompted"}
    page.evaluate(
        "() => { window.scrollTo(0, 0); document.querySelector('.sidebar-content').scrollTop = 0; }"
    )
    SHOTS.mkdir(exist_ok=True)
    page.screenshot(path=str(SHOTS / "app.png"))
    if demo:
        assert has_marker(three["prompted"], "pirate")
        page.locator("#clear").click()
        wait_status(page, r"^Conversation cleared")
        page.wait_for_function("() => !document.querySelector('#compare .pc-turn')")
        page.locator("#recipe-direction").click()
        wait_status(page, r"^Recipe for pirate")
        send(page, QUESTION)
        removed = replies(page)
        assert not has_marker(removed["steered"], "pirate"), removed
        assert has_marker(removed["unsteered"], "pirate"), removed
        assert (
            "Moving pirate's direction (read from prompt_last)"
            in page.locator("#status").inner_text()
        )

    # 5. a link carries the settings: opening it restores them
    page.locator("#share").click()
    link_box = page.locator("#share-link textarea")
    link_box.wait_for(timeout=10000)
    page.wait_for_function(
        "() => document.querySelector('#share-link textarea')?.value.startsWith('http')"
    )
    link = link_box.input_value()
    named = "direction=pirate" if demo else "prompted=1"  # the recipe's, or the checkbox
    assert link.startswith(url) and named in link, link
    other = context.new_page()
    other.goto(link)
    wait_status(other, r"^Settings restored from the link")
    if demo:
        other.get_by_text("Generation", exact=True).click()
        assert other.locator("#system textarea").input_value() == "You are a pirate."
        other.get_by_text("Directional ablation", exact=True).click()
        assert other.locator("#direction-layers textarea").input_value() == "0"
        assert other.locator("#direction input").first.input_value() == "pirate"
    else:
        assert other.locator("#prompted input").is_checked()
    other.close()

    # 5b. the hold panel's recipe holds the assistant: the pirate's own prompt, no pirate
    if demo:
        check_hold(page)

    # 6. downloads: the conversation as JSON, a vector that loads back bit for bit
    with page.expect_download() as done:
        page.locator("#download-conversation").click()
    record = json.loads(Path(done.value.path()).read_text())
    assert record["format"] == "personachat.conversation/1"
    assert record["conversation"][-1]["role"] == "assistant"
    assert record["settings"]["message"] == QUESTION and "direction_layers" in record["settings"]
    numbers = record["readout"]
    assert len(numbers["tokens"]) > 10 and numbers["raw"]["values"]
    check_vector_download(page, store, tmp_path)
    # Undo takes the last turn and the views of its reply away
    turns = page.locator("#compare .pc-turn").count()
    page.locator("#undo").click()
    page.wait_for_function(
        "() => document.querySelector('#tokens').innerText.includes('No reply yet')"
    )
    assert page.locator("#compare .pc-turn").count() == turns - 1

    # 7. Stop is enabled only while a reply is written, and Esc stops it: the partial stays
    assert not page.locator("#stop").is_enabled()
    page.locator("#message textarea").fill(STORY)
    page.locator("#send").click()
    wait_status(page, r"^Generating")
    page.locator("#stop:not([disabled])").wait_for(timeout=10000)
    page.locator("#message textarea").press("Escape")
    wait_status(page, r"^Stopped: partial reply kept")
    assert replies(page)["steered"] and not page.locator("#stop").is_enabled()

    # 8. bad input: a visible, specific message, and the chat keeps working
    page.get_by_text("Advanced: typed weights and layer spec", exact=True).click()
    page.locator("#layer-spec textarea").fill("")
    page.locator("#layer-spec textarea").press_sequentially("1:lots")  # typing: preset custom
    page.locator("#message textarea").fill(QUESTION)
    page.locator("#send").click()
    wait_status(page, r"^⚠ Strength per layer: strength 'lots'")
    assert page.locator("#message textarea").input_value() == QUESTION
    context.close()
    assert external == [], f"requests left the machine: {external}"


DRIFT_TURNS = """() => {
  const plot = document.querySelector('#drift .js-plotly-plot');
  return plot && plot.data ? plot.data.map((t) => [t.name, (t.x || []).length]) : [];
}"""


def check_drift(page: Page, demo: bool) -> None:
    """After two messages the Drift tab charts two turns of each tracked vector (the pirate;
    on the demo model also the assistant axis, as a percentile and scaled)."""
    page.get_by_role("tab", name="Drift").click()
    page.locator("#drift .main-svg").first.wait_for(timeout=20000)
    page.wait_for_function(f"() => ({DRIFT_TURNS})().some((t) => t[1] === 2)")
    traces = page.evaluate(DRIFT_TURNS)
    assert all(n == 2 for _, n in traces), traces
    if demo:
        names = {name.split(" (")[0] for name, _ in traces}
        assert names == {"pirate", "assistant_axis"}, traces
        text = str(page.locator("#drift").inner_text())
        assert "normal band: its 5th-95th" in text and "raw and scaled only" not in text
    page.locator("#drift").scroll_into_view_if_needed()
    SHOTS.mkdir(exist_ok=True)
    page.locator("#drift").screenshot(path=str(SHOTS / "app_drift.png"))
    page.get_by_role("tab", name="Tokens").click()


def check_hold(page: Page) -> None:
    """The hold panel's recipe sets the model card's setting; the reply under the pirate's own
    prompt is the default's, the plain column beside it stays the pirate's."""
    from personachat.prompts.demo import has_marker

    page.locator("#clear").click()
    wait_status(page, r"^Conversation cleared")
    page.get_by_text("Hold the persona", exact=True).click()
    page.locator("#cap-recipe").click()
    wait_status(page, r"^Recipe for pirate: Hold the assistant")
    page.wait_for_function(
        "() => document.querySelector('#cap-info').innerText.startsWith('Holding assistant_axis')"
    )
    assert page.locator("#cap input").first.input_value() == "assistant_axis"
    assert page.locator("#cap-layers textarea").input_value() == "0"
    send(page, QUESTION)
    held = replies(page)
    assert not has_marker(held["steered"], "pirate") and has_marker(held["unsteered"], "pirate")
    status = page.locator("#status").inner_text()
    assert "Holding assistant_axis's projection at least the 5th percentile" in status


def check_vector_download(page: Page, store: Path, folder: Path) -> None:
    """The Store tab exports a persona's vector; the file loads back bit for bit."""
    import torch

    from personachat.store import Store
    from personachat.store.formats import read_vector

    page.get_by_role("tab", name="Store").click()
    persona = page.locator("#vector-persona input").first.input_value()
    kind = page.locator("#vector-kind input").first.input_value()
    with Store(store, read_only=True) as opened:
        model_id = opened.vectors(persona=persona)[0].model_id
        stored = opened.load_vector(model_id, persona, positions=kind)
        info = opened.model(model_id)
    for suffix in (".safetensors", ".gguf"):
        page.locator("#vector-format").get_by_label(suffix).check()
        page.locator("#export-vector").click()
        named = page.locator(f"#vector-file a[href*='{suffix}']").first
        named.wait_for(timeout=20000)
        with page.expect_download() as done:
            named.click()
        saved = folder / done.value.suggested_filename
        done.value.save_as(saved)
        assert saved.name == f"{persona}.{kind}{suffix}"
        back = read_vector(saved, info)
        layers = slice(1, None) if suffix == ".gguf" else slice(None)  # GGUF has no layer 0
        assert torch.equal(back.vector[layers], stored.vector[layers].float()), suffix
    page.get_by_role("tab", name="Tokens").click()


def test_the_page_on_a_phone(app_url: tuple[str, float, Path], browser: Any) -> None:
    url, _, _ = app_url
    external: list[str] = []
    context = browser.new_context(viewport=PHONE, is_mobile=True, has_touch=True)
    page = context.new_page()
    page.on("request", lambda r: None if r.url.startswith(LOCAL) else external.append(r.url))
    ready(page, url)
    # the chat comes first: the message box is on the first screen, the settings in a drawer
    page.wait_for_function("() => !document.querySelector('.sidebar.open')")
    box = page.locator("#message textarea").bounding_box()
    assert box is not None and box["y"] + box["height"] <= PHONE["height"], box
    page.locator("#open-settings").click()
    page.locator(".sidebar.open #personas").wait_for()
    page.locator(".sidebar.open .toggle-button").click()
    page.wait_for_function("() => !document.querySelector('.sidebar.open')")
    send(page)
    assert len(replies(page)) == 2
    # every view's tab is reachable, none hidden behind an overflow menu
    for name in ("Tokens", "Drift", "Layers", "Map", "Store", "Analysis"):
        assert page.get_by_role("tab", name=name).is_visible(), name
    page.get_by_role("tab", name="Layers").click()
    page.locator("#plot-layers").click()
    page.locator("#layer-plot .main-svg").first.wait_for(timeout=20000)
    page.get_by_role("tab", name="Tokens").click()
    page.evaluate("() => window.scrollTo(0, 0)")
    SHOTS.mkdir(exist_ok=True)
    page.screenshot(path=str(SHOTS / "app_phone.png"))
    context.close()
    assert external == [], f"requests left the machine: {external}"


def test_the_admin_token_box_of_a_public_page(tmp_path: Path, browser: Any) -> None:
    """In public mode the page shows the Admin token box: without the token registering the
    assistant axis is refused, with it typed in the box the axis registers."""
    token = "s3cret-admin"
    env = {"PERSONACHAT_ADMIN_TOKEN": token}
    with running_app(tmp_path / "store", ["--public"], env) as url:
        page = browser.new_page(viewport=DESKTOP)
        try:
            ready(page, url)
            page.get_by_role("tab", name="Store").click()
            page.locator("#register-axis").click()
            wait_status(page, r"^⚠ Registering the assistant axis failed: .* none was given\.")
            page.get_by_text("Model and store", exact=True).click()
            page.locator("#admin-token input").fill("guess")
            page.locator("#register-axis").click()
            wait_status(page, r"^⚠ Registering the assistant axis failed: .* token given is wrong")
            page.locator("#admin-token input").fill(token)
            page.locator("#register-axis").click()
            wait_status(page, r"^Registered the assistant axis of", timeout=120)
        finally:
            page.close()
