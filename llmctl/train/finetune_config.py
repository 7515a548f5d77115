"""A finetune's config: the base checkpoint's shape and tokenizer under finetuning's own defaults,
then the usual layers; and what a resumed run may not change.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from llmctl.config import RunConfig, load_yaml_file, resolve_config
from llmctl.errors import UsageError
from llmctl.model.classifier import TASK
from llmctl.train import recipe
from llmctl.train.runs import RunOptions
from llmctl.workspace import RUN_CONFIG, Workspace

TASKS = ("sft", TASK)
# Finetuning starts from trained weights: a short warmup, a lower rate than pretraining, and no weight
# decay pulling the base's weights toward zero. Adapters start at zero and need about ten times the
# rate: their best rates were 3-10x full finetuning's, and at 2e-4 they learned nothing in the steps
# full finetuning learned a task in (docs/benchmarks.md#what-each-method-learns).
FINETUNE_TRAIN = {
    "lr": 1e-4,
    "min_lr": 1e-5,
    "warmup_steps": 20,
    "weight_decay": 0.0,
    "max_steps": 500,
    "eval_every": 50,
    "save_every": 100,
}
ADAPTER_LR = 1e-3
# Rows default to the base's context, up to this: a long-context base (16,384 tokens for
# deepseek-coder) would otherwise plan every row at its full context, most of it padding
DEFAULT_MAX_LENGTH = 2048
MODEL_KEYS_ALLOWED = ("model.dropout",)


@dataclass
class FinetuneOptions(RunOptions):
    stage: str = "finetune"  # or 'qlora'
    model: str | None = None
    data: str | None = None
    task: str | None = None
    prompt_style: str | None = None
    packing: bool | None = None
    max_length: int | None = None
    lora: bool = False
    lora_r: int | None = None
    lora_alpha: float | None = None
    lora_dropout: float | None = None
    lora_targets: list[str] | None = None
    lora_rslora: bool | None = None
    qlora: bool = False  # adapters on the base quantized to 4 bits (the stage 'qlora' implies it)

    @property
    def quantize_base(self) -> bool:
        return self.qlora or self.stage == "qlora"


def resume_state(workspace: Workspace, options: FinetuneOptions) -> tuple[dict[str, Any], dict[str, Any]]:
    """A resumed run's saved config tree and registry meta; the data and base stay the run's."""
    saved = workspace.run_dir(options.run) / RUN_CONFIG
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


def resolve_finetune_config(
    options: FinetuneOptions,
    base_config: RunConfig | None,
    saved: dict[str, Any] | None,
    *,
    stage_flags: dict[str, Any] | None = None,
    stage_train: dict[str, Any] | None = None,
    adapter_lr: float = ADAPTER_LR,
    what: str = "finetuning",
) -> RunConfig:
    """defaults < the base's model and tokenizer < the stage's training defaults (finetuning's, or
    `stage_train` and `adapter_lr`) < preset < --config < --set < flags (the stage adds
    `stage_flags`)."""
    quantize_base = options.quantize_base
    adapter = options.lora or quantize_base
    lora_flags = {
        "--lora-r": options.lora_r,
        "--lora-alpha": options.lora_alpha,
        "--lora-dropout": options.lora_dropout,
        "--lora-targets": options.lora_targets,
        "--rslora": options.lora_rslora,
    }
    given = [flag for flag, value in lora_flags.items() if value is not None]
    if given and not adapter:
        raise UsageError(
            f"{given[0]} shapes LoRA adapters, and this run trains every weight; add --lora "
            "(or train on a 4-bit base with qlora), or drop the LoRA flags"
        )
    flags = {
        "data.corpus": options.data,
        "data.prompt_style": options.prompt_style,
        "data.packing": options.packing,
        "data.max_length": options.max_length,
        **(stage_flags or {}),
        "adapter.enabled": True if adapter else None,
        "adapter.quantize": "nf4" if quantize_base else None,
        "adapter.r": options.lora_r,
        "adapter.alpha": options.lora_alpha,
        "adapter.dropout": options.lora_dropout,
        "adapter.targets": options.lora_targets,
        "adapter.rslora": options.lora_rslora,
        **recipe.limit_flags(options),
    }
    if saved is not None:
        base_tree = copy.deepcopy(saved)  # resolve_config merges into the nested dicts it is given
    else:
        train = {
            **(FINETUNE_TRAIN if stage_train is None else stage_train),
            **({"lr": adapter_lr} if adapter else {}),
            **({"activation_checkpointing": True} if quantize_base else {}),
        }
        base_tree = {
            "model": base_config.model.model_dump(),
            "data": {"tokenizer": base_config.data.tokenizer},
            "train": train,
        }
    config = resolve_config(options.preset, options.config_file, options.overrides, flags, base=base_tree)
    changed = [
        key
        for key in config.sources
        if key.startswith("model.") and config.set_by_user(key) and key not in MODEL_KEYS_ALLOWED
    ]
    if changed:
        raise UsageError(
            f"'{changed[0]}' cannot be set: the model's shape comes from the base checkpoint "
            "(only model.dropout may change)"
        )
    recipe.apply_limit_rules(config, options)
    # a preset bundles a model shape with its training settings; here only the training settings apply
    shape = base_config.model if base_config is not None else RunConfig.model_validate(saved).model
    dropout = config.model.dropout if config.set_by_user("model.dropout") else shape.dropout
    config.model = shape.model_copy(update={"dropout": dropout})
    _resolve_max_length(config, saved)
    if not config.data.corpus:
        raise UsageError(f"{what} needs data: --data CORPUS (llmctl corpus list) or --data FILE.jsonl")
    if config.adapter.quantize == "nf4" and not config.adapter.enabled:
        raise UsageError("adapter.quantize nf4 needs adapters: use llmctl qlora (or llmctl dpo --qlora)")
    if saved is not None:
        _check_unchanged(config, RunConfig.model_validate(saved))
    return config


def _resolve_max_length(config: RunConfig, saved: dict[str, Any] | None) -> None:
    """data.max_length: the user's (at most the base's context), else the base's context capped at
    DEFAULT_MAX_LENGTH. A run saved before the setting existed trained at the full context."""
    context = config.model.context_length
    if saved is not None and saved["data"].get("max_length") is None:
        saved["data"]["max_length"] = context
        config.data.max_length = config.data.max_length or context
    elif config.data.max_length is None:
        config.data.max_length = min(context, DEFAULT_MAX_LENGTH)
    elif config.data.max_length > context:
        raise UsageError(
            f"--max-length {config.data.max_length} exceeds the base's context of {context} tokens; "
            f"give at most {context}"
        )


def max_length_source(config: RunConfig) -> str:
    """Where a run's data.max_length came from: 'chosen', 'cap' (DEFAULT_MAX_LENGTH) or 'context'."""
    if config.set_by_user("data.max_length"):
        return "chosen"
    return "cap" if config.data.max_length < config.model.context_length else "context"


def _check_unchanged(config: RunConfig, saved: RunConfig) -> None:
    """A resumed run keeps its adapter, its data rendering and its preference loss: each would
    change what the checkpoint holds, which batches come next or what the steps minimise."""
    for section in ("adapter", "data", "dpo"):
        now, before = getattr(config, section).model_dump(), getattr(saved, section).model_dump()
        for key, value in now.items():
            if value != before[key]:
                raise UsageError(
                    f"{section}.{key} cannot change when resuming (the run has {before[key]!r}, given "
                    f"{value!r}); start a new run to change it"
                )
