"""The Playground in a real browser: Debian's Chromium driven by Playwright for Python.

One server (a tiny random model, an API key set) serves all tests. Streaming, Stop and the
error tests talk to it for real; only the Markdown/XSS test feeds a canned stream with
`page.route`, because a random model cannot be made to write a code block or `<script>`.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import time
import urllib.request
from pathlib import Path

import pytest

try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:  # pragma: no cover - depends on the machine
    sync_playwright = None

from starchat.chat_template import SYSTEM_PROMPTS

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
API_KEY = "playground-test-key"
MODEL_NAME = "starchat-tiny"
REPLY_TIMEOUT_MS = 90_000

# CI installs both (.ci/browser-deps.sh): there a missing browser is a failure, not a skip.
_MAY_SKIP = not os.environ.get("CI")

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(_MAY_SKIP and sync_playwright is None, reason="Playwright for Python is not installed (see .ci/browser-deps.sh)"),
    pytest.mark.skipif(_MAY_SKIP and not CHROMIUM.exists(), reason="/usr/bin/chromium is missing: apt-get install chromium (see .ci/browser-deps.sh)"),
]


# ---------- fixtures ----------

@pytest.fixture(scope="module")
def server_url(tiny_model_dir):
    import uvicorn

    from starchat.server.app import create_app
    from starchat.server.settings import ServerSettings

    settings = ServerSettings(model=str(tiny_model_dir), served_model_name=MODEL_NAME, api_key=API_KEY, device="cpu",
                              log_level="warning")
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(settings), log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            pytest.fail("the server did not start")
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port}"
    _wait_until_ready(url)
    yield url
    server.should_exit = True
    thread.join(timeout=30)
    listener.close()


def _wait_until_ready(url: str, timeout: float = 120.0) -> None:
    """The model loads in the background: wait until /health says ready."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    pytest.fail("the server's /health never reported ready")


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, server_url):
    """A fresh browser context (empty session storage) per test; script errors fail the test."""
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    page = context.new_page()
    page.set_default_timeout(30_000)
    page_errors: list[str] = []
    page.on("pageerror", lambda error: page_errors.append(str(error)))
    yield page
    context.close()
    assert not page_errors, f"script errors on the page: {page_errors}"


def open_playground(page, server_url: str, api_key: str = API_KEY) -> None:
    page.goto(server_url + "/playground")
    page.wait_for_selector("body[data-ready=true]")
    dialog = page.locator("#api-key-dialog")
    expect(dialog).to_be_visible()  # the server has a key: the page asks for it first
    page.fill("#api-key-input", api_key)
    page.click("#api-key-save")
    if api_key == API_KEY:
        expect(dialog).to_be_hidden()


def ask(page, question: str, max_tokens: int | None = None) -> None:
    if max_tokens is not None:
        page.fill("#max_tokens", str(max_tokens))
    page.fill("#prompt", question)
    page.press("#prompt", "Enter")


def last_reply(page):
    return page.locator(".message.assistant").last


def metrics(server_url: str) -> dict[str, float]:
    with urllib.request.urlopen(server_url + "/metrics", timeout=10) as response:
        text = response.read().decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


# ---------- tests against the real server ----------

