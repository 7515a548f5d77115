"""`llmctl monitor` and `llmctl status --json` reading a log another process is writing."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llmctl.events import EventWriter

# A trainer stand-in: writes `start` with its own pid, then one event per JSON line on stdin
# ({"raw": "..."} appends raw bytes, for a half-written line), answering "ok" after each.
WRITER = r"""
import json, os, socket, sys
from llmctl.events import EventWriter
writer = EventWriter(sys.argv[1])
writer.write("start", 0, run=sys.argv[2], stage="pretrain", preset="cpu-debug", pid=os.getpid(),
             host=socket.gethostname(), device="cpu", max_steps=100, device_memory_bytes=8e9)
print("ok", flush=True)
for line in sys.stdin:
    command = json.loads(line)
    if "raw" in command:
        with open(sys.argv[1], "ab") as handle:
            handle.write(command["raw"].encode())
    else:
        writer.write(command.pop("event"), command.pop("step"), **command)
    print("ok", flush=True)
"""


class Trainer:
    def __init__(self, log: Path, run: str):
        self.process = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(log), run],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout.readline().strip() == "ok"

    def write(self, event: str, step: int, **figures) -> None:
        self.send({"event": event, "step": step, **figures})

    def send(self, command: dict) -> None:
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()
        assert self.process.stdout.readline().strip() == "ok"

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()


@pytest.fixture
def trainer(workspace_dir: Path):
    started = []

    def launch(run: str = "live-run") -> Trainer:
        started.append(Trainer(workspace_dir / "runs" / run / "events.jsonl", run))
        return started[-1]

    yield launch
    for process in (t.process for t in started):
        if process.poll() is None:
            process.kill()
            process.wait()


def test_monitor_and_status_show_the_numbers_another_process_writes(cli, trainer):
    writer = trainer()
    writer.write(
        "train",
        30,
        loss=2.875,
        lr=4.5e-4,
        grad_norm=0.625,
        tokens_per_s=5123.0,
        mfu=0.125,
        mem_bytes=2.5e9,
        tokens=61440,
    )
    frame = cli("monitor", "live-run", "--once", "--width", 120)
    assert frame.exit_code == 0, frame.stderr
    text = frame.stdout
    for shown in (
        "live-run",
        "pretrain",
        "cpu-debug",
        "running",
        "step 30 / 100",
        "30%",
        "2.875",
        "5.1k",
        "12.5%",
        "4.5e-4",
        "0.625",
        "2.5 / 8.0 GB",
        "61.4k tokens",
        "no evaluation yet",
        "✓ no alerts",
    ):
        assert shown in text, shown
    assert all(len(line) == 120 for line in text.splitlines()), "every line is exactly --width wide"

    doc = cli("status", "--json").json()
    (run,) = doc["runs"]
    assert (run["name"], run["state"], run["step"], run["max_steps"]) == ("live-run", "running", 30, 100)
    assert run["best_eval"] is None

    writer.write("eval", 50, val_loss=2.5, val_ppl=12.18, val_bpb=1.125)
    writer.write(
        "checkpoint", 50, path="runs/live-run/checkpoints/step-00000050", kind="full", best=True, val_loss=2.5
    )
    writer.write("sample", 50, prompt="def add(a, b):", text="\n    return a + b")
    writer.send({"raw": '{"ts":1,"event":"train","step":60,"loss":9'})  # caught mid-write
    text = cli("monitor", "live-run", "--once", "--width", 120).stdout
    for shown in (
        "val loss 2.500",
        "ppl 12.18",
        "bpb 1.125",
        "step-00000050",
        "sample @ step 50",
        "return a + b",
        "step 50 / 100",
    ):
        assert shown in text, shown
    doc = cli("status", "live-run", "--json").json()
    assert doc["run"]["best_eval"]["val_loss"] == 2.5 and doc["run"]["step"] == 50
    assert doc["run"]["best_checkpoint"]["step"] == 50

    writer.send({"raw": ".5}\n"})
    writer.write("end", 60, reason="finished", elapsed_s=12.0, best_val_loss=2.5)
    text = cli("monitor", "live-run", "--once", "--width", 120).stdout
    assert "finished: finished at step 60" in text and "best val loss 2.500 at step 50" in text
    assert cli("status", "--json").json()["runs"][0]["state"] == "finished"


def test_a_killed_writer_shows_up_as_crashed(cli, trainer):
    writer = trainer("doomed")
    writer.write("train", 10, loss=3.0)
    assert cli("status", "--json").json()["runs"][0]["state"] == "running"
    writer.kill()
    doc = cli("status", "doomed", "--json").json()
    assert doc["run"]["state"] == "crashed"
    assert doc["alerts"][-1]["kind"] == "crashed" and "is gone" in doc["alerts"][-1]["message"]
    text = cli("monitor", "doomed", "--once", "--width", 100).stdout
    assert "crashed" in text and "without an end event" in text


def test_monitor_picks_the_most_recently_active_run(cli, workspace_dir: Path):
    for run in ("older", "newer"):
        with EventWriter(workspace_dir / "runs" / run / "events.jsonl") as writer:
            writer.write("start", 0, run=run, stage="pretrain", max_steps=10)
        time.sleep(0.02)
    # no --once needed: stdout is not a terminal here, so one frame is printed
    assert "newer" in cli("monitor").stdout.splitlines()[0]


def test_monitor_reads_a_log_copied_anywhere(cli, tmp_path: Path):
    log = tmp_path / "from-the-gpu-box.jsonl"
    with EventWriter(log) as writer:
        writer.write("start", 0, run="remote", stage="pretrain", host="gpu-box", pid=1, max_steps=10)
        writer.write("train", 4, loss=1.5)
    result = cli("monitor", str(log), "--once", "--width", 100)
    assert result.exit_code == 0 and "remote" in result.stdout and "step 4 / 10" in result.stdout


def test_monitor_errors(cli):
    result = cli("monitor", "--once")
    assert result.exit_code == 2 and "no runs" in result.stderr
    result = cli("monitor", "typo", "--once")
    assert result.exit_code == 2 and "no run 'typo'" in result.stderr and result.stdout == ""


def test_the_dashboard_waits_for_a_log_that_does_not_exist_yet(tmp_path: Path):
    from rich.console import Console

    from llmctl.monitor.render import Dashboard
    from llmctl.monitor.watch import RunWatch

    watch = RunWatch(tmp_path / "runs" / "soon" / "events.jsonl")
    watch.refresh()
    console = Console(width=90, record=True, file=open("/dev/null", "w"))  # noqa: SIM115
    console.print(Dashboard(watch, live=True))
    text = console.export_text()
    assert "waiting for" in text and "q quit" in text


HEAVY = ("torch", "peft", "bitsandbytes", "transformers", "datasets", "tokenizers", "numpy", "matplotlib")
PROBE = f"""
import contextlib, io, json, sys
from llmctl.cli.main import main
with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
    code = main(sys.argv[1:])
