"""Shared fixtures: a fresh workspace per test and an in-process CLI runner.

The runner calls the real entry point (`llmctl.cli.main.main`), so errors go through the same
one-line handling a user sees; stdout and stderr are captured separately.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from cli_helpers import CliResult, run_cli


@pytest.fixture
def workspace_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "workspace"
    monkeypatch.setenv("LLMCTL_HOME", str(root))
    monkeypatch.setenv("COLUMNS", "160")
    return root


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str], workspace_dir: Path):
    def invoke(*args: object) -> CliResult:
        return run_cli(capsys, list(args))

    return invoke


# ---------------------------------------------------------------- a small pretraining workspace
# Modules that train tiny models opt in with `pytestmark = pytest.mark.usefixtures("single_thread")`.


@pytest.fixture
def single_thread(monkeypatch: pytest.MonkeyPatch):
    """One OpenMP thread, here and in subprocesses (pretrain_helpers.one_thread says why)."""
    from pretrain_helpers import one_thread

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    with one_thread():
        yield


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A stdlib code corpus, a 512-token tokenizer and its token cache, built once per module."""
    from pretrain_helpers import build_template

    return build_template(tmp_path_factory.mktemp("template") / "workspace")


@pytest.fixture
def ws(template: Path, workspace_dir: Path) -> Path:
    """A fresh copy of the template workspace as this test's LLMCTL_HOME."""
    shutil.copytree(template, workspace_dir)
    return workspace_dir
