"""Continuous batching in `llmctl serve`: requests for one model decode in the same forwards, join
and leave between steps, and get exactly what they would get alone.

The model is random (speed and exactness do not depend on training) and never stops on its own:
its end-of-text logit is 0 while the likeliest of 261 random logits is positive, so every request
runs to its max_tokens unless it is cancelled. Decoding steps are counted by the batcher, so a
test can tell a request that left early from one that ran out, without timing anything.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import torch
from tiny_checkpoints import byte_tokenizer_file, write_run_checkpoint

from llmctl.config import GenerationConfig, ModelConfig
from llmctl.generate import Engine
from llmctl.generate.batch import DecodeBatch
from llmctl.serve.batching import Batcher, QueueFull
from llmctl.tokenizer import load_tokenizer_file

pytestmark = pytest.mark.usefixtures("single_thread")

LONG = ModelConfig(n_layer=2, n_head=4, d_model=64, context_length=1024, vocab_size=262, init_std=0.5)
# served over HTTP: big enough that 1000 tokens take seconds, so a request is still decoding when
# the test acts on it
SLOW = LONG.model_copy(update={"n_layer": 4, "d_model": 256})
GREEDY = GenerationConfig(temperature=0, max_new_tokens=24)
PROMPTS = ["def add(a, b):", "x", "The quick brown fox jumps over the lazy dog", "import os\nimport sys\n"]


def silence_end_of_text(model, eot_id: int) -> None:
    model.lm_head.weight[eot_id] = 0


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> Engine:
    tokenizer = load_tokenizer_file(byte_tokenizer_file(tmp_path_factory.mktemp("bytes")).parent)
    torch.manual_seed(0)
    from llmctl.model.transformer import Transformer

    model = Transformer(LONG.model_copy(update={"tie_embeddings": False}))
    with torch.no_grad():
        silence_end_of_text(model, tokenizer.eot_id)
    return Engine(model, tokenizer, dtype="fp32")


def run(coroutine):
    return asyncio.run(coroutine)


async def steps_reach(batcher: Batcher, steps: int) -> None:
    while batcher.steps < steps:
        await asyncio.sleep(0.001)


def submit(batcher: Batcher, prompts, config: GenerationConfig, num_samples: int = 1):
    return batcher.submit(prompts, config, num_samples, None, asyncio.get_running_loop())


# ---------------------------------------------------------------- the same answers batched or alone


def test_greedy_rows_joining_at_different_steps_get_what_they_get_alone(engine):
    """Prompts of different lengths, joining while others decode, some leaving early: each one's
    tokens and text equal its own generation alone."""
    alone = {prompt: engine.generate([prompt], GREEDY)[0] for prompt in PROMPTS}
    short = GREEDY.model_copy(update={"max_new_tokens": 5})
    alone_short = engine.generate([PROMPTS[1]], short)[0]

    async def scenario():
        batcher = Batcher(engine, max_batch=8, max_queue=8)
        try:
            tickets = [submit(batcher, [PROMPTS[0]], GREEDY)]
            await steps_reach(batcher, 3)
            tickets.append(submit(batcher, [PROMPTS[2]], GREEDY))
            tickets.append(submit(batcher, [PROMPTS[1]], short))  # leaves while the others decode
            await steps_reach(batcher, 7)
            tickets.append(submit(batcher, [PROMPTS[3], PROMPTS[1]], GREEDY))
            results = [await ticket.completions() for ticket in tickets]
            return results, batcher.steps
        finally:
            batcher.close()

    results, steps = run(scenario())
    got = [results[0][0], results[1][0], results[3][0], results[3][1]]
    for completion, prompt in zip(got, [PROMPTS[0], PROMPTS[2], PROMPTS[3], PROMPTS[1]], strict=True):
        assert completion.token_ids == alone[prompt].token_ids, prompt
        assert completion.text == alone[prompt].text
    assert results[2][0].token_ids == alone_short.token_ids
    assert steps < 7 + 2 * GREEDY.max_new_tokens  # they overlapped: one after another would take 5 x 24


def test_seeded_samples_are_the_same_batched_or_alone(engine):
    config = GenerationConfig(temperature=1.0, top_p=0.9, max_new_tokens=16, seed=7)
    alone = engine.generate([PROMPTS[0]], config, num_samples=3)
    other = GenerationConfig(temperature=0.7, top_k=5, max_new_tokens=20, seed=99)
    alone_other = engine.generate([PROMPTS[2]], other)

    async def scenario():
        batcher = Batcher(engine, max_batch=8)
        try:
            first = submit(batcher, [PROMPTS[2]], other)
            await steps_reach(batcher, 2)
            second = submit(batcher, [PROMPTS[0]], config, num_samples=3)
            noise = submit(batcher, [PROMPTS[3]], GenerationConfig(temperature=1.5, max_new_tokens=12))
            return await first.completions(), await second.completions(), await noise.completions()
        finally:
            batcher.close()

    got_other, got, _ = run(scenario())
    assert [c.token_ids for c in got] == [c.token_ids for c in alone]
    assert len({tuple(c.token_ids) for c in got}) == 3  # three different samples
    assert got_other[0].token_ids == alone_other[0].token_ids


def test_the_cache_path_with_rows_at_different_positions_matches_recomputing(engine):
    """DecodeBatch with rows at different positions against the no-cache reference."""
    rows_cached = engine.rows(engine.prepare(PROMPTS, 12), GREEDY, 1, engine.stop_token_ids)
    rows_full = engine.rows(engine.prepare(PROMPTS, 12), GREEDY, 1, engine.stop_token_ids)
    for use_cache, rows in ((True, rows_cached), (False, rows_full)):
        batch = DecodeBatch(engine.model, use_cache)
        batch.join(rows[:2])
        for step in range(12):
            if step == 4:
                batch.join(rows[2:])  # joins at a later position than the first two
            batch.draw()
            batch.advance()
    for cached, full in zip(rows_cached, rows_full, strict=True):
        assert cached.token_ids == full.token_ids and len(cached.token_ids) >= 8


# ---------------------------------------------------------------- bounds, order, cancellation


def test_a_cancelled_request_frees_its_slot_for_the_next(engine):
    """One slot: the waiting request is served once the first is cancelled, long before the first
    could have finished (steps counted, not timed)."""
    long = GREEDY.model_copy(update={"max_new_tokens": 500})

    async def scenario():
        batcher = Batcher(engine, max_batch=1, max_queue=4)
        try:
            first = submit(batcher, [PROMPTS[0]], long)
            second = submit(batcher, [PROMPTS[1]], GREEDY)
            await steps_reach(batcher, 5)
            assert batcher.load()["waiting"] == 1
            batcher.cancel(first)
            done = await second.completions()
            assert await first.completions() == []  # its stream simply ends
            return done, batcher.steps, first.generated_tokens
        finally:
            batcher.close()

    done, steps, first_tokens = run(scenario())
    assert len(done[0].token_ids) == GREEDY.max_new_tokens
    assert first_tokens < 100 and steps < 150  # the cancelled one would have needed 500


def test_past_the_queue_requests_are_refused_and_slots_go_first_come_first_served(engine):
    long = GREEDY.model_copy(update={"max_new_tokens": 400})
    brief = GREEDY.model_copy(update={"max_new_tokens": 3})

    async def scenario():
        batcher = Batcher(engine, max_batch=1, max_queue=2)
        finished: list[str] = []

        async def follow(ticket, name):
            await ticket.completions()
            finished.append(name)

        try:
            holder = submit(batcher, [PROMPTS[0]], long)
            b, c = submit(batcher, [PROMPTS[1]], brief), submit(batcher, [PROMPTS[2]], brief)
            with pytest.raises(QueueFull) as refused:  # one decoding and two waiting: full
                submit(batcher, [PROMPTS[3]], brief)
            assert "--max-queue" in refused.value.message
            batcher.cancel(c)  # its place in the queue is free at once
            d = submit(batcher, [PROMPTS[3]], brief)
            with pytest.raises(QueueFull):  # samples count: three need three places
                submit(batcher, [PROMPTS[3]], brief, num_samples=3)
            followers = [asyncio.create_task(follow(b, "b")), asyncio.create_task(follow(d, "d"))]
            await steps_reach(batcher, 3)
            assert holder.generated_tokens >= 3 and b.generated_tokens == 0  # b waits its turn
            batcher.cancel(holder)
            await asyncio.gather(*followers)
            return finished
        finally:
            batcher.close()

    assert run(scenario()) == ["b", "d"]


# ---------------------------------------------------------------- through HTTP


@pytest.fixture(scope="module")
def long_workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("long") / "workspace"
    tokenizer = load_tokenizer_file(byte_tokenizer_file(root / "byte-tokenizer").parent)
    write_run_checkpoint(
        root,
        "long",
        model_config=SLOW,
        generation=GenerationConfig(temperature=0, max_new_tokens=1000),
        edit=lambda model: silence_end_of_text(model, tokenizer.eot_id),
    )
    return root


def test_http_queue_full_is_a_429_and_a_cancelled_stream_or_a_client_gone_frees_the_slot(long_workspace):
    httpx = pytest.importorskip("httpx")
    from serve_helpers import running_server

    from llmctl.serve.app import ServeSettings

    settings = ServeSettings(long_workspace, max_batch=1, max_queue=0, dtype="fp32")
    long = {"model": "long", "prompt": "def", "max_tokens": 1000}
    with running_server(settings) as url:

        def steps() -> int:
            return httpx.get(f"{url}/api/models/long", timeout=30).json()["batch"]["steps"]

        assert (
            httpx.post(f"{url}/v1/completions", json={**long, "max_tokens": 2}, timeout=60).status_code == 200
        )
        before = steps()
        with httpx.stream("POST", f"{url}/v1/completions", json={**long, "stream": True}, timeout=60) as held:
            lines = held.iter_lines()  # kept: a dropped iterator would close the connection
            next(lines)  # decoding: the one slot is taken
            busy = httpx.post(f"{url}/v1/completions", json={**long, "max_tokens": 2}, timeout=60)
            assert busy.status_code == 429 and busy.headers["retry-after"] == "1"
            assert busy.json()["error"]["code"] == "queue_full"
        # the stream was closed mid-answer: its row left, so the next request gets the slot
        answered = httpx.post(f"{url}/v1/completions", json={**long, "max_tokens": 3}, timeout=60)
        assert answered.status_code == 200
        assert steps() - before < 900  # not the 1000 steps the stream asked for

        # a non-streamed request whose client gives up leaves the batch at the next step too
        before = steps()
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/completions", json=long, timeout=httpx.Timeout(60, read=0.5))
        answered = httpx.post(f"{url}/v1/completions", json={**long, "max_tokens": 3}, timeout=60)
        assert answered.status_code == 200
        detail = httpx.get(f"{url}/api/models/long", timeout=30).json()
        assert detail["batch"]["active"] == 0 and detail["dtype"] == "fp32"
        assert detail["batch"]["steps"] - before < 900


def test_n_samples_and_the_compare_views_requests_share_one_batch(long_workspace):
    """n samples of one request, and two ids naming one checkpoint (as the page's compare view
    sends them, at once), decode in the same forwards."""
    httpx = pytest.importorskip("httpx")
    from serve_helpers import running_server

    from llmctl.serve.app import ServeSettings

    with running_server(ServeSettings(long_workspace, max_batch=8, dtype="fp32")) as url:
        body = {"prompt": "x = ", "max_tokens": 40, "temperature": 0}

        async def both():
            async with httpx.AsyncClient(timeout=60) as client:
                return await asyncio.gather(
                    client.post(f"{url}/v1/completions", json={**body, "model": "long", "n": 3}),
                    client.post(f"{url}/v1/completions", json={**body, "model": "long:step-100"}),
                )

        before = httpx.get(f"{url}/api/models/long", timeout=30).json()["batch"]
        first, second = asyncio.run(both())
        after = httpx.get(f"{url}/api/models/long", timeout=30).json()["batch"]
    texts = [choice["text"] for choice in first.json()["choices"]]
    assert len(texts) == 3 and len(set(texts)) == 1  # greedy: n copies of one answer
    assert second.json()["choices"][0]["text"] == texts[0]
    assert first.json()["usage"]["completion_tokens"] == 3 * 40
    steps = after["steps"] - (before["steps"] if before else 0)
    assert steps < 2 * 40  # four rows, 40 tokens each, in fewer than two rounds of steps
    assert json.dumps(after)  # the page's view of the batch is plain JSON
