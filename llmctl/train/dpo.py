"""Preference tuning (DPO, IPO, hinge) as a recipe: full weights, LoRA and QLoRA.

A DPO run starts from a trained (usually instruction-tuned) checkpoint, as finetune does, and
shares its config resolution, base, adapters and 4-bit base (llmctl.train.adapt). What it adds:
pairs instead of examples, the preference loss, and a reference model the policy is held to:

    --lora / --qlora            the policy with its adapters disabled: the base, no second copy
    full weights                a frozen copy of the base (or of --reference)
    --precompute-reference      every pair scored once before training, the scores stored with
                                the run (a resume reuses them), then the reference freed

Every check runs before anything is written: a refused run leaves no directory and no row.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llmctl.checkpoint import load as loader
from llmctl.checkpoint.files import AdapterModelIO, FullModelIO
from llmctl.config import RunConfig
from llmctl.data import preference, sft
from llmctl.data.preference import PairSource
from llmctl.errors import UsageError
from llmctl.model.sizing import count_parameters, human_bytes, human_count, lookup_parameters
from llmctl.train import adapt, recipe
from llmctl.train.adapt import Base, open_base
from llmctl.train.allocator import return_large_frees_to_the_os
from llmctl.train.distributed import DistEnv, seed_per_rank
from llmctl.train.dpo_data import (
    EncodedPreference,
    encode_preference,
    load_or_score,
    make_batches,
    score_pairs,
)
from llmctl.train.finetune_config import FinetuneOptions, resolve_finetune_config, resume_state
from llmctl.train.optim import build_optimizer, paged_adamw_8bit
from llmctl.train.preference_loss import PreferenceLoss, Reference, adapters_off, frozen_reference
from llmctl.train.recipe import Plan, Row, StageParts
from llmctl.train.runs import check_run_name, starts_over
from llmctl.workspace import Workspace

STAGE = "dpo"
# DPO moves a trained policy a little: a low rate (TRL's default is 1e-6 for all weights), no decay
DPO_TRAIN = {
    "lr": 5e-6,
    "min_lr": 5e-7,
    "warmup_steps": 10,
    "weight_decay": 0.0,
    "max_steps": 500,
    "eval_every": 50,
    "save_every": 100,
}
DPO_ADAPTER_LR = 5e-5
REFERENCE_MODES = {
    "adapters-off": "the base: the policy with its adapters disabled (no second copy)",
    "frozen-copy": "a frozen copy of the base",
    "precomputed": "scored once before training and stored with the run, then freed",
}


@dataclass
class DpoOptions(FinetuneOptions):
    stage: str = STAGE
    loss: str | None = None
    beta: float | None = None
    label_smoothing: float | None = None
    precompute_reference: bool | None = None
    reference: str | None = None  # full weights: another checkpoint as the frozen reference


@dataclass(frozen=True, kw_only=True)
class DpoPlan(Plan):
    base: Base
    reference: Base | None  # --reference; None: the base itself
    data: PairSource
    encoded: EncodedPreference
    run_dir: Path
    reference_bytes: int  # what the reference holds in memory while training
    frozen_copy_bytes: int  # what a frozen copy would hold (the dry run's comparison)

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
    def reference_mode(self) -> str:
        if self.config.dpo.precompute_reference:
            return "precomputed"
        return "adapters-off" if self.adapter else "frozen-copy"

    @property
    def paged_optimizer(self) -> bool:
        return adapt.paged_optimizer(self.config, self.device)

    @property
    def optimizer_name(self) -> str:
        return "paged AdamW 8-bit" if self.paged_optimizer else "AdamW"

    # ------------------------------------------------------------ the plan's figures and rows

    def details(self) -> dict[str, Any]:
        cfg, steps = self.config, self.size.total_steps
        return {
            "method": self.method,
            "loss": cfg.dpo.loss,
            "beta": cfg.dpo.beta,
            "label_smoothing": cfg.dpo.label_smoothing,
            "reference": self.reference_mode,
            "reference_checkpoint": str((self.reference or self.base).path),
            "reference_bytes": self.reference_bytes,
            "frozen_copy_bytes": self.frozen_copy_bytes,
            "base": str(self.base.path),
            "data": cfg.data.corpus,
            "validation": self.data.val_note,
            "prompt_style": cfg.data.prompt_style,
            **adapt.max_length_details(cfg),
            "train_pairs": len(self.encoded.train),
            "val_pairs": len(self.encoded.val),
            "adapter": cfg.adapter.model_dump() if self.adapter else None,
            "adapter_params": adapt.adapter_counts(cfg) or None,
            "epochs": round(steps * cfg.global_batch_size / len(self.encoded.train), 2) if steps else None,
            "notes": self.encoded.notes,
        }

    def head_rows(self) -> list[Row]:
        cfg = self.config
        method = self.method
        loss = f"{cfg.dpo.loss} · beta {cfg.dpo.beta:g}"
        if cfg.dpo.label_smoothing:
            loss += f" · label smoothing {cfg.dpo.label_smoothing:g}"
        return [
            ("base", str(self.base.path)),
            ("method", method),
            ("loss", loss + " · log-probabilities summed over reply tokens"),
            (
                "data",
                f"{cfg.data.corpus} · {len(self.encoded.train):,} pairs · {cfg.data.prompt_style} style",
            ),
            ("validation", f"{len(self.encoded.val):,} pairs: {self.data.val_note}"),
            adapt.max_length_row(cfg),
            (
                "parameters",
                f"{human_count(self.trainable)} trained of {human_count(self.params)} "
                f"({100 * self.trainable / self.params:.2f}%)",
            ),
            *adapt.adapter_rows(cfg),
            adapt.lr_row(cfg, DPO_TRAIN["lr"], DPO_ADAPTER_LR),
        ]

    def length_note(self) -> str:
        epochs = self.details()["epochs"]
        return f" · {epochs} epochs" if epochs else ""

    def memory_comparison_rows(self) -> list[Row]:
        mode = self.reference_mode
        source = f" ({self.reference.path})" if self.reference else ""
        text = (
            f"{REFERENCE_MODES[mode]}{source}: {human_bytes(self.reference_bytes)} of weights while training"
        )
        if mode == "frozen-copy":
            text += " · --precompute-reference frees them after one scoring pass"
        elif mode == "precomputed" and not self.adapter:
            text += f" (a frozen copy would hold {human_bytes(self.frozen_copy_bytes)})"
        return [("reference", text)]

    def tail_rows(self) -> list[Row]:
        return [("note", note) for note in self.encoded.notes]

    def describe_stage(self) -> str:
        return f"{self.stage} ({self.method}, {self.config.dpo.loss}, beta {self.config.dpo.beta:g})"

    # ------------------------------------------------------------ the run

    def run_meta(self) -> dict[str, Any]:
        return {
            "task": "preference",
            "method": self.method,
            "base_checkpoint": str(self.base.path),
            "reference_checkpoint": str(self.reference.path) if self.reference else None,
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
        """The policy, the reference it is held to, and batches of pairs."""
        cfg = self.config
        if self.device.type == "cpu":
            return_large_frees_to_the_os()
        torch.manual_seed(cfg.train.seed)  # LoRA's A matrices start the same everywhere
        model = adapt.build_model(self.base.path, cfg, self.device).to(self.device)
        table, reference = None, None
        if self.reference_mode == "precomputed":
            # scored before the first step, or found stored with the run by a resumed one
            table = load_or_score(
                self.run_dir,
                self.encoded,
                lambda: score_pairs(
                    self._reference(model, copy_base=False),
                    self.encoded.pairs,
                    cfg,
                    self.tokenizer.pad_id,
                    self.device,
                    self.precision,
                ),
                write=dist.is_main,
            )
        else:
            # built before a resumed run's weights reach the policy, so the reference is the base
            reference = self._reference(model, copy_base=True)
        seed_per_rank(cfg.train.seed, dist)
        batches = make_batches(
            cfg, self.encoded, self.tokenizer.pad_id, self.device, table, dist.rank, dist.world_size
        )
        prompt = self.data.val[0]["messages"] if self.data.val else self.data.train[0]["messages"]
        return StageParts(
            model,
            batches,
            loss_fn=PreferenceLoss(cfg.dpo.loss, cfg.dpo.beta, cfg.dpo.label_smoothing, reference),
            model_io=AdapterModelIO() if self.adapter else FullModelIO(),
            optimizer_factory=paged_adamw_8bit if self.paged_optimizer else build_optimizer,
            sampler=adapt.reply_sampler(self.tokenizer, cfg, prompt),
            start_fields={
                "data": cfg.data.corpus,
                "tokenizer": cfg.data.tokenizer,
                "task": "preference",
                "base_checkpoint": str(self.base.path),
                "reference": self.reference_mode,
            },
            checkpoint_fields={"tokenizer_sha256": self.tokenizer.sha256, **self.run_meta()},
            params=self.params,
        )

    def _reference(self, model: torch.nn.Module, copy_base: bool) -> Reference:
        """The base with adapters off; else --reference, or the base as the policy starts (a copy of
        it where the policy is to train beside it)."""
        if self.adapter:
            return adapters_off(model)
        if self.reference is not None:
            frozen = loader.load_weights(self.reference.path, device=self.device)
        else:
            frozen = copy.deepcopy(model) if copy_base else model
        if frozen is not model:
            frozen.requires_grad_(False).eval()
        return frozen_reference(frozen)


# ---------------------------------------------------------------- plan


def make_plan(
    workspace: Workspace, options: DpoOptions, warn: Callable[[str], None] | None = None
) -> DpoPlan:
    """Resolve and check everything a run needs, writing nothing."""
    adapt.check_run_names(options, "dpo")
    saved = run_meta = None
    if options.resume:
        saved, run_meta = resume_state(workspace, options)
        if options.reference is not None:
            raise UsageError("--reference cannot change when resuming; a resumed run keeps its reference")
        base_ref, reference_ref = run_meta["base_checkpoint"], run_meta.get("reference_checkpoint")
        options.lora = bool(saved["adapter"]["enabled"])
        options.qlora = saved["adapter"]["quantize"] == "nf4"
    else:
        base_ref, reference_ref = options.model, options.reference
    base = open_base(workspace, base_ref, "dpo")
    config = resolve_finetune_config(
        options,
        base.config if saved is None else None,
        saved,
        stage_flags={
            "data.packing": False,  # each side is scored on its own
            "dpo.loss": options.loss,
            "dpo.beta": options.beta,
            "dpo.label_smoothing": options.label_smoothing,
            "dpo.precompute_reference": options.precompute_reference,
        },
        stage_train=DPO_TRAIN,
        adapter_lr=DPO_ADAPTER_LR,
        what="dpo",
    )
    sft.check_prompt_style(base.tokenizer, config.data.prompt_style)
    reference = _open_reference(workspace, reference_ref, base, config) if reference_ref else None
    data = preference.open_pairs(workspace, config.data.corpus)
    adapt.check_adapter(config)

    run = options.run or f"{Path(str(config.data.corpus)).stem}-dpo-{time.strftime('%Y%m%d-%H%M%S')}"
    resume_from = check_run_name(workspace, run, options, warn)
    runtime = adapt.resolve_runtime(config)
    encoded = encode_preference(config, base.tokenizer, data)
    sizing = adapt.size_run(config, runtime, sequences_per_row=2)
    frozen_copy = 4 * count_parameters((reference or base).config.model)
    precomputed = config.dpo.precompute_reference
    reference_bytes = 0 if config.adapter.enabled or precomputed else frozen_copy
    memory = dataclasses.replace(sizing.memory, weights=sizing.memory.weights + reference_bytes)
    size = sizing.size
    if not precomputed:  # the reference's forward over both sides: 2N FLOPs a token, twice
        forward = 4 * (sizing.base_params - lookup_parameters(config.model))
        size = dataclasses.replace(size, flops_per_token=size.flops_per_token + forward)
    recipe.check_fits(
        memory,
        runtime.memory,
        runtime.device,
        force=options.force,
        fix="lower train.micro_batch_size, use --lora or --qlora, or --precompute-reference",
    )
    return DpoPlan(
        stage=STAGE,
        run=run,
        config=config,
        tokenizer=base.tokenizer,
        runtime=runtime,
        size=size,
        memory=memory,
        device_memory=runtime.memory,
        resume_from=resume_from,
        overwrite=starts_over(options, resume_from),
        base=base,
        reference=reference,
        data=data,
        encoded=encoded,
        run_dir=workspace.run_dir(run),
        reference_bytes=reference_bytes,
        frozen_copy_bytes=frozen_copy,
    )


def _open_reference(workspace: Workspace, ref: str, base: Base, config: RunConfig) -> Base:
    """--reference: a full-weight run's frozen reference, which must score the policy's tokens."""
    if config.adapter.enabled:
        raise UsageError(
            "--reference goes with full-weight dpo; with --lora or --qlora the reference is the base "
            "with its adapters off (drop --reference)"
        )
    reference = open_base(workspace, ref, "dpo")
    if reference.tokenizer.sha256 != base.tokenizer.sha256:
        raise UsageError(
            f"reference '{ref}' uses tokenizer '{reference.tokenizer.name}', not the policy's "
            f"'{base.tokenizer.name}' ({base.path}); a reference must score the same tokens: give a "
            "checkpoint trained with the policy's tokenizer"
        )
    if reference.config.model.context_length < config.sequence_length:
        raise UsageError(
            f"reference '{ref}' has a context of {reference.config.model.context_length} tokens, shorter "
            f"than the rows of {config.sequence_length}; give one with a longer context or a lower "
            "--max-length"
        )
    return reference
