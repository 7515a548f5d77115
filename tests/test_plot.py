"""`llmctl plot`: curves of several runs on one PNG."""

from __future__ import annotations

import math
import struct
from pathlib import Path

import pytest

from llmctl.events import EventWriter


def write_run(workspace_dir: Path, run: str, floor: float) -> None:
    with EventWriter(workspace_dir / "runs" / run / "events.jsonl") as writer:
        writer.write("start", 0, run=run, stage="pretrain", preset="cpu-debug", max_steps=400)
        for step in range(10, 410, 10):
            writer.write("train", step, loss=train_loss(floor, step), lr=1e-3 * min(1, step / 50))
            if step % 100 == 0:
                val_loss = train_loss(floor, step) + 0.1
                writer.write(
                    "eval", step, val_loss=val_loss, val_ppl=math.exp(val_loss), val_bpb=val_loss / 2
                )


def png_size(path: Path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", header[16:24])


TRAIN_STEPS = list(range(10, 410, 10))
EVAL_STEPS = [100, 200, 300, 400]


def train_loss(floor: float, step: int) -> float:
    return floor + 6 * math.exp(-step / 80)


@pytest.fixture
def drawn(monkeypatch) -> list:
    """The figures `llmctl plot` saves, kept for their data (matplotlib's own savefig still runs)."""
    from matplotlib.figure import Figure

    figures = []
    save = Figure.savefig

    def keep(figure, *args, **kwargs):
        figures.append(figure)
        return save(figure, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", keep)
    return figures


def lines_by_label(ax) -> dict[str, tuple[list[float], list[float]]]:
    return {
        line.get_label(): (list(line.get_xdata()), list(line.get_ydata()))
        for line in ax.get_lines()
        if not line.get_label().startswith("_")
    }


def test_plot_several_runs_to_one_png(cli, workspace_dir: Path, tmp_path: Path, drawn):
    write_run(workspace_dir, "small", 2.5)
    write_run(workspace_dir, "big", 2.0)
    out = tmp_path / "figures" / "curves.png"
    result = cli("plot", "small", "big", "--out", out)
    assert result.exit_code == 0, result.stderr
    assert result.stdout == "" and "wrote" in result.stderr
    width, height = png_size(out)
    assert width > 800 and height > 800

    (figure,) = drawn
    loss_ax, ppl_ax, lr_ax = figure.axes
    losses, perplexities, rates = lines_by_label(loss_ax), lines_by_label(ppl_ax), lines_by_label(lr_ax)
    for run, floor in (("small", 2.5), ("big", 2.0)):
        label = f"{run} (cpu-debug)"
        # each run's own events, point for point, in its own curves
        steps, values = losses[f"{label} train"]
        assert steps == TRAIN_STEPS
        assert values == pytest.approx([train_loss(floor, s) for s in TRAIN_STEPS])  # 40 points: no smoothing
        steps, values = losses[f"{label} val"]
        val = [train_loss(floor, s) + 0.1 for s in EVAL_STEPS]
        assert steps == EVAL_STEPS and values == pytest.approx(val)
        (ppl_label,) = [name for name in perplexities if name.startswith(label)]
        assert "best" in ppl_label and "at step 400" in ppl_label
        steps, values = perplexities[ppl_label]
        assert steps == EVAL_STEPS and values == pytest.approx([math.exp(v) for v in val])
        steps, values = rates[label]
        assert steps == TRAIN_STEPS and values == pytest.approx([1e-3 * min(1, s / 50) for s in TRAIN_STEPS])
    # the raw train loss is drawn faintly beside each smoothed one
    faint = [line for line in loss_ax.get_lines() if line.get_label().startswith("_")]
    assert len(faint) == 2 and all(line.get_alpha() < 0.5 for line in faint)


def test_a_preference_run_gets_its_accuracy_panel(cli, workspace_dir: Path, tmp_path: Path, drawn):
    with EventWriter(workspace_dir / "runs" / "prefs" / "events.jsonl") as writer:
        writer.write("start", 0, run="prefs", stage="dpo")
        for step in TRAIN_STEPS:
            writer.write("train", step, loss=0.69 - step / 1000, lr=1e-4, preference_accuracy=step / 400)
        for step in EVAL_STEPS:
            writer.write("eval", step, val_loss=0.6, val_preference_accuracy=step / 500)
    assert cli("plot", "prefs", "--out", tmp_path / "prefs.png").exit_code == 0
    (figure,) = drawn
    assert len(figure.axes) == 4
    accuracy = lines_by_label(figure.axes[3])
    assert accuracy["prefs train"] == (TRAIN_STEPS, pytest.approx([s / 400 for s in TRAIN_STEPS]))
    assert accuracy["prefs val"] == (EVAL_STEPS, pytest.approx([s / 500 for s in EVAL_STEPS]))
    assert lines_by_label(figure.axes[1]) == {}  # a preference loss's exp() is no perplexity


def test_plot_errors(cli, workspace_dir: Path, tmp_path: Path):
    result = cli("plot", "missing", "--out", tmp_path / "x.png")
    assert result.exit_code == 2 and "no run 'missing'" in result.stderr
    with EventWriter(workspace_dir / "runs" / "empty" / "events.jsonl") as writer:
        writer.write("start", 0, run="empty")
    result = cli("plot", "empty", "--out", tmp_path / "x.png")
    assert result.exit_code == 1 and "nothing to plot" in result.stderr
    assert not (tmp_path / "x.png").exists()
