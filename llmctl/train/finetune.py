"""Finetuning as a recipe: full, LoRA and QLoRA; instruction tuning (SFT) and classification.

Resolve the config on top of the base checkpoint's, check everything, plan, then hand the shared
Trainer the base model (wrapped with adapters, or quantized and wrapped), the rendered examples
and, for classification, the classifier's loss. Like pretraining, every check runs before
anything is written: a refused run leaves no runs/<name> directory and no registry row.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import dataclasses
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch import nn

from llmctl.checkpoint import load as loader
from llmctl.checkpoint.files import AdapterModelIO, FullModelIO, read_config, read_meta, write_checkpoint
from llmctl.checkpoint.refs import resolve_model_ref
from llmctl.config import RunConfig, load_yaml_file, parse_assignment, resolve_config
from llmctl.data import sft
from llmctl.errors import LlmctlError, UsageError
from llmctl.model import lora as lora_model
from llmctl.model import quantize
from llmctl.model.classifier import TASK, classifier_from
from llmctl.model.sizing import (
    MemoryEstimate,
    count_parameters,
    estimate_training_memory,
    flops_per_token,
    human_bytes,
)
from llmctl.model.transformer import Attention, Transformer
from llmctl.tokenizer import END_OF_TURN_TOKEN, LoadedTokenizer, load_tokenizer_file
from llmctl.train.distributed import DistEnv, seed_per_rank
from llmctl.train.losses import classify_loss, lm_loss
from llmctl.train.optim import build_optimizer, paged_adamw_8bit
from llmctl.train.precision import (
    Precision,
    describe_device,
    device_memory_bytes,
    resolve_compile,
    resolve_device,
    resolve_precision,
)
from llmctl.train.pretrain import SAMPLE_MAX_NEW_TOKENS
from llmctl.train.runs import RunOptions, check_run_name, open_run
from llmctl.train.trainer import RunInfo, Sampler, Trainer, planned_steps
from llmctl.workspace import Workspace, check_name, checkpoint_name

TASKS = ("sft", TASK)
# Finetuning starts from trained weights: a short warmup, a lower rate than pretraining (higher for
# adapters, which start at zero), and no weight decay pulling the base's weights toward zero.
FINETUNE_TRAIN = {
    "lr": 1e-4,
    "min_lr": 1e-5,
    "warmup_steps": 20,
    "weight_decay": 0.0,
    "max_steps": 500,
    "eval_every": 50,
    "save_every": 100,
}
ADAPTER_LR = 2e-4
MODEL_KEYS_ALLOWED = ("model.dropout",)


@dataclass
class FinetuneOptions(RunOptions):
    stage: str = "finetune"  # or 'qlora'
    model: str | None = None
    data: str | None = None
    task: str | None = None
    prompt_style: str | None = None
    packing: bool | None = None
    lora: bool = False
    lora_r: int | None = None
    lora_alpha: float | None = None
    lora_dropout: float | None = None
    lora_targets: list[str] | None = None


@dataclass
class FinetunePlan:
    run: str
    stage: str
    task: str
    config: RunConfig
    tokenizer: LoadedTokenizer
    base_path: Path
    base_id: int | None
    data: sft.DataSource
    labels: list[str] | None
    device: torch.device
    precision: Precision
    compile: bool
    params: int
    trainable: int
    flops_per_token: int
    tokens_per_step: int
    total_steps: int | None
    memory: MemoryEstimate
    unquantized_memory: MemoryEstimate | None  # QLoRA: the same LoRA run on the full-precision base
    device_memory: int | None
    resume_from: Path | None
    encoded: EncodedData | None = None

    @property
    def fits(self) -> bool:
        return self.device_memory is None or self.memory.total <= self.device_memory

    @property
    def adapter(self) -> bool:
        return self.config.adapter.enabled

    def summary(self) -> dict[str, Any]:
        cfg = self.config
        total_tokens = self.total_steps * self.tokens_per_step if self.total_steps else None
        summary = {
            "run": self.run,
            "stage": self.stage,
            "task": self.task,
            "method": "qlora" if cfg.adapter.quantize == "nf4" else "lora" if self.adapter else "full",
            "base": str(self.base_path),
            "data": cfg.data.corpus,
            "validation": self.data.val_note,
            "prompt_style": cfg.data.prompt_style if self.task == "sft" else None,
            "packing": cfg.data.packing if self.task == "sft" else None,
            "labels": self.labels,
            "train_examples": len(self.encoded.train),
            "val_examples": len(self.encoded.val),
            "train_rows": self.encoded.train_rows,
            "device": describe_device(self.device),
            "precision": self.precision.name,
            "compile": self.compile,
            "activation_checkpointing": cfg.train.activation_checkpointing,
            "optimizer": "paged AdamW 8-bit" if _paged_optimizer(self) else "AdamW",
            "params": self.params,
            "trainable_params": self.trainable,
            "trainable_fraction": round(self.trainable / self.params, 6),
            "adapter": cfg.adapter.model_dump() if self.adapter else None,
            "micro_batch_size": cfg.train.micro_batch_size,
            "grad_accum_steps": cfg.train.grad_accum_steps,
            "tokens_per_step": self.tokens_per_step,
            "total_steps": self.total_steps,
            "total_tokens": total_tokens,
            "epochs": round(self.total_steps * cfg.global_batch_size / self.encoded.train_rows, 2)
            if self.total_steps
            else None,
            "max_time_s": cfg.train.max_time,
            "memory": _memory_dict(self.memory),
            "device_memory": self.device_memory,
            "fits": self.fits,
            "resume_from": str(self.resume_from) if self.resume_from else None,
            "notes": self.encoded.notes,
        }
        if self.unquantized_memory is not None:
            saved = self.unquantized_memory.total - self.memory.total
            summary["lora_unquantized_memory"] = _memory_dict(self.unquantized_memory)
            summary["memory_saved"] = saved
            summary["memory_saved_fraction"] = round(saved / self.unquantized_memory.total, 4)
        return summary


def _memory_dict(memory: MemoryEstimate) -> dict[str, int]:
    return {
        "weights": memory.weights,
        "gradients": memory.gradients,
        "optimizer": memory.optimizer,
        "activations": memory.activations,
        "total": memory.total,
    }


# ---------------------------------------------------------------- config


def _resume_state(workspace: Workspace, options: FinetuneOptions) -> tuple[dict[str, Any], dict[str, Any]]:
    """A resumed run's saved config tree and registry meta; the data and base stay the run's."""
    saved = workspace.run_dir(options.run) / "config.yaml"
    row = workspace.registry(create=False).run(options.run)
    if not saved.is_file() or row is None:
        raise UsageError(f"run '{options.run}' does not exist in {workspace.root}; nothing to resume")
    if row["stage"] != options.stage:
        raise UsageError(f"run '{options.run}' is a {row['stage']} run; resume it with llmctl {row['stage']}")
    tree = load_yaml_file(saved, "saved run config")
    if options.data is not None and options.data != tree["data"]["corpus"]:
        raise UsageError(
            f"--data '{options.data}' differs from the run's '{tree['data']['corpus']}'; "
            "a resumed run keeps its data (start a new run instead)"
        )
    if options.model is not None:
        raise UsageError("--model cannot change when resuming; a resumed run keeps its base (drop --model)")
    return tree, row["meta"]


def _model_overrides(options: FinetuneOptions) -> list[str]:
    keys = [parse_assignment(item)[0] for item in options.overrides]
    if options.config_file is not None:
        tree = load_yaml_file(Path(options.config_file), "config file")
        keys += [f"model.{key}" for key in (tree.get("model") or {})]
    return [key for key in keys if key.startswith("model.") and key not in MODEL_KEYS_ALLOWED]


def resolve_finetune_config(
    options: FinetuneOptions, base_config: RunConfig | None, saved: dict[str, Any] | None
) -> RunConfig:
    """defaults < the base's model and tokenizer < finetuning defaults < preset < --config < --set < flags."""
    changed = _model_overrides(options)
    if changed:
        raise UsageError(
            f"'{changed[0]}' cannot be set: the model's shape comes from the base checkpoint "
            "(only model.dropout may change)"
        )
    quantize = options.stage == "qlora"
    adapter = options.lora or quantize
    flags = {
        "data.corpus": options.data,
        "data.prompt_style": options.prompt_style,
        "data.packing": options.packing,
        "adapter.enabled": True if adapter else None,
        "adapter.quantize": "nf4" if quantize else None,
        "adapter.r": options.lora_r,
        "adapter.alpha": options.lora_alpha,
        "adapter.dropout": options.lora_dropout,
        "adapter.targets": options.lora_targets,
        "train.max_steps": options.max_steps,
        "train.max_time": options.max_time,
        "train.max_tokens": options.max_tokens,
        "train.precision": options.precision,
    }
    if saved is not None:
        base_tree = copy.deepcopy(saved)  # resolve_config merges into the nested dicts it is given
    else:
        train = {
            **FINETUNE_TRAIN,
            **({"lr": ADAPTER_LR} if adapter else {}),
            **({"activation_checkpointing": True} if quantize else {}),
        }
        base_tree = {
            "model": base_config.model.model_dump(),
            "data": {"tokenizer": base_config.data.tokenizer},
            "train": train,
        }
    config = resolve_config(options.preset, options.config_file, options.overrides, flags, base=base_tree)
    if options.max_tokens is not None and options.max_steps is None:
        config.train.max_steps = None  # --max-tokens alone replaces the step limit
    # a preset bundles a model shape with its training settings; here only the training settings apply
    shape = base_config.model if base_config is not None else RunConfig.model_validate(saved).model
    config.model = shape.model_copy(
        update={"dropout": config.model.dropout if _dropout_given(options) else shape.dropout}
    )
    if not config.data.corpus:
        raise UsageError("finetuning needs data: --data CORPUS (llmctl corpus list) or --data FILE.jsonl")
    if config.adapter.quantize == "nf4" and not config.adapter.enabled:
        raise UsageError("adapter.quantize nf4 needs adapters: use llmctl qlora")
    if saved is not None:
        _check_unchanged(config, RunConfig.model_validate(saved))
    return config


