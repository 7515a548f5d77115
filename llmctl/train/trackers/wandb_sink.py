"""Weights & Biases: one W&B run per llmctl run, its id kept in runs/<run>/trackers.json so a resumed
run continues it (`resume="allow"`). Offline (runs/<run>/wandb/, uploaded later with `wandb sync`)
unless the user is logged in or WANDB_MODE says otherwise; project WANDB_PROJECT, else "llmctl".

The resolved config (and the start event's figures under `llmctl`) is the run's config; train and
eval figures are history rows at their step and the event's time; checkpoints, samples, alerts and
the end reason go in the summary. W&B history only moves forward, so rows are committed once no
resume can redo their step (see BufferedSink), and a later session logs only the steps after the
last one W&B holds: the server's (a resumed online run starts after it) or, offline, the last
history record in the earlier sessions' files. W&B's service keeps an offline run's last records
(up to 32 KiB) in memory until the run finishes, so a SIGKILL loses them; they are not lost for
the mirror: the resumed session replays them from events.jsonl.
"""

from __future__ import annotations

import netrc
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from llmctl.events import EndReason
from llmctl.train.trackers.base import BufferedSink, Target, load_state, save_state
from llmctl.train.trackers.history import read_config, start_fields

DEFAULT_PROJECT = "llmctl"


def logged_in() -> bool:
    """Whether W&B has credentials here (`wandb login` writes them to ~/.netrc), without asking it:
    an unreachable server must not hold up a run that would go offline anyway."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host or "") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def mode() -> str:
    return os.environ.get("WANDB_MODE") or ("online" if logged_in() else "offline")


def last_logged_step(wandb_dir: Path, run_id: str) -> int:
    """The last history step the offline session files of W&B run `run_id` hold (-1: none)."""
    from google.protobuf.message import DecodeError
    from wandb.proto import wandb_internal_pb2

    last = -1
    for log in sorted(wandb_dir.glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")):
        for raw in _transaction_log(log.read_bytes()):
            record = wandb_internal_pb2.Record()
            try:
                record.ParseFromString(raw)
            except DecodeError:  # a record cut where the killed service stopped writing
                continue
            if record.WhichOneof("record_type") == "history":
                last = max(last, record.history.step.num)
    return last


def _transaction_log(data: bytes) -> Iterator[bytes]:
    """The records of a .wandb file: a 7-byte header (':W&B', magic, version), then LevelDB log
    blocks of 32 KiB whose records come in chunks, each behind a 7-byte header (CRC, length, type:
    1 whole, 2 first, 3 middle, 4 last). A record whose last chunk is missing is dropped."""
    block, position, pending = 32768, 7, None
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a header is padding
            position += block - position % block
            continue
        length, kind = int.from_bytes(data[position + 4 : position + 6], "little"), data[position + 6]
        chunk = data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind == 1:
            yield chunk
        elif kind == 2:
            pending = chunk
        elif kind == 3 and pending is not None:
            pending += chunk
        elif kind == 4 and pending is not None:
            yield pending + chunk
            pending = None


class WandbSink(BufferedSink):
    name = "wandb"
    title = "W&B"

    def __init__(self, target: Target):
        super().__init__(target)
        self.run: Any = None
        self.state: dict[str, Any] = {}
        self.through = -1  # the last history step W&B holds

    def load(self) -> None:
        import wandb  # noqa: F401

    def open(self, start: dict[str, Any]) -> None:
        import wandb

        recorded = load_state(self.target.run_dir).get(self.name, {})
        self.state = {
            "id": recorded.get("id") or uuid.uuid4().hex[:12],
            # a resumed run continues where its W&B run is, whatever WANDB_PROJECT says now
            "project": recorded.get("project") or os.environ.get("WANDB_PROJECT") or DEFAULT_PROJECT,
            "mode": mode(),
        }
        self.through = last_logged_step(self._wandb_dir(), self.state["id"])
        self.run = wandb.init(
            project=self.state["project"],
            id=self.state["id"],
            name=self.target.run,
            group=self.target.group,
            job_type=str(start.get("stage") or "train"),
            dir=None if os.environ.get("WANDB_DIR") else str(self.target.run_dir),
            mode=self.state["mode"],
            resume="allow",
            reinit="create_new",  # trials one after another in one process, or the user's own runs
            settings=wandb.Settings(console="off"),  # the event stream is the record, not the terminal
        )
        self.through = max(self.through, self.run.starting_step - 1)  # online: what the server holds
        config = {**read_config(self.target.run_dir), "llmctl": start_fields(start)}
        self.run.config.update(config, allow_val_change=True)
        save_state(self.target.run_dir, self.name, self.state)

    def _wandb_dir(self) -> Path:
        return Path(os.environ.get("WANDB_DIR") or self.target.run_dir) / "wandb"

    def commit(self, rows: list[tuple[int, float, dict[str, float]]]) -> None:
        for step, ts, values in rows:
            if step > self.through:
                self.run.log({**values, "_timestamp": ts}, step=step, commit=True)
                self.through = step

    def checkpoint(self, record: dict[str, Any]) -> None:
        summary = {"latest_checkpoint": record.get("path"), "latest_checkpoint_step": record["step"]}
        if record.get("best"):
            summary.update({"best_checkpoint": record.get("path"), "best_checkpoint_step": record["step"]})
        self.run.summary.update(summary)

    def text(self, record: dict[str, Any]) -> None:
        if record["event"] == "sample":
            sample = f"{record.get('prompt', '')}{record.get('text', '')}"
            self.run.summary.update({"sample": sample, "sample_step": record["step"]})
        else:
            alert = f"{record.get('level')} {record.get('kind')}: {record.get('message')}"
            self.run.summary.update({"last_alert": alert, "last_alert_step": record["step"]})

    def ended(self, record: dict[str, Any]) -> None:
        self.run.summary.update(
            {"end_reason": record.get("reason"), "best_val_loss": record.get("best_val_loss")}
        )

    def finish(self, end: dict[str, Any] | None) -> None:
        if self.run is None:
            return
        reason = end.get("reason") if end else None
        ok = reason in {r.value for r in EndReason if r.completed or r is EndReason.PRUNED}
        run, self.run = self.run, None
        run.finish(exit_code=0 if ok or end is None else 1)

    def abandon(self) -> None:
        run, self.run = self.run, None
        if run is not None:
            run.finish(exit_code=1)

    def where(self) -> str:
        where = (
            f"run {self.state.get('id')} in project {self.state.get('project')} ({self.state.get('mode')})"
        )
        if self.state.get("mode") == "offline":
            where += f"; upload with `wandb sync {self.target.run_dir / 'wandb'}/offline-run-*`"
        return where


SINK = WandbSink
