"""What mirroring a run to a tracker costs the trainer, and what `llmctl report` costs afterwards.

Live: the trainer writes each event through its RunLog, which calls the listeners before the
next step goes on. The baseline is the RunLog alone (the line in events.jsonl that every run
pays); each tracker adds its sink as a listener. A round feeds a realistic run's events (a train
event every `log_every` steps, an eval every 100 steps, a checkpoint every 500) through a fresh
RunLog and run directory, wall clock around the whole feed: the tracker run's opening and
closing (W&B's init and finish, MLflow's run creation) are in it. One untimed round per tracker
first (imports, W&B's service), then the trackers in a rotated order every round.

Report: `mirror_run` rebuilding each tracker's mirror from that run's events.jsonl.

    python benchmarks/trackers.py                       # 2,000 train events (20k steps), 3 rounds
    python benchmarks/trackers.py --events 500 --rounds 5
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import random
import statistics
import tempfile
import time
from pathlib import Path

from llmctl.config import RunConfig
from llmctl.train.run_log import RunLog
from llmctl.train.trackers import mirror_run, open_sinks
from llmctl.workspace import EVENTS_FILE, RUN_CONFIG, Workspace

TRACKERS = ("tensorboard", "mlflow", "wandb")


def run_events(train_events: int, log_every: int) -> list[tuple[str, int, dict]]:
    """(event, step, figures) as a pretraining run writes them."""
    rng = random.Random(0)
    events = [("start", 0, {"run": "bench", "stage": "pretrain", "resumed": False, "device": "cpu"})]
    for i in range(1, train_events + 1):
        step = i * log_every
        loss = 2.0 + 7.0 * math.exp(-step / 5_000) + rng.gauss(0, 0.05)
        events.append(
            (
                "train",
                step,
                {
                    "loss": loss,
                    "lr": 3e-4,
                    "grad_norm": 0.4 + rng.random() * 0.1,
                    "tokens_per_s": 48_000 + rng.gauss(0, 500),
                    "mfu": 0.38,
                    "mem_bytes": 6.9e9,
                    "tokens": step * 8192,
                    "elapsed_s": step * 0.2,
                },
            )
        )
        if step % 100 == 0:
            events.append(
                ("eval", step, {"val_loss": loss + 0.1, "val_ppl": math.exp(loss + 0.1), "val_bpb": 1.0})
            )
        if step % 500 == 0:
            events.append(("checkpoint", step, {"path": f"/x/step-{step:08d}", "kind": "full", "best": True}))
    events.append(("end", train_events * log_every, {"reason": "finished", "best_val_loss": 2.0}))
    return events


def fresh_run(root: Path, name: str) -> tuple[Workspace, Path]:
    workspace = Workspace(root / name / "ws")
    run_dir = workspace.run_dir("bench")
    run_dir.mkdir(parents=True)
    (run_dir / RUN_CONFIG).write_text(RunConfig().to_yaml(), encoding="utf-8")
    return workspace, run_dir


def live_round(root: Path, name: str, tracker: str | None, events: list) -> tuple[float, float]:
    """(wall clock of the whole feed, the longest single write: the longest the trainer waits)."""
    workspace, run_dir = fresh_run(root, name)
    sinks = open_sinks([tracker], workspace, "bench") if tracker else []
    started = time.perf_counter()
    log = RunLog(run_dir / EVENTS_FILE, sinks)
    longest = 0.0
    for kind, step, figures in events:
        before = time.perf_counter()
        log.write(kind, step, **figures)
        longest = max(longest, time.perf_counter() - before)
    log.close()
    elapsed = time.perf_counter() - started
    assert not any(sink.failed for sink in sinks), tracker
    return elapsed, longest


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=2000, help="train events in the run")
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.pop("MLFLOW_TRACKING_URI", None)

    events = run_events(args.events, args.log_every)
    names = (None, *TRACKERS)
    times: dict[str | None, list[tuple[float, float]]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for name in names:  # warm-up: imports, W&B's service
            live_round(root, f"warm-{name}", name, events[:50] + events[-1:])
        for round_ in range(args.rounds):
            order = names[round_ % len(names) :] + names[: round_ % len(names)]
            for name in order:
                times[name].append(live_round(root, f"r{round_}-{name}", name, events))

        workspace, run_dir = fresh_run(root, "report")
        live_round(root, "report-src", None, events)
        source = root / "report-src" / "ws" / "runs" / "bench" / EVENTS_FILE
        (run_dir / EVENTS_FILE).write_bytes(source.read_bytes())
        report = {}
        for tracker in TRACKERS:
            started = time.perf_counter()
            mirror_run(workspace, "bench", run_dir, [tracker])
            report[tracker] = time.perf_counter() - started

    print(f"CPU: {cpu_name()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    steps = args.events * args.log_every
    print(f"run: {len(events)} events ({args.events} train events, {steps:,} steps), {args.rounds} rounds")
    base = statistics.median(total for total, _ in times[None])
    header = ("tracker", "live total", "per event", "vs log alone", "longest write", "report")
    print(f"{header[0]:<12} {header[1]:>11} {header[2]:>10} {header[3]:>13} {header[4]:>14} {header[5]:>8}")
    for name in names:
        total = statistics.median(t for t, _ in times[name])
        longest = statistics.median(w for _, w in times[name])
        per_event = total / len(events) * 1e6
        rebuilt = f"{report[name]:.2f} s" if name else ""
        print(
            f"{name or 'log alone':<12} {total:>9.2f} s {per_event:>7.0f} µs {total / base:>12.1f}× "
            f"{longest * 1e3:>11.1f} ms {rebuilt:>8}"
        )


if __name__ == "__main__":
    main()