def _check_unchanged(config: RunConfig, saved: RunConfig) -> None:
    """A resumed run keeps its adapter and its data rendering: either would change what the
    checkpoint holds or which batches come next."""
    for section in ("adapter", "data"):
        now, before = getattr(config, section).model_dump(), getattr(saved, section).model_dump()
        for key, value in now.items():
            if value != before[key]:
                raise UsageError(
                    f"{section}.{key} cannot change when resuming (the run has {before[key]!r}, given "
                    f"{value!r}); start a new run to change it"
                )


def _dropout_given(options: FinetuneOptions) -> bool:
    return any(parse_assignment(item)[0] == "model.dropout" for item in options.overrides) or (
        options.config_file is not None
        and "dropout" in (load_yaml_file(Path(options.config_file), "config file").get("model") or {})
    )


# ---------------------------------------------------------------- plan


def _base_checkpoint(workspace: Workspace, ref: str) -> tuple[Path, RunConfig, LoadedTokenizer, int | None]:
    path = resolve_model_ref(workspace, ref)
    meta = read_meta(path)
    config = read_config(path)
    if meta.get("task") == TASK:
        raise UsageError(f"'{ref}' is a classifier; finetune from a language model checkpoint")
    if not (path / "tokenizer.json").is_file():
        raise LlmctlError(
            f"checkpoint '{path}' has no tokenizer.json; a base checkpoint must carry its tokenizer"
        )
    # an llmctl checkpoint names its tokenizer; a Hugging Face model directory goes by its own name
    tokenizer = load_tokenizer_file(path / "tokenizer.json", name=config.data.tokenizer or path.name)
    row = workspace.registry(create=False).checkpoint_by_path(path)
    return path, config, tokenizer, row["id"] if row else None


