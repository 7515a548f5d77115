"""A run's directory and registry row: the part every stage (pretrain, finetune, qlora, merge) shares."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmctl.checkpoint.files import select_resume_checkpoint
from llmctl.config import RunConfig
from llmctl.errors import UsageError
from llmctl.workspace import RUN_CONFIG, Workspace


@dataclass
class RunOptions:
    """What every training command's line asks for; None means 'not given'."""

    run: str | None = None
    preset: str | None = None
    config_file: Path | None = None
    overrides: list[str] = field(default_factory=list)
    max_steps: int | None = None
    max_time: str | None = None
    max_tokens: int | None = None
    precision: str | None = None
    resume: bool = False
    overwrite: bool = False
    force: bool = False
    fallback: bool = False
    report_to: str | None = None  # trackers, comma-separated: the flag's text, parsed by the config


def check_run_name(
    workspace: Workspace, run: str, options: RunOptions, warn: Callable[[str], None] | None = None
) -> Path | None:
    """The checkpoint to resume from, or None for a new run.

    A resumed run must exist with a readable checkpoint; a new one must not exist unless it is to
    be overwritten.
    """
    run_dir = workspace.run_dir(run)
    if options.resume:
        return select_resume_checkpoint(run_dir, options.fallback, warn or (lambda message: None))
    registered = workspace.registry(create=False).run(run) is not None
    if (run_dir.exists() or registered) and not options.overwrite:
        raise UsageError(
            f"run '{run}' already exists; continue it with --resume, or start it over with --overwrite"
        )
    return None


def open_run(
    workspace: Workspace,
    run: str,
    stage: str,
    config: RunConfig,
    meta: dict[str, Any],
    *,
    resuming: bool,
    overwrite: bool,
    corpus: str | None = None,
    tokenizer: str | None = None,
    base_checkpoint: int | None = None,
) -> Path:
    """runs/<run>/ with its config.yaml, and the run's registry row (refreshed when resuming)."""
    registry = workspace.registry()
    run_dir = workspace.run_dir(run)
    if not resuming and overwrite:
        discard_run(workspace, run)
    run_dir.mkdir(parents=True, exist_ok=True)
    staged = run_dir / f".{RUN_CONFIG}.tmp"
    staged.write_text(config.to_yaml(), encoding="utf-8")
    staged.replace(run_dir / RUN_CONFIG)
    if resuming:
        registry.update_run_meta(run, **meta, end_reason=None)
    else:
        registry.add_run(
            run,
            stage,
            run_dir,
            corpus=corpus,
            tokenizer=tokenizer,
            base_checkpoint=base_checkpoint,
            meta=meta,
        )
    return run_dir


def discard_run(workspace: Workspace, run: str) -> None:
    """Remove a run's registry rows and its directory. The directory is renamed first, so a crash
    mid-delete never leaves a partial run under the run's name."""
    workspace.registry().remove_run(run)
    run_dir = workspace.run_dir(run)
    if run_dir.exists():
        retired = run_dir.with_name(f".old-{run_dir.name}-{int(time.time())}")
        run_dir.rename(retired)
        shutil.rmtree(retired, ignore_errors=True)
