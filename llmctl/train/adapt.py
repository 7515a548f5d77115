"""What the stages that start from a trained model share (finetune, qlora, dpo): the base
checkpoint, the run options that name it, the model built on it (all weights, LoRA adapters, or
adapters on a 4-bit base), its size and memory estimate, where it computes, and the samples of its
replies in the event stream.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llmctl.checkpoint import load as loader
from llmctl.checkpoint.files import read_config, read_meta
from llmctl.checkpoint.refs import resolve_model_ref
from llmctl.config import RunConfig
from llmctl.data import sft
from llmctl.errors import LlmctlError, UsageError
from llmctl.model import quantize
from llmctl.model.classifier import TASK, classifier_from
from llmctl.model.lora import (
    apply_lora,
    check_targets,
    lora_parameter_count,
    lora_parameter_counts,
    lora_saved_values_per_token,
)
from llmctl.model.sizing import (
    MemoryEstimate,
    count_parameters,
    estimate_training_memory,
    flops_per_token,
    human_count,
    lookup_parameters,
)
from llmctl.model.transformer import Attention, Transformer
from llmctl.tokenizer import END_OF_TURN_TOKEN, LoadedTokenizer, load_tokenizer_file
from llmctl.train import recipe
from llmctl.train.finetune_config import max_length_source
from llmctl.train.precision import resolve_device
from llmctl.train.recipe import Row, Runtime, Size
from llmctl.train.runinfo import Sampler
from llmctl.workspace import Workspace, check_name


@dataclass(frozen=True)
class Base:
    """The checkpoint a finetune or DPO run starts from."""

    path: Path
    config: RunConfig
    tokenizer: LoadedTokenizer
    registry_id: int | None


def open_base(workspace: Workspace, ref: str, what: str = "finetune") -> Base:
    path = resolve_model_ref(workspace, ref)
    meta = read_meta(path)
    config = read_config(path)
    if meta.get("task") == TASK:
        raise UsageError(f"'{ref}' is a classifier; {what} from a language model checkpoint")
    if not (path / "tokenizer.json").is_file():
        raise LlmctlError(
            f"checkpoint '{path}' has no tokenizer.json; a base checkpoint must carry its tokenizer"
        )
    # an llmctl checkpoint names its tokenizer; a Hugging Face model directory goes by its own name
    tokenizer = load_tokenizer_file(path / "tokenizer.json", name=config.data.tokenizer or path.name)
    row = workspace.registry(create=False).checkpoint_by_path(path)
    return Base(path, config, tokenizer, row["id"] if row else None)


def check_run_names(options: Any, what: str) -> None:
    """--run is a valid name, and --resume names the run it continues."""
    if options.run is not None:
        check_name(options.run, "run")
    elif options.resume:
        raise UsageError("--resume needs --run NAME (llmctl status lists runs)")
    if not options.resume and not options.model:
        raise UsageError(f"{what} needs a base model: --model RUN (or RUN:step-N, or a checkpoint directory)")


def check_adapter(config: RunConfig, inspect_only: bool = False) -> None:
    """LoRA targets that name layers of the model; bitsandbytes where a 4-bit base needs it."""
    if config.adapter.enabled:
        with torch.device("meta"):
            check_targets(Transformer(config.model), list(config.adapter.targets))
    if config.adapter.quantize == "nf4" and not inspect_only:
        quantize.require_bitsandbytes(resolve_device(config.train.device))


def adapter_counts(config: RunConfig) -> dict[str, int]:
    """LoRA's trained parameters per target group (attention, mlp, lm_head); none without adapters."""
    if not config.adapter.enabled:
        return {}
    with torch.device("meta"):
        return lora_parameter_counts(Transformer(config.model), config.adapter)


def adapter_rows(config: RunConfig) -> list[Row]:
    """The adapter's shape and its capacity per target group, for a dry run."""
    if not config.adapter.enabled:
        return []
    adapter = config.adapter
    scale = f"alpha {adapter.alpha:g} / {'sqrt(r), rslora' if adapter.rslora else 'r'}"
    counts = " · ".join(f"{group} {human_count(n)}" for group, n in adapter_counts(config).items())
    return [
        (
            "adapter",
            f"r {adapter.r} · {scale} · dropout {adapter.dropout:g} · targets {','.join(adapter.targets)}",
        ),
        ("adapter params", counts),
    ]


LR_SOURCES = {"preset": "the preset", "config": "--config", "set": "--set train.lr", "flag": "a flag"}


def lr_row(config: RunConfig, full_lr: float, adapter_lr: float) -> Row:
    """The learning rate and where it came from: the user or a preset, or the stage's default for
    its method (which differs between adapters and all weights)."""
    lr, source = config.train.lr, config.sources.get("train.lr")
    if source in LR_SOURCES:
        why = f"from {LR_SOURCES[source]}"
    elif config.adapter.enabled and lr == adapter_lr:
        why = (
            f"the adapter default ({full_lr:g} for all weights): adapters start at zero and need a "
            "higher rate (docs/finetune.md#configuration)"
        )
    elif not config.adapter.enabled and lr == full_lr:
        why = f"the all-weights default ({adapter_lr:g} for adapters)"
    else:
        why = "the run's saved config"
    return ("learning rate", f"{lr:g} · {why}")


