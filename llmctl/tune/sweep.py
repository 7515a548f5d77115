"""A sweep: the search space and the stage checked before any trial, the study opened (created, or
joined by the same question), then trials until the study holds its count. A study survives its
process: the same command again fails the trials a dead process left running, queues each once
more, and goes on. Several processes (`--jobs`, other terminals, other machines on one --storage)
share the study through Optuna's storage, which hands each its own trial numbers."""

from __future__ import annotations

import contextlib
import math
import shlex
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console

from llmctl.errors import UsageError
from llmctl.train import stages
from llmctl.train.recipe import Plan
from llmctl.train.runs import RunOptions
from llmctl.tune import report, space, storage
from llmctl.tune.study import (
    Question,
    counts,
    default_direction,
    make_pruner,
    make_sampler,
    open_study,
    retry_once,
    settle_dead_trials,
)
from llmctl.tune.trial import TrialFailed, TrialInterrupted, TrialRunner
from llmctl.workspace import Workspace, check_name

Report = Callable[[str], None]
DIRECTIONS = ("minimize", "maximize")
STUDY_NAME_MAX = 90  # a trial's run is STUDY-tNNN, and run names hold 100 characters


@dataclass
class SweepRequest:
    """What `llmctl tune` was asked; None means 'not given'."""

    study: str
    stage: str = "pretrain"
    inputs: dict[str, Any] = field(default_factory=dict)  # corpus, tokenizer, model, data, task
    preset: str | None = None
    config_file: Path | None = None
    overrides: list[str] = field(default_factory=list)
    params: list[str] = field(default_factory=list)
    objective: str = "val_loss"
    direction: str | None = None
    trials: int = 20
    trial_time: str | None = None
    trial_steps: int | None = None
    trial_tokens: int | None = None
    precision: str | None = None
    force: bool = False
    sampler: str = "tpe"
    seed: int | None = None
    pruner: str = "median"
    startup_trials: int = 5
    baseline: bool = False
    storage: str | None = None


@dataclass
class Sweep:
    """A request checked whole: its stage, space, question and the plan of its first trial."""

    request: SweepRequest
    stage: stages.Stage
    space: space.Space
    config_file: Path | None  # the --config without its search: block
    question: Question
    storage_url: str
    base: Plan | None = None  # the plan with the config's own values: what --dry-run shows

    def options(self, run: str, values: dict[str, Any]) -> RunOptions:
        request = self.request
        return self.stage.options(
            request.inputs,
            run=run,
            preset=request.preset,
            config_file=self.config_file,
            overrides=[*request.overrides, *space.overrides(values)],
            max_steps=request.trial_steps,
            max_time=request.trial_time,
            max_tokens=request.trial_tokens,
            precision=request.precision,
            force=request.force,
        )

    @property
    def trials(self) -> int:
        """The trials the study runs to: a grid ends when every point ran."""
        if self.request.sampler == "grid":
            return min(self.request.trials, self.space.size())
        return self.request.trials

    def plan(self, workspace: Workspace, run: str, values: dict[str, Any], warn=None) -> Plan:
        return self.stage.plan(workspace, self.options(run, values), warn)

    def command(self) -> str:
        """What every trial runs with besides its values, as flags (for the best config's header)."""
        request = self.request
        parts = [f"--stage {request.stage}"]
        parts += [f"--{key} {value}" for key, value in request.inputs.items() if value is not None]
        parts += [f"--preset {request.preset}"] if request.preset else []
        parts += [f"--set {shlex.quote(assignment)}" for assignment in request.overrides]
        budget = {"--max-time": request.trial_time, "--max-steps": request.trial_steps}
        budget["--max-tokens"] = request.trial_tokens
        parts += [f"{flag} {value}" for flag, value in budget.items() if value is not None]
        return " ".join(parts)


@contextlib.contextmanager
def prepared(workspace: Workspace, request: SweepRequest, warn=None) -> Iterator[Sweep]:
    """Check everything before any trial (no study is created here): the names, the space against
    the config model and the stage (each bound and choice planned), the objective, the sampler."""
    storage.quiet_optuna()
    check_name(request.study, "study")
    if len(request.study) > STUDY_NAME_MAX:
        raise UsageError(
            f"--study '{request.study}' is too long: trial runs add to it; use {STUDY_NAME_MAX} or fewer"
        )
    if request.trials < 1:
        raise UsageError("--trials must be at least 1")
    found, rest = space.build_space(request.params, request.config_file)
    stage = stages.stage(request.stage)
    with tempfile.TemporaryDirectory(prefix="llmctl-tune-") as scratch:
        config_file = request.config_file
        if rest is not None:  # the file's settings without its search: block, which no stage reads
            config_file = Path(scratch) / "config.yaml"
            config_file.write_text(yaml.safe_dump(rest, sort_keys=False), encoding="utf-8")
        direction = request.direction or default_direction(request.objective)
        if direction not in DIRECTIONS:
            raise UsageError(f"unknown --direction '{direction}'; use minimize or maximize")
        sweep = Sweep(
            request,
            stage,
            found,
            config_file,
            Question(stage.name, request.objective, direction, tuple(sorted(found.specs))),
            storage.storage_url(workspace, request.storage),
        )
        _check_objective(sweep)
        make_sampler(request.sampler, found, request.seed, request.startup_trials)
        make_pruner(request.pruner, request.startup_trials, 1)
        if request.sampler == "grid" and request.trials > found.size():
            warn and warn(f"the grid holds {found.size()} points: the study ends at {found.size()} trials")
        sweep.base = _check_plans(workspace, sweep, warn)
        if request.baseline:
            _baseline(sweep)
        yield sweep


