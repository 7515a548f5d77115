"""`llmctl serve`'s HTTP API: through OpenAI's own Python client and through raw HTTP (httpx).

One server on a loopback port serves the session's tiny workspace (see serve_helpers); tests that
need other settings (an API key, a small body limit) start their own.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from serve_helpers import (  # noqa: E402
    BASE_RUN,
    CHAT_RUN,
    ENDLESS_RUN,
    endless_workspace,
    running_server,
    served_workspace,
)
from tiny_checkpoints import ADD_REPLY, GREETING  # noqa: E402

from llmctl.serve.app import ServeSettings  # noqa: E402
from llmctl.serve.completions import Limits  # noqa: E402
from llmctl.serve.models import ModelPool  # noqa: E402

HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def workspace_root() -> Path:
    return served_workspace()


@pytest.fixture(scope="module")
def server(workspace_root: Path) -> str:
    with running_server(ServeSettings(workspace_root, limits=Limits(max_tokens=256))) as url:
        yield url


@pytest.fixture(scope="module")
def client(server: str):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="not-checked", max_retries=0, timeout=60)


def _post(url: str, body: object, **kwargs) -> httpx.Response:
    return httpx.post(url, json=body, timeout=60, **kwargs)


# ---------------------------------------------------------------- the OpenAI client


def test_models_lists_every_run_and_each_checkpoint(client):
    ids = {model.id for model in client.models.list()}
    assert ids == {
        BASE_RUN,
        f"{BASE_RUN}:step-10",
        f"{BASE_RUN}:step-15",
        f"{BASE_RUN}:step-20",
        CHAT_RUN,
        f"{CHAT_RUN}:step-150",
    }
    model = client.models.retrieve(BASE_RUN)
    assert (model.id, model.owned_by, model.step) == (BASE_RUN, "llmctl", 20)


def test_chat_completion_answers_with_usage(client):
    reply = client.chat.completions.create(model=CHAT_RUN, messages=HI, temperature=0)
    (choice,) = reply.choices
    assert choice.message.role == "assistant"
    assert choice.message.content == GREETING
    assert choice.finish_reason == "stop"
    usage = reply.usage
    assert usage.prompt_tokens > 0 and usage.completion_tokens >= len(GREETING)
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert reply.model == CHAT_RUN and reply.id.startswith("chatcmpl-")


def test_chat_completion_streams_through_the_client(client):
    stream = client.chat.completions.create(
        model=f"{CHAT_RUN}:step-150",
        messages=HI,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    choices = [chunk.choices[0] for chunk in chunks if chunk.choices]
    assert "".join(choice.delta.content or "" for choice in choices) == GREETING
    assert [choice.finish_reason for choice in choices if choice.finish_reason] == ["stop"]
    assert len([choice for choice in choices if choice.delta.content]) > 3  # streamed, not sent whole
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0


def test_code_reply_and_stop_strings(client):
    request = [{"role": "user", "content": "write a function that adds two numbers"}]
    reply = client.chat.completions.create(model=CHAT_RUN, messages=request, temperature=0)
    assert reply.choices[0].message.content == ADD_REPLY
    cut = client.chat.completions.create(model=CHAT_RUN, messages=request, temperature=0, stop=["```"])
    assert cut.choices[0].message.content == "Here you go:\n"
    assert cut.choices[0].finish_reason == "stop"


def test_completions_batch_prompts_and_samples(client):
    prompts = ["import os", "def main():"]
    settings = {"n": 2, "max_tokens": 6, "temperature": 1.0, "seed": 3}
    reply = client.completions.create(model=BASE_RUN, prompt=prompts, **settings)
    assert sorted(choice.index for choice in reply.choices) == [0, 1, 2, 3]
    assert all(choice.finish_reason in ("length", "stop") for choice in reply.choices)
    assert reply.usage.completion_tokens <= 4 * 6
    again = client.completions.create(model=BASE_RUN, prompt=prompts, **settings)
    assert [c.text for c in again.choices] == [c.text for c in reply.choices]  # a seed repeats the samples


def test_completions_stream_with_echo(client):
    settings = {"model": BASE_RUN, "prompt": "import os", "max_tokens": 5, "temperature": 0, "echo": True}
    text = "".join(chunk.choices[0].text for chunk in client.completions.create(**settings, stream=True))
    whole = client.completions.create(**settings)
    assert text.startswith("import os")
    assert text == whole.choices[0].text


def test_sampling_extensions_reach_the_engine(server, workspace_root):
    """top_k 1 samples the likeliest token whatever the temperature: greedy; a repetition penalty
    changes the text exactly as the engine's own does; the other extensions are accepted."""

    def text(**settings) -> str:
        body = {"model": BASE_RUN, "prompt": "x = ", "max_tokens": 24, **settings}
        response = _post(f"{server}/v1/completions", body)
        assert response.status_code == 200, response.text
        assert response.json()["object"] == "text_completion"
        return response.json()["choices"][0]["text"]

    greedy = text(temperature=0)
    assert text(temperature=1.5, seed=3) != greedy  # sampling hot differs ...
    assert text(temperature=1.5, seed=3, top_k=1) == greedy  # ... unless only one token may be drawn

    from llmctl.generate.loading import load_engine, override_generation
    from llmctl.workspace import Workspace

    loaded = load_engine(Workspace(workspace_root), BASE_RUN, device="cpu")
    penalised = override_generation(
        loaded.config.generation, {"temperature": 0, "repetition_penalty": 1.5, "max_new_tokens": 24}
    )
    (expected,) = loaded.engine.generate(["x = "], penalised)
    assert text(temperature=0, repetition_penalty=1.5) == expected.text != greedy
    text(top_k=5, min_p=0.05, presence_penalty=0.5, frequency_penalty=0.5, seed=1)


