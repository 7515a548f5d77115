"""Model references that could mean two things: a run of the workspace and a directory of the
same name where the command runs. A command refuses to guess and says how to say each."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from tiny_checkpoints import GREETING, write_run_checkpoint

from llmctl.checkpoint.refs import resolve_model_ref, resolve_run_ref
from llmctl.errors import UsageError
from llmctl.workspace import Workspace

pytestmark = pytest.mark.usefixtures("single_thread")
PROMPT = "<|user|>\nhi<|end|>\n<|assistant|>\n"


@pytest.fixture
def here(tmp_path: Path, workspace_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory holding `tiny/`, a copy of a checkpoint with other weights, while the
    workspace has a run named tiny."""
    write_run_checkpoint(workspace_dir, "tiny", step=100)
    other = write_run_checkpoint(
        tmp_path / "elsewhere", "other", step=5, edit=lambda model: model.lm_head.weight.mul_(-1)
    )
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    shutil.copytree(other, cwd / "tiny")
    monkeypatch.chdir(cwd)
    return cwd


def test_a_name_that_is_both_a_run_and_a_directory_is_refused(here, workspace_dir):
    workspace = Workspace(workspace_dir)
    with pytest.raises(UsageError) as refused:
        resolve_model_ref(workspace, "tiny")
    assert "both run 'tiny'" in refused.value.message and "./tiny" in refused.value.message
    assert "tiny:best" in refused.value.message
    assert resolve_model_ref(workspace, "./tiny") == (here / "tiny").resolve()
    run_checkpoint = workspace_dir / "runs" / "tiny" / "checkpoints" / "step-00000100"
    assert resolve_model_ref(workspace, "tiny:best") == run_checkpoint
    assert resolve_run_ref(workspace, "tiny") == run_checkpoint  # what the server resolves


def test_a_run_name_alone_still_resolves_where_no_directory_shares_it(here, workspace_dir):
    (here / "tiny").rename(here / "exported")
    workspace = Workspace(workspace_dir)
    assert (
        resolve_model_ref(workspace, "tiny")
        == workspace_dir / "runs" / "tiny" / "checkpoints" / "step-00000100"
    )
    with pytest.raises(UsageError):
        resolve_run_ref(workspace, "exported")  # a run reference never reaches a directory
    with pytest.raises(UsageError):
        resolve_run_ref(workspace, str(here / "exported"))


def test_standing_in_the_runs_directory_is_not_ambiguous(here, workspace_dir, monkeypatch):
    monkeypatch.chdir(workspace_dir / "runs")
    path = resolve_model_ref(Workspace(workspace_dir), "tiny")
    assert path == workspace_dir / "runs" / "tiny" / "checkpoints" / "step-00000100"


def test_sample_says_which_to_write(cli, here):
    result = cli("sample", "--model", "tiny", "--prompt", PROMPT, "--stop", "<|end|>")
    assert result.exit_code == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "./tiny" in result.stderr
    run = cli("sample", "--model", "tiny:best", "--prompt", PROMPT, "--stop", "<|end|>")
    assert run.exit_code == 0 and run.stdout == PROMPT + GREETING + "\n"
    directory = cli("sample", "--model", "./tiny", "--prompt", PROMPT, "--stop", "<|end|>", "--json")
    assert directory.exit_code == 0 and directory.json()["completions"][0]["text"] != GREETING
