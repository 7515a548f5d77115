"""Fixtures and helpers for the pretrain tests: a small real workspace (stdlib code corpus, 512-token
BPE tokenizer, token cache) built once per module and copied per test, and subprocess helpers.
The fixtures over these functions (`single_thread`, `template`, `ws`) live in conftest.py."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from llmctl.data.build import BuildOptions, build_corpus
from llmctl.data.store import CorpusStore
from llmctl.data.tokencache import build_token_cache
from llmctl.events import read_events
from llmctl.tokenizer import load_tokenizer
from llmctl.tokenizer_build import train_tokenizer
from llmctl.workspace import Workspace

# a model small enough that a few hundred steps take seconds on one core
TINY = [
    "--set",
    "model.n_layer=1",
    "--set",
    "model.n_head=2",
    "--set",
    "model.d_model=32",
    "--set",
    "model.context_length=32",
    "--set",
    "train.micro_batch_size=4",
    "--set",
    "train.eval_batches=2",
    "--set",
    "train.warmup_steps=5",
    "--set",
    "train.log_every=5",
]
BASE = ["pretrain", "--corpus", "code", "--tokenizer", "tok", "--preset", "cpu-debug", *TINY]


@contextlib.contextmanager
def one_thread():
    """Tiny models on two OpenMP threads stall whenever other processes busy the cores; one is steady.
    Subprocesses get the same through OMP_NUM_THREADS, so their arithmetic matches in-process runs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def build_template(root: Path) -> Path:
    """A workspace with a stdlib code corpus, a 512-token BPE tokenizer and its token cache."""
    workspace = Workspace(root)
    build_corpus(workspace, "code", ["stdlib"], BuildOptions(limit=40, val_fraction=0.1))
    train_tokenizer(workspace, "tok", "code", vocab_size=512)
    tokenizer = load_tokenizer(workspace, "tok")
    store = CorpusStore.open(workspace, "code")
    build_token_cache(store, tokenizer.tokenizer, tokenizer.sha256, tokenizer.eot_id)
    return root


def events_of(ws: Path, run: str) -> list[dict]:
    return read_events(ws / "runs" / run / "events.jsonl")


def nothing_written(ws: Path, run: str) -> bool:
    registry = Workspace(ws).registry(create=False)
    return not (ws / "runs" / run).exists() and registry.run(run) is None


def llmctl_process(ws: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "LLMCTL_HOME": str(ws), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "llmctl", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_event(ws: Path, run: str, kind: str, process: subprocess.Popen, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        path = ws / "runs" / run / "events.jsonl"
        for event in read_events(path) if path.exists() else []:
            if event["event"] == kind:
                return event
        assert process.poll() is None, process.communicate()
        time.sleep(0.01)
    raise AssertionError(f"no {kind} event within {timeout} s")