def test_client_errors_are_typed(client):
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="no-such-run", messages=HI)
    assert missing.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=CHAT_RUN, messages=HI, temperature=5)
    assert bad.value.param == "temperature"


# ---------------------------------------------------------------- raw HTTP: errors


CHAT = "/v1/chat/completions"
ERRORS = [
    ("unknown model", CHAT, {"model": "nope", "messages": HI}, 404, "model_not_found"),
    ("a path is not a model", CHAT, {"model": "../../etc", "messages": HI}, 404, "model_not_found"),
    ("unknown step", CHAT, {"model": f"{BASE_RUN}:step-7", "messages": HI}, 404, "model_not_found"),
    ("unknown field", CHAT, {"model": CHAT_RUN, "messages": HI, "temprature": 1}, 400, None),
    ("no messages", CHAT, {"model": CHAT_RUN, "messages": []}, 400, None),
    ("missing model", CHAT, {"messages": HI}, 400, None),
    ("bad role", CHAT, {"model": CHAT_RUN, "messages": [{"role": "robot", "content": "x"}]}, 400, None),
    (
        "assistant last",
        CHAT,
        {"model": CHAT_RUN, "messages": [{"role": "assistant", "content": "x"}]},
        400,
        None,
    ),
    ("too many stops", CHAT, {"model": CHAT_RUN, "messages": HI, "stop": list("abcde")}, 400, None),
    ("top_p zero", CHAT, {"model": CHAT_RUN, "messages": HI, "top_p": 0}, 400, None),
    ("max_tokens over the limit", CHAT, {"model": CHAT_RUN, "messages": HI, "max_tokens": 100000}, 400, None),
    ("n over the limit", CHAT, {"model": CHAT_RUN, "messages": HI, "n": 64}, 400, None),
    (
        "prompt too long",
        "/v1/completions",
        {"model": BASE_RUN, "prompt": "x " * 500},
        400,
        "context_length_exceeded",
    ),
    ("token id outside the vocabulary", "/v1/completions", {"model": BASE_RUN, "prompt": [10**6]}, 400, None),
    ("empty prompt list", "/v1/completions", {"model": BASE_RUN, "prompt": []}, 400, None),
    ("unsupported feature", "/v1/completions", {"model": BASE_RUN, "prompt": "x", "logprobs": 2}, 400, None),
]