def make_plan(
    workspace: Workspace,
    options: FinetuneOptions,
    warn: Callable[[str], None] | None = None,
    inspect_only: bool = False,
) -> FinetunePlan:
    """Resolve and check everything a run needs, writing nothing."""
    if options.run is not None:
        check_name(options.run, "run")
    elif options.resume:
        raise UsageError("--resume needs --run NAME (llmctl status lists runs)")
    saved = run_meta = None
    if options.resume:
        saved, run_meta = _resume_state(workspace, options)
        base_ref = run_meta["base_checkpoint"]
        task = run_meta["task"]
        options.lora = bool(saved["adapter"]["enabled"])
    else:
        if not options.model:
            raise UsageError(
                "finetuning needs a base model: --model RUN (or RUN:step-N, or a checkpoint directory)"
            )
        base_ref = options.model
        task = options.task or "sft"
        if task not in TASKS:
            raise UsageError(f"unknown --task '{task}'; use sft or classify")
    base_path, base_config, tokenizer, base_id = _base_checkpoint(workspace, base_ref)
    config = resolve_finetune_config(options, base_config if saved is None else None, saved)
    if task == "sft":
        sft.check_prompt_style(tokenizer, config.data.prompt_style)
    data = sft.open_data(workspace, config.data.corpus)
    if config.adapter.enabled:
        with torch.device("meta"):
            lora_model.check_targets(Transformer(config.model), list(config.adapter.targets))
    if config.adapter.quantize == "nf4" and not inspect_only:
        quantize.require_bitsandbytes(resolve_device(config.train.device))

    run = (
        options.run
        or f"{Path(str(config.data.corpus)).stem}-{options.stage}-{time.strftime('%Y%m%d-%H%M%S')}"
    )
    resume_from = None
    if not inspect_only:
        resume_from = check_run_name(
            workspace,
            run,
            resume=options.resume,
            overwrite=options.overwrite,
            fallback=options.fallback,
            warn=warn,
        )

    device = resolve_device(config.train.device)
    requested = config.train.precision
    if requested == "auto" and config.adapter.quantize == "nf4" and device.type == "cpu":
        requested = "fp32"  # the 4-bit layers compute in fp32 on a CPU; bf16 autocast would only add casts
    precision = resolve_precision(requested, device)
    compile_model = resolve_compile(config.train.compile, device)
    config.train.precision = precision.name
    config.train.compile = "on" if compile_model else "off"

    labels = run_meta.get("labels") if run_meta else None
    if task == TASK and labels is None:
        labels = sft.label_set(data.train, f"data '{data.name}'")
    plan = FinetunePlan(
        run=run,
        stage=options.stage,
        task=task,
        config=config,
        tokenizer=tokenizer,
        base_path=base_path,
        base_id=base_id,
        data=data,
        labels=labels,
        device=device,
        precision=precision,
        compile=compile_model,
        params=0,
        trainable=0,
        flops_per_token=0,
        tokens_per_step=config.tokens_per_step,
        total_steps=None,
        memory=MemoryEstimate(0, 0, 0, 0),
        unquantized_memory=None,
        device_memory=device_memory_bytes(device),
        resume_from=resume_from,
    )
    plan.encoded = encode_data(plan)
    _size(plan)
    if not inspect_only and not plan.fits and not options.force:
        raise LlmctlError(
            f"the estimated training memory {human_bytes(plan.memory.total)} exceeds "
            f"{describe_device(device)}'s "
            f"{human_bytes(plan.device_memory)}; lower train.micro_batch_size, use --lora or qlora, "
            "or pass --force to try anyway"
        )
    return plan


