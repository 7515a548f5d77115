"""Shared fixtures: a fresh workspace per test and an in-process CLI runner.

The runner calls the real entry point (`llmctl.cli.main.main`), so errors go through the same
one-line handling a user sees; stdout and stderr are captured separately.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from llmctl.cli.main import main


@dataclass
class CliResult:
    exit_code: int
    stdout: str
    stderr: str

    def json(self):
        return json.loads(self.stdout)


@pytest.fixture
def workspace_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "workspace"
    monkeypatch.setenv("LLMCTL_HOME", str(root))
    monkeypatch.setenv("COLUMNS", "160")
    return root


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str], workspace_dir: Path):
    def invoke(*args: object) -> CliResult:
        capsys.readouterr()
        code = main([str(arg) for arg in args])
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return invoke
