"""The chat page of `tunesmith deploy`, in a real (headless) Chromium through Playwright, against a real server
with the bundled SmolLM2 and a LoRA adapter."""

from __future__ import annotations

import re
import shutil
import time

import httpx
import pytest

from test_serve import ADAPTER, BASE, make_adapter, one_torch_thread, running, wait_ready
from tunesmith.args import DeployArgs
from tunesmith.serve.app import create_app
from tunesmith.session import load_for_generation

sync_api = pytest.importorskip("playwright.sync_api")
pytestmark = pytest.mark.slow  # a real server and headless Chromium
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SCREENSHOT = "/tmp/tunesmith_web.png"


@pytest.fixture(scope="module")
def url(smollm, tmp_path_factory):
    with one_torch_thread():
        ckpt = tmp_path_factory.mktemp("web") / "checkpoint-1"
        make_adapter(smollm, ckpt)
        args = DeployArgs(model=BASE, adapters=[f"{ADAPTER}={ckpt}"])
        with running(create_app(lambda: load_for_generation(args), args)) as base_url:
            wait_ready(base_url)
            yield base_url


@pytest.fixture(scope="module")
def browser():
    import os

    if not os.path.exists(CHROMIUM):
        pytest.skip("no chromium binary (apt-get install -y chromium)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        yield b
        b.close()


def send(page, text: str) -> None:
    page.fill("#input", text)
    page.press("#input", "Enter")


def wait_answer(page, count: int):
    """The count-th assistant bubble, once its answer has finished streaming."""
    bubble = page.locator(".msg.assistant").nth(count - 1)
    sync_api.expect(bubble).not_to_have_class(re.compile(r"\bstreaming\b"), timeout=60_000)
    sync_api.expect(page.locator("#send")).to_be_visible(timeout=60_000)
    return bubble


def test_chat_page(browser, url):
    expect = sync_api.expect
    page = browser.new_page(viewport={"width": 1100, "height": 820})
    dialogs, bodies = [], []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    page.on("request", lambda r: bodies.append(r.post_data_json) if r.url.endswith("/v1/chat/completions") else None)
    page.goto(url)

    # the model list comes from /v1/models; the adapter is picked first, as `tunesmith infer` would
    options = page.locator("#model option")
    expect(options).to_have_count(2, timeout=30_000)
    assert options.all_text_contents() == [f"{BASE}  ·  base model", f"{ADAPTER}  ·  adapter on {BASE}"]
    assert page.input_value("#model") == ADAPTER
    expect(page.locator("#health")).to_have_text("ready")

    page.click("#settings summary")
    page.fill("#max-tokens", "8")

    # a streamed answer appears, and it is what the API answers to the same request
    send(page, "Who are you?")
    first = wait_answer(page, 1)
    answer1 = first.locator(".body").text_content()
    assert answer1.strip()
    assert bodies[0]["stream"] is True and bodies[0]["model"] == ADAPTER
    api = httpx.post(f"{url}/v1/chat/completions", json={**bodies[0], "stream": False}, timeout=60).json()
    assert api["choices"][0]["message"]["content"] == answer1
    expect(first.locator(".who")).to_contain_text("8 tokens")

    # a second message carries the first exchange: the history holds 2 turns
    page.select_option("#model", BASE)
    send(page, "And what can you do?")
    wait_answer(page, 2)
    assert bodies[1]["model"] == BASE
    assert bodies[1]["messages"] == [{"role": "user", "content": "Who are you?"},
                                     {"role": "assistant", "content": answer1},
                                     {"role": "user", "content": "And what can you do?"}]
    expect(page.locator(".msg.user")).to_have_count(2)
    expect(page.locator(".msg.assistant")).to_have_count(2)

    # markup typed by the user (or produced by the model) is shown as text, never parsed
    attack = "<img src=x onerror=alert(1)>"
    send(page, attack)
    wait_answer(page, 3)
    expect(page.locator(".msg.user .body").nth(2)).to_have_text(attack)
    assert page.locator("#log img").count() == 0 and dialogs == []

    # the stop button ends a long answer at once and the server drops the work
    page.fill("#max-tokens", "400")
    send(page, "Write a long story about a dragon who learns to sing.")
    long = page.locator(".msg.assistant").nth(3)
    expect(long.locator(".body")).not_to_be_empty(timeout=60_000)
    expect(page.locator("#stop")).to_be_visible()
    page.click("#stop")
    expect(page.locator("#send")).to_be_visible(timeout=5_000)
    expect(long.locator(".who")).to_contain_text("stopped")
    deadline = time.monotonic() + 10
    while httpx.get(f"{url}/health").json()["in_flight"]:
        assert time.monotonic() < deadline, "the server kept generating after Stop"
        time.sleep(0.1)

    # errors from the API are shown to the user
    page.fill("#max-tokens", "0")
    send(page, "hello")
    failed = page.locator(".msg.failed")
    expect(failed).to_have_count(1, timeout=30_000)
    expect(failed.locator(".body")).to_contain_text("max_tokens")
    page.screenshot(path=SCREENSHOT, full_page=True)

    page.click("#clear")
    expect(page.locator(".msg")).to_have_count(0)
    expect(page.locator("#empty")).to_be_visible()
    page.close()