def _size(plan: FinetunePlan) -> None:
    """Parameter counts, FLOPs, steps and the memory estimate (QLoRA: also LoRA's on the full base)."""
    cfg = plan.config
    params = count_parameters(cfg.model)
    head = cfg.model.d_model * len(plan.labels) if plan.labels else 0
    with torch.device("meta"):
        shape = Transformer(cfg.model)
    lora = lora_model.lora_parameter_count(shape, cfg.adapter) if plan.adapter else 0
    plan.params = params + head + lora
    plan.trainable = lora + head if plan.adapter else params + head
    plan.flops_per_token = flops_per_token(cfg.model, params) - (2 * params if plan.adapter else 0)
    plan.tokens_per_step = cfg.tokens_per_step
    plan.total_steps = planned_steps(cfg, plan.tokens_per_step)
    mixed = plan.precision.name != "fp32"
    full_bytes = 4 * plan.params
    if cfg.adapter.quantize == "nf4":
        quantized, kept = quantize.count_quantized(shape)
        weight_bytes = quantized * quantize.NF4_BITS_PER_WEIGHT / 8 + 4 * (kept + head + lora)
        plan.unquantized_memory = estimate_training_memory(
            cfg.model, cfg.train, plan.trainable, full_bytes / params, mixed
        )
    else:
        weight_bytes = full_bytes
    plan.memory = estimate_training_memory(cfg.model, cfg.train, plan.trainable, weight_bytes / params, mixed)
    if _paged_optimizer(plan):  # two 8-bit moments per trained parameter instead of two fp32 ones
        plan.memory = dataclasses.replace(plan.memory, optimizer=2 * plan.trainable)


