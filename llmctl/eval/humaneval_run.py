"""`eval humaneval` as one call: generate completions with a model (or read ones made elsewhere),
score them in the sandbox, write the results and record the eval in the registry.

Where the results go is checked before any work starts, so a run of every program is never lost
to an output that cannot be written.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmctl.errors import UsageError
from llmctl.eval.humaneval import (
    STOP_SEQUENCES,
    HumanEvalReport,
    Problem,
    evaluate,
    humaneval_path,
    load_completions,
    load_problems,
    parse_ks,
    write_results,
)
from llmctl.eval.results import record
from llmctl.eval.sandbox import SandboxLimits
from llmctl.workspace import Workspace

RESULTS_MARKER = ".llmctl-eval"  # an eval's output directory, which a later eval may reuse


@dataclass
class HumanEvalRun:
    """What to score and how; exactly one of `model` and `completions`."""

    model: str | None = None
    completions: Path | None = None
    problems_file: Path | None = None
    limit: int | None = None
    n_samples: int = 1
    temperature: float = 0.2
    top_p: float = 0.95
    max_new_tokens: int = 300
    seed: int = 0
    batch_size: int = 8
    ks: str = "1,10,100"
    workers: int = 1
    timeout_s: float = 5.0
    out_dir: Path | None = None
    device: str = "auto"
    dtype: str | None = None  # None: the checkpoint's generation.dtype


@dataclass
class Progress:
    """What the caller hears while the eval runs."""

    note: Callable[[str], None] = lambda message: None
    generated: Callable[[int, int], None] = lambda rows, total: None
    scored: Callable[[int, int], None] = lambda finished, total: None
    before_scoring: Callable[[], None] = lambda: None  # the sandbox is about to run programs
    left_out: Callable[[HumanEvalReport], None] = lambda report: None


def run_humaneval(
    workspace: Workspace, run: HumanEvalRun, progress: Progress | None = None
) -> dict[str, Any]:
    """The eval's summary, with the registry row's `eval_id`."""
    progress = progress or Progress()
    if (run.model is None) == (run.completions is None):
        raise UsageError(
            "give --model REF to generate completions or --completions FILE to score ones made "
            "elsewhere" + (", not both" if run.model else "")
        )
    ks = parse_ks(run.ks)
    problems = load_problems(run.problems_file)[: run.limit]
    directory = run.out_dir.resolve() if run.out_dir else _new_eval_dir(workspace.root / "evals")
    _check_writable(directory)
    source: dict[str, Any] = {"problems_file": str((run.problems_file or humaneval_path()).resolve())}
    completions = run.completions
    if run.model is not None:
        completions = directory / "completions.jsonl"
        source |= _generate(workspace, run, problems, completions, progress)
    samples = load_completions(completions, problems)
    progress.before_scoring()
    report = evaluate(
        problems,
        samples,
        ks,
        SandboxLimits(timeout_s=run.timeout_s),
        run.workers,
        on_progress=progress.scored,
    )
    progress.left_out(report)
    summary = write_results(report, directory, {**source, "completions_file": str(completions.resolve())})
    (directory / RESULTS_MARKER).touch()  # a later eval may write here again
    # a run that writes into the workspace makes it; one writing elsewhere records only where one exists
    eval_id = record(workspace, "humaneval", summary, create=run.out_dir is None)
    if eval_id is not None:
        summary["eval_id"] = eval_id
    return summary


def _generate(
    workspace: Workspace, run: HumanEvalRun, problems: list[Problem], path: Path, progress: Progress
) -> dict[str, Any]:
    """Completions for `problems` written to `path`; the checkpoint and the sampling, for the summary."""
    from llmctl.config import GenerationConfig
    from llmctl.eval.generation import generate_completions, sampling_summary, write_completions
    from llmctl.eval.results import describe_checkpoint
    from llmctl.generate import load_engine, override_generation

    flags = {
        "temperature": run.temperature,
        "top_p": run.top_p,
        "max_new_tokens": run.max_new_tokens,
        "seed": run.seed,
        "stop": list(STOP_SEQUENCES),
    }
    config = override_generation(GenerationConfig(), flags)  # bad flags fail before the model loads
    loaded = load_engine(workspace, run.model, run.device, run.dtype)
    progress.note(
        f"generating {run.n_samples} completion{'s' * (run.n_samples > 1)} for each of {len(problems)} "
        f"problems with {loaded.path}"
    )
    generated = generate_completions(
        loaded.engine,
        [problem.prompt for problem in problems],
        config,
        n_samples=run.n_samples,
        batch_size=run.batch_size,
        stop_sequences=config.stop,
        on_progress=progress.generated,
    )
    write_completions(path, [problem.task_id for problem in problems], generated)
    return {
        **describe_checkpoint(workspace, run.model, loaded.path),
        "generation": {
            **sampling_summary(config, run.n_samples, run.batch_size, generated),
            "dtype": loaded.engine.dtype,
        },
    }


def _new_eval_dir(evals: Path) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    directory, suffix = evals / f"humaneval-{stamp}", 2
    while directory.exists():
        directory, suffix = evals / f"humaneval-{stamp}-{suffix}", suffix + 1
    return directory


def _check_writable(directory: Path) -> None:
    """Refuse, before generating or running anything, an output directory that cannot be written,
    or one holding files of someone else's that the results would overwrite. Nothing is created
    here: a run refused later for another reason leaves nothing behind."""
    if directory.exists() and not directory.is_dir():
        raise UsageError(f"--out '{directory}' is a file; give a directory for the results")
    if directory.is_dir() and any(directory.iterdir()) and not (directory / RESULTS_MARKER).is_file():
        raise UsageError(
            f"--out '{directory}' holds other files that the results (summary.json, problems.jsonl, "
            "completions.jsonl) could overwrite; give a new or empty directory, or an earlier eval's"
        )
    existing = next(parent for parent in [directory, *directory.parents] if parent.exists())
    if not existing.is_dir():
        raise UsageError(f"cannot create '{directory}': '{existing}' is a file; give --out a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(
            f"cannot write the results to '{directory}' ('{existing}' is not writable); "
            "give --out a writable directory"
        )
