"""A run's events folded into its state: figures now, curves so far, alerts, liveness.

Folding is incremental (`fold` takes the events a poll returned) and bounded in memory: curves
are `Series`, checkpoints and alerts are short deques. What depends on the clock (elapsed, ETA,
stalled, crashed) is computed when asked, from `now`, so a frame can be drawn at any moment.
"""

from __future__ import annotations

import math
import os
import socket
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

from llmctl.events import COMPLETED, PREFERENCE_FIGURES, TRAIN_FIGURES, EndReason, as_float, jsonable
from llmctl.monitor.series import Series
from llmctl.monitor.units import duration

# The trainer writes a heartbeat every 30 s when it has nothing else to say.
STALL_AFTER_S = 120.0  # four heartbeats missed: stalled
LOST_AFTER_S = 600.0  # silence after which a run whose pid we cannot check (another host) is crashed
OVERFIT_EVALS = 3  # val loss rising this many evals in a row while train loss falls
SPIKE_WARMUP = 20  # train events before spikes are judged, so the smoothed loss has settled
SPIKE_JITTERS = 6.0  # a spike rises this many times the usual step-to-step jitter above the smoothed loss,
SPIKE_MIN_RISE = 0.15  # and at least 15% above it: noise on a flat curve is not a spike
SPIKE_COOLDOWN = 20  # train events between two spike alerts
SMOOTHING = 0.1  # weight of the newest figure in the smoothed ("avg") throughput figures
LOSS_SMOOTHING = 0.05

# a run's state from its end reason: completed ones finished, an interrupted one stopped, the rest failed
END_STATES = {
    **dict.fromkeys(COMPLETED, "finished"),
    EndReason.INTERRUPTED: "stopped",
    EndReason.PRUNED: "stopped",
}
ACTIVE_STATES = ("running", "stalled")


@dataclass
class Alert:
    level: str  # "warning" or "error"
    kind: str
    message: str
    step: int
    ts: float | None
    source: str  # "trainer" (an alert event) or "monitor" (derived here)


@dataclass
class Limit:
    """One of the run's stopping limits (steps, time or tokens) and how far along it is."""

    kind: str
    done: float
    total: float
    remaining_s: float | None  # at the recent pace; None when unknown or the run is not active

    @property
    def fraction(self) -> float:
        return min(1.0, self.done / self.total)


class Ema:
    """Exponential moving average."""

    def __init__(self, alpha: float):
        self.alpha = alpha
        self.value: float | None = None
        self.count = 0

    def update(self, sample: float) -> None:
        self.count += 1
        self.value = sample if self.value is None else self.value + self.alpha * (sample - self.value)


# what an eval record keeps: the common figures, a classifier's accuracy, a dpo run's (PREFERENCE_FIGURES)
EVAL_NAMES = ("val_loss", "val_ppl", "val_bpb", "val_accuracy", *(f"val_{n}" for n in PREFERENCE_FIGURES))


def _int(value: Any) -> int:
    number = as_float(value)
    return int(number) if number is not None and math.isfinite(number) else 0


def _is_lower(value: float | None, than: float | None) -> bool:
    return value is not None and math.isfinite(value) and (than is None or value < than)


