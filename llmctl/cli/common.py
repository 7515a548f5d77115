"""What every command module shares: the workspace, the consoles, JSON output.

Keep this module light: it is imported by `llmctl --help`.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console

from llmctl.events import EndReason

if TYPE_CHECKING:
    from llmctl.train.trainer import TrainResult
    from llmctl.workspace import Workspace


@dataclass
class AppState:
    workspace_path: Path | None = None
    debug: bool = False


state = AppState()

# Every form `--model` accepts (llmctl.checkpoints.resolve_model_ref), in one place so that the
# help of sample, chat, eval, finetune, qlora, export and serve cannot drift apart.
MODEL_REF_HELP = (
    "RUN (its best checkpoint), RUN:best, RUN:latest, RUN:step-N, a checkpoint directory "
    "or a Hugging Face model directory"
)

# Results go to stdout; progress, notes and errors go to stderr so `--json` output stays clean.
out = Console(highlight=False)
err = Console(stderr=True, highlight=False)


def workspace() -> Workspace:
    from llmctl.workspace import Workspace

    return Workspace(state.workspace_path)


def print_json(document: Any) -> None:
    sys.stdout.write(json.dumps(document, indent=2, default=str) + "\n")
    sys.stdout.flush()


def note(message: str) -> None:
    err.print(f"[dim]{message}[/dim]")


def warn(message: str) -> None:
    err.print(f"[yellow]warning:[/yellow] {message}")


def success(message: str) -> None:
    err.print(f"[green]✓[/green] {message}")


def report_result(stage: str, run: str, result: TrainResult) -> None:
    """How a training run ended, with the command that continues an interrupted one."""
    best = f" · best val loss {result.best_val_loss:.4f}" if result.best_val_loss is not None else ""
    where = f" · {result.last_checkpoint}" if result.last_checkpoint else ""
    if result.reason is EndReason.INTERRUPTED:
        warn(
            f"run '{run}' interrupted at step {result.step:,}{where}; continue it with: "
            f"llmctl {stage} --run {run} --resume"
        )
    elif result.exit_code == 0:
        success(f"run '{run}' ended ({result.reason}) at step {result.step:,}{best}{where}")
