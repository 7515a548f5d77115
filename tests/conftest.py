"""Shared fixtures: a fresh workspace per test and an in-process CLI runner.

The runner calls the real entry point (`llmctl.cli.main.main`), so errors go through the same
one-line handling a user sees; stdout and stderr are captured separately.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from cli_helpers import CliResult, run_cli

# ---------------------------------------------------------------- CPU unless a test asks for CUDA
# On a GPU host, 'auto' would put the CLI tests on CUDA with bf16 and compile, and fail them for
# reasons unrelated to what they test. LLMCTL_DEVICE is what llmctl's 'auto' resolves to, read by
# every process, so it pins this one and every process a test starts (torchrun's children too);
# `cuda`-marked tests (tests/test_cuda*.py) are left unpinned and skipped where no GPU is visible.

CPU_PIN = ("LLMCTL_DEVICE", "cpu")


def cuda_visible() -> bool:
    import torch

    return torch.cuda.is_available()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    cuda_items = [item for item in items if item.get_closest_marker("cuda")]
    if cuda_items and not cuda_visible():
        skip = pytest.mark.skip(reason="needs a CUDA GPU: torch.cuda.is_available() is False on this machine")
        for item in cuda_items:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def pinned_device(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str | None:
    """The device 'auto' means in this test: the CPU, unless the test is marked `cuda`."""
    if request.node.get_closest_marker("cuda"):
        monkeypatch.delenv(CPU_PIN[0], raising=False)
        return None
    monkeypatch.setenv(*CPU_PIN)
    return CPU_PIN[1]


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
