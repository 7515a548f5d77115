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


def tree_snapshot(root) -> dict[str, tuple[int, int]]:
    """Every path under `root` with its size and modification time, to tell what a command changed."""
    from pathlib import Path

    root = Path(root)
    if not root.exists():
        return {}
    return {
        str(path): (path.stat().st_size, path.stat().st_mtime_ns)
        for path in root.rglob("*")
        if path.is_file()
    }


def assert_refused(result: CliResult, message: str, exit_code: int | None = None) -> None:
    """A refusal as users must see it: non-zero exit, one line on stderr naming `message`, no traceback."""
    assert result.exit_code != 0 if exit_code is None else result.exit_code == exit_code, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr and "internal error" not in result.stderr