def _check_objective(sweep: Sweep) -> None:
    figures = sweep.stage.figures(sweep.options(f"{sweep.request.study}-check", {}))
    if sweep.request.objective not in figures:
        raise UsageError(
            f"--objective {sweep.request.objective}: no evaluation of the {sweep.stage.name} stage "
            f"produces it; its evaluations give {', '.join(figures)}"
        )


def _check_plans(workspace: Workspace, sweep: Sweep, warn) -> Plan:
    """Plan a trial with the config's own values, then one per bound and choice of each key: a value
    the config or the stage refuses, or that a flag or the stage would override, is named now."""
    run = f"{sweep.request.study}-check"
    base = sweep.plan(workspace, run, {}, warn)
    for param in sweep.space.params:
        for value in param.check_values():
            try:
                plan = sweep.plan(workspace, run, {param.key: value})
            except UsageError as exc:
                raise UsageError(f"--param {param.spec}: with {param.key}={value}, {exc.message}") from None
            used = config_value(plan.config, param.key)
            if not _same(used, value):
                raise UsageError(
                    f"--param {param.spec}: the trials would not use it — {param.key} stays {used!r} "
                    f"(a flag or the {sweep.stage.name} stage sets it)"
                )
            if (
                param.key.startswith("adapter.")
                and param.key != "adapter.enabled"
                and not plan.config.adapter.enabled
            ):
                raise UsageError(
                    f"--param {param.spec}: the trials train every weight, so adapter settings do "
                    "nothing; add --set adapter.enabled=true, or use --stage qlora"
                )
    return base


def config_value(config, key: str) -> Any:
    section, _, name = key.partition(".")
    return getattr(getattr(config, section), name)


def _same(used: Any, value: Any) -> bool:
    if isinstance(used, float) and isinstance(value, (int, float)) and not isinstance(value, bool):
        return math.isclose(used, value, rel_tol=1e-9)
    return used == value


def _baseline(sweep: Sweep) -> None:
    for param in sweep.space.params:
        own = config_value(sweep.base.config, param.key)
        if not param.contains(own):
            raise UsageError(
                f"--baseline: {param.key}'s own value {own!r} lies outside '{param.spec}'; "
                "widen the range, or drop --baseline"
            )


# ---------------------------------------------------------------- the study and its trials


@dataclass
class SweepResult:
    study: str
    ran: list[int]  # the trials this process ran
    document: dict[str, Any]  # the study as `tune show --json` gives it
    interrupted: int | None = None  # the signal that stopped the sweep


def open_sweep_study(workspace: Workspace, sweep: Sweep):
    """Open the storage and create or join the study; record it in the registry. Returns both."""
    import optuna

    request = sweep.request
    store = storage.open_storage(sweep.storage_url, live=True)
    earlier = workspace.registry().trial_runs(request.study)
    if earlier and request.study not in optuna.get_all_study_names(store):
        raise UsageError(
            f"runs of an earlier study '{request.study}' remain ({earlier[0]['name']}, ...) but the "
            "storage has no such study; choose another --study name"
        )
    study = open_study(
        store,
        request.study,
        sweep.question,
        make_sampler(request.sampler, sweep.space, request.seed, request.startup_trials),
        make_pruner(request.pruner, request.startup_trials, sweep.base.config.train.eval_every),
    )
    if "base" not in study.user_attrs:
        study.set_user_attr("base", {"command": sweep.command()})
    workspace.registry().add_study(
        request.study,
        sweep.stage.name,
        None if request.storage is None else storage.shown(sweep.storage_url),
        {
            **study.user_attrs["question"],
            "sampler": request.sampler,
            "pruner": request.pruner,
            "budget": {
                "time": request.trial_time,
                "steps": request.trial_steps,
                "tokens": request.trial_tokens,
            },
        },
    )
    if request.baseline and not study.get_trials(deepcopy=False):
        values = {param.key: config_value(sweep.base.config, param.key) for param in sweep.space.params}
        study.enqueue_trial(values, user_attrs={"baseline": True}, skip_if_exists=True)
    return store, study


def run_sweep(
    workspace: Workspace,
    sweep: Sweep,
    report_line: Report,
    console: Console | None = None,
    debug: bool = False,
) -> SweepResult:
    """Run trials until the study holds `trials` that ended (with the ones other processes run)."""
    store, study = open_sweep_study(workspace, sweep)
    runner = TrialRunner(
        workspace,
        sweep.request.study,
        lambda run, values: sweep.plan(workspace, run, values, report_line),
        sweep.space.suggest,
        sweep.request.objective,
        console,
        debug,
    )
    objective, settled, ran = sweep.request.objective, set(), []
    while True:
        for number in settle_dead_trials(study, store, workspace, settled):
            report_line(f"trial {number}: its process died; marked failed and queued again")
        tally = counts(study)
        if tally.done + tally.running >= sweep.trials:
            break
        runner.trial_id = None
        try:
            study.optimize(runner, n_trials=1, catch=(TrialFailed,))
        except (TrialInterrupted, KeyboardInterrupt) as stop:
            if runner.trial_id is not None:
                trial = store.get_trial(runner.trial_id)
                retry_once(study, trial)
                ran.append(trial.number)
                report_line(f"trial {trial.number}: interrupted; it runs again when the study goes on")
            signal = stop.signal if isinstance(stop, TrialInterrupted) else 2
            return SweepResult(sweep.request.study, ran, report.study_document(study), signal or 2)
        trial = store.get_trial(runner.trial_id)
        ran.append(trial.number)
        report_line(report.describe_trial(trial, objective))
    return SweepResult(sweep.request.study, ran, report.study_document(study))