def test_reply_streams_in_pieces_with_starchat_defaults(page, server_url):
    requests = []
    page.on("request", lambda request: requests.append(request))
    page.goto(server_url + "/")  # what a browser sees at the root: the playground
    expect(page).to_have_url(server_url + "/playground")
    open_playground(page, server_url)

    # StarChat's defaults and named system prompts.
    assert page.input_value("#temperature") == "0.2"
    assert page.input_value("#top_p") == "0.95"
    assert page.input_value("#top_k") == "50"
    assert page.input_value("#max_tokens") == "512"
    assert page.input_value("#repetition_penalty") == "1.2"
    assert page.input_value("#seed") == ""
    assert page.input_value("#system-prompt") == SYSTEM_PROMPTS["coding"]
    page.select_option("#system-preset", "default")
    assert page.input_value("#system-prompt") == SYSTEM_PROMPTS["default"]
    page.fill("#seed", "3")

    # The tiny model writes its 200 tokens in a few tens of milliseconds, about two of the page's
    # frames: the response is throttled (Chrome's network emulation) so the reply streams over
    # seconds whatever the engine's speed, and the page's rendering is sampled every 10 ms.
    cdp = page.context.new_cdp_session(page)
    cdp.send("Network.enable")
    cdp.send("Network.emulateNetworkConditions",
             {"offline": False, "latency": 0, "downloadThroughput": 20_000, "uploadThroughput": -1})
    page.evaluate("""() => {
        window.__lengths = [];
        window.__states = [];
        setInterval(() => {
            const reply = document.querySelector('.message.assistant');
            if (reply) {
                window.__lengths.push(Number(reply.dataset.contentLength));
                window.__states.push(reply.dataset.state);
            }
        }, 10);
    }""")
    ask(page, "How can I reverse a list in Python?", max_tokens=200)
    reply = last_reply(page)
    expect(page.locator("#stop")).to_be_visible()
    expect(reply).to_have_attribute("data-state", "done", timeout=REPLY_TIMEOUT_MS)

    states = page.evaluate("window.__states")
    assert states and states[0] == "streaming", states  # never "done" before the reply came
    lengths = page.evaluate("window.__lengths")
    growing = sorted(set(length for length in lengths if length > 0))
    assert len(growing) >= 3, f"the reply did not arrive in pieces: {lengths}"
    assert lengths == sorted(lengths), "the reply's text shrank while streaming"
    stats = reply.locator(".reply-stats")
    expect(stats).to_contain_text("first token")
    expect(stats).to_contain_text("tokens/s")
    assert float(stats.get_attribute("data-ttft-ms")) > 0
    assert float(stats.get_attribute("data-tokens-per-second")) > 0
    expect(page.locator("#send")).to_be_visible()
    cdp.send("Network.emulateNetworkConditions", {"offline": False, "latency": 0, "downloadThroughput": -1, "uploadThroughput": -1})

    chat_requests = [r for r in requests if r.url.endswith("/v1/chat/completions")]
    assert len(chat_requests) == 1
    body = json.loads(chat_requests[0].post_data)
    assert body["stream"] is True
    assert body["model"] == MODEL_NAME  # as GET /v1/models named it
    assert (body["temperature"], body["top_p"], body["top_k"], body["repetition_penalty"]) == (0.2, 0.95, 50, 1.2)
    assert (body["max_tokens"], body["seed"]) == (200, 3)
    assert body["messages"] == [{"role": "system", "content": SYSTEM_PROMPTS["default"]},
                                {"role": "user", "content": "How can I reverse a list in Python?"}]
    assert chat_requests[0].headers["authorization"] == f"Bearer {API_KEY}"
    # No internet: every script, style and image came from our server.
    outside = [r.url for r in requests if not r.url.startswith((server_url, "data:", "blob:"))]
    assert not outside, f"the page fetched from elsewhere: {outside}"

    # Export: the conversation as JSON, the reply exactly as streamed.
    with page.expect_download() as download_info:
        page.click("#export")
    exported = json.loads(Path(download_info.value.path()).read_text(encoding="utf-8"))
    assert [m["role"] for m in exported["messages"]] == ["system", "user", "assistant"]
    assert len(exported["messages"][2]["content"]) == int(reply.get_attribute("data-content-length")) > 0
    assert exported["parameters"]["temperature"] == 0.2

    # Clear empties the chat; Regenerate needs a conversation again.
    page.click("#clear")
    expect(page.locator(".message")).to_have_count(0)
    expect(page.locator("#regenerate")).to_be_disabled()


def test_stop_ends_the_stream_and_the_server_cancels_the_generation(page, server_url, monkeypatch):
    # The tiny model writes its 440 tokens in about half a second, which can be over before the
    # click reaches the server: each engine step takes 10 ms more here (a slower model), so the
    # generation is still running when Stop is pressed.
    from starchat.engine.engine import LLMEngine

    step = LLMEngine.step
    monkeypatch.setattr(LLMEngine, "step", lambda self: time.sleep(0.01) or step(self))
    aborted_before = metrics(server_url).get('starchat_generations_finished_total{finish_reason="abort"}', 0.0)
    open_playground(page, server_url)
    ask(page, "Write a very long essay about sorting algorithms.", max_tokens=440)
    reply = last_reply(page)
    page.wait_for_function("() => Number(document.querySelector('.message.assistant')?.dataset.contentLength) > 0")
    page.click("#stop")

    expect(reply).to_have_attribute("data-state", "stopped")
    expect(reply.locator(".reply-stats")).to_contain_text("stopped")
    expect(page.locator("#send")).to_be_visible()
    expect(page.locator("#stop")).to_be_hidden()
    length = reply.get_attribute("data-content-length")
    page.wait_for_timeout(400)
    assert reply.get_attribute("data-content-length") == length, "text kept arriving after Stop"

    # The server saw the disconnect, aborted the generation and runs nothing any more.
    deadline = time.monotonic() + 20
    while True:
        values = metrics(server_url)
        aborted = values.get('starchat_generations_finished_total{finish_reason="abort"}', 0.0)
        idle = values.get("starchat_requests_in_flight") == 0 and values.get("starchat_num_requests_running") == 0
        if aborted > aborted_before and idle:
            break
        assert time.monotonic() < deadline, f"the server did not cancel the generation: {values}"
        time.sleep(0.1)

    # Regenerate replaces the stopped reply with a new one.
    page.fill("#max_tokens", "8")
    page.click("#regenerate")
    expect(page.locator(".message.assistant")).to_have_count(1)
    expect(last_reply(page)).to_have_attribute("data-state", "done", timeout=REPLY_TIMEOUT_MS)


