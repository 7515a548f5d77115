"""Finetuning as a recipe: full, LoRA and QLoRA; instruction tuning (SFT) and classification.

Resolve the config on top of the base checkpoint's, check everything, plan, then hand the shared
Trainer the base model (wrapped with adapters, or quantized and wrapped), the rendered examples
and, for classification, the classifier's loss. Like pretraining, every check runs before
anything is written: a refused run leaves no runs/<name> directory and no registry row.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llmctl.checkpoint.files import AdapterModelIO, FullModelIO
from llmctl.data import sft
from llmctl.errors import UsageError
from llmctl.model.classifier import TASK
from llmctl.model.sizing import MemoryEstimate, human_bytes, human_count
from llmctl.train import adapt, recipe
from llmctl.train.adapt import Base, open_base
from llmctl.train.allocator import return_large_frees_to_the_os
from llmctl.train.distributed import DistEnv, seed_per_rank
from llmctl.train.finetune_config import (
    ADAPTER_LR,
    FINETUNE_TRAIN,
    TASKS,
    FinetuneOptions,
    resolve_finetune_config,
    resume_state,
)
from llmctl.train.finetune_data import EncodedData, encode_data, make_batches
from llmctl.train.losses import classify_loss, lm_loss
from llmctl.train.optim import build_optimizer, paged_adamw_8bit
from llmctl.train.recipe import Plan, Row, StageParts
from llmctl.train.runinfo import Sampler
from llmctl.train.runs import check_run_name, starts_over
from llmctl.workspace import Workspace

__all__ = ["Base", "FinetuneOptions", "FinetunePlan", "build_model", "make_plan", "open_base"]


@dataclass(frozen=True, kw_only=True)
class FinetunePlan(Plan):
    task: str
    base: Base
    data: sft.DataSource
    labels: list[str] | None
    encoded: EncodedData
    unquantized_memory: MemoryEstimate | None  # QLoRA: the same LoRA run on the full-precision base

    @property
    def adapter(self) -> bool:
        return self.config.adapter.enabled

    @property
    def quantized(self) -> bool:
        return self.config.adapter.quantize == "nf4"

    @property
    def method(self) -> str:
        return "qlora" if self.quantized else "lora" if self.adapter else "full"

    @property
    def paged_optimizer(self) -> bool:
        return adapt.paged_optimizer(self.config, self.device)

    @property
    def optimizer_name(self) -> str:
        return "paged AdamW 8-bit" if self.paged_optimizer else "AdamW"

    # ------------------------------------------------------------ the plan's figures and rows

    def details(self) -> dict[str, Any]:
        cfg, encoded, sft_task = self.config, self.encoded, self.task == "sft"
        steps = self.size.total_steps
        details = {
            "task": self.task,
            "method": self.method,
            "base": str(self.base.path),
            "data": cfg.data.corpus,
            "validation": self.data.val_note,
            "prompt_style": cfg.data.prompt_style if sft_task else None,
            "packing": cfg.data.packing if sft_task else None,
            **adapt.max_length_details(cfg),
            "labels": self.labels,
            "train_examples": len(encoded.train),
            "val_examples": len(encoded.val),
            "train_rows": encoded.train_rows,
            "adapter": cfg.adapter.model_dump() if self.adapter else None,
            "adapter_params": adapt.adapter_counts(cfg) or None,
            "epochs": round(steps * cfg.global_batch_size / encoded.train_rows, 2) if steps else None,
            "notes": encoded.notes,
        }
        if self.unquantized_memory is not None:
            saved = self.unquantized_memory.total - self.memory.total
            details["lora_unquantized_memory"] = self.unquantized_memory.as_dict()
            details["memory_saved"] = saved
            details["memory_saved_fraction"] = round(saved / self.unquantized_memory.total, 4)
        return details

    def head_rows(self) -> list[Row]:
        cfg, encoded = self.config, self.encoded
        method = self.method
        data = f"{cfg.data.corpus} · {len(encoded.train):,} examples in {encoded.train_rows:,} rows"
        if self.task == "sft":
            data += f" · {cfg.data.prompt_style} style · {'packed' if cfg.data.packing else 'padded'}"
        else:
            data += f" · labels {', '.join(self.labels)}"
        return [
            ("base", str(self.base.path)),
            ("task", f"{self.task} · {method}"),
            ("data", data),
            ("validation", f"{len(encoded.val):,} examples: {self.data.val_note}"),
            adapt.max_length_row(cfg),
            (
                "parameters",
                f"{human_count(self.trainable)} trained of {human_count(self.params)} "
                f"({100 * self.trainable / self.params:.2f}%)",
            ),
            *adapt.adapter_rows(cfg),
            adapt.lr_row(cfg, FINETUNE_TRAIN["lr"], ADAPTER_LR),
        ]

    def length_note(self) -> str:
        epochs = self.details()["epochs"]
        return f" · {epochs} epochs" if epochs else ""

    def memory_comparison_rows(self) -> list[Row]:
        if self.unquantized_memory is None:
            return []
        saved = self.unquantized_memory.total - self.memory.total
        return [
            (
                "vs LoRA",
                f"{human_bytes(self.unquantized_memory.total)} for LoRA on the unquantized base: 4-bit saves "
                f"{human_bytes(saved)} ({100 * saved / self.unquantized_memory.total:.0f}%)",
            )
        ]

    def tail_rows(self) -> list[Row]:
        return [("note", note) for note in self.encoded.notes]

    def describe_stage(self) -> str:
        return f"{self.stage} ({self.method}, {self.task})"

    # ------------------------------------------------------------ the run

    def run_meta(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "labels": self.labels,
            "base_checkpoint": str(self.base.path),
            "trainable_params": self.trainable,
            "data": self.config.data.corpus,
        }

    def registry_links(self) -> dict[str, Any]:
        return {
            "corpus": self.data.corpus,
            "tokenizer": self.config.data.tokenizer,
            "base_checkpoint": self.base.registry_id,
        }

    def stage_parts(self, dist: DistEnv) -> StageParts:
        """The base (wrapped, quantized, or as a classifier) and batches of the rendered examples."""
        cfg = self.config
        if self.device.type == "cpu":
            return_large_frees_to_the_os()
        # the classifier head and LoRA's A matrices start the same everywhere
        torch.manual_seed(cfg.train.seed)
        model = build_model(self)
        seed_per_rank(cfg.train.seed, dist)
        batches = make_batches(
            cfg, self.encoded, self.task, self.tokenizer.pad_id, self.device, dist.rank, dist.world_size
        )
        return StageParts(
            model,
            batches,
            loss_fn=classify_loss if self.task == TASK else lm_loss,
            model_io=AdapterModelIO() if self.adapter else FullModelIO(),
            optimizer_factory=paged_adamw_8bit if self.paged_optimizer else build_optimizer,
            sampler=sft_sampler(self),
            start_fields={
                "data": cfg.data.corpus,
                "tokenizer": cfg.data.tokenizer,
                "task": self.task,
                "base_checkpoint": str(self.base.path),
            },
            checkpoint_fields={"tokenizer_sha256": self.tokenizer.sha256, **self.run_meta()},
            params=self.params,
        )


def make_plan(
    workspace: Workspace,
    options: FinetuneOptions,
    warn: Callable[[str], None] | None = None,
    inspect_only: bool = False,
) -> FinetunePlan:
    """Resolve and check everything a run needs, writing nothing."""
    adapt.check_run_names(options, "finetuning")
    saved = run_meta = None
    if options.resume:
        saved, run_meta = resume_state(workspace, options)
        base_ref, task = run_meta["base_checkpoint"], run_meta["task"]
        options.lora = bool(saved["adapter"]["enabled"])
    else:
        base_ref, task = options.model, options.task or "sft"
        if task not in TASKS:
            raise UsageError(f"unknown --task '{task}'; use sft or classify")
    base = open_base(workspace, base_ref)
    config = resolve_finetune_config(options, base.config if saved is None else None, saved)
    if task == "sft":
        sft.check_prompt_style(base.tokenizer, config.data.prompt_style)
    data = sft.open_data(workspace, config.data.corpus)
    adapt.check_adapter(config, inspect_only)

    run = (
        options.run
        or f"{Path(str(config.data.corpus)).stem}-{options.stage}-{time.strftime('%Y%m%d-%H%M%S')}"
    )
    resume_from = None if inspect_only else check_run_name(workspace, run, options, warn)
    runtime = adapt.resolve_runtime(config)
    labels = run_meta.get("labels") if run_meta else None
    if task == TASK and labels is None:
        labels = sft.label_set(data.train, f"data '{data.name}'")
    encoded = encode_data(config, base.tokenizer, data, task, labels)
    sizing = adapt.size_run(config, runtime, labels)
    device_memory = runtime.memory
    if not inspect_only:
        recipe.check_fits(
            sizing.memory,
            device_memory,
            runtime.device,
            force=options.force,
            fix="lower train.micro_batch_size, use --lora or qlora",
        )
    return FinetunePlan(
        stage=options.stage,
        run=run,
        config=config,
        tokenizer=base.tokenizer,
        runtime=runtime,
        size=sizing.size,
        memory=sizing.memory,
        device_memory=device_memory,
        resume_from=resume_from,
        overwrite=starts_over(options, resume_from),
        task=task,
        base=base,
        data=data,
        labels=labels,
        encoded=encoded,
        unquantized_memory=sizing.unquantized,
    )


# ---------------------------------------------------------------- the model and its samples


def build_model(plan: FinetunePlan) -> nn.Module:
    """The base, as a classifier if asked, quantized for QLoRA, wrapped with LoRA for adapters."""
    labels = plan.labels if plan.task == TASK else None
    return adapt.build_model(plan.base.path, plan.config, plan.device, labels)


def sft_sampler(plan: FinetunePlan) -> Sampler | None:
    """Samples for the event stream: the model's reply to the first validation prompt."""
    if plan.task == TASK:
        return None
    messages = sft.messages_of(plan.data.val[0], f"data '{plan.data.name}'")
    last_reply = max(i for i, message in enumerate(messages) if message["role"] == "assistant")
    return adapt.reply_sampler(plan.tokenizer, plan.config, messages[:last_reply])
