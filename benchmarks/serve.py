"""`llmctl serve` under concurrent clients: aggregate tokens/s, latency and time to first token.

    python benchmarks/serve.py [--clients 1,4,16] [--requests 3] [--new-tokens 128] [--threads 2]
    python benchmarks/serve.py --gguf q8_0,f32        # and llama.cpp's server on GGUF exports

The server runs as users run it (`python -m llmctl serve`, a subprocess on a loopback port) with
the model in the mini-27m preset's shape (6 layers, 512 wide, 8 heads, 8k vocabulary, context
1024), random weights (speed does not depend on them) whose end-of-text logit is 0, so no request
stops before its --new-tokens; or --model REF in --workspace. For each number of clients, every
client sends --requests requests one after another, each a different 32-token stretch of stdlib
code, greedy, streamed; a level's wall clock runs from the first request sent to the last byte
received. Figures: aggregate tokens/s (every client's tokens over the wall clock), p50/p95 of each
request's latency and of its time to its first token. Servers and levels alternate for --rounds
rounds in rotated order; each figure is the median of the rounds, with their range.

With --gguf, llama.cpp's own server (xllamacpp) on the same model exported to those GGUF types,
with as many slots as the most clients (its continuous batching) and the same threads, answers
the same requests through its OpenAI-compatible /v1/completions, printed beside llmctl's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import select
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).parent))
from generate import scratch_dir, stdlib_texts  # noqa: E402

from llmctl.config import GenerationConfig, ModelConfig, RunConfig  # noqa: E402
from llmctl.model.transformer import Transformer  # noqa: E402
from llmctl.tokenizer import load_tokenizer_file  # noqa: E402
from llmctl.tokenizer_build import train_bpe  # noqa: E402

PROMPT_TOKENS = 32
MINI_27M = ModelConfig(
    n_layer=6, n_head=8, d_model=512, context_length=1024, vocab_size=8192, tie_embeddings=False
)


# ---------------------------------------------------------------- the model and the servers


def random_workspace() -> tuple[Path, str]:
    """A workspace with run `bench`: mini-27m's shape, random weights, end-of-text never likeliest."""
    from llmctl.checkpoint.files import FullModelIO, write_checkpoint

    root = scratch_dir("llmctl-bench-serve-")
    (root / "tokenizer").mkdir()
    train_bpe(stdlib_texts(), MINI_27M.vocab_size).save(str(root / "tokenizer" / "tokenizer.json"))
    tokenizer = load_tokenizer_file(root / "tokenizer")
    config = MINI_27M.model_copy(update={"vocab_size": tokenizer.vocab_size})
    torch.manual_seed(0)
    model = Transformer(config)
    with torch.no_grad():
        model.lm_head.weight[tokenizer.eot_id] = 0
    write_checkpoint(
        root / "workspace" / "runs" / "bench" / "checkpoints" / "step-00000000",
        model=model,
        model_io=FullModelIO(),
        config=RunConfig(model=config, generation=GenerationConfig(temperature=0)),
        trainer_state={},
        meta={"step": 0},
        tokenizer_file=tokenizer.path,
    )
    return root / "workspace", "bench"


class LlmctlServer:
    name = "llmctl"

    def __init__(self, workspace: Path, model: str, threads: int, max_batch: int, dtype: str | None):
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
        command = [sys.executable, "-m", "llmctl", "--workspace", str(workspace), "serve", "--model", model]
        command += ["--port", "0", "--max-batch", str(max_batch), "--max-queue", "256"]
        if dtype:
            command += ["--dtype", dtype]
        self.process = subprocess.Popen(
            command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        said, self.url = "", None
        deadline = time.monotonic() + 300
        while self.url is None and time.monotonic() < deadline and self.process.poll() is None:
            if select.select([self.process.stderr], [], [], 0.5)[0]:
                said += self.process.stderr.readline()
                found = re.search(r"http://127\.0\.0\.1:\d+", said)
                self.url = found.group(0) if found else None
        if self.url is None:
            raise SystemExit(f"llmctl serve did not start: {said}")
        self.model = model
        detail = httpx.get(f"{self.url}/api/models/{model}", timeout=60).json()
        self.name = f"llmctl {detail['dtype']}"

    def body(self, prompt: list[int], new_tokens: int) -> dict:
        return {
            "model": self.model,
            "prompt": prompt,
            "max_tokens": new_tokens,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=60)


class LlamaCppServer:
    def __init__(self, checkpoint: Path, quant: str, threads: int, slots: int, context: int):
        from llmctl.export.gguf import export_gguf
        from llmctl.export.llamacpp import LlamaCpp
        from llmctl.workspace import Workspace

        scratch = scratch_dir("llmctl-bench-gguf-")
        result = export_gguf(
            Workspace(scratch / "workspace"), str(checkpoint), scratch / f"{quant}.gguf", quant
        )
        # as users run it: its default f16 KV cache and flash-attention choice
        self.llama = LlamaCpp(result.path, context, threads, exact=False, parallel=slots)
        self.url = self.llama.url
        self.name = f"llama.cpp {quant}"

    def body(self, prompt: list[int], new_tokens: int) -> dict:
        return {
            "prompt": prompt,
            "max_tokens": new_tokens,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
            "ignore_eos": True,  # exactly new_tokens, as llmctl's model never ends early
            "cache_prompt": False,
        }

    def close(self) -> None:
        self.llama.close()


# ---------------------------------------------------------------- the load


@dataclass
class Level:
    clients: int
    wall_s: float
    tokens: int
    latencies: list[float]
    first_tokens: list[float]

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s


async def one_request(
    client: httpx.AsyncClient, url: str, body: dict, new_tokens: int
) -> tuple[float, float, int]:
    """(latency, time to first token, tokens) of one streamed completion."""
    started = time.perf_counter()
    first, tokens = None, None
    async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
        if response.status_code != 200:
            raise SystemExit(f"{url} answered {response.status_code}: {(await response.aread())[:300]!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if first is None and any(choice.get("text") for choice in chunk.get("choices", [])):
                first = time.perf_counter() - started
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return time.perf_counter() - started, first or 0.0, tokens if tokens is not None else new_tokens


async def run_level(server, prompts: list[list[int]], clients: int, requests: int, new_tokens: int) -> Level:
    latencies, first_tokens, tokens = [], [], 0

    async def client_loop(client: httpx.AsyncClient, number: int) -> None:
        nonlocal tokens
        for index in range(requests):
            prompt = prompts[(number * requests + index) % len(prompts)]
            latency, first, made = await one_request(
                client, server.url, server.body(prompt, new_tokens), new_tokens
            )
            latencies.append(latency)
            first_tokens.append(first)
            tokens += made

    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits, trust_env=False) as client:
        started = time.perf_counter()
        await asyncio.gather(*(client_loop(client, number) for number in range(clients)))
        wall = time.perf_counter() - started
    return Level(clients, wall, tokens, latencies, first_tokens)


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(fraction * (len(ordered) - 1))))]


