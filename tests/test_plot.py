"""`llmctl plot`: curves of several runs on one PNG."""

from __future__ import annotations

import math
import struct
from pathlib import Path

from llmctl.events import EventWriter


def write_run(workspace_dir: Path, run: str, floor: float) -> None:
    with EventWriter(workspace_dir / "runs" / run / "events.jsonl") as writer:
        writer.write("start", 0, run=run, stage="pretrain", preset="cpu-debug", max_steps=400)
        for step in range(10, 410, 10):
            writer.write("train", step, loss=floor + 6 * math.exp(-step / 80), lr=1e-3 * min(1, step / 50))
            if step % 100 == 0:
                val_loss = floor + 0.1 + 6 * math.exp(-step / 80)
                writer.write(
                    "eval", step, val_loss=val_loss, val_ppl=math.exp(val_loss), val_bpb=val_loss / 2
                )


def png_size(path: Path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", header[16:24])


def test_plot_several_runs_to_one_png(cli, workspace_dir: Path, tmp_path: Path):
    write_run(workspace_dir, "small", 2.5)
    write_run(workspace_dir, "big", 2.0)
    out = tmp_path / "figures" / "curves.png"
    result = cli("plot", "small", "big", "--out", out)
    assert result.exit_code == 0, result.stderr
    assert result.stdout == "" and "wrote" in result.stderr
    width, height = png_size(out)
    assert width > 800 and height > 800


def test_plot_errors(cli, workspace_dir: Path, tmp_path: Path):
    result = cli("plot", "missing", "--out", tmp_path / "x.png")
    assert result.exit_code == 2 and "no run 'missing'" in result.stderr
    with EventWriter(workspace_dir / "runs" / "empty" / "events.jsonl") as writer:
        writer.write("start", 0, run="empty")
    result = cli("plot", "empty", "--out", tmp_path / "x.png")
    assert result.exit_code == 1 and "nothing to plot" in result.stderr
    assert not (tmp_path / "x.png").exists()