# ---------------------------------------------------------------- examples


@dataclass
class EncodedData:
    """Both splits rendered to tokens: SFT Examples, or ClassExamples for classification."""

    train: list[Any]
    val: list[Any]
    train_rows: int
    notes: list[str]
    inspected: sft.EncodedSplit | None = None  # the SFT training split with its figures


def encode_data(plan: FinetunePlan) -> EncodedData:
    """Render and encode the data; fails, naming the fix, when nothing is left to train on."""
    cfg = plan.config
    context = cfg.model.context_length
    where = f"data '{plan.data.name}'"
    if plan.task == TASK:
        train, skipped = sft.encode_classification(plan.data.train, plan.tokenizer, plan.labels, context)
        val, val_skipped = sft.encode_classification(plan.data.val, plan.tokenizer, plan.labels, context)
        notes = [f"{skipped + val_skipped} examples skipped (no text, or a label not in training)"] * bool(
            skipped + val_skipped
        )
        return EncodedData(train, val, len(train), notes)
    style = cfg.data.prompt_style
    train = sft.encode_split(plan.data.train, plan.tokenizer, style, context, where)
    val = sft.encode_split(plan.data.val, plan.tokenizer, style, context, where)
    if not train.examples:
        raise UsageError(
            f"no example of {where} fits: every response starts beyond the context of {context} tokens "
            f"with --prompt-style {style}; use shorter prompts or a base with a longer context"
        )
    notes = []
    if train.truncated:
        notes.append(f"{train.truncated} training examples cut to the context of {context} tokens")
    if train.dropped:
        notes.append(f"{train.dropped} training examples dropped: their response starts beyond the context")
    rows = _rows(cfg, train.examples, range(len(train.examples)))
    return EncodedData(train.examples, val.examples or train.examples, len(rows), notes, train)


def _rows(cfg: RunConfig, examples: list[sft.Example], order) -> list[sft.Row]:
    if cfg.data.packing:
        return sft.pack_rows(examples, order, cfg.model.context_length)
    return sft.single_rows(examples, order)


