"""llama.cpp itself, on a GGUF file: the server xllamacpp ships, asked over loopback HTTP.

    with LlamaCpp(path, context_length) as llama:
        llama.tokenize(text)                 # /tokenize: llama.cpp's own tokenizer
        llama.render_chat(messages)          # /apply-template: the file's chat template, as llama.cpp runs it
        llama.greedy(ids, n)                 # /completion at temperature 0: tokens and why it stopped
        llama.logprobs(context, ids, vocab)  # every token's log-probability at each position of ids
        llama.score(context, ids)            # the log-probability of each token of ids
        llama.chat(messages, n)              # /v1/chat/completions: a reply as a chat client gets it
        llama.sampling_defaults()            # /props: the sampling settings the file gave it

xllamacpp's Python API covers completions but not tokenizing or templates; the server it starts
answers llama-server's documented HTTP API, which covers all of them, so everything goes through
that (bound to 127.0.0.1 on a free port, no proxy). `exact=True` keeps the KV cache in f32 and
flash attention off, so what is measured is the file, not the runtime's f16 cache.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llmctl.errors import LlmctlError


def llamacpp_available() -> bool:
    return importlib.util.find_spec("xllamacpp") is not None


@dataclass
class Continuation:
    tokens: list[int]
    stopped: bool  # at an end-of-generation token, not at the token limit


@dataclass
class ChatReply:
    text: str
    finish_reason: str
    prompt_tokens: int


class LlamaCpp:
    def __init__(
        self,
        path: Path,
        context_length: int,
        threads: int | None = None,
        exact: bool = True,
        parallel: int = 1,
    ) -> None:
        """`parallel` slots decode at once (llama.cpp's continuous batching), each with the whole
        `context_length`."""
        import xllamacpp

        params = xllamacpp.CommonParams()
        params.model.path = str(path)
        params.n_ctx = context_length * parallel  # llama.cpp splits its context among the slots
        params.n_parallel = parallel
        params.warmup = False
        params.ui = False
        params.fit_params = False  # no probing of memory to size the context: it is given
        params.cache_ram_mib = 0
        params.verbosity = 1  # errors only
        params.cpuparams.n_threads = params.cpuparams_batch.n_threads = threads or torch.get_num_threads()
        if exact:
            params.cache_type_k = params.cache_type_v = xllamacpp.ggml_type.GGML_TYPE_F32
            params.flash_attn_type = xllamacpp.llama_flash_attn_type.LLAMA_FLASH_ATTN_TYPE_DISABLED
        reason = None
        with _stderr_captured() as log:
            try:
                self._server = xllamacpp.Server(params)
            except RuntimeError:
                time.sleep(0.05)  # llama.cpp's logger writes from a thread of its own
                reason = _load_error(log)
        if reason is not None:
            raise LlmctlError(f"llama.cpp could not load '{path}': {reason}")
        self._base = self.url = self._server.listening_address.rstrip("/")
        self._http = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def __enter__(self) -> LlamaCpp:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._server = None  # its destructor stops the server's threads

    # ------------------------------------------------------------ what llama.cpp answers

    def tokenize(self, text: str, add_special: bool = False) -> list[int]:
        return self._post("/tokenize", {"content": text, "add_special": add_special})["tokens"]

    def render_chat(self, messages: Sequence[Mapping[str, str]]) -> str:
        return self._post("/apply-template", {"messages": list(messages)})["prompt"]

    def greedy(self, ids: Sequence[int], max_tokens: int, ignore_eos: bool = False) -> Continuation:
        """Up to `max_tokens` greedy tokens after `ids`, and the end-of-generation token if one ended
        them (none does with `ignore_eos`: exactly `max_tokens` come back)."""
        request = {"prompt": list(ids), "n_predict": max_tokens, "temperature": 0.0, "ignore_eos": ignore_eos}
        answer = self._complete(request)
        return Continuation(answer["tokens"], answer["stop_type"] == "eos")

    def logprobs(self, context: Sequence[int], ids: Sequence[int], vocab_size: int) -> torch.Tensor:
        """[len(ids), vocab] fp64 log-probabilities of every token at each position of `ids` read
        after `context` (llama.cpp reports log-softmax, never raw logits)."""
        steps = self._forced(context, ids, vocab_size)
        table = torch.full((len(ids), vocab_size), float("nan"), dtype=torch.float64)
        for position, step in enumerate(steps):
            for entry in step["top_logprobs"]:
                table[position, entry["id"]] = entry["logprob"]
        return table

    def score(self, context: Sequence[int], ids: Sequence[int]) -> torch.Tensor:
        """[len(ids)] fp64 log-probabilities of `ids` themselves, following `context`."""
        steps = self._forced(context, ids, 1)
        return torch.tensor([step["logprob"] for step in steps], dtype=torch.float64)

    def _forced(self, context: Sequence[int], ids: Sequence[int], top: int) -> list[dict[str, Any]]:
        """llama.cpp made to generate exactly `ids` after `context` by a grammar of their token ids;
        each step reports the raw model's log-probabilities (the grammar only masks the draw).

        `ids` must hold no end-of-generation token, and each must end a UTF-8 character: the server
        reports nothing for a token that leaves one incomplete."""
        grammar = "root ::= " + " ".join(f"<[{token}]>" for token in ids)
        request = {"prompt": list(context), "n_predict": len(ids), "temperature": 0.0, "n_probs": top}
        answer = self._complete({**request, "grammar": grammar})
        steps = answer["completion_probabilities"][: len(ids)]
        if answer["tokens"][: len(ids)] != list(ids) or [step["id"] for step in steps] != list(ids):
            raise LlmctlError("llama.cpp did not report each token of the text it was made to follow")
        return steps

    def sampling_defaults(self) -> dict[str, Any]:
        """What a request that sets no sampling option gets (llama.cpp reads them from the file)."""
        request = urllib.request.Request(self._base + "/props")
        with self._http.open(request, timeout=60) as response:
            settings = json.loads(response.read())["default_generation_settings"]
        return settings.get("params", settings)

    def chat(self, messages: Sequence[Mapping[str, str]], max_tokens: int) -> ChatReply:
        request = {"messages": list(messages), "max_tokens": max_tokens, "temperature": 0.0}
        answer = self._post("/v1/chat/completions", request)
        choice = answer["choices"][0]
        return ChatReply(
            choice["message"]["content"], choice["finish_reason"], answer["usage"]["prompt_tokens"]
        )

    # ------------------------------------------------------------ plumbing

    def _complete(self, request: dict[str, Any]) -> dict[str, Any]:
        # no prompt cache: each request computed from scratch, as llmctl's side is
        return self._post("/completion", {**request, "cache_prompt": False, "return_tokens": True})

    def _post(self, route: str, body: dict[str, Any]) -> dict[str, Any]:
        if self._server is None:
            raise LlmctlError("the llama.cpp server was closed")
        request = urllib.request.Request(
            self._base + route, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        try:
            with self._http.open(request, timeout=600) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")
            raise LlmctlError(f"llama.cpp answered {route} with HTTP {exc.code}: {detail[:300]}") from None


@contextlib.contextmanager
def _stderr_captured() -> Iterator[Path]:
    """llama.cpp's log (written by C code to file descriptor 2) into a temporary file, so a failed
    load can be reported in one line instead of a screenful."""
    with tempfile.TemporaryDirectory(prefix="llmctl-llamacpp-") as directory:
        path = Path(directory) / "stderr.log"
        sys.stderr.flush()
        saved = os.dup(2)
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(target, 2)
        try:
            yield path
        finally:
            os.dup2(saved, 2)
            os.close(target)
            os.close(saved)


def _load_error(log: Path) -> str:
    text = log.read_text(errors="replace")
    found = re.findall(r"error loading model: (.*)", text)
    return found[-1].strip() if found else "see llama.cpp's log (run with the file directly to see it)"