print(json.dumps({{"code": code, "heavy": sorted(m for m in {HEAVY!r} if m in sys.modules)}}))
"""


@pytest.mark.parametrize(
    "argv",
    [
        ["status"],
        ["status", "--json"],
        ["status", "probe"],
        ["monitor", "--once"],
        ["monitor", "probe", "--once"],
    ],
    ids=" ".join,
)
def test_status_and_monitor_never_import_the_training_stack(argv, workspace_dir: Path):
    with EventWriter(workspace_dir / "runs" / "probe" / "events.jsonl") as writer:
        writer.write("start", 0, run="probe", stage="pretrain", max_steps=10)
        writer.write("train", 1, loss=2.0)
        writer.write("eval", 1, val_loss=2.1, val_ppl=8.2, val_bpb=1.0)
    done = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, check=True)
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["code"] == 0
    assert report["heavy"] == []


def test_live_dashboard_quits_on_q_and_restores_the_terminal(workspace_dir: Path):
    import os
    import pty
    import select
    import termios

    with EventWriter(workspace_dir / "runs" / "watched" / "events.jsonl") as writer:
        writer.write("start", 0, run="watched", stage="pretrain", max_steps=10)
        writer.write("train", 3, loss=2.0)
    pid, terminal = pty.fork()
    if pid == 0:  # the child: the monitor on a terminal of its own
        os.execv(sys.executable, [sys.executable, "-m", "llmctl", "monitor", "watched"])
    shown, deadline, sent_at = b"", time.monotonic() + 20, None
    while time.monotonic() < deadline:
        if select.select([terminal], [], [], 0.1)[0]:
            try:
                chunk = os.read(terminal, 65536)
            except OSError:  # the child is gone and its terminal closed
                break
            shown += chunk
        if sent_at is None and b"q quit" in shown:
            assert not termios.tcgetattr(terminal)[3] & termios.ICANON  # keys arrive without Enter
            os.write(terminal, b"q")
            sent_at = time.monotonic()
    _, status = os.waitpid(pid, 0)
    assert sent_at is not None and os.waitstatus_to_exitcode(status) == 0
    assert time.monotonic() - sent_at < 5
    assert b"step 3 / 10" in shown.split(b"q quit")[-1]  # the last frame stays on the normal screen
