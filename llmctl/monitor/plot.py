"""Curves of one or more runs as a PNG: loss, validation perplexity and learning rate; and for a
preference stage (dpo), its preference accuracy."""

from __future__ import annotations

from pathlib import Path

from llmctl.errors import LlmctlError
from llmctl.monitor.series import Series
from llmctl.monitor.state import RunState
from llmctl.monitor.watch import RunWatch

HISTORY_POINTS = 4096  # per curve: more than a figure's width in pixels
SMOOTHING_WINDOW = 0.02  # of the points: the train loss is drawn raw (faint) and smoothed


def _smoothed(values: list[float]) -> list[float]:
    """A centred moving average, so the smoothed line does not lag the raw one."""
    half = max(1, int(len(values) * SMOOTHING_WINDOW)) // 2
    sums = [0.0]
    for value in values:
        sums.append(sums[-1] + value)
    out = []
    for i in range(len(values)):
        lo, hi = max(0, i - half), min(len(values), i + half + 1)
        out.append((sums[hi] - sums[lo]) / (hi - lo))
    return out


def read_run(log: Path) -> RunState:
    watch = RunWatch(log, history_points=HISTORY_POINTS)
    watch.refresh()
    return watch.state


def plot_runs(logs: dict[str, Path], out: Path) -> Path:
    """Draw every run in `logs` (name -> events.jsonl) on one figure and save it to `out`."""
    try:
        import matplotlib
    except ImportError as exc:
        raise LlmctlError("llmctl plot needs matplotlib: pip install matplotlib") from exc
    matplotlib.use("Agg")
    from matplotlib import pyplot

    states = {name: read_run(log) for name, log in logs.items()}
    empty = [name for name, state in states.items() if not len(state.train_loss) and not len(state.val_loss)]
    if len(empty) == len(states):
        raise LlmctlError(
            f"nothing to plot: no train or eval events yet in {', '.join(str(p) for p in logs.values())}"
        )

    # a preference stage (dpo) gets a panel of its preference accuracy; its exp(loss) is no perplexity
    preference = any(len(s.preference_accuracy) or len(s.val_preference_accuracy) for s in states.values())
    ratios = [3, 2, 1.4] + [2] * preference
    figure, (loss_ax, ppl_ax, lr_ax, *pref_ax) = pyplot.subplots(
        len(ratios),
        1,
        figsize=(10, 9.5 + 3 * preference),
        sharex=True,
        gridspec_kw={"height_ratios": ratios},
        layout="constrained",
    )
    colors = pyplot.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (name, state) in enumerate(states.items()):
        color = colors[i % len(colors)]
        label = name + (f" ({state.preset})" if state.preset else "")
        train = state.train_loss.points()
        if train:
            steps, losses = zip(*train, strict=True)
            loss_ax.plot(steps, losses, color=color, alpha=0.25, linewidth=0.8)
            loss_ax.plot(steps, _smoothed(list(losses)), color=color, linewidth=1.6, label=f"{label} train")
        val = state.val_loss.points()
        if val:
            steps, losses = zip(*val, strict=True)
            loss_ax.plot(
                steps,
                losses,
                color=color,
                linestyle="--",
                marker="o",
                markersize=3.5,
                linewidth=1.3,
                label=f"{label} val",
            )
        ppl = [] if len(state.val_preference_accuracy) else state.val_ppl.points()
        if pref_ax:
            _preference_curves(pref_ax[0], state, color, label)
        if ppl:
            steps, values = zip(*ppl, strict=True)
            best = state.best_eval if state.best_eval and "val_ppl" in state.best_eval else None
            best_note = f" · best {best['val_ppl']:.4g} at step {best['step']:,}" if best else ""
            ppl_ax.plot(
                steps, values, color=color, marker="o", markersize=3.5, linewidth=1.3, label=label + best_note
            )
            if best:
                ppl_ax.plot(
                    [best["step"]],
                    [best["val_ppl"]],
                    color=color,
                    marker="*",
                    markersize=13,
                    markeredgecolor="black",
                    markeredgewidth=0.6,
                    linestyle="none",
                )
        lr = state.lr.points()
        if lr:
            steps, rates = zip(*lr, strict=True)
            lr_ax.plot(steps, rates, color=color, linewidth=1.4, label=label)

    _frame(loss_ax, [s for state in states.values() for s in (state.train_loss, state.val_loss)])
    _frame(ppl_ax, [state.val_ppl for state in states.values()])
    loss_ax.set_ylabel("loss (nats/token)")
    loss_ax.set_title("loss: train (smoothed over the raw curve) and validation", loc="left", fontsize=10)
    ppl_ax.set_ylabel("val perplexity")
    lr_ax.set_ylabel("learning rate")
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    (pref_ax or [lr_ax])[-1].set_xlabel("step")
    if pref_ax:
        pref_ax[0].set_ylabel("preference accuracy")
        pref_ax[0].set_ylim(-0.02, 1.02)
        pref_ax[0].set_title(
            "share of pairs whose chosen reply wins: train and validation", loc="left", fontsize=10
        )
    for ax in (loss_ax, ppl_ax, lr_ax, *pref_ax):
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="best")
    figure.suptitle(" vs ".join(states) if len(states) > 1 else next(iter(states)), fontsize=12)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=110)
    pyplot.close(figure)
    return out


def _preference_curves(ax, state: RunState, color: str, label: str) -> None:
    train = state.preference_accuracy.points()
    if train:
        steps, values = zip(*train, strict=True)
        ax.plot(steps, values, color=color, alpha=0.25, linewidth=0.8)
        ax.plot(steps, _smoothed(list(values)), color=color, linewidth=1.6, label=f"{label} train")
    val = state.val_preference_accuracy.points()
    if val:
        steps, values = zip(*val, strict=True)
        ax.plot(steps, values, color=color, linestyle="--", marker="o", markersize=3.5, label=f"{label} val")


def _frame(ax, curves: list[Series]) -> None:
    """Frame the y axis where the curves spend the run: a fresh model's first losses (ln of the
    vocabulary, 9 or so) and perplexities (thousands) would otherwise flatten everything after."""
    later = []
    for curve in curves:
        points = curve.points()
        if points:
            cut = points[0][0] + 0.1 * (points[-1][0] - points[0][0])
            later += [value for step, value in points if step >= cut]
    if later:
        low, high = min(later), max(later)
        margin = 0.08 * (high - low or abs(high) or 1.0)
        ax.set_ylim(low - margin, high + margin * 4)