class RunState:
    def __init__(self, history_points: int = 1024):
        self.history_points = history_points
        # from the latest `start`
        self.run: str | None = None
        self.stage: str | None = None
        self.preset: str | None = None
        self.device: str | None = None
        self.host: str | None = None
        self.precision: str | None = None
        self.pid: int | None = None
        self.max_steps: int | None = None
        self.max_time_s: float | None = None
        self.max_tokens: int | None = None
        self.params: int | None = None
        self.trainable_params: int | None = None
        self.device_memory_bytes: float | None = None
        self.world_size = 1
        self.starts = 0
        self.events = 0
        # clock: a resumed run's elapsed time adds up its segments
        self.segment_ts: float | None = None
        self.last_ts: float | None = None
        self.previous_segments_s = 0.0
        # training
        self.step = 0
        self.latest: dict[str, float | None] = {}
        self.peak_mem_bytes: float | None = None
        self.loss_smoothed = Ema(LOSS_SMOOTHING)
        # Jitter is judged from step-to-step differences, which a falling trend barely moves.
        self._loss_jitter = Ema(LOSS_SMOOTHING)
        self._previous_loss: float | None = None
        self.tokens_per_s_smoothed = Ema(SMOOTHING)
        self.mfu_smoothed = Ema(SMOOTHING)
        self.grad_norm_smoothed = Ema(SMOOTHING)
        self._recent_progress: deque[tuple[float, int]] = deque(maxlen=32)
        self._train_events = 0
        self._last_spike_at = -SPIKE_COOLDOWN
        self.train_loss = Series(history_points)
        self.lr = Series(history_points)
        self.val_loss = Series(history_points)
        self.val_ppl = Series(history_points)
        # a preference stage's (dpo) curves: the share of pairs whose chosen reply wins
        self.preference_accuracy = Series(history_points)
        self.val_preference_accuracy = Series(history_points)
        # evaluation, checkpoints, samples, alerts
        self.last_eval: dict[str, Any] | None = None
        self.best_eval: dict[str, Any] | None = None
        self.eval_count = 0
        self._val_window: deque[tuple[int, float, float | None]] = deque(maxlen=OVERFIT_EVALS + 1)
        self._overfit_reported = False
        self.checkpoints: deque[dict[str, Any]] = deque(maxlen=20)
        self.checkpoint_count = 0
        self.best_checkpoint: dict[str, Any] | None = None
        self.sample: dict[str, Any] | None = None
        self.alerts: deque[Alert] = deque(maxlen=50)
        self.end: dict[str, Any] | None = None

    # ------------------------------------------------------------------ folding events

    def fold(self, events: Iterable[dict[str, Any]]) -> None:
        handlers = {
            "start": self._on_start,
            "train": self._on_train,
            "eval": self._on_eval,
            "checkpoint": self._on_checkpoint,
            "sample": self._on_sample,
            "alert": self._on_alert,
            "end": self._on_end,
        }
        for event in events:
            ts, step, kind = as_float(event.get("ts")), _int(event.get("step")), event.get("event")
            handler = handlers.get(kind)
            if handler is not None:
                handler(event, step, ts)
            if kind != "start":  # a resumed run's start moves the step back; every other event moves it on
                self.step = max(self.step, step)
            self.events += 1
            if ts is not None:
                self.last_ts = ts

    def _on_start(self, event: dict[str, Any], step: int, ts: float | None) -> None:
        if self.segment_ts is not None and self.last_ts is not None:
            self.previous_segments_s += max(0.0, self.last_ts - self.segment_ts)
        self.starts += 1
        self.segment_ts = ts
        for name in ("run", "stage", "preset", "device", "host", "precision"):
            if event.get(name) is not None:
                setattr(self, name, str(event[name]))
        for name in ("pid", "max_steps", "max_tokens", "params", "trainable_params"):
            value = as_float(event.get(name))
            setattr(self, name, int(value) if value is not None and math.isfinite(value) else None)
        self.device_memory_bytes = as_float(event.get("device_memory_bytes"))
        self.max_time_s = as_float(event.get("max_time_s"))
        self.world_size = _int(event.get("world_size")) or 1
        self.end = None
        self.step = step
        # A resumed run repeats the steps after its checkpoint: the curve continues from there.
        curves = (self.train_loss, self.lr, self.val_loss, self.val_ppl)
        for series in (*curves, self.preference_accuracy, self.val_preference_accuracy):
            series.truncate_after(step)
        self._recent_progress.clear()
        self._val_window = deque(
            (entry for entry in self._val_window if entry[0] <= step), maxlen=OVERFIT_EVALS + 1
        )

    def _on_train(self, event: dict[str, Any], step: int, ts: float | None) -> None:
        self._train_events += 1
        self.latest = {name: as_float(event.get(name)) for name in TRAIN_FIGURES}
        self.latest.update({name: as_float(event[name]) for name in PREFERENCE_FIGURES if name in event})
        self.preference_accuracy.append_finite(step, self.latest.get("preference_accuracy"))
        loss, lr = self.latest["loss"], self.latest["lr"]
        if loss is not None:
            if math.isfinite(loss):
                self._check_spike(loss, step, ts)
                self.loss_smoothed.update(loss)
                if self._previous_loss is not None:
                    self._loss_jitter.update(abs(loss - self._previous_loss))
                self._previous_loss = loss
                self.train_loss.append(step, loss)
            else:
                self._alert("error", "nonfinite_loss", f"train loss is {loss} at step {step:,}", step, ts)
        self.lr.append_finite(step, lr)
        for name, smoothed in (
            ("tokens_per_s", self.tokens_per_s_smoothed),
            ("mfu", self.mfu_smoothed),
            ("grad_norm", self.grad_norm_smoothed),
        ):
            value = self.latest[name]
            if value is not None and math.isfinite(value):
                smoothed.update(value)
        mem = self.latest["mem_bytes"]
        if mem is not None and (self.peak_mem_bytes is None or mem > self.peak_mem_bytes):
            self.peak_mem_bytes = mem
        if ts is not None:
            self._recent_progress.append((ts, step))

    def _check_spike(self, loss: float, step: int, ts: float | None) -> None:
        smoothed, jitter = self.loss_smoothed.value, self._loss_jitter.value
        if smoothed is None or jitter is None or self.loss_smoothed.count < SPIKE_WARMUP:
            return
        if self._train_events - self._last_spike_at < SPIKE_COOLDOWN:
            return
        if loss - smoothed > max(SPIKE_JITTERS * jitter, SPIKE_MIN_RISE * abs(smoothed)):
            self._last_spike_at = self._train_events
            self._alert(
                "warning",
                "loss_spike",
                f"loss spiked to {loss:.4g} at step {step:,} (smoothed {smoothed:.4g})",
                step,
                ts,
            )

    def _on_eval(self, event: dict[str, Any], step: int, ts: float | None) -> None:
        record: dict[str, Any] = {"step": step, "ts": ts}
        for name in EVAL_NAMES:
            value = as_float(event.get(name))
            if value is not None:
                record[name] = value
        self.last_eval = record
        self.val_preference_accuracy.append_finite(step, record.get("val_preference_accuracy"))
        self.eval_count += 1
        val_loss = record.get("val_loss")
        if val_loss is None or not math.isfinite(val_loss):
            return
        self.val_loss.append(step, val_loss)
        self.val_ppl.append_finite(step, record.get("val_ppl"))
        if _is_lower(val_loss, self.best_eval and self.best_eval["val_loss"]):
            self.best_eval = record
        self._check_overfitting(val_loss, step, ts)

    def _check_overfitting(self, val_loss: float, step: int, ts: float | None) -> None:
        window = self._val_window
        window.append((step, val_loss, self.loss_smoothed.value))
        rising = len(window) == window.maxlen and all(b[1] > a[1] for a, b in pairwise(window))
        if not rising:
            self._overfit_reported = False
            return
        train_then, train_now = window[0][2], window[-1][2]
        if self._overfit_reported or train_then is None or train_now is None or train_now >= train_then:
            return
        self._overfit_reported = True
        self._alert(
            "warning",
            "overfitting",
            f"val loss rose {OVERFIT_EVALS} evals in a row while train loss fell: possible overfitting "
            f"(step {step:,})",
            step,
            ts,
        )

    def _on_checkpoint(self, event: dict[str, Any], step: int, ts: float | None) -> None:
        record = {
            "step": step,
            "ts": ts,
            "path": event.get("path"),
            "kind": event.get("kind"),
            "best": bool(event.get("best")),
            "val_loss": as_float(event.get("val_loss")),
        }
        self.checkpoints.append(record)
        self.checkpoint_count += 1
        best_so_far = self.best_checkpoint and self.best_checkpoint["val_loss"]
        # The trainer marks its best checkpoint; an older log without the flag is judged by val loss.
        if record["best"] or ("best" not in event and _is_lower(record["val_loss"], best_so_far)):
            self.best_checkpoint = record

    def _on_sample(self, event: dict[str, Any], step: int, ts: float | None) -> None:
        self.sample = {
            "step": step,
            "ts": ts,
            "prompt": str(event.get("prompt") or ""),
            "text": str(event.get("text") or ""),
        }

    def _on_alert(self, event: dict[str, Any], step: int, ts: float | None) -> None:
        self._alert(
            str(event.get("level") or "warning"),
            str(event.get("kind") or "trainer"),
            str(event.get("message") or event.get("kind") or "alert"),
            step,
            ts,
            source="trainer",
        )

    def _on_end(self, event: dict[str, Any], step: int, ts: float | None) -> None:
        self.end = {
            "step": step,
            "ts": ts,
            "reason": str(event.get("reason") or "unknown"),
            "elapsed_s": as_float(event.get("elapsed_s")),
            "best_val_loss": as_float(event.get("best_val_loss")),
        }

    def _alert(
        self, level: str, kind: str, message: str, step: int, ts: float | None, source: str = "monitor"
    ) -> None:
        # The trainer and this monitor may both report one problem (a NaN loss): keep the first.
        if any(alert.kind == kind and alert.step == step for alert in list(self.alerts)[-5:]):
            return
        self.alerts.append(Alert(level, kind, message, step, ts, source))

    # ------------------------------------------------------------------ what depends on the clock

    def liveness(self, now: float | None = None) -> str:
        """waiting, running, stalled, finished, stopped, failed or crashed."""
        if not self.starts:
            return "waiting"
        if self.end is not None:
            return END_STATES.get(self.end["reason"], "failed")
        now = time.time() if now is None else now
        silent_s = now - self.last_ts if self.last_ts is not None else 0.0
        alive = process_alive(self.pid, self.host, self.segment_ts)
        if alive is False or (alive is None and silent_s > LOST_AFTER_S):
            return "crashed"
        return "stalled" if silent_s > STALL_AFTER_S else "running"

    def elapsed_s(self, now: float | None, state: str) -> float | None:
        if self.segment_ts is None:
            return None
        segment_end = (time.time() if now is None else now) if state in ACTIVE_STATES else self.last_ts
        return self.previous_segments_s + max(0.0, (segment_end or self.segment_ts) - self.segment_ts)

    def steps_per_s(self) -> float | None:
        """Recent progress, evaluations and checkpoints included (what an ETA must count)."""
        if len(self._recent_progress) < 2:
            return None
        (first_ts, first_step), (last_ts, last_step) = self._recent_progress[0], self._recent_progress[-1]
        if last_ts <= first_ts or last_step <= first_step:
            return None
        return (last_step - first_step) / (last_ts - first_ts)

    def limits(self, now: float | None, state: str) -> list[Limit]:
        """The limits the run stops at (max steps, max time, max tokens), as far as it has got."""
        active = state in ACTIVE_STATES
        limits = []
        if self.max_steps:
            speed = self.steps_per_s()
            remaining = (self.max_steps - self.step) / speed if active and speed else None
            limits.append(Limit("steps", self.step, self.max_steps, remaining))
        trained_s, tokens = self.latest.get("elapsed_s"), self.latest.get("tokens")
        if self.max_time_s and trained_s is not None:
            # the trainer's own clock at its last train event, run on to now while it trains
            last_train_ts = self._recent_progress[-1][0] if self._recent_progress else None
            if active and last_train_ts is not None:
                trained_s += max(0.0, (time.time() if now is None else now) - last_train_ts)
            remaining = max(0.0, self.max_time_s - trained_s) if active else None
            limits.append(Limit("time", trained_s, self.max_time_s, remaining))
        if self.max_tokens and tokens is not None:
            rate = self.tokens_per_s_smoothed.value
            remaining = (self.max_tokens - tokens) / rate if active and rate else None
            limits.append(Limit("tokens", tokens, self.max_tokens, remaining))
        return limits

    def progress(self, now: float | None, state: str) -> float | None:
        """How far along the run is: by the limit it is closest to reaching."""
        limits = self.limits(now, state)
        return max(limit.fraction for limit in limits) if limits else None

    def eta_s(self, now: float | None, state: str) -> float | None:
        remaining = [limit.remaining_s for limit in self.limits(now, state) if limit.remaining_s is not None]
        return max(0.0, min(remaining)) if remaining else None

    def current_alerts(self, now: float | None, state: str) -> list[Alert]:
        """The alerts folded from the log, plus the one the clock tells: stalled or crashed."""
        alerts = list(self.alerts)
        now = time.time() if now is None else now
        silent = duration(now - self.last_ts) if self.last_ts is not None else "ever"
        if state == "stalled":
            alerts.append(
                Alert(
                    "warning",
                    "stalled",
                    f"no event for {silent} at step {self.step:,}: stalled? (the trainer writes a"
                    " heartbeat every 30 s)",
                    self.step,
                    now,
                    "monitor",
                )
            )
        elif state == "crashed":
            why = (
                f"process {self.pid} is gone"
                if process_alive(self.pid, self.host, self.segment_ts) is False
                else f"no event for {silent} from host {self.host or '?'}"
            )
            alerts.append(
                Alert(
                    "error",
                    "crashed",
                    f"{why} without an end event: crashed at step {self.step:,}",
                    self.step,
                    self.last_ts,
                    "monitor",
                )
            )
        return alerts

    def summary(self, now: float | None = None) -> dict[str, Any]:
        """The state as one JSON-ready document (status --json prints these)."""
        now = time.time() if now is None else now
        state = self.liveness(now)
        latest_checkpoint = self.checkpoints[-1] if self.checkpoints else None
        return jsonable(
            {
                "run": self.run,
                "stage": self.stage,
                "preset": self.preset,
                "device": self.device,
                "host": self.host,
                "pid": self.pid,
                "state": state,
                "step": self.step,
                "max_steps": self.max_steps,
                "progress": self.progress(now, state),
                "starts": self.starts,
                "elapsed_s": self.elapsed_s(now, state),
                "eta_s": self.eta_s(now, state),
                "last_event_age_s": None if self.last_ts is None else max(0.0, now - self.last_ts),
                "train": {
                    **self.latest,
                    "tokens_per_s_avg": self.tokens_per_s_smoothed.value,
                    "mfu_avg": self.mfu_smoothed.value,
                    "peak_mem_bytes": self.peak_mem_bytes,
                },
                "last_eval": self.last_eval,
                "best_eval": self.best_eval,
                "best_checkpoint": self.best_checkpoint,
                "latest_checkpoint": latest_checkpoint,
                "end": self.end,
                "alerts": [asdict(alert) for alert in self.current_alerts(now, state)[-10:]],
                "events": self.events,
            }
        )


def process_alive(pid: int | None, host: str | None, started_ts: float | None) -> bool | None:
    """Whether the run's process still lives; None when this machine cannot tell (another host)."""
    if not pid or (host and host != socket.gethostname()):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, owned by someone else
    stat = Path(f"/proc/{pid}/stat")
    try:
        fields = stat.read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return True  # no /proc (macOS): the pid answering is all we know
    if fields[0] in ("Z", "X"):  # exited, not yet reaped by its parent
        return False
    # A pid reused by a later process: that process started after the run did.
    started = _boot_time() + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    return not (started_ts is not None and started > started_ts + 5)


def _boot_time() -> float:
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("btime "):
            return float(line.split()[1])
    return 0.0