def make_batches(plan: FinetunePlan, encoded: EncodedData, rank: int = 0, world_size: int = 1):
    """The trainer's batch source over the encoded data."""
    cfg = plan.config
    context, pad_id, device = cfg.model.context_length, plan.tokenizer.pad_id, plan.device
    common = {
        "micro_batch_size": cfg.train.micro_batch_size,
        "eval_batches": cfg.train.eval_batches,
        "seed": cfg.train.seed,
        "rank": rank,
        "world_size": world_size,
    }
    train = encoded.train
    if plan.task == TASK:
        collate = partial(sft.collate_classification, context_length=context, pad_id=pad_id, device=device)
        return sft.ShuffledBatches(
            len(train), lambda order: [train[i] for i in order], collate, encoded.val, **common
        )
    collate = partial(
        sft.collate, context_length=context, pad_id=pad_id, packed=cfg.data.packing, device=device
    )
    eval_rows = _rows(cfg, encoded.val, range(len(encoded.val)))
    return sft.ShuffledBatches(len(train), partial(_rows, cfg, train), collate, eval_rows, **common)


# ---------------------------------------------------------------- run


def start_finetune_run(workspace: Workspace, plan: FinetunePlan, overwrite: bool) -> Path:
    """runs/<run>/ with its config.yaml, and a registry row linked to the base checkpoint."""
    meta = {
        "preset": plan.config.preset,
        "config": plan.config.model_dump(mode="json"),
        "params": plan.params,
        "tokenizer_sha256": plan.tokenizer.sha256,
        "max_steps": plan.total_steps,
        "device": describe_device(plan.device),
        **_run_meta(plan),
    }
    data = plan.config.data.corpus
    return open_run(
        workspace,
        plan.run,
        plan.stage,
        plan.config,
        meta,
        resuming=plan.resume_from is not None,
        overwrite=overwrite,
        corpus=data if workspace.registry().corpus(data) else None,
        tokenizer=plan.config.data.tokenizer,
        base_checkpoint=plan.base_id,
    )


def _run_meta(plan: FinetunePlan) -> dict[str, Any]:
    return {
        "task": plan.task,
        "labels": plan.labels,
        "base_checkpoint": str(plan.base_path),
        "trainable_params": plan.trainable,
        "data": plan.config.data.corpus,
    }


def set_dropout(model: nn.Module, p: float) -> None:
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = p
        elif isinstance(module, Attention):
            module.dropout = p


def build_model(plan: FinetunePlan) -> nn.Module:
    """The base, as a classifier if asked, quantized for QLoRA, wrapped with LoRA for adapters."""
    cfg = plan.config
    quantize = cfg.adapter.quantize == "nf4"
    base_is_full = read_meta(plan.base_path).get("kind", "full") == "full"
    if quantize and plan.task != TASK and base_is_full:
        model = loader.load_quantized_base(plan.base_path, cfg, plan.device)
    else:
        model = loader.load_weights(plan.base_path)
        if plan.task == TASK:
            model = classifier_from(model, len(plan.labels))
        if quantize:
            quantize.quantize_model(model, plan.device)
    set_dropout(model, cfg.model.dropout)
    if cfg.adapter.enabled:
        model = lora_model.apply_lora(model, cfg.adapter, plan.base_path)
    return model


def sft_sampler(plan: FinetunePlan) -> Sampler | None:
    """Samples for the event stream: the model's reply to the first validation prompt, rendered in
    the run's prompt style, with a fixed seed in a generator of its own (see pretrain's)."""
    if plan.task == TASK:
        return None
    cfg = plan.config
    messages = sft.messages_of(plan.data.val[0], f"data '{plan.data.name}'")
    last_reply = max(i for i, message in enumerate(messages) if message["role"] == "assistant")
    prompt = sft.render_prompt(messages[:last_reply], cfg.data.prompt_style)
    stop = [END_OF_TURN_TOKEN] if cfg.data.prompt_style == "chat" else []
    generation = cfg.generation.model_copy(
        update={
            "max_new_tokens": min(cfg.generation.max_new_tokens, SAMPLE_MAX_NEW_TOKENS),
            "seed": cfg.train.seed,
            "stop": [*cfg.generation.stop, *stop],
        }
    )

    def sample(model: nn.Module) -> list[tuple[str, str]]:
        from llmctl.generate import Engine

        (completion,) = Engine(model, plan.tokenizer).generate([prompt], generation)
        return [(prompt, completion.text)]

    return sample


