"""`llmctl serve` against clients that mean harm or make mistakes: numbers that are valid JSON but
not valid sampling settings, text that is not Unicode, huge conversations, slow or silent
connections, and request `model` names that are also directories where the server runs."""

from __future__ import annotations

import json
import shutil
import socket
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from serve_helpers import BASE_RUN, CHAT_RUN, running_server, served_workspace  # noqa: E402
from tiny_checkpoints import GREETING  # noqa: E402

from llmctl.serve.app import ServeSettings  # noqa: E402
from llmctl.serve.completions import Limits  # noqa: E402
from llmctl.serve.transport import ConnectionLimits  # noqa: E402

HI = [{"role": "user", "content": "hi"}]
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"


@pytest.fixture(scope="module")
def workspace_root() -> Path:
    return served_workspace()


@pytest.fixture(scope="module")
def server(workspace_root: Path) -> str:
    with running_server(ServeSettings(workspace_root, limits=Limits(max_messages=64))) as url:
        yield url


def _raw(url: str, path: str, body: str) -> httpx.Response:
    """A request body sent as written: JSON that Python's json module reads (Infinity, \\ud800)."""
    return httpx.post(f"{url}{path}", content=body, headers={"content-type": "application/json"}, timeout=60)


def _chat(extra: str) -> str:
    return f'{{"model": "{CHAT_RUN}", "messages": [{{"role": "user", "content": "hi"}}], {extra}}}'


def _completion(extra: str) -> str:
    return f'{{"model": "{BASE_RUN}", "max_tokens": 2, {extra}}}'


# every one of these was a 500 (an exception deep in sampling or tokenizing) before
INVALID = [
    ("temperature 1e-300", CHAT, _chat('"temperature": 1e-300'), "temperature"),
    ("repetition_penalty 1e-308", CHAT, _chat('"repetition_penalty": 1e-308'), "repetition_penalty"),
    ("repetition_penalty Infinity", CHAT, _chat('"repetition_penalty": Infinity'), "repetition_penalty"),
    ("temperature NaN", CHAT, _chat('"temperature": NaN'), "temperature"),
    ("seed 2^64", CHAT, _chat(f'"seed": {2**64}'), "seed"),
    ("seed below -2^63", CHAT, _chat(f'"seed": {-(2**63) - 1}'), "seed"),
    ("seed 10^30", COMPLETIONS, _completion(f'"prompt": "x", "seed": {10**30}'), "seed"),
    ("max_tokens true", CHAT, _chat('"max_tokens": true'), "max_tokens"),
    ("n true", CHAT, _chat('"n": true'), "n"),
    ("max_tokens as a string", CHAT, _chat('"max_tokens": "5"'), "max_tokens"),
    ("top_k 1.5", CHAT, _chat('"top_k": 1.5'), "top_k"),
    ("a lone surrogate in a prompt", COMPLETIONS, _completion('"prompt": "x\\ud800y"'), "prompt"),
    ("a lone surrogate in a message", CHAT, _chat('"stop": ["\\udfff"]'), "stop"),
    (
        "a lone surrogate in a chat message",
        CHAT,
        f'{{"model": "{CHAT_RUN}", "messages": [{{"role": "user", "content": "\\ud83d"}}]}}',
        "messages.0.content",
    ),
    ("token ids true", COMPLETIONS, _completion('"prompt": [true, 5]'), "prompt"),
]


