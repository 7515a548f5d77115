"""The training loop every stage shares: pretrain, full finetune, LoRA, QLoRA and classification.

A stage hands the Trainer a model (already wrapped with adapters if any; frozen parameters have
requires_grad=False), a BatchSource, and optionally its own loss function and ModelIO. The
Trainer owns everything else: optimizer and schedule, precision, compile, DDP, accumulation,
clipping, evaluation, early stopping, checkpoints and exact resume, signals, non-finite losses,
the event stream, the registry rows and the progress line.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import socket
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch import nn

from llmctl.checkpoint.files import (
    FullModelIO,
    ModelIO,
    load_trainer_state,
    read_meta,
)
from llmctl.config import RunConfig
from llmctl.events import EndReason
from llmctl.train import distributed
from llmctl.train.batches import BatchSource
from llmctl.train.distributed import DistEnv
from llmctl.train.keeper import CheckpointKeeper
from llmctl.train.losses import LossFn, lm_loss, measure_loss
from llmctl.train.mfu import peak_flops
from llmctl.train.optim import CosineSchedule, TimeBudget, build_optimizer
from llmctl.train.precision import Precision, describe_device, device_memory_bytes, peak_memory_bytes
from llmctl.train.progress import Interval, ProgressLine
from llmctl.train.rng import capture_rng_state, restore_rng_state
from llmctl.train.run_log import Listener, RunLog
from llmctl.train.runinfo import OptimizerFactory, RunInfo, Sampler, TrainResult, planned_steps
from llmctl.train.signals import StopRequests
from llmctl.workspace import EVENTS_FILE

NONFINITE_STOP_AFTER = 3  # non-finite steps in a row before the run stops


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


class Trainer:
    def __init__(
        self,
        config: RunConfig,
        model: nn.Module,
        batches: BatchSource,
        run: RunInfo,
        *,
        device: torch.device,
        precision: Precision,
        compile_model: bool = False,
        dist_env: DistEnv | None = None,
        loss_fn: LossFn = lm_loss,
        model_io: ModelIO | None = None,
        optimizer_factory: OptimizerFactory = build_optimizer,
        flops_per_token: int | None = None,
        sampler: Sampler | None = None,
        console: Console | None = None,
        show_progress: bool = True,
        listeners: Sequence[Listener] = (),
    ):
        self.config, self.train_cfg = config, config.train
        self.run, self.batches, self.loss_fn = run, batches, loss_fn
        self.device, self.precision = device, precision
        self.compile_model = compile_model
        self.dist = dist_env or DistEnv()
        self.model_io = model_io or FullModelIO()
        self.checkpoints = CheckpointKeeper(
            run.dir,
            run.name,
            run.stage,
            run.registry,
            self.model_io,
            keep_last=config.train.keep_last,
            tokenizer_file=run.tokenizer_file,
            checkpoint_fields=run.checkpoint_fields,
        )
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops(device, precision.name)
        self.sampler = sampler
        self.console = console or Console(stderr=True, highlight=False)
        self.show_progress = show_progress and self.dist.is_main

        self.model = model.to(device)  # the bare module: checkpoints read and write this one
        for module in self.model.modules():
            if hasattr(module, "gradient_checkpointing"):
                module.gradient_checkpointing = self.train_cfg.activation_checkpointing
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls on tensor cores
            torch.backends.cudnn.allow_tf32 = True
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = optimizer_factory(self.model, self.train_cfg, device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision.needs_grad_scaler)
        self.micro_tokens = config.train.micro_batch_size * config.sequence_length
        self.tokens_per_step = self.micro_tokens * config.train.grad_accum_steps * self.dist.world_size
        self.total_steps = planned_steps(config, self.tokens_per_step)
        self.schedule = CosineSchedule(self.optimizer, self.train_cfg, self.total_steps)

        self.train_model: nn.Module = distributed.wrap_ddp(self.model, self.dist, device)
        if compile_model:
            self.train_model = torch.compile(self.train_model)

        self.step = 0
        self.tokens = 0
        self.elapsed_before = 0.0  # training time of earlier sessions of a resumed run
        self.best_val_loss: float | None = None
        self.best_step: int | None = None
        self.evals_without_improvement = 0
        self.patience_best: float | None = None  # best val loss by at least min_delta
        self.resumed_from: Path | None = None
        self._signal: int | None = None
        self._nonfinite_in_a_row = 0
        self._saved_step: int | None = None
        self._evaluated_step: int | None = None
        self._last_eval: dict[str, float] = {}
        self.events = RunLog()
        self.listeners = list(listeners)
        self._stops = StopRequests()
        self._requested_stop: EndReason | None = None
        self._start_time = time.monotonic()

    # ------------------------------------------------------------ resume

    def resume(self, checkpoint_dir: Path) -> None:
        """Restore weights, optimizer, schedule, scaler, data position, counters and every RNG."""
        read_meta(checkpoint_dir)
        state = load_trainer_state(checkpoint_dir)
        self.model_io.load(self.model, checkpoint_dir)
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.scaler.load_state_dict(state["scaler"])
        self.batches.load_state_dict(state["batches"])
        rng_states = state["rng"]
        restore_rng_state(rng_states[self.dist.rank % len(rng_states)])
        self.step, self.tokens, self.elapsed_before = state["step"], state["tokens"], state["elapsed_s"]
        self.best_val_loss, self.best_step = state["best_val_loss"], state["best_step"]
        self.evals_without_improvement = state["evals_without_improvement"]
        self.patience_best = state["patience_best"]
        self._saved_step = self._evaluated_step = self.step
        self.resumed_from = checkpoint_dir

    # ------------------------------------------------------------ the loop

    def fit(self) -> TrainResult:
        self.events = RunLog(self.run.dir / EVENTS_FILE if self.dist.is_main else None, self.listeners)
        self._start_time = time.monotonic()
        self._budget = TimeBudget(self.train_cfg, self.step)
        self._write_start()
        progress = ProgressLine(self.console, self.total_steps, self.step, enabled=self.show_progress)
        self.events.start_heartbeat(lambda: self.step)
        try:
            with self._stops:
                reason = self._loop(progress)
                last_checkpoint = self._finish(reason)
        except BaseException as exc:
            self.events.write(
                "end",
                self.step,
                reason=EndReason.ERROR,
                message=f"{type(exc).__name__}: {exc}"[:500],
                elapsed_s=round(self.elapsed, 3),
                best_val_loss=self.best_val_loss,
            )
            self._update_run_meta(end_reason=EndReason.ERROR)
            raise
        finally:
            progress.close()
            self.events.close()
        return TrainResult(
            reason, self.step, self.tokens, self.elapsed, self.best_val_loss, last_checkpoint, self._signal
        )

    @property
    def elapsed(self) -> float:
        return self.elapsed_before + time.monotonic() - self._start_time

    def _loop(self, progress: ProgressLine) -> EndReason:
        interval = Interval()
        while True:
            reason = self._stop_reason()
            if reason:
                return reason
            lr = self.schedule.apply()
            started = time.perf_counter()
            loss, grad_norm, figures = self._optimizer_step()
            seconds = time.perf_counter() - started
            self.step += 1
            self.tokens += self.tokens_per_step
            self.schedule.advance()
            self._fix_schedule()

            if not (_finite(loss) and (grad_norm is None or _finite(grad_norm) or self.scaler.is_enabled())):
                self._nonfinite_in_a_row += 1
                what = "loss" if not _finite(loss) else "gradient norm"
                self.events.write(
                    "alert",
                    self.step,
                    level="error",
                    kind=EndReason.NONFINITE_LOSS,
                    message=f"non-finite {what} ({loss}) at step {self.step}: step skipped "
                    f"({self._nonfinite_in_a_row} in a row)",
                )
                if self._nonfinite_in_a_row >= NONFINITE_STOP_AFTER:
                    return EndReason.NONFINITE_LOSS
                continue
            self._nonfinite_in_a_row = 0
            interval.add(loss, self.tokens_per_step, seconds, figures)

            if self.step % self.train_cfg.log_every == 0:
                self._log_train(interval, lr, grad_norm, progress)
                interval = Interval()
            if self.step % self.train_cfg.eval_every == 0:
                metrics = self.evaluate()
                if self._should_stop_early(metrics):
                    return EndReason.EARLY_STOPPING
            if self.step % self.train_cfg.save_every == 0 and self._saved_step != self.step:
                self.save_checkpoint()
            if self.train_cfg.sample_every and self.step % self.train_cfg.sample_every == 0:
                self._write_samples()

    def _fix_schedule(self) -> None:
        """A run bounded by time decays its rate over the steps the time holds (or its step limit, if
        that comes first), estimated once from rank 0's clock and the same on every rank."""
        if self.schedule.estimated or not self.train_cfg.max_time:
            return
        mine = self._budget.estimate(self.step, self.elapsed) if self.dist.is_main else None
        (steps,) = distributed.all_reduce([float(mine or 0)], self.dist, self.device, op="max")
        if steps:
            self.schedule.fix_total(min(int(steps), self.total_steps or int(steps)))

    def request_stop(self, reason: EndReason) -> None:
        """Stop after the current step with `reason` (a listener pruning a trial, say); the run
        ends as an interrupted one does: a checkpoint, then the end event."""
        self._requested_stop = reason

    def _stop_reason(self) -> EndReason | None:
        # every rank must stop at the same step: rank 0's clock and any rank's signal decide
        time_up = bool(self.train_cfg.max_time and self.elapsed >= self.train_cfg.max_time)
        reasons = list(EndReason)
        requested = reasons.index(self._requested_stop) + 1 if self._requested_stop else 0
        signalled, time_up, requested = distributed.all_reduce(
            [float(self._stops.signal or 0), float(time_up and self.dist.is_main), float(requested)],
            self.dist,
            self.device,
            op="max",
        )
        if signalled:
            self._signal = self._stops.signal = int(signalled)
            if self.show_progress:
                self.console.print(
                    f"[yellow]{signal.Signals(self._signal).name}: writing a checkpoint, then "
                    "stopping (press Ctrl-C again to abort)[/yellow]"
                )
            return EndReason.INTERRUPTED
        if requested:
            return reasons[int(requested) - 1]
        if self.train_cfg.max_steps and self.step >= self.train_cfg.max_steps:
            return EndReason.FINISHED
        if self.train_cfg.max_tokens and self.tokens >= self.train_cfg.max_tokens:
            return EndReason.MAX_TOKENS
        if time_up:
            return EndReason.MAX_TIME
        return None

    def _optimizer_step(self) -> tuple[float, float | None, dict[str, float]]:
        """One update from grad_accum_steps micro-batches. Returns the mean loss (over ranks too),
        the gradient norm before clipping, and the loss's own figures per item (a stage's summed
        figures, such as DPO's rewards, divided by the items they sum over); a non-finite loss
        skips the update."""
        self.train_model.train()
        accum = self.train_cfg.grad_accum_steps
        loss_sum = torch.zeros((), device=self.device)
        count = torch.zeros((), dtype=torch.float64, device=self.device)
        sums: dict[str, torch.Tensor] = {}
        for micro in range(accum):
            batch = self.batches.next_batch()
            last = micro == accum - 1
            # DDP all-reduces gradients on every backward unless told to wait for the last micro-batch
            sync = contextlib.nullcontext() if last or not self.dist.enabled else self.train_model.no_sync()
            with sync:
                with self.precision.autocast():
                    result = self.loss_fn(self.train_model, batch)
                loss = result.loss / accum
                self.scaler.scale(loss).backward()
            loss_sum += loss.detach()
            if result.sums:
                count += result.count
                for name, value in result.sums.items():
                    sums[name] = sums.get(name, 0) + value.detach().double()
        names = sorted(sums)
        loss_value, total, *totals = distributed.all_reduce(
            [loss_sum.item(), count.item(), *(sums[name].item() for name in names)], self.dist, self.device
        )
        loss_value /= self.dist.world_size
        figures = {name: value / total for name, value in zip(names, totals, strict=True)} if total else {}
        if not _finite(loss_value):
            self.optimizer.zero_grad(set_to_none=True)
            return loss_value, None, figures
        self.scaler.unscale_(self.optimizer)
        max_norm = self.train_cfg.grad_clip or float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.trainable, max_norm))
        if _finite(grad_norm) or self.scaler.is_enabled():
            self.scaler.step(self.optimizer)  # skips the update itself when fp16 gradients overflowed
            self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_value, grad_norm, figures

    # ------------------------------------------------------------ evaluation

    @torch.no_grad()
    def measure(self) -> dict[str, float]:
        """Validation loss, perplexity and bits per byte over the source's evaluation batches."""
        self.train_model.eval()
        metrics = measure_loss(
            self.train_model, self.batches, self.loss_fn, self.precision, self.dist, self.device
        )
        self.train_model.train()
        return metrics

    def evaluate(self) -> dict[str, float]:
        """The loop's evaluation: measure, write the eval event, checkpoint a new best."""
        metrics = self.measure()
        val_loss = metrics["val_loss"]
        improved = _finite(val_loss) and (self.best_val_loss is None or val_loss < self.best_val_loss)
        if improved:
            self.best_val_loss, self.best_step = val_loss, self.step
        self._evaluated_step, self._last_eval = self.step, metrics
        self.events.write(
            "eval",
            self.step,
            **{k: round(v, 6) for k, v in metrics.items()},
            best_val_loss=self.best_val_loss,
        )
        if improved:
            self.save_checkpoint()
        return metrics

    def _should_stop_early(self, metrics: dict[str, float]) -> bool:
        patience = self.train_cfg.early_stopping_patience
        if patience is None:
            return False
        best = self.patience_best
        if best is None or metrics["val_loss"] < best - self.train_cfg.early_stopping_min_delta:
            self.patience_best = metrics["val_loss"]
            self.evals_without_improvement = 0
            return False
        self.evals_without_improvement += 1
        return self.evals_without_improvement >= patience

    # ------------------------------------------------------------ checkpoints

    def save_checkpoint(self) -> Path | None:
        """Write a checkpoint of the current step (rank 0), register it, prune old ones.
        Every rank must call this: each contributes its RNG state."""
        rng_states = distributed.gather_objects(capture_rng_state(), self.dist)
        self._saved_step = self.step
        if not self.dist.is_main:
            return None
        metrics = self._last_eval if self._evaluated_step == self.step else {}
        state = {
            "step": self.step,
            "tokens": self.tokens,
            "elapsed_s": self.elapsed,
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "scaler": self.scaler.state_dict(),
            "batches": self.batches.state_dict(),
            "rng": rng_states,
            "best_val_loss": self.best_val_loss,
            "best_step": self.best_step,
            "evals_without_improvement": self.evals_without_improvement,
            "patience_best": self.patience_best,
            "world_size": self.dist.world_size,
        }
        path = self.checkpoints.save(
            self.events,
            model=self.model,
            config=self.config,
            trainer_state=state,
            metrics=metrics,
            best_step=self.best_step,
        )
        self._update_run_meta(
            latest_checkpoint=self.step,
            best_checkpoint=self.checkpoints.best_on_disk(self.best_step),
            best_val_loss=self.best_val_loss,
            step=self.step,
            tokens=self.tokens,
        )
        return path

    def _finish(self, reason: EndReason) -> Path | None:
        """Final evaluation and checkpoint as the reason allows, then the end event."""
        if reason.completed and self._evaluated_step != self.step:
            self.evaluate()
        if reason is not EndReason.NONFINITE_LOSS and self._saved_step != self.step:
            self.save_checkpoint()
        last = self.checkpoints.latest() if self.dist.is_main else None
        if reason is EndReason.NONFINITE_LOSS:
            self.console.print(
                f"[red]stopped:[/red] the loss was non-finite {NONFINITE_STOP_AFTER} steps in a row at step "
                f"{self.step}; the last good checkpoint is {last or 'none'} "
                "(lower train.lr or check the data)"
            )
        self.events.write(
            "end",
            self.step,
            reason=reason,
            elapsed_s=round(self.elapsed, 3),
            best_val_loss=self.best_val_loss,
            tokens=self.tokens,
        )
        self._update_run_meta(end_reason=reason)
        return last

    def _update_run_meta(self, **fields: Any) -> None:
        if self.dist.is_main and self.run.registry is not None:
            self.run.registry.update_run_meta(self.run.name, **fields)

    # ------------------------------------------------------------ reporting

    def _write_start(self) -> None:
        n_params = self.run.params or sum(p.numel() for p in self.model.parameters())
        self.events.write(
            "start",
            self.step,
            run=self.run.name,
            stage=self.run.stage,
            preset=self.run.preset,
            pid=os.getpid(),
            host=socket.gethostname(),
            device=describe_device(self.device),
            device_memory_bytes=device_memory_bytes(self.device),
            max_steps=self.total_steps,
            tokens_per_step=self.tokens_per_step,
            params=n_params,
            trainable_params=sum(p.numel() for p in self.trainable),
            precision=self.precision.name,
            compile=self.compile_model,
            activation_checkpointing=self.train_cfg.activation_checkpointing,
            max_time_s=self.train_cfg.max_time,
            max_tokens=self.train_cfg.max_tokens,
            resumed=self.resumed_from is not None,
            world_size=self.dist.world_size,
            distributed=distributed.backend(),
            **self.run.start_fields,
        )

    def _log_train(
        self, interval: Interval, lr: float, grad_norm: float | None, progress: ProgressLine
    ) -> None:
        tokens_per_s = interval.tokens_per_s
        mfu = None
        if self.peak_flops and self.flops_per_token:
            mfu = self.flops_per_token * tokens_per_s / (self.peak_flops * self.dist.world_size)
        figures = {
            "loss": interval.mean_loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens_per_s": round(tokens_per_s, 1),
            "mfu": round(mfu, 4) if mfu is not None else None,
            "mem_bytes": peak_memory_bytes(self.device),
            "tokens": self.tokens,
            "elapsed_s": round(self.elapsed, 3),
            **interval.mean_figures,
        }
        self.events.write("train", self.step, **figures)
        steps_left = self.total_steps - self.step if self.total_steps else None
        time_left = self.train_cfg.max_time - self.elapsed if self.train_cfg.max_time else None
        progress.update(self.step, self.total_steps, figures, interval.eta(steps_left, time_left))

    @torch.no_grad()
    def _write_samples(self) -> None:
        if self.sampler is None or not self.dist.is_main:
            return
        with self.precision.autocast():
            samples = self.sampler(self.model)
        for prompt, text in samples:
            self.events.write("sample", self.step, prompt=prompt, text=text)
