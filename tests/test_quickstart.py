"""`llmctl quickstart`: what it plans to build or reuse, the instruction pairs it derives from the
standard library, the preset it picks; and (slow) the whole pipeline run twice, the second reusing
what the first built."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from llmctl.quickstart import (
    BASE_RUN,
    CODE_CORPUS,
    INSTRUCT_CORPUS,
    SFT_RUN,
    TOKENIZER,
    QuickstartOptions,
    choose_preset,
    docstring_pairs,
    plan_quickstart,
)
from llmctl.workspace import Workspace

MODULE = '''
import functools

@functools.cache
def area(width, height):
    """Return the area of a rectangle of the given width and height.

    Both sides must be positive.
    """

    return width * height


class Shape:
    def describe(self):
        """Describe the shape in one line of plain English."""
        return f"{type(self).__name__} with area {self.area()}"

    def undocumented(self):
        return 1

    def only_a_docstring(self):
        """A method whose whole body is its docstring, which is no answer."""


def short():
    """Too short."""
    return 0
'''


def actions(workspace: Workspace, **options) -> dict[str, str]:
    return {step.name: step.action for step in plan_quickstart(workspace, QuickstartOptions(**options))}


def test_docstrings_ask_and_sources_answer() -> None:
    pairs = list(docstring_pairs(MODULE))
    assert pairs == [
        {
            "instruction": "Return the area of a rectangle of the given width and height.",
            "output": "@functools.cache\ndef area(width, height):\n    return width * height",
        },
        {
            "instruction": "Describe the shape in one line of plain English.",
            "output": 'def describe(self):\n    return f"{type(self).__name__} with area {self.area()}"',
        },
    ]
    assert list(docstring_pairs("def broken(:\n")) == []


def test_the_preset_fits_the_device() -> None:
    assert choose_preset("cpu", 64 * 2**30) == "cpu-debug"
    assert choose_preset("cuda", 8 * 2**30) == "rtx4060-8g"
    assert choose_preset("cuda", 80 * 2**30) == "small-16g"
    assert choose_preset("cuda", 4 * 2**30) == "cpu-debug"


def _register_data(workspace: Workspace, *corpora: str, tokenizer: bool = True) -> None:
    registry = workspace.registry()
    for corpus in corpora:
        workspace.corpus_dir(corpus).mkdir(parents=True)
        registry.add_corpus(corpus, "text", workspace.corpus_dir(corpus), {})
    if tokenizer:
        workspace.tokenizer_dir(TOKENIZER).mkdir(parents=True)
        registry.add_tokenizer(TOKENIZER, workspace.tokenizer_dir(TOKENIZER), CODE_CORPUS, "0" * 64, 8192, {})


def _register_run(workspace: Workspace, run: str, end_reason: str | None, checkpoint: bool = True) -> None:
    registry = workspace.registry()
    run_dir = workspace.run_dir(run)
    run_dir.mkdir(parents=True)
    registry.add_run(run, "pretrain", run_dir, meta={"end_reason": end_reason})
    if checkpoint:
        registry.add_checkpoint(run, 10, "full", run_dir / "checkpoints" / "step-00000010", {})


def test_a_fresh_workspace_builds_everything(tmp_path: Path) -> None:
    assert actions(Workspace(tmp_path)) == {
        "code corpus": "build",
        "tokenizer": "build",
        "instructions": "build",
        "pretrain": "build",
        "finetune": "build",
        "eval": "run",
        "sample": "run",
    }


def test_what_exists_is_reused_and_an_interrupted_run_resumed(tmp_path: Path) -> None:
    workspace = Workspace(tmp_path)
    _register_data(workspace, CODE_CORPUS, INSTRUCT_CORPUS)
    _register_run(workspace, BASE_RUN, "max_time")
    _register_run(workspace, SFT_RUN, "interrupted")

    planned = actions(workspace)
    assert [planned[name] for name in ("code corpus", "tokenizer", "instructions")] == ["reuse"] * 3
    assert planned["pretrain"] == "reuse" and planned["finetune"] == "resume"

    fresh = actions(workspace, fresh=True)
    assert fresh["code corpus"] == "reuse" and fresh["pretrain"] == "build" and fresh["finetune"] == "build"


def test_what_is_made_again_makes_what_follows_again(tmp_path: Path) -> None:
    workspace = Workspace(tmp_path)
    _register_data(workspace, CODE_CORPUS, INSTRUCT_CORPUS)
    _register_run(workspace, BASE_RUN, None)  # killed: no end reason, but a checkpoint to go on from
    _register_run(workspace, SFT_RUN, "finished")
    assert actions(workspace)["pretrain"] == "resume" and actions(workspace)["finetune"] == "build"

    workspace.registry().remove_run(BASE_RUN)
    assert actions(workspace)["pretrain"] == "build"


@pytest.mark.parametrize("missing", ["tokenizer", "instructions"])
def test_new_data_means_new_runs(tmp_path: Path, missing: str) -> None:
    workspace = Workspace(tmp_path)
    corpora = (CODE_CORPUS,) if missing == "instructions" else (CODE_CORPUS, INSTRUCT_CORPUS)
    _register_data(workspace, *corpora, tokenizer=missing != "tokenizer")
    _register_run(workspace, BASE_RUN, "finished")
    _register_run(workspace, SFT_RUN, "finished")
    planned = actions(workspace)
    assert planned[missing] == "build" and planned["finetune"] == "build"
    assert planned["pretrain"] == ("build" if missing == "tokenizer" else "reuse")


@pytest.mark.slow
def test_quickstart_runs_the_pipeline_and_a_second_run_reuses_it(cli, workspace_dir) -> None:
    started = time.monotonic()
    first = cli("quickstart", "--minutes", "0.25")
    first_seconds = time.monotonic() - started
    assert first.exit_code == 0, first.stderr
    for expected in ("code corpus", "bits per byte", "probe score", "llmctl chat --model quickstart-sft"):
        assert expected in first.stdout
    registry = Workspace(workspace_dir).registry()
    assert {row["kind"] for row in registry.evals()} >= {"perplexity", "probes"}
    assert registry.run(BASE_RUN)["meta"]["end_reason"] in ("max_time", "finished")

    planned = actions(Workspace(workspace_dir))
    assert all(
        planned[name] == "reuse"
        for name in ("code corpus", "tokenizer", "instructions", "pretrain", "finetune")
    )
    started = time.monotonic()
    second = cli("quickstart", "--minutes", "0.25")
    assert second.exit_code == 0, second.stderr
    assert "(reuse)" in second.stdout
    assert time.monotonic() - started < first_seconds
