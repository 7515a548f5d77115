"""A run's directory and registry row: the part every stage (pretrain, finetune, qlora, merge) shares."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmctl.checkpoint.files import select_resume_checkpoint
from llmctl.config import RunConfig
from llmctl.errors import UsageError
from llmctl.storage import refuse_if_busy, remove_stale_staging, staging_name
from llmctl.workspace import CHECKPOINTS_DIRNAME, RUN_CONFIG, Workspace, list_checkpoints

log = logging.getLogger("llmctl")


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
    workspace: Workspace,
    run: str,
    options: RunOptions,
    warn: Callable[[str], None] | None = None,
    writer: bool = True,
) -> Path | None:
    """The checkpoint to resume from, or None for a run that starts at step 0.

    A resumed run must exist with a readable checkpoint, or none at all (then it starts again, see
    `starts_over`); a new one must not exist unless it is to be overwritten.
    """
    run_dir = workspace.run_dir(run)
    # the other ranks of a distributed run plan while rank 0, the writer, already holds the lock
    if writer and (options.resume or options.overwrite):
        refuse_if_busy(workspace.root, "run", run, "resuming" if options.resume else "overwriting")
    if options.resume and not list_checkpoints(run_dir):
        log.warning(
            f"run '{run}' has no checkpoint yet (it stopped before its first one): starting it again "
            "from step 0 with its saved config"
        )
        return None
    if options.resume:
        return select_resume_checkpoint(run_dir, options.fallback, warn or (lambda message: None))
    registered = workspace.registry(create=False).run(run) is not None
    if (run_dir.exists() or registered) and not options.overwrite:
        raise UsageError(
            f"run '{run}' already exists; continue it with --resume, or start it over with --overwrite"
        )
    return None


def starts_over(options: RunOptions, resume_from: Path | None) -> bool:
    """Whether the run's directory is replaced as it starts: --overwrite, or --resume of a run
    that never wrote a checkpoint."""
    return options.overwrite or (options.resume and resume_from is None)


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
    remove_stale_staging(run_dir / CHECKPOINTS_DIRNAME)  # checkpoint writes a SIGKILL cut short
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
        retired = run_dir.with_name(staging_name(".old-", run_dir.name))
        run_dir.rename(retired)
        shutil.rmtree(retired, ignore_errors=True)
