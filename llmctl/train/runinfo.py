"""What the Trainer is told about its run, and what it reports when the run ends."""

from __future__ import annotations

import math
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llmctl.config import RunConfig, TrainConfig
from llmctl.events import EndReason
from llmctl.workspace import Registry

# builds the optimizer over the model's trainable parameters (QLoRA brings bitsandbytes' paged AdamW)
OptimizerFactory = Callable[[nn.Module, TrainConfig, torch.device], torch.optim.Optimizer]
# the model in, (prompt, generated text) pairs out; run every train.sample_every steps on rank 0
Sampler = Callable[[nn.Module], list[tuple[str, str]]]


@dataclass
class RunInfo:
    """Where a run lives and what it is; the registry row must exist before `fit` (rank 0)."""

    name: str
    stage: str
    dir: Path
    registry: Registry | None
    preset: str | None = None
    tokenizer_file: Path | None = None
    start_fields: dict[str, Any] = field(default_factory=dict)  # extra figures for the start event
    checkpoint_fields: dict[str, Any] = field(default_factory=dict)  # extra keys for each meta.json
    params: int | None = None  # the model's parameter count where numel() misreads it (4-bit packed weights)


@dataclass
class TrainResult:
    reason: EndReason
    step: int
    tokens: int
    elapsed_s: float
    best_val_loss: float | None
    last_checkpoint: Path | None
    signal: int | None = None

    @property
    def exit_code(self) -> int:
        if self.reason is EndReason.INTERRUPTED:  # as the shell reports a signal: 128 + its number
            return 128 + (self.signal or signal.SIGINT)
        return self.reason.exit_code


def planned_steps(config: RunConfig, tokens_per_step: int) -> int | None:
    """Optimizer steps the limits allow: max_steps, or max_tokens in whole steps, the smaller."""
    limits = []
    if config.train.max_steps:
        limits.append(config.train.max_steps)
    if config.train.max_tokens:
        limits.append(math.ceil(config.train.max_tokens / tokens_per_step))
    return min(limits) if limits else None
