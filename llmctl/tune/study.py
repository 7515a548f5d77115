"""A study as tune runs it: created, or joined by a process asking the same question; its samplers
and pruners (Optuna's); how many trials it holds; and the trials whose process died, failed with
their retry queued and their run ended, so nothing is left looking alive. No torch here."""

from __future__ import annotations

import os
import socket
import time
from dataclasses import asdict, dataclass
from typing import Any

from llmctl.errors import UsageError
from llmctl.events import EndReason, EventWriter, read_events
from llmctl.monitor.state import LOST_AFTER_S, process_alive
from llmctl.tune.space import Space
from llmctl.workspace import EVENTS_FILE, Workspace

SAMPLERS = ("tpe", "random", "grid")
PRUNERS = ("median", "hyperband", "none")


@dataclass(frozen=True)
class Question:
    """What a study asks; every process joining it must ask the same."""

    stage: str
    objective: str
    direction: str  # 'minimize' or 'maximize'
    space: tuple[str, ...]  # the --param specs


def default_direction(objective: str) -> str:
    return "maximize" if "accuracy" in objective else "minimize"


def make_sampler(kind: str, space: Space, seed: int | None, startup_trials: int):
    import optuna

    if kind == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup_trials)
    if kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if kind == "grid":
        return optuna.samplers.GridSampler(space.grid(), seed=seed)
    raise UsageError(f"unknown --sampler '{kind}'; choose one of: {', '.join(SAMPLERS)}")


def make_pruner(kind: str, startup_trials: int, first_eval_step: int):
    """Pruners judge a trial on the evaluations it reported, at the steps it reported them."""
    import optuna

    if kind == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=startup_trials)
    if kind == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=first_eval_step)
    if kind == "none":
        return optuna.pruners.NopPruner()
    raise UsageError(f"unknown --pruner '{kind}'; choose one of: {', '.join(PRUNERS)}")


def open_study(storage, name: str, question: Question, sampler, pruner):
    """Create the study, or join it when it exists and asks the same question."""
    import optuna

    study = optuna.create_study(
        study_name=name,
        storage=storage,
        direction=question.direction,
        sampler=sampler,
        pruner=pruner,
        load_if_exists=True,
    )
    asked = study.user_attrs.get("question")
    if asked is None:
        study.set_user_attr("question", asdict(question) | {"space": list(question.space)})
        return study
    mine = asdict(question) | {"space": list(question.space)}
    for field, theirs in asked.items():
        if mine.get(field) != theirs:
            raise UsageError(
                f"study '{name}' has {field} {_said(theirs)}, not {_said(mine.get(field))}; join it with "
                "the same --stage, --objective, --direction and --param, or choose another --study"
            )
    return study


def _said(value: Any) -> str:
    return " ".join(value) if isinstance(value, list) else str(value)


# ---------------------------------------------------------------- counting


@dataclass(frozen=True)
class Counts:
    done: int  # trials that ended (complete, pruned, or failed and not retried)
    running: int
    complete: int
    pruned: int
    failed: int


def counts(study) -> Counts:
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    retried = {number for trial in trials for number in trial.system_attrs.get("retry_history", [])}
    states = [trial.state for trial in trials]
    failed = [t for t in trials if t.state == TrialState.FAIL and t.number not in retried]
    complete, pruned = states.count(TrialState.COMPLETE), states.count(TrialState.PRUNED)
    return Counts(
        complete + pruned + len(failed), states.count(TrialState.RUNNING), complete, pruned, len(failed)
    )


# ---------------------------------------------------------------- trials whose process died


def trial_attrs(workspace: Workspace, run: str) -> dict[str, Any]:
    """What a trial records about where it runs, so a later process can tell whether it died."""
    return {"run": run, "pid": os.getpid(), "host": socket.gethostname(), "workspace": str(workspace.root)}


def retry_once(study, trial) -> None:
    """Queue the trial again with the same parameters, once (Optuna's own retry of stale trials)."""
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    RetryHeartbeatStaleTrialCallback(max_retry=1)(study, trial)


def settle_dead_trials(study, storage, workspace: Workspace, settled: set[int]) -> list[int]:
    """Fail the running trials whose process on this machine has died, queueing each one's retry
    (Optuna's heartbeat does the same, later, for other machines), and end the runs of this
    workspace's failed trials that their process left without an end. Returns the trials failed."""
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    failed = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        attrs = trial.user_attrs
        if attrs.get("host") != socket.gethostname() or attrs.get("pid") in (None, os.getpid()):
            continue
        started = trial.datetime_start.timestamp() if trial.datetime_start else None
        if process_alive(attrs["pid"], attrs["host"], started) is not False:
            continue
        try:
            storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
        except UpdateFinishedTrialError:
            continue  # another process of the study settled it first
        retry_once(study, storage.get_trial(trial._trial_id))
        failed.append(trial.number)
    for trial in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)):
        attrs = trial.user_attrs
        if trial.number in settled or attrs.get("workspace") != str(workspace.root) or "run" not in attrs:
            continue
        if end_dead_run(workspace, attrs["run"], trial.number, attrs.get("host")):
            settled.add(trial.number)
    return failed


def end_dead_run(workspace: Workspace, run: str, number: int, host: str | None) -> bool:
    """Give a run its trial's process left without an end an `end` event and registry end reason
    (error), so status, monitor and the page show it failed; False while it may still be alive."""
    log = workspace.run_dir(run) / EVENTS_FILE
    events = read_events(log) if log.is_file() else []
    registry = workspace.registry()
    if not events:  # it died before its run started training: the row alone says it ended
        if registry.run(run) is not None and registry.run(run)["meta"].get("end_reason") is None:
            registry.update_run_meta(run, end_reason=EndReason.ERROR)
        return True
    if any(event["event"] == "end" for event in events):
        return True
    last = events[-1]
    if host != socket.gethostname() and time.time() - last["ts"] < LOST_AFTER_S:
        return False  # another machine's trial: failed by its silence, but give its log the same grace
    with EventWriter(log) as writer:
        writer.write(
            "end",
            last["step"],
            reason=EndReason.ERROR,
            message=f"trial {number}'s process died (killed or lost) at step {last['step']:,}; "
            "llmctl tune marked it failed",
        )
    if registry.run(run) is not None:
        registry.update_run_meta(run, end_reason=EndReason.ERROR)
    return True