def spread(values: list[float], digits: int = 1) -> str:
    return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", default="1,4,16")
    parser.add_argument(
        "--requests", type=int, default=3, help="requests each client sends, one after another"
    )
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads of each server")
    parser.add_argument("--dtype", default=None, help="llmctl serve --dtype [default: its own, auto]")
    parser.add_argument(
        "--model", default=None, help="a model reference in --workspace instead of random weights"
    )
    parser.add_argument("--workspace", default=os.environ.get("LLMCTL_HOME", "."))
    parser.add_argument(
        "--gguf", default="", help="comma-separated GGUF types for llama.cpp's server (q8_0,f32)"
    )
    args = parser.parse_args()
    levels = [int(n) for n in args.clients.split(",")]

    workspace, model = (Path(args.workspace), args.model) if args.model else random_workspace()
    from llmctl.checkpoint.refs import resolve_model_ref
    from llmctl.workspace import Workspace

    checkpoint = resolve_model_ref(Workspace(workspace), model)
    tokenizer = load_tokenizer_file(checkpoint / "tokenizer.json")
    stream = tokenizer.encode("".join(stdlib_texts(400_000)))
    prompts = [stream[i : i + PROMPT_TOKENS] for i in range(0, PROMPT_TOKENS * 200, PROMPT_TOKENS)]

    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"torch {torch.__version__}, load average {os.getloadavg()[0]:.1f} at start"
    )
    print(
        f"model: {checkpoint}; {args.threads} threads per server; clients {levels}, {args.requests} "
        f"requests each, {PROMPT_TOKENS}-token prompts, {args.new_tokens} new tokens, greedy, streamed; "
        f"{args.rounds} rounds, servers and levels rotated; median (min-max) over rounds"
    )
    servers = [LlmctlServer(workspace, model, args.threads, max(levels), args.dtype)]
    context = int(
        json.loads(httpx.get(f"{servers[0].url}/api/models/{model}", timeout=60).text)["context_length"]
    )
    for quant in filter(None, args.gguf.split(",")):
        servers.append(LlamaCppServer(checkpoint, quant, args.threads, max(levels), context))
    try:
        for server in servers:  # warm-up: first loads, allocators, kernels
            asyncio.run(run_level(server, prompts, 2, 1, 16))
        results: dict[tuple[str, int], list[Level]] = {}
        for round_ in range(args.rounds):
            order = servers[round_ % len(servers) :] + servers[: round_ % len(servers)]
            for clients in levels[round_ % len(levels) :] + levels[: round_ % len(levels)]:
                for server in order:
                    level = asyncio.run(run_level(server, prompts, clients, args.requests, args.new_tokens))
                    results.setdefault((server.name, clients), []).append(level)
        report(servers, levels, results)
    finally:
        for server in servers:
            server.close()
    print(f"\nload average {os.getloadavg()[0]:.1f} at the end")


def report(servers: list, levels: list[int], results: dict) -> None:
    for server in servers:
        print(f"\n{server.name}")
        print(
            "  clients   tokens/s (aggregate)     latency p50 s        p95 s                first token p50 s"
        )
        for clients in levels:
            runs = results[(server.name, clients)]
            rate = [run.tokens_per_s for run in runs]
            p50 = [percentile(run.latencies, 0.5) for run in runs]
            p95 = [percentile(run.latencies, 0.95) for run in runs]
            ttft = [percentile(run.first_tokens, 0.5) for run in runs]
            cells = f"{spread(rate):<22}   {spread(p50, 2):<18}   {spread(p95, 2):<18}   {spread(ttft, 3)}"
            print(f"  {clients:>7}   {cells}")
        one, most = levels[0], levels[-1]
        rate = statistics.median(run.tokens_per_s for run in results[(server.name, most)])
        base = statistics.median(run.tokens_per_s for run in results[(server.name, one)])
        p95_most = statistics.median(percentile(run.latencies, 0.95) for run in results[(server.name, most)])
        p95_one = statistics.median(percentile(run.latencies, 0.95) for run in results[(server.name, one)])
        print(
            f"  {most} clients against {one}: {rate / base:.2f}x the aggregate tokens/s, "
            f"p95 latency {p95_most / p95_one:.2f}x"
        )


if __name__ == "__main__":
    main()