@pytest.mark.parametrize(("path", "body", "param"), [c[1:] for c in INVALID], ids=[c[0] for c in INVALID])
def test_numbers_and_text_that_cannot_be_sampled_are_400s(server, path, body, param):
    json.loads(body)  # valid JSON, as Python reads it
    response = _raw(server, path, body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    assert error["param"] is not None and param in error["param"], error
    assert "Traceback" not in response.text and "internal error" not in error["message"]


def test_the_smallest_valid_values_still_work(server):
    body = _chat(f'"temperature": 0.001, "repetition_penalty": 0.01, "seed": {2**64 - 1}, "max_tokens": 3')
    assert _raw(server, CHAT, body).status_code == 200
    body = _completion(f'"prompt": "x \\ud83d\\ude00", "seed": {-(2**63)}')  # a surrogate pair is fine
    assert _raw(server, COMPLETIONS, body).status_code == 200


def test_conversations_over_the_message_cap_are_refused(server):
    turns = [{"role": role, "content": "ok"} for _ in range(40) for role in ("user", "assistant")]
    response = httpx.post(f"{server}{CHAT}", json={"model": CHAT_RUN, "messages": turns + HI}, timeout=60)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "messages" and "64" in response.json()["error"]["message"]
    # under the cap a long history is answered, its oldest turns dropped to fit
    turns = turns[:62]
    response = httpx.post(f"{server}{CHAT}", json={"model": CHAT_RUN, "messages": turns + HI}, timeout=60)
    assert response.status_code == 200, response.text


# ---------------------------------------------------------------- model names are never paths


def test_a_request_never_reaches_a_directory_where_the_server_runs(
    server, workspace_root, tmp_path, monkeypatch
):
    """A directory named like a run, and a checkpoint directory named like nothing served, in the
    server's working directory: the first request gets the run, the second a 404."""
    base_checkpoint = workspace_root / "runs" / BASE_RUN / "checkpoints" / "step-00000010"
    monkeypatch.chdir(tmp_path)
    shutil.copytree(workspace_root / "runs" / CHAT_RUN / "checkpoints" / "step-00000150", tmp_path / BASE_RUN)
    shutil.copytree(base_checkpoint, tmp_path / "loose-checkpoint")
    reply = httpx.get(f"{server}/v1/models/{BASE_RUN}", timeout=30).json()
    assert (reply["run"], reply["step"]) == (BASE_RUN, 20)  # the run's best, not ./tiny-base
    chat = httpx.post(
        f"{server}{CHAT}", json={"model": BASE_RUN, "messages": HI, "max_tokens": 3}, timeout=60
    )
    assert chat.status_code == 200 and chat.json()["choices"][0]["message"]["content"] != GREETING
    for model in ("loose-checkpoint", "./loose-checkpoint", str(tmp_path / "loose-checkpoint")):
        response = httpx.post(f"{server}{CHAT}", json={"model": model, "messages": HI}, timeout=60)
        assert response.status_code == 404, model
        assert response.json()["error"]["code"] == "model_not_found"


# ---------------------------------------------------------------- slow and silent connections


def _closed_within(sock: socket.socket, seconds: float) -> bool:
    """Whether the server closes `sock` (or answers and closes) within `seconds`."""
    sock.settimeout(seconds)
    try:
        while sock.recv(4096):
            pass
    except TimeoutError:
        return False
    except OSError:
        pass
    return True


def _connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def test_slow_headers_silent_connections_and_slow_bodies_are_cut_off(workspace_root):
    limits = ConnectionLimits(header_timeout_s=0.5, body_timeout_s=0.5)
    with running_server(ServeSettings(workspace_root, connections=limits)) as url:
        silent = _connect(url)
        dribbling = _connect(url)
        dribbling.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n")  # and the rest never comes
        assert _closed_within(silent, 15) and _closed_within(dribbling, 15)

        slow_body = _connect(url)
        slow_body.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b'Content-Length: 100\r\n\r\n{"model": '
        )
        slow_body.settimeout(15)
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            chunk = slow_body.recv(4096)
            if not chunk:
                break
            answer += chunk
        slow_body.close()
        assert answer.startswith(b"HTTP/1.1 408")
        assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "body_timeout"

        # a request that comes whole in time is served, and its keep-alive connection reused
        with httpx.Client(timeout=30) as client:
            assert client.get(f"{url}/v1/models").status_code == 200
            assert client.get(f"{url}/v1/models").status_code == 200


def test_connections_past_the_cap_are_refused(workspace_root):
    limits = ConnectionLimits(max_connections=2, header_timeout_s=30)
    with running_server(ServeSettings(workspace_root, connections=limits)) as url:
        held = [_connect(url), _connect(url)]
        time.sleep(0.2)  # let the server accept them
        assert httpx.get(f"{url}/v1/models", timeout=30).status_code == 503
        for sock in held:
            sock.close()
        deadline = time.monotonic() + 15
        while (status := httpx.get(f"{url}/v1/models", timeout=30).status_code) != 200:
            assert time.monotonic() < deadline, status
            time.sleep(0.1)
