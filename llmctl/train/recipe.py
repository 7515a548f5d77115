"""The recipe core every training stage specialises: plan, start, train.

A stage (pretrain; finetune and qlora; the ones to come) turns its options into a `Plan`: the run,
the resolved config, where and how it computes, its size, its memory estimate and whether that
fits, and what it trains on. Planning checks everything and writes nothing. Then

    start_run(workspace, plan)        creates runs/<run>/ and its registry row (or refreshes them)
    train(workspace, plan, ...)       builds the stage's Trainer and fits it

Commands, quickstart and tune go through these two, so every stage is started the same way.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch import nn

from llmctl.checkpoint.files import FullModelIO, ModelIO
from llmctl.config import GenerationConfig, RunConfig
from llmctl.errors import LlmctlError
from llmctl.model.sizing import MemoryEstimate, human_bytes, human_count
from llmctl.storage import writer_lock
from llmctl.tokenizer import LoadedTokenizer
from llmctl.train import distributed
from llmctl.train.batches import BatchSource
from llmctl.train.distributed import DistEnv
from llmctl.train.losses import LossFn, lm_loss
from llmctl.train.optim import build_optimizer
from llmctl.train.precision import (
    Precision,
    describe_device,
    device_memory_bytes,
    resolve_compile,
    resolve_device,
    resolve_precision,
)
from llmctl.train.run_log import Listener
from llmctl.train.runinfo import OptimizerFactory, RunInfo, Sampler, TrainResult, planned_steps
from llmctl.train.runs import RunOptions, open_run
from llmctl.train.trackers import describe as describe_trackers
from llmctl.train.trackers import open_sinks
from llmctl.train.trainer import Trainer
from llmctl.workspace import Workspace

SAMPLE_MAX_NEW_TOKENS = 96  # the event stream's samples are a glimpse, not a completion

Row = tuple[str, str]  # a line of the plan as a dry run shows it: label, text (Rich markup)


# ---------------------------------------------------------------- config


def limit_flags(options: RunOptions) -> dict[str, Any]:
    """The config keys the flags every stage takes set: run length, precision, trackers."""
    return {
        "train.max_steps": options.max_steps,
        "train.max_time": options.max_time,
        "train.max_tokens": options.max_tokens,
        "train.precision": options.precision,
        "train.report_to": options.report_to,
    }


def apply_limit_rules(config: RunConfig, options: RunOptions) -> None:
    """--max-tokens alone replaces the step limit a preset or the defaults set."""
    if options.max_tokens is not None and options.max_steps is None:
        config.train.max_steps = None


def check_fits(
    memory: MemoryEstimate,
    device_memory: int | None,
    device: torch.device,
    *,
    force: bool,
    fix: str,
    shared_by: int = 1,
) -> None:
    """Refuse a run whose estimate exceeds the device, naming `fix`, unless forced."""
    if device_memory is None or memory.total <= device_memory or force:
        return
    shared = f" (its RAM shared by {shared_by} processes)" if shared_by > 1 else ""
    raise LlmctlError(
        f"the estimated training memory {human_bytes(memory.total)} exceeds "
        f"{describe_device(device)}'s {human_bytes(device_memory)}{shared}; "
        f"{fix}, or pass --force to try anyway"
    )


@dataclass(frozen=True)
class Runtime:
    """Where and how a run computes, decided once before it starts."""

    device: torch.device
    precision: Precision
    compile: bool

    @property
    def memory(self) -> int | None:
        return device_memory_bytes(self.device)


def resolve_runtime(config: RunConfig, local_rank: int = 0, precision: str | None = None) -> Runtime:
    """The device, precision and compilation `config.train` asks for (`precision` overrides its
    precision), recorded in the config: the saved config says what 'auto' chose, so a resumed run
    computes exactly as before."""
    device = resolve_device(config.train.device, local_rank)
    chosen = resolve_precision(precision or config.train.precision, device)
    compile_model = resolve_compile(config.train.compile, device)
    config.train.precision = chosen.name
    config.train.compile = "on" if compile_model else "off"
    return Runtime(device, chosen, compile_model)


# ---------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Size:
    """How big a run is: parameters, what trains, FLOPs and tokens per optimizer step."""

    params: int
    trainable: int
    flops_per_token: int
    tokens_per_step: int
    total_steps: int | None

    @classmethod
    def of(cls, config: RunConfig, params: int, trainable: int, flops_per_token: int, world_size: int = 1):
        tokens_per_step = config.tokens_per_step * world_size
        return cls(
            params, trainable, flops_per_token, tokens_per_step, planned_steps(config, tokens_per_step)
        )


@dataclass
class StageParts:
    """What a stage hands the shared Trainer: its model and data, how it learns and what its
    checkpoints and events carry. The recipe core supplies everything else."""

    model: nn.Module
    batches: BatchSource
    loss_fn: LossFn = lm_loss
    model_io: ModelIO = field(default_factory=FullModelIO)
    optimizer_factory: OptimizerFactory = build_optimizer
    sampler: Sampler | None = None
    start_fields: dict[str, Any] = field(default_factory=dict)  # extra figures for the start event
    checkpoint_fields: dict[str, Any] = field(default_factory=dict)  # extra keys for each meta.json
    params: int | None = None  # where numel() misreads the model (4-bit packed weights)


@dataclass(frozen=True, kw_only=True)
class Plan:
    """What every stage's plan holds; a stage's subclass adds what it trains on and how to build
    its Trainer. Built whole, once every figure is known."""

    stage: str
    run: str
    config: RunConfig
    tokenizer: LoadedTokenizer
    runtime: Runtime
    size: Size
    memory: MemoryEstimate
    device_memory: int | None
    resume_from: Path | None
    overwrite: bool = False
    world_size: int = 1
    memory_shared_by: int = 1  # processes of one CPU node sharing its RAM (each GPU is its own)

    # ------------------------------------------------------------ derived figures

    @property
    def device(self) -> torch.device:
        return self.runtime.device

    @property
    def precision(self) -> Precision:
        return self.runtime.precision

    @property
    def compile(self) -> bool:
        return self.runtime.compile

    @property
    def params(self) -> int:
        return self.size.params

    @property
    def trainable(self) -> int:
        return self.size.trainable

    @property
    def fits(self) -> bool:
        return self.device_memory is None or self.memory.total <= self.device_memory

    @property
    def optimizer_name(self) -> str:
        return "AdamW"

    @property
    def total_tokens(self) -> int | None:
        return self.size.total_steps * self.size.tokens_per_step if self.size.total_steps else None

    # ------------------------------------------------------------ what the stage adds

    def details(self) -> dict[str, Any]:
        """The stage's own figures for the plan's summary."""
        return {}

    def head_rows(self) -> list[Row]:
        """The stage's lines at the top of the dry run: what it trains and on what."""
        return []

    def tail_rows(self) -> list[Row]:
        """The stage's lines at the end of the dry run: suggestions and notes."""
        return []

    def length_note(self) -> str:
        """What the run's length means in epochs of its data, for the dry run."""
        return ""

    def run_meta(self) -> dict[str, Any]:
        """The stage's fields of the run's registry row (beside the common ones)."""
        return {}

    def registry_links(self) -> dict[str, Any]:
        """The run row's parents: corpus, tokenizer, base_checkpoint."""
        return {}

    def stage_parts(self, dist: DistEnv) -> StageParts:
        """The stage's model, batches, loss, checkpoint format and sampler (seeded per rank)."""
        raise NotImplementedError

    # ------------------------------------------------------------ shared by every stage

    def build_trainer(
        self,
        workspace: Workspace,
        dist: DistEnv | None = None,
        *,
        console: Console | None = None,
        show_progress: bool = True,
        tracker_group: str | None = None,
        listeners: Sequence[Listener] = (),
    ) -> Trainer:
        """The stage's Trainer, resumed from the plan's checkpoint when there is one; rank 0 mirrors
        its events to the trackers of `train.report_to` (`tracker_group`: a tune study's name)."""
        dist = dist or DistEnv()
        parts = self.stage_parts(dist)
        run = RunInfo(
            name=self.run,
            stage=self.stage,
            dir=workspace.run_dir(self.run),
            registry=workspace.registry() if dist.is_main else None,
            preset=self.config.preset,
            tokenizer_file=self.tokenizer.path,
            start_fields=parts.start_fields,
            checkpoint_fields=parts.checkpoint_fields,
            params=parts.params,
        )
        trainer = Trainer(
            self.config,
            parts.model,
            parts.batches,
            run,
            device=self.device,
            precision=self.precision,
            compile_model=self.compile,
            dist_env=dist,
            loss_fn=parts.loss_fn,
            model_io=parts.model_io,
            optimizer_factory=parts.optimizer_factory,
            flops_per_token=self.size.flops_per_token,
            sampler=parts.sampler,
            console=console,
            show_progress=show_progress,
            listeners=[
                *listeners,
                *(
                    open_sinks(
                        self.config.train.report_to, workspace, self.run, group=tracker_group, console=console
                    )
                    if dist.is_main
                    else ()
                ),
            ],
        )
        if self.resume_from is not None:
            trainer.resume(self.resume_from)
        return trainer

    def summary(self) -> dict[str, Any]:
        """The plan as plain figures (what --dry-run --json prints)."""
        cfg = self.config
        return {
            "run": self.run,
            "stage": self.stage,
            "preset": cfg.preset,
            "device": describe_device(self.device),
            "precision": self.precision.name,
            "compile": self.compile,
            "activation_checkpointing": cfg.train.activation_checkpointing,
            "optimizer": self.optimizer_name,
            "world_size": self.world_size,
            "params": self.params,
            "trainable_params": self.trainable,
            "trainable_fraction": round(self.trainable / self.params, 6),
            "micro_batch_size": cfg.train.micro_batch_size,
            "grad_accum_steps": cfg.train.grad_accum_steps,
            "tokens_per_step": self.size.tokens_per_step,
            "total_steps": self.size.total_steps,
            "total_tokens": self.total_tokens,
            "max_time_s": cfg.train.max_time,
            "flops_per_token": self.size.flops_per_token,
            "memory": self.memory.as_dict(),
            "device_memory": self.device_memory,
            "device_memory_shared_by": self.memory_shared_by,
            "fits": self.fits,
            "resume_from": str(self.resume_from) if self.resume_from else None,
            "report_to": list(cfg.train.report_to),
            **self.details(),
        }

    def rows(self) -> list[Row]:
        """The plan as a dry run shows it."""
        return [
            *self.head_rows(),
            *self.compute_rows(),
            *self.memory_rows(),
            *self.tail_rows(),
            *(
                [("report to", describe_trackers(self.config.train.report_to))]
                if self.config.train.report_to
                else []
            ),
            *([("resume from", str(self.resume_from))] if self.resume_from else []),
        ]

    def compute_rows(self) -> list[Row]:
        cfg, ranks = self.config, self.world_size
        on = {True: "on", False: "off"}
        batch = f"{cfg.train.micro_batch_size} × {cfg.train.grad_accum_steps} accumulation"
        if ranks > 1:
            batch += f" × {ranks} ranks"
        steps = self.size.total_steps
        length = f"{steps:,} steps = {human_count(self.total_tokens)} tokens" if steps else "no step limit"
        if cfg.train.max_time:
            length += f" · at most {cfg.train.max_time:.0f} s"
        return [
            ("device", describe_device(self.device) + (f" × {ranks}" if ranks > 1 else "")),
            (
                "precision",
                f"{self.precision.name} · compile {on[self.compile]} · activation checkpointing "
                f"{on[cfg.train.activation_checkpointing]} · {self.optimizer_name}",
            ),
            ("batch", f"{batch} = {self.size.tokens_per_step:,} tokens per step"),
            ("length", length + self.length_note()),
        ]

    def memory_rows(self) -> list[Row]:
        memory = self.memory
        fits = "[green]fits[/green]" if self.fits else "[red]does not fit[/red]"
        device = human_bytes(self.device_memory) if self.device_memory else "unknown"
        if self.memory_shared_by > 1:
            device += f" (RAM / {self.memory_shared_by} processes)"
        return [
            (
                "memory",
                f"{human_bytes(memory.total)} estimated (weights {human_bytes(memory.weights)}, "
                f"gradients {human_bytes(memory.gradients)}, optimizer {human_bytes(memory.optimizer)}, "
                f"activations {human_bytes(memory.activations)})",
            ),
            *self.memory_comparison_rows(),
            ("device memory", f"{device} · {fits}"),
        ]

    def memory_comparison_rows(self) -> list[Row]:
        return []

    def headline(self) -> str:
        """One line announcing the run as it starts."""
        action = f"resuming from {self.resume_from.name}" if self.resume_from else "starting"
        what = (
            f"{human_count(self.trainable)} of {human_count(self.params)} params trained"
            if self.trainable != self.params
            else f"{human_count(self.params)} params"
        )
        ranks = f" × {self.world_size}" if self.world_size > 1 else ""
        compiled = " + compile" if self.compile else ""
        return (
            f"[bold]{self.run}[/bold] · {self.describe_stage()} · {action} · {what} · "
            f"{self.precision.name}{compiled} · {describe_device(self.device)}{ranks}"
        )

    def describe_stage(self) -> str:
        return self.stage


