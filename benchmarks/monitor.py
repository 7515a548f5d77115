"""What one monitor refresh costs as the log grows: it should stay flat.

A refresh is poll (read the bytes added since the last one) + fold (update the run state) +
render (draw the 120-column frame with colours). The log is grown to each size with a realistic
mix of events (a train line per step, an eval every 50, a checkpoint every 500), the watcher
catches up once (the cost of starting `monitor` on a log that size), then a trainer stand-in
appends a few lines before each of many timed refreshes.

    python benchmarks/monitor.py                      # 10k, 100k and 1M lines
    python benchmarks/monitor.py --sizes 10000 --repeats 20
"""

from __future__ import annotations

import argparse
import io
import json
import math
import platform
import random
import resource
import statistics
import tempfile
import time
from pathlib import Path

from rich.console import Console

from llmctl.events import EventWriter
from llmctl.monitor.render import Dashboard
from llmctl.monitor.status import devices, run_summary
from llmctl.monitor.watch import RunWatch
from llmctl.workspace import Workspace


def event_lines(first_step: int, count: int) -> list[str]:
    """`count` lines as the trainer writes them, from `first_step` on."""
    lines, rng = [], random.Random(first_step)
    for step in range(first_step, first_step + count):
        loss = 2.0 + 7.0 * math.exp(-step / 50_000) + rng.gauss(0, 0.05)
        figures = {
            "ts": 1.7e9 + step * 0.2,
            "event": "train",
            "step": step,
            "loss": loss,
            "lr": 3e-4,
            "grad_norm": 0.4 + rng.random() * 0.1,
            "tokens_per_s": 48_000 + rng.gauss(0, 500),
            "mfu": 0.38,
            "mem_bytes": 6.9e9,
            "tokens": step * 8192,
            "elapsed_s": step * 0.2,
        }
        lines.append(json.dumps(figures, separators=(",", ":")))
        if step % 50 == 0:
            lines.append(
                json.dumps(
                    {
                        "ts": 1.7e9 + step * 0.2,
                        "event": "eval",
                        "step": step,
                        "val_loss": loss + 0.05,
                        "val_ppl": math.exp(loss + 0.05),
                        "val_bpb": (loss + 0.05) / 2.2,
                        "best_val_loss": loss,
                    },
                    separators=(",", ":"),
                )
            )
        if step % 500 == 0:
            lines.append(
                json.dumps(
                    {
                        "ts": 1.7e9 + step * 0.2,
                        "event": "checkpoint",
                        "step": step,
                        "path": f"runs/bench/checkpoints/step-{step:08d}",
                        "kind": "full",
                        "best": False,
                        "val_loss": loss,
                    },
                    separators=(",", ":"),
                )
            )
    return lines


def grow(log: Path, target_lines: int, written: int, step: int) -> tuple[int, int]:
    """Append lines until the log holds `target_lines`; returns (lines, next step)."""
    with open(log, "a", encoding="utf-8") as handle:
        while written < target_lines:
            batch = event_lines(step, min(100_000, target_lines - written))
            batch = batch[: target_lines - written]
            handle.write("\n".join(batch) + "\n")
            written += len(batch)
            step += 100_000
    return written, step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--new", type=int, default=5, help="lines appended before each refresh")
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()

    cpu = devices()[-1]
    print(
        f"machine: {cpu['name']}, {cpu['cores']} cores, {platform.python_implementation()} "
        f"{platform.python_version()}, {platform.system()}"
    )
    print(
        f"refresh = poll + fold + render at 120 columns; {args.new} new lines per refresh, "
        f"{args.repeats} refreshes per size\n"
    )
    header = (
        "lines in log",
        "log size",
        "catch up (cold start)",
        "status row",
        "refresh median",
        "refresh p95",
        "of which render",
        "curve points kept",
    )
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---:" for _ in header) + "|")

    with tempfile.TemporaryDirectory() as tmp:
        workspace = Workspace(Path(tmp))
        log = workspace.run_dir("bench") / "events.jsonl"
        log.parent.mkdir(parents=True)
        with EventWriter(log) as writer:
            writer.write(
                "start",
                0,
                run="bench",
                stage="pretrain",
                preset="rtx4060-8g",
                device="cpu",
                max_steps=10_000_000,
                pid=None,
            )
        written, step = 1, 1
        console = Console(file=io.StringIO(), width=120, force_terminal=True, color_system="truecolor")
        for size in args.sizes:
            written, step = grow(log, size, written, step)
            watch = RunWatch(log)
            started = time.perf_counter()
            watch.refresh()
            catch_up = time.perf_counter() - started
            started = time.perf_counter()
            run_summary(workspace, "bench", skim=True)
            status_row = time.perf_counter() - started

            refreshes, renders = [], []
            with EventWriter(log) as writer:
                for _ in range(args.repeats):
                    for _ in range(args.new):
                        writer.write("train", step, loss=2.0, lr=3e-4, tokens_per_s=48_000.0, mfu=0.38)
                        step += 1
                    started = time.perf_counter()
                    watch.refresh()
                    folded = time.perf_counter()
                    console.print(Dashboard(watch))
                    console.file.seek(0)
                    console.file.truncate()
                    done = time.perf_counter()
                    refreshes.append(done - started)
                    renders.append(done - folded)
            written += args.repeats * args.new
            refreshes.sort()
            p95 = refreshes[int(0.95 * len(refreshes))]
            print(
                f"| {size:,} | {log.stat().st_size / 1e6:.0f} MB | {catch_up:.2f} s | {status_row:.2f} s "
                f"| {1e3 * statistics.median(refreshes):.1f} ms | {1e3 * p95:.1f} ms "
                f"| {1e3 * statistics.median(renders):.1f} ms | {len(watch.state.train_loss.points())} |"
            )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\npeak resident memory of this process: {peak:.0f} MB")


if __name__ == "__main__":
    main()
