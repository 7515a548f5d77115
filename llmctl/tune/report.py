"""A study as people and programs read it: its trials as rows, its best trial, the importance of
each parameter, and the best values as a config file any command takes. No torch here."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import yaml

from llmctl.errors import UsageError
from llmctl.monitor import units


def question(study) -> dict[str, Any]:
    return study.user_attrs.get("question") or {}


def objective_name(study) -> str:
    return question(study).get("objective", "value")


def _state(trial) -> str:
    return trial.state.name.lower()


def _duration(trial) -> float | None:
    if trial.datetime_start and trial.datetime_complete:
        return (trial.datetime_complete - trial.datetime_start).total_seconds()
    return None


def trial_row(trial) -> dict[str, Any]:
    """One trial as plain figures: its value, or for a pruned one its last evaluation."""
    intermediate = trial.intermediate_values
    last_step = max(intermediate) if intermediate else None
    return {
        "number": trial.number,
        "state": _state(trial),
        "value": trial.value if trial.values else None,
        "last_reported": intermediate[last_step] if last_step is not None else None,
        "last_step": last_step,
        "params": dict(trial.params),
        "run": trial.user_attrs.get("run"),
        "end_reason": trial.user_attrs.get("end_reason"),
        "retry_of": trial.system_attrs.get("failed_trial"),
        "duration_s": _duration(trial),
        "host": trial.user_attrs.get("host"),
    }


def describe_value(value: Any) -> str:
    if isinstance(value, float):
        return units.rate(value) if value and (abs(value) < 1e-2 or abs(value) >= 1e3) else f"{value:.4g}"
    return str(value)


def describe_params(params: dict[str, Any]) -> str:
    return " ".join(f"{key}={describe_value(value)}" for key, value in params.items())


def describe_trial(trial, objective: str) -> str:
    """One line for a trial that ended: what it tried and what came of it."""
    row = trial_row(trial)
    what = f"trial {row['number']} · {describe_params(row['params'])}"
    took = f" · {units.duration(row['duration_s'])}" if row["duration_s"] is not None else ""
    if row["state"] == "complete":
        return f"{what} · {objective} {units.figure(row['value'])}{took}"
    if row["state"] == "pruned":
        at = f" at step {row['last_step']:,} ({objective} {units.figure(row['last_reported'])})"
        return f"{what} · pruned{at if row['last_step'] is not None else ''}{took}"
    message = trial.user_attrs.get("failure") or row["end_reason"] or "its process died"
    return f"{what} · failed: {message}{took}"


def best(study) -> dict[str, Any] | None:
    """The best complete trial, or None while there is none."""
    from optuna.trial import TrialState

    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return None
    return trial_row(study.best_trial)


def importances(study) -> dict[str, float] | None:
    """How much each parameter moved the objective (Optuna's PED-ANOVA, which needs no scikit-learn);
    None until enough trials completed to say."""
    from optuna.importance import PedAnovaImportanceEvaluator, get_param_importances
    from optuna.trial import TrialState

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(complete) < 3 or not complete[0].params:
        return None
    try:
        found = get_param_importances(study, evaluator=PedAnovaImportanceEvaluator())
    except (ValueError, RuntimeError, ZeroDivisionError):
        return None
    return {key: float(value) for key, value in found.items() if math.isfinite(value)} or None


def study_document(study) -> dict[str, Any]:
    from llmctl.tune.study import counts

    tally = counts(study)
    return {
        "study": study.study_name,
        **question(study),
        "direction": study.direction.name.lower(),
        "counts": {
            "done": tally.done,
            "running": tally.running,
            "complete": tally.complete,
            "pruned": tally.pruned,
            "failed": tally.failed,
        },
        "trials": [trial_row(trial) for trial in study.get_trials(deepcopy=False)],
        "best": best(study),
        "importances": importances(study),
    }


def nested(values: dict[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for key, value in values.items():
        section, _, name = key.partition(".")
        tree.setdefault(section, {})[name] = value
    return tree


def best_config(study) -> str:
    """The best trial's values as a YAML config (`--config best.yaml` for any command), with a header
    saying where they came from and what else the trials ran with."""
    found = best(study)
    if found is None:
        raise UsageError(f"study '{study.study_name}' has no complete trial yet; nothing is best")
    base = study.user_attrs.get("base") or {}
    header = [
        f"# the best trial of study '{study.study_name}': trial {found['number']}, "
        f"{objective_name(study)} {units.figure(found['value'])} (run {found['run']})",
        "# written by llmctl tune best; the trials also ran with: " + (base.get("command") or "-"),
    ]
    body = yaml.safe_dump(nested(found["params"]), sort_keys=False)
    return "\n".join(header) + "\n" + body


def write_file(path: Path, text: str) -> None:
    """Write under a temporary name and rename into place: never a half-written config."""
    path = Path(path)
    staged = path.with_name(f".{path.name}.tmp")
    staged.write_text(text, encoding="utf-8")
    os.replace(staged, path)


def study_summaries(storage) -> list[dict[str, Any]]:
    """Every study in a storage, in a line each."""
    import optuna

    rows = []
    for summary in optuna.get_all_study_summaries(storage, include_best_trial=True):
        asked = summary.user_attrs.get("question") or {}
        rows.append(
            {
                "study": summary.study_name,
                "stage": asked.get("stage"),
                "objective": asked.get("objective"),
                "direction": summary.direction.name.lower(),
                "trials": summary.n_trials,
                "best": summary.best_trial.value if summary.best_trial else None,
            }
        )
    return rows
