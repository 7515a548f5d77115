"""Model references, as every command's `--model REF` accepts them.

    code-base            the run's best checkpoint (lowest val loss; the latest if none was evaluated)
    code-base:best       the same
    code-base:latest     the newest checkpoint
    code-base:step-500   the checkpoint of step 500
    path/to/step-00000500   a checkpoint directory (from any workspace, or copied elsewhere)
    path/to/model-dir    a Hugging Face model directory (config.json, safetensors, tokenizer.json)

Resolution reads only the disk and the registry (no torch), so status and monitor may use it.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path

from llmctl.errors import LlmctlError, UsageError
from llmctl.workspace import Workspace, check_name, checkpoint_step, list_checkpoints, run_dir_of

SELECTORS = ("best", "latest")
META = "meta.json"


def whole_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, directory) of a run's checkpoints that have their meta.json, oldest first."""
    return [(checkpoint_step(path), path) for path in list_checkpoints(run_dir) if (path / META).is_file()]


def _val_loss(path: Path) -> float | None:
    try:
        value = json.loads((path / META).read_text(encoding="utf-8")).get("val_loss")
    except (OSError, ValueError):
        return None
    return float(value) if isinstance(value, (int, float)) else None


def resolve_model_ref(workspace: Workspace, ref: str) -> Path:
    """The checkpoint directory `ref` names, or a one-line error saying what exists instead.

    A bare name that is both a run of the workspace and a directory here is refused rather than
    guessed: `./NAME` says the directory, `NAME:best` the run."""
    as_path = Path(ref).expanduser()
    if as_path.is_dir():
        run = ref.partition(":")[0]
        run_dir = workspace.run_dir(run) if _is_run_name(run) else None
        if run_dir is not None and run_dir.is_dir():
            if as_path.resolve() == run_dir.resolve():  # standing in runs/: the run itself
                return resolve_run_ref(workspace, ref)
            raise UsageError(
                f"'{ref}' names both run '{run}' of the workspace and the directory ./{ref}; "
                f"write ./{ref} for the directory or {run}:best (or :latest, :step-N) for the run"
            )
        return _checkpoint_directory(as_path, ref)
    return resolve_run_ref(workspace, ref)


def _is_run_name(name: str) -> bool:
    try:
        check_name(name, "run")
    except UsageError:
        return False
    return True


def _checkpoint_directory(as_path: Path, ref: str) -> Path:
    if (as_path / META).is_file() and (as_path / "config.yaml").is_file():
        return as_path.resolve()
    if (as_path / "config.json").is_file():  # its model_type is checked when it is read
        if not (as_path / "tokenizer.json").is_file():
            raise UsageError(
                f"'{ref}' is a Hugging Face model directory without a tokenizer.json; llmctl needs "
                "the fast tokenizer's file beside the weights"
            )
        return as_path.resolve()
    raise UsageError(
        f"'{ref}' is a directory but neither an llmctl checkpoint (no meta.json and config.yaml) "
        "nor a Hugging Face model directory (no config.json)"
    )


def resolve_run_ref(workspace: Workspace, ref: str) -> Path:
    """The checkpoint `ref` names as a run reference (RUN, RUN:best, RUN:latest, RUN:step-N) of
    `workspace`, never as a path: what a server resolves for a request's `model`."""
    run, _, selector = ref.partition(":")
    run_dir = workspace.run_dir(run) if _is_run_name(run) else None
    if run_dir is None or not run_dir.is_dir():
        known = [row["name"] for row in workspace.registry(create=False).runs()]
        close = difflib.get_close_matches(run, known, n=1)
        hint = f"did you mean '{close[0]}'?" if close else "llmctl status lists runs"
        raise UsageError(f"no run or checkpoint directory named '{ref}' — {hint}")
    checkpoints = whole_checkpoints(run_dir)
    if not checkpoints:
        raise LlmctlError(f"run '{run}' has no checkpoint yet")
    selector = selector or "best"
    if selector == "latest":
        return checkpoints[-1][1]
    if selector == "best":
        evaluated = [
            (loss, step, path) for step, path in checkpoints if (loss := _val_loss(path)) is not None
        ]
        return min(evaluated)[2] if evaluated else checkpoints[-1][1]
    digits = selector.removeprefix("step-")
    if not (selector.startswith("step-") and digits.isdigit()):
        raise UsageError(f"unknown checkpoint selector '{selector}' in '{ref}'; use best, latest or step-N")
    for step, path in checkpoints:
        if step == int(digits):
            return path
    steps = ", ".join(str(step) for step, _ in checkpoints)
    raise UsageError(f"run '{run}' has no checkpoint at step {int(digits)} (it has steps {steps})")


def other_checkpoints(damaged: Path) -> str:
    """What to load instead of a damaged checkpoint: its run's other checkpoints, newest first."""
    run_dir = run_dir_of(damaged)
    others = (
        [step for step, path in reversed(whole_checkpoints(run_dir)) if path != damaged] if run_dir else []
    )
    if not others:
        return "point --model at another checkpoint"
    names = ", ".join(f"{run_dir.name}:step-{step}" for step in others[:3])
    return f"load another checkpoint of run '{run_dir.name}' ({names})"
