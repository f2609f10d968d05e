"""The browser playground (GET /) end to end: Debian's Chromium driven by Playwright against a
real server on loopback with a tiny random model and API keys on. What a user relies on: the
page loads offline, asks for the key, shows ghost text streamed after a pause in typing, Tab
inserts it, and typing again cancels the request in flight on the server too.

Needs `apt-get install chromium` and `pip install playwright` (never `playwright install`: the
Debian browser is used through executable_path). The screenshot goes to bench/playground.png
(override with PLAYGROUND_SCREENSHOT)."""
from __future__ import annotations

import os
import shutil
import time

import httpx
import pytest

from serve_helpers import REPO, thread_server, write_tiny_checkpoint

try:
    from playwright.sync_api import sync_playwright
except ImportError:  # the browser test skips; the plain HTTP test still runs
    sync_playwright = None

CHROMIUM = os.environ.get("CHROMIUM", shutil.which("chromium") or "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SCREENSHOT = os.environ.get("PLAYGROUND_SCREENSHOT", os.path.join(REPO, "bench", "playground.png"))
KEY = "playground-test-key"
MODEL = "code-assistant"
CODE = 'def mean(values):\n    """The arithmetic mean of a list of numbers."""\n    total = '

needs_browser = pytest.mark.skipif(
    sync_playwright is None or not os.path.exists(CHROMIUM),
    reason="browser test needs the playwright package (pip install playwright) and Debian's chromium "
           f"(apt-get install chromium) at {CHROMIUM}" + ("" if sync_playwright else "; playwright is missing"))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    ckpt = write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "best.pt", block_size=256)
    # A short drain: a request the browser left streaming must not hold up the teardown. The
    # engine runs as a thread here, not a process, so that slow_decode can reach its model.
    with thread_server(ckpt, api_keys=(KEY,), max_batch=2, drain_timeout_s=2.0, engine_process=False) as srv:
        yield srv


@pytest.fixture
def slow_decode(server):
    """Makes each decode step take `delay[0]` seconds longer, so that a completion is surely
    still streaming when the test types again (the tiny model would otherwise finish first)."""
    model = server.runtime.served.model
    original, delay = model.decode, [0.0]

    def decode(*args, **kwargs):
        time.sleep(delay[0])
        return original(*args, **kwargs)

    model.decode = decode  # an instance attribute shadows the method for the engine's calls
    yield delay
    del model.decode


def cancellations(server) -> float:
    text = httpx.get(server.url + "/metrics", timeout=10).text
    line = next(l for l in text.splitlines() if l.startswith("codeassist_cancellations_total "))
    return float(line.split()[1])


def wait_until(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not predicate():
        time.sleep(0.05)
    return predicate()


def test_page_and_script_are_served_without_a_key(server):
    page = httpx.get(server.url + "/", timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'id="editor"' in page.text and "static/playground.js" in page.text
    assert "http://" not in page.text and "https://" not in page.text  # offline: no CDN
    script = httpx.get(server.url + "/static/playground.js", timeout=10)
    assert script.status_code == 200 and "v1/completions" in script.text
    assert httpx.get(server.url + "/v1/models", timeout=10).status_code == 401  # the API itself is guarded
    assert httpx.get(server.url + "/info", timeout=10).json()["model"] == MODEL


@needs_browser
def test_type_see_ghost_text_accept_with_tab_and_cancel_by_typing(server, slow_decode):
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 720})
            problems, urls = [], []
            page.on("pageerror", lambda exc: problems.append(str(exc)))
            page.on("request", lambda request: urls.append(request.url))
            run_session(page, server, slow_decode)
            assert not problems, problems
            assert urls and all(u.startswith(server.url + "/") for u in urls), urls  # nothing off-box
        finally:
            browser.close()
            slow_decode[0] = 0.0


def run_session(page, server, slow_decode):
    page.goto(server.url + "/")
    enter_key(page)
    # Greedy: the tiny model is fixed, so every run sees the same text (never an early stop).
    page.fill("#temperature", "0")
    editor = page.locator("#editor")
    ghost = accept_a_suggestion(page, editor)
    assert "tok/s" in page.text_content("#stats") and "ms" in page.text_content("#stats")
    print(f"\nplayground: suggestion {ghost!r}; {page.text_content('#stats')}; screenshot {SCREENSHOT}")
    cancel_by_typing(page, server, editor, slow_decode)


def enter_key(page):
    """Without the key /v1/models answers 401 and the page says so; with it the model id shows."""
    page.wait_for_function("document.getElementById('status').dataset.state === 'error'")
    assert "401" in page.text_content("#status") and page.text_content("#model-id") == "unavailable"
    page.fill("#api-key", KEY)
    page.press("#api-key", "Enter")
    page.wait_for_function(f"document.getElementById('model-id').textContent === {MODEL!r}")
    stored = page.evaluate("[sessionStorage.getItem('codeassist.apiKey'), localStorage.getItem('codeassist.apiKey')]")
    assert stored == [KEY, None]  # this tab only, unless "remember" is ticked


def accept_a_suggestion(page, editor) -> str:
    editor.fill(CODE)  # an `input` event, as typing is
    page.wait_for_function("document.getElementById('status').dataset.state === 'done'", timeout=15000)
    ghost = page.text_content("#ghost")
    assert ghost, "no ghost text after a pause in typing"
    os.makedirs(os.path.dirname(SCREENSHOT), exist_ok=True)
    page.screenshot(path=SCREENSHOT)
    editor.press("Tab")
    assert editor.input_value() == CODE + ghost
    # Accepting asks for the next suggestion; let it finish so it cannot blur the count below.
    page.wait_for_function("document.getElementById('status').dataset.state === 'done'", timeout=15000)
    return ghost


def cancel_by_typing(page, server, editor, slow_decode):
    page.fill("#max-tokens", "256")
    page.uncheck("#stop-blank")  # nothing may end this completion before the test types again
    slow_decode[0] = 0.05  # >= 12 s for the rest of a 256-token completion
    editor.focus()
    editor.press("Control+End")
    editor.type("x")
    # Streaming: a first piece of ghost text is on screen while the request is still open.
    page.wait_for_function("document.getElementById('status').dataset.state === 'streaming'"
                           " && document.getElementById('ghost').textContent.length > 0", timeout=15000)
    before = cancellations(server)
    editor.type("y")
    assert wait_until(lambda: cancellations(server) > before, 5.0), "typing did not cancel the request on the server"
    assert page.text_content("#ghost") == ""  # stale ghost text is gone at once
    slow_decode[0] = 0.0
    # The suggestion for "xy" follows; let it finish so nothing is left streaming at teardown.
    page.wait_for_function("document.getElementById('status').dataset.state === 'done'", timeout=15000)
    value = editor.input_value()
    editor.press("Escape")  # dismisses without touching the code
    assert page.text_content("#ghost") == "" and editor.input_value() == value
