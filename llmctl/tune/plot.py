"""`tune show --plot`: a study on one PNG. The optimisation history (each trial's objective and the
best so far), every trial's evaluations over its steps (where the pruned ones stopped), the
parameters in parallel coordinates coloured by the objective, and their importances."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from llmctl.errors import UsageError

STYLE = {"complete": ("o", "tab:blue"), "pruned": ("x", "tab:orange"), "fail": ("v", "tab:red")}


def plot_study(doc: dict[str, Any], study, out: Path) -> Path:
    """Draw the study (`doc` as report.study_document gives it; `study` for the evaluations)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    trials = [trial for trial in doc["trials"] if trial["state"] in STYLE]
    if not any(trial["value"] is not None or trial["last_reported"] is not None for trial in trials):
        raise UsageError(f"nothing to plot: no trial of study '{doc['study']}' has evaluated yet")
    objective = doc.get("objective", "value")
    figure, axes = pyplot.subplots(2, 2, figsize=(13, 9), layout="constrained")
    figure.suptitle(
        f"study {doc['study']} · {doc.get('stage', '')} · {doc['direction']} {objective}", fontsize=13
    )
    _history(axes[0][0], doc, trials, objective)
    _curves(axes[0][1], study, objective)
    _parallel(figure, axes[1][0], doc, objective)
    _importances(axes[1][1], doc)
    out.parent.mkdir(parents=True, exist_ok=True)
    staged = out.with_name(f".{out.name}.tmp.png")
    figure.savefig(staged, dpi=110)
    pyplot.close(figure)
    staged.replace(out)
    return out


def _history(ax, doc: dict[str, Any], trials: list[dict[str, Any]], objective: str) -> None:
    better = min if doc["direction"] == "minimize" else max
    for state, (marker, color) in STYLE.items():
        points = [
            (trial["number"], trial["value"] if state == "complete" else trial["last_reported"])
            for trial in trials
            if trial["state"] == state
        ]
        points = [(n, v) for n, v in points if v is not None and math.isfinite(v)]
        if points:
            label = {"complete": "complete", "pruned": "pruned (last evaluation)", "fail": "failed"}[state]
            ax.scatter(*zip(*points, strict=True), marker=marker, color=color, label=label, zorder=3)
    complete = sorted(
        (t["number"], t["value"]) for t in trials if t["state"] == "complete" and t["value"] is not None
    )
    if complete:
        steps, best, running = [], [], None
        for number, value in complete:
            running = value if running is None else better(running, value)
            steps.append(number)
            best.append(running)
        ax.step(steps, best, where="post", color="tab:green", label="best so far")
    ax.set(title="optimisation history", xlabel="trial", ylabel=objective)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def _curves(ax, study, objective: str) -> None:
    for trial in study.get_trials(deepcopy=False):
        values = sorted(trial.intermediate_values.items())
        if not values:
            continue
        state = trial.state.name.lower()
        marker, color = STYLE.get(state, ("", "grey"))
        steps, figures = zip(*values, strict=True)
        ax.plot(steps, figures, color=color, alpha=0.6, linewidth=1)
        ax.scatter(steps[-1:], figures[-1:], marker=marker, color=color, s=18, zorder=3)
    ax.set(title="evaluations of each trial (pruned: orange ×)", xlabel="step", ylabel=objective)
    ax.grid(alpha=0.3)


def _parallel(figure, ax, doc: dict[str, Any], objective: str) -> None:
    """One axis for the objective, then one per parameter, each scaled to its own range; a trial is
    a line through its values, coloured by its objective (the best ones drawn last, on top)."""
    complete = [t for t in doc["trials"] if t["state"] == "complete" and t["value"] is not None]
    keys = list(dict.fromkeys(key for trial in complete for key in trial["params"]))
    ax.set_title("the complete trials in parallel coordinates")
    if not complete:
        ax.text(0.5, 0.5, "no complete trial yet", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return
    from matplotlib import cm, colors

    values = [t["value"] for t in complete]
    norm = colors.Normalize(min(values), max(values))
    cmap = cm.viridis if doc["direction"] == "maximize" else cm.viridis_r
    columns = [objective, *keys]
    scales = [Scale(values), *(Scale([t["params"].get(key) for t in complete]) for key in keys)]
    for trial in sorted(complete, key=lambda t: t["value"], reverse=doc["direction"] == "minimize"):
        row = [trial["value"], *(trial["params"].get(key) for key in keys)]
        ys = [scale(value) for scale, value in zip(scales, row, strict=True)]
        ax.plot(
            range(len(columns)), ys, color=cmap(norm(trial["value"])), alpha=0.85, linewidth=1.5, marker="."
        )
    ax.set_xticks(range(len(columns)), columns, fontsize=8)
    ax.set_yticks([])
    for i, scale in enumerate(scales):
        ax.axvline(i, color="grey", linewidth=0.8)
        ax.text(i, -0.04, scale.low, ha="center", va="top", fontsize=7)
        ax.text(i, 1.04, scale.high, ha="center", va="bottom", fontsize=7)
    ax.set_ylim(-0.12, 1.12)
    ax.set_xlim(-0.3, len(columns) - 0.7)
    figure.colorbar(cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, label=objective)


class Scale:
    """A column's values mapped to [0, 1]: numbers linearly (or in their logarithm when they span a
    decade or more), other values by their order."""

    def __init__(self, values: list[Any]):
        numbers = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
        self.numeric = len(numbers) == len(values)
        if self.numeric:
            lo, hi = min(numbers), max(numbers)
            self.log = lo > 0 and hi / lo >= 10
            self.lo, self.hi = (math.log(lo), math.log(hi)) if self.log else (lo, hi)
            self.low, self.high = _label(lo), _label(hi)
        else:
            self.order = sorted(set(map(str, values)))
            self.low, self.high = self.order[0], self.order[-1]

    def __call__(self, value: Any) -> float:
        if not self.numeric:
            return self.order.index(str(value)) / max(1, len(self.order) - 1)
        x = math.log(value) if self.log else value
        return 0.5 if self.hi == self.lo else (x - self.lo) / (self.hi - self.lo)


def _label(value: float) -> str:
    return f"{value:.3g}"


def _importances(ax, doc: dict[str, Any]) -> None:
    ax.set_title("parameter importance (PED-ANOVA)")
    found = doc["importances"]
    if not found:
        ax.text(0.5, 0.5, "needs 3 complete trials", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return
    keys = list(found)[::-1]
    ax.barh(keys, [found[key] for key in keys], color="tab:blue")
    ax.set_xlabel("importance")
    ax.grid(axis="x", alpha=0.3)