def _paged_optimizer(plan: FinetunePlan) -> bool:
    return plan.config.adapter.quantize == "nf4" and plan.device.type == "cuda"


GLIBC_M_MMAP_THRESHOLD = -3  # mallopt's parameter number for the mmap threshold (malloc.h)
MMAP_THRESHOLD_BYTES = 1 << 20


def return_large_frees_to_the_os() -> None:
    """Serve allocations of 1 MB and more from mmap, so freeing them returns the memory at once.

    glibc keeps freed blocks below its dynamic mmap threshold (which grows up to 32 MB) in the heap.
    Training on a CPU frees and reallocates activation and dequantized-weight buffers of many sizes
    in every layer, the heap fragments, and the resident size grows far past the live tensors (for
    QLoRA about twice; docs/benchmarks.md has the figures). A no-op where the C library has no mallopt.
    """
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).mallopt(GLIBC_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)


def build_trainer(
    workspace: Workspace,
    plan: FinetunePlan,
    *,
    dist: DistEnv | None = None,
    console: Console | None = None,
    show_progress: bool = True,
) -> Trainer:
    cfg = plan.config
    dist = dist or DistEnv()
    if plan.device.type == "cpu":
        return_large_frees_to_the_os()
    torch.manual_seed(cfg.train.seed)  # the classifier head and LoRA's A matrices start the same everywhere
    model = build_model(plan)
    seed_per_rank(cfg.train.seed, dist)
    batches = make_batches(plan, plan.encoded, dist.rank, dist.world_size)
    checkpoint_fields = {"tokenizer_sha256": plan.tokenizer.sha256, **_run_meta(plan)}
    run = RunInfo(
        name=plan.run,
        stage=plan.stage,
        dir=workspace.run_dir(plan.run),
        registry=workspace.registry() if dist.is_main else None,
        preset=cfg.preset,
        tokenizer_file=plan.tokenizer.path,
        start_fields={
            "data": cfg.data.corpus,
            "tokenizer": cfg.data.tokenizer,
            "task": plan.task,
            "base_checkpoint": str(plan.base_path),
        },
        checkpoint_fields=checkpoint_fields,
        params=plan.params,
    )
    trainer = Trainer(
        cfg,
        model,
        batches,
        run,
        device=plan.device,
        precision=plan.precision,
        compile_model=plan.compile,
        dist_env=dist,
        loss_fn=classify_loss if plan.task == TASK else lm_loss,
        model_io=AdapterModelIO() if plan.adapter else FullModelIO(),
        optimizer_factory=paged_adamw_8bit if _paged_optimizer(plan) else build_optimizer,
        flops_per_token=plan.flops_per_token,
        sampler=sft_sampler(plan),
        console=console,
        show_progress=show_progress,
    )
    if plan.resume_from is not None:
        trainer.resume(plan.resume_from)
    return trainer


# ---------------------------------------------------------------- inspect


@dataclass
class InspectedExample:
    pieces: list[tuple[str, bool]]  # decoded runs of tokens, and whether they are trained
    tokens: int
    trained: int
    truncated: bool = False