def paged_optimizer(config: RunConfig, device: torch.device) -> bool:
    """QLoRA on a GPU trains with bitsandbytes' paged 8-bit AdamW (CUDA only)."""
    return config.adapter.quantize == "nf4" and device.type == "cuda"


def resolve_runtime(config: RunConfig) -> Runtime:
    requested = None
    on_cpu = resolve_device(config.train.device).type == "cpu"
    if config.train.precision == "auto" and config.adapter.quantize == "nf4" and on_cpu:
        requested = "fp32"  # the 4-bit layers compute in fp32 on a CPU; bf16 autocast would only add casts
    return recipe.resolve_runtime(config, precision=requested)


@dataclass(frozen=True)
class Sizing:
    """A run's size, its memory estimate, and QLoRA's: the same LoRA run on the unquantized base."""

    size: Size
    memory: MemoryEstimate
    unquantized: MemoryEstimate | None
    base_params: int
    weight_bytes: float  # of the model as it trains (the 4-bit base packed)


def size_run(
    config: RunConfig, runtime: Runtime, labels: list[str] | None = None, sequences_per_row: int = 1
) -> Sizing:
    """Parameter counts, FLOPs and steps; the memory estimate. A DPO row is two sequences (chosen
    and rejected), so its activations and FLOPs count `sequences_per_row` of them."""
    adapter = config.adapter.enabled
    base_params = count_parameters(config.model)
    head = config.model.d_model * len(labels) if labels else 0
    with torch.device("meta"):
        shape = Transformer(config.model)
    lora = lora_parameter_count(shape, config.adapter) if adapter else 0
    params = base_params + head + lora
    trainable = lora + head if adapter else base_params + head
    length = config.sequence_length
    # adapters train no base weight: the base's weight gradients (2N of the 6N) are never computed
    flops = flops_per_token(config.model, base_params, length)
    if adapter:
        flops -= 2 * (base_params - lookup_parameters(config.model))
    size = Size.of(config, params, trainable, flops * sequences_per_row)

    mixed = runtime.precision.name != "fp32"
    train = config.train.model_copy(
        update={"micro_batch_size": config.train.micro_batch_size * sequences_per_row}
    )
    full_bytes = 4 * params
    unquantized = None
    weight_bytes = full_bytes
    lora_saved = lora_saved_values_per_token(shape, config.adapter) if adapter else 0
    if config.adapter.quantize == "nf4":
        quantized, kept = quantize.count_quantized(shape)
        weight_bytes = quantized * quantize.NF4_BITS_PER_WEIGHT / 8 + 4 * (kept + head + lora)
        unquantized = estimate_training_memory(
            config.model, train, trainable, full_bytes / base_params, mixed, lora_saved, length
        )
    memory = estimate_training_memory(
        config.model, train, trainable, weight_bytes / base_params, mixed, lora_saved, length
    )
    if paged_optimizer(config, runtime.device):  # two 8-bit moments per trained parameter, not two fp32
        memory = MemoryEstimate(memory.weights, memory.gradients, 2 * trainable, memory.activations)
    return Sizing(size, memory, unquantized, base_params, weight_bytes)


def max_length_row(config: RunConfig) -> recipe.Row:
    """The plan's line for the rows' length and where it came from."""
    context = config.model.context_length
    why = {
        "chosen": f"--max-length (the base's context is {context:,})",
        "cap": f"capped by default; the base's context is {context:,} (--max-length N to change)",
        "context": "the base's context (--max-length N for shorter rows)",
    }[max_length_source(config)]
    return ("max length", f"{config.data.max_length:,} tokens per row · {why}")


def max_length_details(config: RunConfig) -> dict[str, Any]:
    return {"max_length": config.data.max_length, "max_length_source": max_length_source(config)}


# ---------------------------------------------------------------- the model and its samples


def set_dropout(model: nn.Module, p: float) -> None:
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = p
        elif isinstance(module, Attention):
            module.dropout = p


def build_model(
    base: Path, config: RunConfig, device: torch.device, labels: list[str] | None = None
) -> nn.Module:
    """The base, as a classifier if given labels, quantized for QLoRA, wrapped with LoRA for adapters."""
    quantized = config.adapter.quantize == "nf4"
    dtype = quantize.compute_dtype(device, config.train.precision)  # resolved by now: the run's
    if labels is not None:
        model = classifier_from(loader.load_weights(base), len(labels))
        if quantized:
            quantize.quantize_model(model, device, dtype)
    else:
        model = loader.load_weights(base, quantize_base=quantized, device=device, quantized_dtype=dtype)
    set_dropout(model, config.model.dropout)
    if config.adapter.enabled:
        model = apply_lora(model, config.adapter, base)
    return model


def reply_sampler(tokenizer: LoadedTokenizer, config: RunConfig, messages: list[dict[str, str]]) -> Sampler:
    """Samples for the event stream: the model's reply to `messages` (ending with a user turn),
    rendered in the run's prompt style."""
    style = config.data.prompt_style
    prompt = sft.render_prompt(messages, style)
    stop = [END_OF_TURN_TOKEN] if style == "chat" else []
    return recipe.event_sampler(tokenizer, config.generation, config.train.seed, prompt, stop)
