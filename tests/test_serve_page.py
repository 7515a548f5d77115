"""The page `llmctl serve` serves at `/`, driven in a real headless Chromium (Debian's `chromium`)
through Playwright: chat with a streamed reply, compare two models, a run's chart and lineage, the
API-key prompt. Each test saves a screenshot under its tmp_path and fails on any JavaScript error
or Content-Security-Policy violation the page logs."""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
sync_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None:
    pytest.skip("no chromium on PATH (Debian: apt-get install chromium)", allow_module_level=True)

from serve_helpers import BASE_RUN, CHAT_RUN, running_server, served_workspace  # noqa: E402
from tiny_checkpoints import GREETING  # noqa: E402

from llmctl.events import EventWriter  # noqa: E402
from llmctl.serve.app import ServeSettings  # noqa: E402

expect = sync_api.expect
# without these Chromium reaches out to Google's services, which a closed network refuses slowly
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ADD_REQUEST = "write a function that adds two numbers"


@pytest.fixture(scope="module")
def workspace_root() -> Path:
    return served_workspace()


@pytest.fixture(scope="module")
def server(workspace_root: Path) -> str:
    with running_server(ServeSettings(workspace_root)) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1360, "height": 900})
    page = context.new_page()
    page.set_default_timeout(30_000)
    problems: list[str] = []
    page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
    page.on("console", lambda message: message.type == "error" and problems.append(message.text))
    yield page
    context.close()
    assert problems == []


def screenshot(page, path: Path) -> None:
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 10_000  # a rendered page, not a blank one


def test_chat_streams_a_reply_and_highlights_code(server, page, tmp_path):
    page.goto(server)
    page.select_option("#chat-model", CHAT_RUN)
    expect(page.locator("#chat-model-info .badge")).to_have_text("chat model")
    expect(page.locator("#chat-model-info")).to_contain_text("weightsint8")  # auto on a CPU
    expect(page.locator("#chat-temperature-value")).to_have_text("0.00")  # the checkpoint's default

    page.fill("#chat-input", "hi")
    with page.expect_response("**/v1/chat/completions") as answer:
        page.press("#chat-input", "Enter")
    assert answer.value.request.post_data_json["stream"] is True
    assert answer.value.headers["content-type"].startswith("text/event-stream")
    reply = page.locator(".message.assistant .content").last
    expect(reply).to_have_text(GREETING)
    expect(page.locator(".message.assistant .meta").last).to_contain_text("tok/s")

    page.click("#chat-clear")
    page.fill("#chat-input", ADD_REQUEST)
    page.click("#chat-send")
    code = page.locator(".message.assistant .codeblock code")
    expect(code).to_have_text("def add(a, b):\n    return a + b")
    expect(code.locator(".tok-kw").first).to_have_text("def")
    expect(code.locator(".tok-fn")).to_have_text("add")
    expect(page.locator(".codeblock-head span")).to_have_text("python")
    screenshot(page, tmp_path / "chat.png")


def test_compare_streams_each_model_into_its_column(server, page, tmp_path):
    page.goto(f"{server}/#compare")
    chips = page.locator("#compare-models .chip.on")
    expect(chips).to_have_text([BASE_RUN, CHAT_RUN])  # each run's best checkpoint, preselected
    page.fill("#compare-prompt", "hi")
    page.click("#compare-run")
    for model in (BASE_RUN, CHAT_RUN):
        expect(page.locator(f".column[data-model='{model}'] .column-foot")).to_contain_text("tok/s")
    expect(page.locator(f".column[data-model='{CHAT_RUN}'] .column-body")).to_have_text(GREETING)
    screenshot(page, tmp_path / "compare.png")