def test_wrong_api_key_shows_the_servers_401_then_the_right_key_works(page, server_url):
    open_playground(page, server_url, api_key="not-the-key")
    # The page checks the key at once (GET /v1/models) and asks again with the server's reason.
    expect(page.locator("#api-key-reason")).to_contain_text("401")
    expect(page.locator("#api-key-reason")).to_contain_text("invalid API key")
    page.click("#api-key-cancel")

    ask(page, "Hello?", max_tokens=8)
    reply = last_reply(page)
    expect(reply).to_have_attribute("data-state", "error")
    expect(reply.locator(".error-card")).to_contain_text("Authentication failed (401)")
    expect(page.locator("#api-key-dialog")).to_be_visible()
    expect(page.locator("#send")).to_be_visible()  # not hanging

    page.fill("#api-key-input", API_KEY)
    page.click("#api-key-save")
    page.click("#regenerate")
    expect(last_reply(page)).to_have_attribute("data-state", "done", timeout=REPLY_TIMEOUT_MS)
    expect(page.locator(".error-card")).to_have_count(0)


def test_prompt_too_long_shows_the_servers_400(page, server_url):
    open_playground(page, server_url)
    ask(page, "def add(a, b):\n    return a + b\n" * 120, max_tokens=8)  # ~1,900 tokens; the context is 512
    reply = last_reply(page)
    expect(reply).to_have_attribute("data-state", "error")
    card = reply.locator(".error-card")
    expect(card).to_contain_text("Prompt too long (400)")
    expect(card).to_contain_text("tokens")
    expect(page.locator("#send")).to_be_visible()


# ---------- rendering: a canned stream (the only faked network) ----------

ANSWER = """Here is an iterative version, which runs in **O(n)** time:

```python
def fibonacci(n: int) -> int:
    \"\"\"Return the nth Fibonacci number.\"\"\"
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a
```

For example, `fibonacci(10)` returns `55`."""

HOSTILE_ANSWER = """Raw HTML stays text: <script>window.__xss = "script"</script>
<img src=x onerror="window.__xss = 'img'"> and a [link](javascript:window.__xss='link').

<div onmouseover="window.__xss='div'">hover</div>"""


def canned_stream(text: str) -> str:
    chunks = [text[i:i + 5] for i in range(0, len(text), 5)]
    events = [{"id": "chatcmpl-canned", "object": "chat.completion.chunk", "model": "canned",
               "choices": [{"index": 0, "delta": {"content": chunk}, "finish_reason": None}]} for chunk in chunks]
    events.append({"id": "chatcmpl-canned", "object": "chat.completion.chunk", "model": "canned",
                   "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    return "".join(f"data: {json.dumps(event)}\n\n" for event in events) + "data: [DONE]\n\n"


def test_markdown_code_highlighting_copy_and_no_html_injection(page, server_url):
    page.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=server_url)
    answers = iter([ANSWER, HOSTILE_ANSWER])
    page.route("**/v1/chat/completions", lambda route: route.fulfill(
        status=200, headers={"Content-Type": "text/event-stream"}, body=canned_stream(next(answers))))
    open_playground(page, server_url)

    ask(page, "How can I write a Python function to generate the nth Fibonacci number?")
    reply = last_reply(page)
    expect(reply).to_have_attribute("data-state", "done")
    code = reply.locator(".code-block code.hljs.language-python")
    expect(code).to_have_count(1)
    expect(reply.locator(".code-language")).to_have_text("python")
    assert code.locator(".hljs-keyword").count() >= 3  # def, for, return, in
    assert code.locator(".hljs-string").count() >= 1
    expect(reply.locator("strong")).to_have_text("O(n)")

    screenshot = REPO / "artifacts" / "playground.png"
    screenshot.parent.mkdir(exist_ok=True)
    page.screenshot(path=str(screenshot))
    docs_screenshot = REPO / "docs" / "playground.png"
    if not docs_screenshot.exists() or os.environ.get("STARCHAT_UPDATE_SCREENSHOTS") == "1":
        shutil.copyfile(screenshot, docs_screenshot)

    reply.locator(".copy-button").click()
    expect(reply.locator(".copy-button")).to_have_text("Copied!")
    assert page.evaluate("navigator.clipboard.readText()") == code.inner_text()

    ask(page, "Show me some HTML.")
    hostile = last_reply(page)
    expect(hostile).to_have_attribute("data-state", "done")
    content = hostile.locator(".content")
    expect(content).to_contain_text('<script>window.__xss = "script"</script>')
    expect(content).to_contain_text("<img src=x onerror=")
    assert content.locator("script, img, [onerror], [onmouseover]").count() == 0
    assert content.locator("a[href^='javascript']").count() == 0
    content.locator("a").hover()
    page.wait_for_timeout(200)
    assert page.evaluate("window.__xss") is None