@pytest.mark.parametrize(
    ("path", "body", "status", "code"), [case[1:] for case in ERRORS], ids=[case[0] for case in ERRORS]
)
def test_bad_requests_get_openai_errors(server, path, body, status, code):
    response = _post(f"{server}{path}", body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"] == "invalid_request_error"
    assert error["code"] == code
    assert "Traceback" not in response.text


@pytest.mark.parametrize(
    ("content", "headers", "words"),
    [
        (b"{not json", {"content-type": "application/json"}, "not valid JSON"),
        (b"[1, 2]", {"content-type": "application/json"}, "JSON object"),
        (
            json.dumps({"model": CHAT_RUN, "messages": HI}).encode(),
            {"content-type": "text/plain"},
            "Content-Type",
        ),
    ],
)
def test_malformed_bodies(server, content, headers, words):
    response = httpx.post(f"{server}{CHAT}", content=content, headers=headers, timeout=30)
    assert response.status_code == 400
    assert words in response.json()["error"]["message"]


def test_unknown_endpoints_and_methods(server):
    assert httpx.get(f"{server}/v1/nothing").json()["error"]["message"] == "no endpoint /v1/nothing"
    response = httpx.delete(f"{server}/v1/models")
    assert response.status_code == 405 and "DELETE" in response.json()["error"]["message"]


# ---------------------------------------------------------------- the page's JSON


def test_runs_documents(server):
    overview = httpx.get(f"{server}/api/runs").json()
    assert {run["name"] for run in overview["runs"]} == {BASE_RUN, CHAT_RUN}
    curves = httpx.get(f"{server}/api/runs/{BASE_RUN}/curves").json()
    assert curves["state"] == "finished"
    assert len(curves["train_loss"]) == 20 and len(curves["val_loss"]) >= 4 and curves["lr"]
    detail = httpx.get(f"{server}/api/runs/{CHAT_RUN}").json()
    base = detail["lineage"]["base_checkpoint"]
    assert (base["run"], base["step"]) == (BASE_RUN, 20)
    base_detail = httpx.get(f"{server}/api/runs/{BASE_RUN}").json()
    assert [(e["checkpoint_step"], e["kind"]) for e in base_detail["evals"]] == [(20, "perplexity")]
    assert base_detail["derived"] == [{"run": CHAT_RUN, "stage": "finetune", "step": 20}]
    assert httpx.get(f"{server}/api/runs/nope").status_code == 404


def test_model_details(server):
    chat = httpx.get(f"{server}/api/models/{CHAT_RUN}").json()
    base = httpx.get(f"{server}/api/models/{BASE_RUN}:step-10").json()
    assert chat["chat"] is True and chat["generation"]["temperature"] == 0.0
    assert base["step"] == 10 and base["context_length"] == 64


def test_page_is_served_with_its_files(server):
    page = httpx.get(f"{server}/")
    assert page.status_code == 200 and "<title>llmctl</title>" in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for name in ("app.js", "app.css"):
        assert httpx.get(f"{server}/static/{name}").status_code == 200


# ---------------------------------------------------------------- limits, key, locks


def test_api_key_guards_the_api_but_not_the_page(workspace_root):
    with running_server(ServeSettings(workspace_root, api_key="s3cret")) as url:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret"}):
            response = httpx.get(f"{url}/v1/models", headers=headers)
            assert response.status_code == 401
            assert response.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(f"{url}/api/runs").status_code == 401
        assert httpx.get(f"{url}/").status_code == 200
        keyed = openai.OpenAI(base_url=f"{url}/v1", api_key="s3cret", max_retries=0)
        reply = keyed.chat.completions.create(model=CHAT_RUN, messages=HI)
        assert reply.choices[0].message.content == GREETING
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()


def test_body_limit(workspace_root):
    with running_server(ServeSettings(workspace_root, limits=Limits(max_body_bytes=2048))) as url:
        big = {"model": CHAT_RUN, "messages": [{"role": "user", "content": "x" * 4096}]}
        response = _post(f"{url}{CHAT}", big)
        assert response.status_code == 413
        assert "2048 bytes" in response.json()["error"]["message"]

        def chunked():  # no Content-Length: the limit is counted as the body arrives
            for _ in range(8):
                yield b" " * 1024

        response = httpx.post(f"{url}{CHAT}", content=chunked(), headers={"content-type": "application/json"})
        assert response.status_code == 413
        assert _post(f"{url}{CHAT}", {"model": CHAT_RUN, "messages": HI}).status_code == 200


def test_a_client_leaving_a_stream_frees_the_model(tmp_path):
    """A model that never stops, one slot: the stream's 1000 tokens would hold the slot for about
    ten times as long as 100 tokens take, so a request answered sooner than half that proves the
    abandoned generation ended when its client left."""
    root = endless_workspace(tmp_path / "workspace")
    with running_server(ServeSettings(root, max_batch=1, dtype="fp32")) as url:

        def batch() -> dict:
            return httpx.get(f"{url}/api/models/{ENDLESS_RUN}", timeout=30).json()["batch"]

        def complete(tokens: int) -> httpx.Response:
            body = {"model": ENDLESS_RUN, "prompt": "def", "max_tokens": tokens}
            return _post(f"{url}/v1/completions", body)

        assert complete(2).status_code == 200  # loaded and warm
        started = time.monotonic()
        hundred = complete(100)
        per_hundred = time.monotonic() - started
        assert hundred.json()["usage"]["completion_tokens"] == 100  # it does not stop on its own

        before = batch()["steps"]
        body = {"model": ENDLESS_RUN, "prompt": "def", "max_tokens": 1000, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            lines = response.iter_lines()
            next(lines)
        started = time.monotonic()
        follow_up = complete(2)
        waited = time.monotonic() - started
        assert follow_up.status_code == 200
        assert waited < 5 * per_hundred, f"waited {waited:.2f}s; 100 tokens take {per_hundred:.2f}s"
        after = batch()
        assert after["active"] == 0 and after["steps"] - before < 500


def test_pool_loads_each_model_once_shares_it_and_evicts_the_least_recently_used(tmp_path):
    """ModelPool with a stand-in loader: requests for one model hold it together (their rows share
    its batch), it loads once however many ask at once, and at most max_loaded stay loaded (never
    one in use); an evicted model is unloaded."""
    loads: list[str] = []
    unloaded: list[str] = []

    def load(path: Path) -> str:
        time.sleep(0.05)  # a load in progress while the other requests for it arrive
        loads.append(path.name)
        return path.name

    pool = ModelPool(tmp_path, load=load, max_loaded=2, unload=unloaded.append)
    a, b, c = (tmp_path / name for name in "abc")
    timeline: list[str] = []

    async def request(path: Path, label: str, together: asyncio.Barrier | None = None) -> None:
        lease = await pool.acquire(path)
        try:
            timeline.append(f"start {label}")
            if together is not None:  # hangs (and times out) unless the others hold the model too
                await asyncio.wait_for(together.wait(), timeout=10)
            timeline.append(f"end {label}")
        finally:
            lease.release()

    async def scenario() -> None:
        together = asyncio.Barrier(3)
        await asyncio.gather(*(request(a, f"a{i}", together) for i in range(3)), request(b, "b1"))
        assert loads.count("a") == 1  # three requests at once, one load
        held = await pool.acquire(a)
        await request(c, "c1")  # a third model: b goes, a is in use and stays
        assert sorted(p.name for p in pool.loaded_paths()) == ["a", "c"] and unloaded == ["b"]
        held.release()
        held.release()  # a second release does nothing
        await request(b, "b2")
        assert sorted(p.name for p in pool.loaded_paths()) == ["b", "c"] and unloaded == ["b", "a"]

    asyncio.run(scenario())
    assert sorted(loads[:2]) == ["a", "b"] and loads[2:] == ["c", "b"]  # each model loaded once until evicted


def test_serve_command_fails_early_on_a_bad_model_or_a_busy_port(cli):
    result = cli("serve", "--model", "no-such-run", "--port", "0")
    assert result.exit_code == 2  # a usage error, as for every other command given an unknown model
    assert "no-such-run" in result.stderr and "Traceback" not in result.stderr
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        result = cli("serve", "--port", busy.getsockname()[1])
    assert result.exit_code == 1
    assert "cannot listen on 127.0.0.1" in result.stderr and "--port" in result.stderr
