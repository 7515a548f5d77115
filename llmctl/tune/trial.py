"""One trial: a real run of the stage through the recipe core, with the sampled values as `--set`
overrides, registered in the workspace as a trial of its study. Each evaluation is reported to
Optuna, whose pruner may stop the run (its end reason: pruned); the objective is the figure of the
run's last evaluation."""

from __future__ import annotations

import gc
import math
from collections.abc import Callable
from typing import Any

import torch
from rich.console import Console

from llmctl.errors import LlmctlError
from llmctl.events import EndReason, as_float
from llmctl.train import recipe
from llmctl.train.recipe import Plan
from llmctl.train.trainer import Trainer
from llmctl.tune.study import trial_attrs
from llmctl.workspace import Workspace


class TrialFailed(Exception):
    """A trial that could not give a value (its config refused, its run failed): the study goes on."""


class TrialInterrupted(Exception):
    """The run was interrupted by a signal: the sweep stops, and the trial is queued again."""

    def __init__(self, signal: int | None):
        super().__init__("interrupted")
        self.signal = signal


def trial_run_name(study: str, number: int) -> str:
    return f"{study}-t{number:03d}"


class EvalFollower:
    """A Trainer listener: each evaluation's objective figure goes to Optuna as the trial's value at
    that step, and when the pruner says so the run stops after the current step."""

    name = "llmctl tune"  # as the run's alert names a listener that failed

    def __init__(self, trial, objective: str):
        self.trial, self.objective = trial, objective
        self.trainer: Trainer | None = None
        self.last: float | None = None

    def follow(self, trainer: Trainer) -> None:
        self.trainer = trainer

    def __call__(self, record: dict[str, Any]) -> None:
        if record["event"] != "eval":
            return
        value = as_float(record.get(self.objective))
        if value is None or not math.isfinite(value):
            return
        self.last = value
        self.trial.report(value, record["step"])
        if self.trial.should_prune() and self.trainer is not None:
            self.trainer.request_stop(EndReason.PRUNED)


class TrialRunner:
    """The objective Optuna calls: `plan_trial(run, values)` plans the stage's run of a trial, and
    `suggest(trial)` samples its values."""

    def __init__(
        self,
        workspace: Workspace,
        study: str,
        plan_trial: Callable[[str, dict[str, Any]], Plan],
        suggest: Callable[[Any], dict[str, Any]],
        objective: str,
        console: Console | None = None,
        debug: bool = False,
    ):
        self.workspace, self.study, self.plan_trial, self.suggest = workspace, study, plan_trial, suggest
        self.objective, self.console, self.debug = objective, console, debug
        self.trial_id: int | None = None  # the trial running now, or the last one

    def __call__(self, trial) -> float:
        self.trial_id = trial._trial_id
        run = trial_run_name(self.study, trial.number)
        for key, value in trial_attrs(self.workspace, run).items():
            trial.set_user_attr(key, value)
        values = self.suggest(trial)
        try:
            plan = self.plan_trial(run, values)
            result = self._train(trial, plan)
        except LlmctlError as exc:
            self._fail(trial, exc.message)
        except Exception as exc:
            if self.debug:
                raise
            self._fail(trial, f"{type(exc).__name__}: {exc}"[:300])
        finally:
            _release_memory()
        trial.set_user_attr("end_reason", str(result.reason))
        if result.reason is EndReason.PRUNED:
            import optuna

            raise optuna.TrialPruned(f"pruned at step {result.step}")
        if result.reason is EndReason.INTERRUPTED:
            raise TrialInterrupted(result.signal)
        if not result.reason.completed:
            self._fail(trial, f"its run ended with {result.reason} (llmctl status {run})")
        if self._follower.last is None:
            self._fail(trial, f"no evaluation of its run reported {self.objective}")
        return self._follower.last

    def _train(self, trial, plan: Plan):
        self._follower = EvalFollower(trial, self.objective)
        registry = self.workspace.registry()

        def register(started: Plan) -> None:
            registry.update_run_meta(started.run, study=self.study, trial=trial.number)

        return recipe.train(
            self.workspace,
            plan,
            console=self.console,
            on_start=register,
            tracker_group=self.study,
            listeners=[self._follower],
            on_trainer=self._follower.follow,
        )

    @staticmethod
    def _fail(trial, message: str):
        trial.set_user_attr("failure", message)
        raise TrialFailed(message)


def _release_memory() -> None:
    """The next trial builds its own model: give back what this one's left behind."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