def inspect_examples(plan: FinetunePlan, count: int) -> tuple[list[InspectedExample], dict[str, Any]]:
    """The first `count` training examples as the model sees them, and figures over all of them."""
    cfg, encoded, tokenizer = plan.config, plan.encoded, plan.tokenizer
    if plan.task == TASK:
        shown = [
            InspectedExample(
                [(tokenizer.decode(e.ids), False), (f"  → {plan.labels[e.label]}", True)], len(e.ids), 0
            )
            for e in encoded.train[:count]
        ]
        return shown, {"examples": len(encoded.train), "labels": plan.labels}
    shown = []
    for example in encoded.train[:count]:
        pieces: list[tuple[str, bool]] = []
        start = 0
        for end in range(1, len(example.ids) + 1):
            if end == len(example.ids) or example.trained[end] != example.trained[start]:
                pieces.append((tokenizer.decode(example.ids[start:end]), example.trained[start]))
                start = end
        shown.append(InspectedExample(pieces, len(example.ids), example.n_trained, example.truncated))
    split = encoded.inspected
    positions = split.tokens - len(split.examples)  # an example of n tokens fills n - 1 positions
    figures = {
        "examples": len(split.examples),
        "tokens": split.tokens,
        "trained_tokens": split.trained_tokens,
        "trained_fraction": round(split.trained_tokens / max(split.tokens, 1), 4),
        "truncated": split.truncated,
        "dropped": split.dropped,
        "rows": encoded.train_rows,
        "row_fill": round(positions / (encoded.train_rows * cfg.model.context_length), 4),
        "prompt_style": cfg.data.prompt_style,
    }
    return shown, figures


# ---------------------------------------------------------------- merge


@dataclass
class MergeResult:
    run: str
    checkpoint: Path
    adapter: Path
    base: Path
    quantized: bool


def merge_to_run(workspace: Workspace, ref: str, run: str, overwrite: bool = False) -> MergeResult:
    """Fold the adapter checkpoint `ref` names into its base and register the result as run `run`,
    one full checkpoint at the adapter's step."""
    check_name(run, "run")
    adapter_path = resolve_model_ref(workspace, ref)
    meta = read_meta(adapter_path)
    if meta.get("kind", "full") != "adapter":
        raise UsageError(
            f"'{ref}' is a full checkpoint; merge takes an adapter (a finetune --lora or qlora run)"
        )
    base_path = loader.base_of(meta, adapter_path)
    registry = workspace.registry()
    run_dir = workspace.run_dir(run)
    if (run_dir.exists() or registry.run(run) is not None) and not overwrite:
        raise UsageError(f"run '{run}' already exists; pick another name or pass --overwrite")
    config = read_config(adapter_path)
    quantized = config.adapter.quantize == "nf4"
    model = loader.load_weights(adapter_path, meta)
    config.adapter.enabled, config.adapter.quantize = False, "none"

    if overwrite:
        registry.remove_run(run)
        if run_dir.exists():
            retired = run_dir.with_name(f".old-{run_dir.name}-{int(time.time())}")
            run_dir.rename(retired)
            shutil.rmtree(retired, ignore_errors=True)
    step = int(meta["step"])
    checkpoint = run_dir / "checkpoints" / checkpoint_name(step)
    figures = {key: meta[key] for key in ("val_loss", "val_ppl", "val_accuracy") if key in meta}
    lineage = {key: meta.get(key) for key in ("task", "labels", "tokenizer_sha256")}
    write_checkpoint(
        checkpoint,
        model=model,
        model_io=FullModelIO(),
        config=config,
        trainer_state={"step": step},
        meta={
            "run": run,
            "stage": "merge",
            "step": step,
            "created": time.time(),
            "merged_from": str(adapter_path),
            "base_checkpoint": str(base_path),
            **lineage,
            **figures,
        },
        tokenizer_file=adapter_path / "tokenizer.json",
    )
    (run_dir / "config.yaml").write_text(config.to_yaml(), encoding="utf-8")
    adapter_row = registry.checkpoint_by_path(adapter_path)
    registry.add_run(
        run,
        "merge",
        run_dir,
        tokenizer=config.data.tokenizer,
        base_checkpoint=adapter_row["id"] if adapter_row else None,
        meta={
            "merged_from": str(adapter_path),
            "base_checkpoint": str(base_path),
            "quantized_base": quantized,
            "latest_checkpoint": step,
            "best_checkpoint": step,
            **lineage,
        },
    )
    registry.add_checkpoint(run, step, "full", checkpoint, figures)
    return MergeResult(run, checkpoint, adapter_path, base_path, quantized)