# ---------------------------------------------------------------- start and train


def start_run(workspace: Workspace, plan: Plan) -> Path:
    """Create (or, resuming, refresh) runs/<run>/ with its config.yaml and registry row."""
    meta = {
        "preset": plan.config.preset,
        "config": plan.config.model_dump(mode="json"),
        "params": plan.params,
        "tokenizer_sha256": plan.tokenizer.sha256,
        "world_size": plan.world_size,
        "max_steps": plan.size.total_steps,
        "device": describe_device(plan.device),
        **plan.run_meta(),
    }
    return open_run(
        workspace,
        plan.run,
        plan.stage,
        plan.config,
        meta,
        resuming=plan.resume_from is not None,
        overwrite=plan.overwrite,
        **plan.registry_links(),
    )


def train(
    workspace: Workspace,
    plan: Plan,
    *,
    dist: DistEnv | None = None,
    console: Console | None = None,
    on_start: Callable[[Plan], None] | None = None,
    tracker_group: str | None = None,
    listeners: Sequence[Listener] = (),
    on_trainer: Callable[[Trainer], None] | None = None,
) -> TrainResult:
    """Start the run and fit the stage's Trainer. In a distributed run, rank 0 started it before
    the other ranks planned (`pretrain.join_distributed_run`); every rank fits.

    `tracker_group` groups the run with others in the trackers (tune: the study's name);
    `listeners` hear every event rank 0 writes; `on_trainer` receives the built Trainer before it
    fits, for a listener that acts on the run (a search pruning a trial calls its `request_stop`)."""
    dist = dist or DistEnv()
    # one writer per run: rank 0 holds the run's lock while it trains (another trainer of the same
    # run, or an --overwrite of it, is refused naming this process)
    held = writer_lock(workspace.root, "run", plan.run) if dist.is_main else contextlib.nullcontext()
    try:
        with held:
            if not dist.enabled:
                start_run(workspace, plan)
            if on_start is not None and dist.is_main:
                on_start(plan)
            trainer = plan.build_trainer(
                workspace, dist, console=console, tracker_group=tracker_group, listeners=listeners
            )
            if on_trainer is not None:
                on_trainer(trainer)
            return trainer.fit()
    finally:
        distributed.destroy_process_group()


def event_sampler(
    tokenizer: LoadedTokenizer,
    generation: GenerationConfig,
    seed: int,
    prompt: str,
    stop: list[str] | None = None,
) -> Sampler:
    """Samples for the event stream: the model's continuation of `prompt`, with the run's generation
    settings, at most SAMPLE_MAX_NEW_TOKENS tokens, and a fixed seed in a generator of its own, so
    sampling never disturbs the training RNG."""
    config = generation.model_copy(
        update={
            "max_new_tokens": min(generation.max_new_tokens, SAMPLE_MAX_NEW_TOKENS),
            "seed": seed,
            "stop": [*generation.stop, *(stop or [])],
        }
    )

    def sample(model: torch.nn.Module) -> list[tuple[str, str]]:
        from llmctl.generate import Engine

        (completion,) = Engine(model, tokenizer).generate([prompt], config)
        return [(prompt, completion.text)]

    return sample
