"""Fixtures for the finetune, qlora and merge tests: a tiny base model pretrained once per session
(byte tokenizer with the chat specials, a few stdlib files) and an in-process CLI on its workspace.
Test modules load them with `pytest_plugins = ["finetune_fixtures"]`, so the base is trained once
however many modules use it."""

from __future__ import annotations

from pathlib import Path

import pytest
from cli_helpers import CliResult, run_cli
from finetune_helpers import PRETRAIN, TINY_MODEL, task_records, write_jsonl
from pretrain_helpers import one_thread

from llmctl.cli.main import main
from llmctl.data.build import BuildOptions, build_corpus
from llmctl.tokenizer_build import train_tokenizer
from llmctl.workspace import Workspace


@pytest.fixture(scope="session")
def base_workspace(tmp_path_factory) -> Path:
    """A workspace holding run 'base': a 2-layer model briefly pretrained on a few stdlib files."""
    root = tmp_path_factory.mktemp("finetune") / "workspace"
    workspace = Workspace(root)
    with one_thread():
        build_corpus(workspace, "code", ["stdlib"], BuildOptions(limit=12, val_fraction=0.2))
        train_tokenizer(workspace, "bytes", "code", vocab_size=None, kind="byte")
        code = main(
            [
                "--workspace",
                str(root),
                "pretrain",
                "--corpus",
                "code",
                "--tokenizer",
                "bytes",
                "--preset",
                "cpu-debug",
                "--run",
                "base",
                *TINY_MODEL,
                *PRETRAIN,
                "--max-steps",
                "40",
            ]
        )
    assert code == 0
    write_jsonl(root / "task.jsonl", task_records())
    return root


@pytest.fixture
def ft(base_workspace: Path, capsys, monkeypatch):
    """`llmctl ARGS` in-process on the shared base workspace, one thread, output captured. Tests share
    the workspace (the base is read-only to them), so each names its own runs."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("COLUMNS", "160")

    def invoke(*args: object) -> CliResult:
        with one_thread():
            return run_cli(capsys, ["--workspace", base_workspace, *args])

    return invoke