def test_runs_view_draws_the_curves_checkpoints_and_lineage(server, page, tmp_path):
    page.goto(f"{server}/#runs")
    page.click(f".run-item[data-run='{BASE_RUN}']")
    train = page.locator("#loss-chart path.series.train")
    expect(train).to_have_attribute("data-points", "20")
    expect(page.locator("#loss-chart path.series.val")).to_have_attribute("data-points", "4")
    assert page.locator("#loss-chart circle.dot").count() == 4
    assert len(train.get_attribute("d").split("L")) == 20  # one segment per point
    expect(page.locator("#lr-chart path.series.lr")).to_have_attribute("data-points", "20")
    expect(page.locator("table.data tbody tr.best td").first).to_have_text("20")
    expect(page.locator(".lineage .node b")).to_have_text(["code", "tok", BASE_RUN, "3 saved", CHAT_RUN])
    expect(page.locator(".card", has_text="Evaluations")).to_contain_text("perplexity")
    page.set_viewport_size({"width": 1360, "height": 1500})  # the run's panels scroll inside the page
    expect(train).to_have_attribute("data-points", "20")  # redrawn at the new width
    screenshot(page, tmp_path / "runs.png")

    page.click(".lineage .node-link")  # the finetune made from this run
    expect(page.locator(".lineage .node b")).to_have_text(
        ["code", "tok", BASE_RUN, f"{BASE_RUN}:step-20", CHAT_RUN, "1 saved"]
    )
    page.locator("table.data button", has_text="chat").click()  # straight to a chat with that checkpoint
    expect(page.locator("#view-chat")).to_be_visible()
    expect(page.locator("#chat-model")).to_have_value(f"{CHAT_RUN}:step-150")


def test_a_late_answer_for_a_run_left_behind_does_not_replace_the_open_run(server, page):
    held = []  # the answers for the run the page opens first, kept back until another run is open
    page.route(f"**/api/runs/{CHAT_RUN}**", lambda route: held.append(route))
    page.goto(f"{server}/#runs/{CHAT_RUN}")
    for _ in range(200):
        if len(held) == 2:  # its detail and its curves
            break
        page.wait_for_timeout(50)
    assert len(held) == 2
    page.click(f".run-item[data-run='{BASE_RUN}']")
    expect(page.locator("#run-detail h2")).to_have_text(BASE_RUN)

    for route in held:
        route.continue_()
    page.wait_for_function(
        "url => performance.getEntriesByType('resource')"
        ".filter((entry) => entry.name.includes(url)).length >= 2",
        arg=f"/api/runs/{CHAT_RUN}",
    )
    page.wait_for_timeout(200)  # the page reads both late answers
    page.set_viewport_size({"width": 1200, "height": 900})  # a resize redraws the open run from what it holds
    expect(page.locator("#run-detail h2")).to_have_text(BASE_RUN)
    expect(page.locator(".lineage .node-link")).to_have_count(1)


def test_page_asks_for_the_api_key(workspace_root, browser, tmp_path):
    with running_server(ServeSettings(workspace_root, api_key="s3cret")) as url:
        context = browser.new_context()
        page = context.new_page()
        page.goto(url)
        expect(page.locator("#key-dialog")).to_be_visible()
        page.fill("#key-input", "s3cret")
        page.click("#key-save")
        expect(page.locator(f"#chat-model option[value='{CHAT_RUN}']")).to_have_count(1)
        screenshot(page, tmp_path / "keyed.png")
        context.close()


def test_a_training_run_updates_live(browser, tmp_path):
    """A run whose trainer (this test, by its pid) is still writing: the page polls and the curve grows."""
    events = EventWriter(tmp_path / "workspace" / "runs" / "live-run" / "events.jsonl")
    events.write(
        "start",
        0,
        run="live-run",
        stage="pretrain",
        pid=os.getpid(),
        host=socket.gethostname(),
        max_steps=100,
    )
    for step in range(1, 6):
        events.write("train", step, loss=5.0 - step * 0.1, lr=1e-3)
    with running_server(ServeSettings(tmp_path / "workspace")) as url:
        context = browser.new_context(viewport={"width": 1360, "height": 900})
        page = context.new_page()
        page.goto(f"{url}/#runs/live-run")
        expect(page.locator("#run-detail .run-head .state")).to_have_text("running")
        train = page.locator("#loss-chart path.series.train")
        expect(train).to_have_attribute("data-points", "5")
        for step in range(6, 11):
            events.write("train", step, loss=5.0 - step * 0.1, lr=1e-3)
        events.write("eval", 10, val_loss=4.2, val_ppl=66.7)
        expect(train).to_have_attribute("data-points", "10", timeout=15_000)
        expect(page.locator("#loss-chart path.series.val")).to_have_attribute("data-points", "1")
        expect(page.locator(".tile .value").first).to_have_text("4.2")
        screenshot(page, tmp_path / "live.png")
        context.close()
    events.close()
