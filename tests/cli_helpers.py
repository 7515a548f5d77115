"""`llmctl` run in-process, as the `cli` fixtures of conftest and finetune_fixtures call it."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest

from llmctl.cli.main import main


@dataclass
class CliResult:
    exit_code: int
    stdout: str
    stderr: str

    def json(self):
        return json.loads(self.stdout)


def run_cli(capsys: pytest.CaptureFixture[str], args: list[object]) -> CliResult:
    """`llmctl ARGS` through the real entry point, with what it printed."""
    capsys.readouterr()
    code = main([str(arg) for arg in args])
    captured = capsys.readouterr()
    return CliResult(code, captured.out, captured.err)
