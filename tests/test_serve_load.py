"""A bounded load test of `llmctl serve` run as a user runs it (a subprocess on a loopback port):
16 concurrent clients share a fixed number of requests (chat and completions, streamed and not,
over two models). Every response must be complete and exactly the greedy answer, none lost, and
the server's resident memory must stay steady from one round to the next."""

from __future__ import annotations

import json
import os
import queue
import re
import select
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from serve_helpers import BASE_RUN, CHAT_RUN, served_workspace  # noqa: E402
from tiny_checkpoints import GREETING  # noqa: E402

CLIENTS = 16
REQUESTS_PER_ROUND = 64
ROUND_DEADLINE_S = 60
RSS_GROWTH_LIMIT = 32 << 20  # between two identical rounds, after the first has warmed every cache
HI = [{"role": "user", "content": "hi"}]
PROMPT = "import os"


@pytest.fixture(scope="module")
def server_process():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "llmctl",
            "--workspace",
            str(served_workspace()),
            "serve",
            "--port",
            "0",
            "--max-loaded",
            "2",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    url, said = None, ""
    deadline = time.monotonic() + 60
    while url is None and time.monotonic() < deadline and process.poll() is None:
        if select.select([process.stderr], [], [], 0.5)[0]:
            said += process.stderr.readline()
            found = re.search(r"http://127\.0\.0\.1:\d+", said)
            url = found.group(0) if found else None
    assert url is not None, f"the server did not start: {said}"
    yield process, url
    process.terminate()
    process.wait(timeout=30)


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _chat(client: httpx.Client, url: str, stream: bool) -> str:
    body = {"model": CHAT_RUN, "messages": HI, "temperature": 0, "stream": stream}
    return _call(client, f"{url}/v1/chat/completions", body)


def _complete(client: httpx.Client, url: str, stream: bool) -> str:
    body = {"model": BASE_RUN, "prompt": PROMPT, "max_tokens": 8, "temperature": 0, "stream": stream}
    return _call(client, f"{url}/v1/completions", body)


def _call(client: httpx.Client, url: str, body: dict) -> str:
    """The reply's text, after checking the response is whole: status, shape, a stream's [DONE]."""
    if not body["stream"]:
        response = client.post(url, json=body)
        assert response.status_code == 200, response.text
        (choice,) = response.json()["choices"]
        return choice["message"]["content"] if "message" in choice else choice["text"]
    text, done, finished = "", False, 0
    with client.stream("POST", url, json=body) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if not line:
                continue
            assert line.startswith("data: ") and not done
            if line == "data: [DONE]":
                done = True
                continue
            for choice in json.loads(line[6:])["choices"]:
                text += (choice["delta"].get("content") or "") if "delta" in choice else choice["text"]
                finished += choice["finish_reason"] is not None
    assert done and finished == 1
    return text


KINDS = [(_chat, True), (_chat, False), (_complete, True), (_complete, False)]


def _round(url: str, expected: dict[str, str]) -> tuple[float, list[float]]:
    """REQUESTS_PER_ROUND requests shared by CLIENTS threads; returns the wall time and latencies."""
    work: queue.Queue[int] = queue.Queue()
    for number in range(REQUESTS_PER_ROUND):
        work.put(number)
    answered: dict[int, str] = {}
    latencies: list[float] = []
    failures: list[str] = []
    lock = threading.Lock()

    def client_loop() -> None:
        with httpx.Client(timeout=ROUND_DEADLINE_S) as client:
            while True:
                try:
                    number = work.get_nowait()
                except queue.Empty:
                    return
                call, stream = KINDS[number % len(KINDS)]
                started = time.monotonic()
                try:
                    text = call(client, url, stream)
                except Exception as exc:  # recorded, so one failure does not hide the others
                    with lock:
                        failures.append(f"request {number}: {exc!r}")
                    continue
                with lock:
                    answered[number] = text
                    latencies.append(time.monotonic() - started)

    started = time.monotonic()
    threads = [threading.Thread(target=client_loop) for _ in range(CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=ROUND_DEADLINE_S)
    wall = time.monotonic() - started
    assert not any(thread.is_alive() for thread in threads), "a client is still waiting after the deadline"
    assert failures == []
    assert sorted(answered) == list(range(REQUESTS_PER_ROUND))  # none lost
    for number, text in answered.items():
        call, _ = KINDS[number % len(KINDS)]
        assert text == expected[call.__name__], f"request {number} got {text!r}"
    return wall, latencies


def test_sixteen_concurrent_clients(server_process):
    process, url = server_process
    with httpx.Client(timeout=60) as client:
        expected = {"_chat": _chat(client, url, False), "_complete": _complete(client, url, False)}
    assert expected["_chat"] == GREETING
    warm_rss = _rss_bytes(process.pid)
    first_wall, first = _round(url, expected)
    first_rss = _rss_bytes(process.pid)
    second_wall, second = _round(url, expected)
    second_rss = _rss_bytes(process.pid)
    latencies = sorted(first + second)
    p50, p95 = latencies[len(latencies) // 2], latencies[int(len(latencies) * 0.95)]
    mib = [rss / 2**20 for rss in (warm_rss, first_rss, second_rss)]
    print(
        f"\n{CLIENTS} clients x {REQUESTS_PER_ROUND} requests, two rounds: {first_wall:.1f} s and "
        f"{second_wall:.1f} s; latency p50 {p50:.2f} s, p95 {p95:.2f} s; "
        f"RSS {mib[0]:.0f} -> {mib[1]:.0f} -> {mib[2]:.0f} MiB"
    )
    assert process.poll() is None
    assert second_rss - first_rss < RSS_GROWTH_LIMIT
