"""Pretraining as a recipe: resolve the config, check everything, plan, then hand the Trainer a
fresh Transformer and random windows of the corpus's token cache.

Every check runs before anything is written, so a refused run leaves no runs/<name> directory and
no registry row. Only the token cache (under the corpus, reusable) may be built before training.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from llmctl.checkpoint.files import read_meta
from llmctl.config import GenerationConfig, RunConfig, load_yaml_file, parse_assignment, resolve_config
from llmctl.data.store import CorpusStore
from llmctl.data.tokencache import TokenCache, build_token_cache, load_token_cache
from llmctl.errors import LlmctlError, UsageError
from llmctl.generate import Engine
from llmctl.model.sizing import (
    MemoryEstimate,
    count_parameters,
    estimate_training_memory,
    flops_per_token,
    human_bytes,
)
from llmctl.model.transformer import Transformer
from llmctl.tokenizer import LoadedTokenizer, load_tokenizer
from llmctl.train import distributed
from llmctl.train.batches import TokenWindows
from llmctl.train.distributed import DistEnv, seed_per_rank
from llmctl.train.precision import (
    Precision,
    describe_device,
    device_memory_bytes,
    resolve_compile,
    resolve_device,
    resolve_precision,
)
from llmctl.train.runs import RunOptions, check_run_name, open_run
from llmctl.train.trainer import RunInfo, Sampler, Trainer, TrainResult, planned_steps
from llmctl.workspace import Workspace, check_name

STAGE = "pretrain"


@dataclass
class PretrainOptions(RunOptions):
    corpus: str | None = None
    tokenizer: str | None = None
    world_size: int = 1
    local_rank: int = 0
    processes_per_node: int = 1


@dataclass
class PretrainPlan:
    run: str
    config: RunConfig
    tokenizer: LoadedTokenizer
    device: torch.device
    precision: Precision
    compile: bool
    world_size: int
    processes_per_node: int
    params: int
    flops_per_token: int
    tokens_per_step: int
    total_steps: int | None
    memory: MemoryEstimate
    device_memory: int | None
    suggestion: str | None
    resume_from: Path | None
    cache: TokenCache | None
    notes: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return self.device_memory is None or self.memory.total <= self.device_memory

    def summary(self) -> dict[str, Any]:
        """The plan as plain figures (what --dry-run prints, and --json would)."""
        cfg = self.config
        train_tokens = self.cache.n_tokens["train"] if self.cache else None
        total_tokens = self.total_steps * self.tokens_per_step if self.total_steps else None
        return {
            "run": self.run,
            "preset": cfg.preset,
            "corpus": cfg.data.corpus,
            "tokenizer": cfg.data.tokenizer,
            "device": describe_device(self.device),
            "precision": self.precision.name,
            "compile": self.compile,
            "activation_checkpointing": cfg.train.activation_checkpointing,
            "world_size": self.world_size,
            "params": self.params,
            "shape": f"{cfg.model.n_layer} layers × {cfg.model.d_model} wide, {cfg.model.n_head} heads, "
            f"context {cfg.model.context_length}, vocab {cfg.model.vocab_size}",
            "micro_batch_size": cfg.train.micro_batch_size,
            "grad_accum_steps": cfg.train.grad_accum_steps,
            "tokens_per_step": self.tokens_per_step,
            "total_steps": self.total_steps,
            "total_tokens": total_tokens,
            "max_time_s": cfg.train.max_time,
            "train_tokens": train_tokens,
            "epochs": round(total_tokens / train_tokens, 2) if total_tokens and train_tokens else None,
            "flops_per_token": self.flops_per_token,
            "memory": {
                "weights": self.memory.weights,
                "gradients": self.memory.gradients,
                "optimizer": self.memory.optimizer,
                "activations": self.memory.activations,
                "total": self.memory.total,
            },
            "device_memory": self.device_memory,
            "device_memory_shared_by": self.processes_per_node if self.device.type == "cpu" else 1,
            "fits": self.fits,
            "suggestion": self.suggestion,
            "resume_from": str(self.resume_from) if self.resume_from else None,
        }


# ---------------------------------------------------------------- config


def _explicit_vocab(options: PretrainOptions) -> bool:
    """Whether the user, not a preset, chose model.vocab_size (then it must match the tokenizer)."""
    if any(parse_assignment(item)[0] == "model.vocab_size" for item in options.overrides):
        return True
    if options.config_file is not None:
        tree = load_yaml_file(Path(options.config_file), "config file")
        return "vocab_size" in (tree.get("model") or {})
    return False


def resolve_pretrain_config(workspace: Workspace, options: PretrainOptions) -> RunConfig:
    flags = {
        "data.corpus": options.corpus,
        "data.tokenizer": options.tokenizer,
        "train.max_steps": options.max_steps,
        "train.max_time": options.max_time,
        "train.max_tokens": options.max_tokens,
        "train.precision": options.precision,
    }
    base = None
    if options.resume:
        saved = workspace.run_dir(options.run) / "config.yaml"
        if not saved.is_file():
            raise UsageError(f"run '{options.run}' does not exist in {workspace.root}; nothing to resume")
        base = load_yaml_file(saved, "saved run config")
        for flag, key in (("--corpus", "corpus"), ("--tokenizer", "tokenizer")):
            given = getattr(options, key)
            if given is not None and given != base["data"][key]:
                raise UsageError(
                    f"{flag} '{given}' differs from the run's '{base['data'][key]}'; "
                    "a resumed run keeps its data (start a new run instead)"
                )
    config = resolve_config(options.preset, options.config_file, options.overrides, flags, base=base)
    if options.max_tokens is not None and options.max_steps is None:
        config.train.max_steps = None  # --max-tokens alone replaces the preset's step limit
    if base is not None and config.model.model_dump() != base["model"]:
        raise UsageError("model.* settings cannot change when resuming; start a new run to change the model")
    if not config.data.corpus or not config.data.tokenizer:
        raise UsageError(
            "pretrain needs a corpus and a tokenizer: --corpus NAME --tokenizer NAME "
            "(llmctl corpus list, llmctl tokenizer list)"
        )
    return config


def _match_vocab(config: RunConfig, tokenizer: LoadedTokenizer, explicit: bool) -> None:
    if config.model.vocab_size == tokenizer.vocab_size:
        return
    if explicit:
        raise UsageError(
            f"model.vocab_size is {config.model.vocab_size} but tokenizer '{tokenizer.name}' has "
            f"{tokenizer.vocab_size} tokens; drop the setting (the tokenizer's size is used) "
            "or pick a matching tokenizer"
        )
    config.model.vocab_size = tokenizer.vocab_size


# ---------------------------------------------------------------- memory


def _memory(config: RunConfig, precision: Precision) -> MemoryEstimate:
    return estimate_training_memory(config.model, config.train, mixed_precision=precision.name != "fp32")


def suggest_fit(config: RunConfig, precision: Precision, budget: int) -> str:
    """The smallest change that brings the estimate under `budget`, keeping the global batch."""
    train = config.train
    options = []
    for checkpointing in (train.activation_checkpointing, True):
        micro, accum = train.micro_batch_size, train.grad_accum_steps
        while True:
            trial = config.model_copy(
                update={
                    "train": train.model_copy(
                        update={
                            "micro_batch_size": micro,
                            "grad_accum_steps": accum,
                            "activation_checkpointing": checkpointing,
                        }
                    )
                }
            )
            if _memory(trial, precision).total <= budget:
                changes = []
                if micro != train.micro_batch_size:
                    changes += [
                        f"--set train.micro_batch_size={micro}",
                        f"--set train.grad_accum_steps={accum}",
                    ]
                if checkpointing != train.activation_checkpointing:
                    changes.append("--set train.activation_checkpointing=true")
                options.append(" ".join(changes) + " (same global batch)")
                break
            if micro == 1:
                break
            micro, accum = micro // 2, accum * 2
        if options:
            return "try " + options[0]
    return "the weights and optimizer alone do not fit: choose a smaller preset (llmctl presets list)"


# ---------------------------------------------------------------- plan


def make_plan(
    workspace: Workspace,
    options: PretrainOptions,
    *,
    build_cache: bool = True,
    check_new_run: bool = True,
    enforce_memory: bool = True,
    warn: Callable[[str], None] | None = None,
) -> PretrainPlan:
    """Resolve and check everything a run needs, writing nothing but (with build_cache) the token cache.

    check_new_run=False skips the 'run exists' check (ranks other than 0 of a distributed run, which
    plan after rank 0 created the run); enforce_memory=False lets a plan that does not fit through
    (a dry run shows it); warn receives notes such as a damaged checkpoint skipped.
    """
    if options.run is not None:
        check_name(options.run, "run")
    elif options.resume:
        raise UsageError("--resume needs --run NAME (llmctl status lists runs)")
    config = resolve_pretrain_config(workspace, options)
    store = CorpusStore.open(workspace, config.data.corpus)
    tokenizer = load_tokenizer(workspace, config.data.tokenizer)
    _match_vocab(config, tokenizer, explicit=_explicit_vocab(options) and not options.resume)

    run = options.run or f"{config.data.corpus}-{config.preset or 'custom'}-{time.strftime('%Y%m%d-%H%M%S')}"
    resume_from = _check_run_name(workspace, run, options, tokenizer, check_new_run, warn)

    device = resolve_device(config.train.device, options.local_rank)
    precision = resolve_precision(config.train.precision, device)
    compile_model = resolve_compile(config.train.compile, device)
    # the saved config records what 'auto' chose, so a resumed run computes exactly as before
    config.train.precision = precision.name
    config.train.compile = "on" if compile_model else "off"
    memory = _memory(config, precision)
    device_memory = device_memory_bytes(device)
    if device_memory is not None and device.type == "cpu":
        device_memory //= options.processes_per_node  # a node's processes share its RAM; each GPU is its own
    params = count_parameters(config.model)
    tokens_per_step = config.tokens_per_step * options.world_size
    plan = PretrainPlan(
        run=run,
        config=config,
        tokenizer=tokenizer,
        device=device,
        precision=precision,
        compile=compile_model,
        world_size=options.world_size,
        processes_per_node=options.processes_per_node,
        params=params,
        flops_per_token=flops_per_token(config.model, params),
        tokens_per_step=tokens_per_step,
        total_steps=planned_steps(config, tokens_per_step),
        memory=memory,
        device_memory=device_memory,
        suggestion=None
        if device_memory is None or memory.total <= device_memory
        else suggest_fit(config, precision, device_memory),
        resume_from=resume_from,
        cache=None,
    )
    if enforce_memory and not plan.fits and not options.force:
        raise LlmctlError(
            f"the estimated training memory {human_bytes(memory.total)} exceeds {describe_device(device)}'s "
            f"{human_bytes(device_memory)}{_share(device, options.processes_per_node)}; {plan.suggestion}, "
            "or pass --force to try anyway"
        )
    plan.cache = _token_cache(store, tokenizer, build_cache)
    if plan.cache is not None:
        _check_cache(plan.cache, config, store.name)
    return plan


def _check_run_name(
    workspace: Workspace,
    run: str,
    options: PretrainOptions,
    tokenizer: LoadedTokenizer,
    check_new_run: bool,
    warn: Callable[[str], None] | None,
) -> Path | None:
    """As runs.check_run_name, and a resumed run must keep the tokenizer it started with."""
    if not (options.resume or check_new_run):
        return None
    checkpoint = check_run_name(
        workspace,
        run,
        resume=options.resume,
        overwrite=options.overwrite,
        fallback=options.fallback,
        warn=warn,
    )
    if checkpoint is not None:
        saved_sha = read_meta(checkpoint).get("tokenizer_sha256")
        if saved_sha and saved_sha != tokenizer.sha256:
            raise UsageError(
                f"tokenizer '{tokenizer.name}' changed since run '{run}' started "
                f"(its checkpoint has {saved_sha[:12]}, the workspace {tokenizer.sha256[:12]}); "
                "resume needs the same tokenizer"
            )
    return checkpoint


def _token_cache(store: CorpusStore, tokenizer: LoadedTokenizer, build: bool) -> TokenCache | None:
    if build:
        return build_token_cache(store, tokenizer.tokenizer, tokenizer.sha256, tokenizer.eot_id)
    return load_token_cache(store, tokenizer.sha256, tokenizer.eot_id)


def _check_cache(cache: TokenCache, config: RunConfig, corpus: str) -> None:
    if cache.meta.get("vocab_size", config.model.vocab_size) > config.model.vocab_size:
        raise UsageError(
            f"the token cache of corpus '{corpus}' holds ids up to {cache.meta['vocab_size'] - 1}, "
            f"beyond model.vocab_size {config.model.vocab_size}; rebuild it with this tokenizer"
        )
    context = config.model.context_length
    needed = {"train": config.train.micro_batch_size * context + 1, "val": context + 1}
    for split, tokens in needed.items():
        if cache.n_tokens[split] < tokens:
            raise UsageError(
                f"corpus '{corpus}' is too small: its {split} split has {cache.n_tokens[split]:,} tokens, "
                f"fewer than "
                f"the {tokens:,} one {'batch' if split == 'train' else 'window'} needs at context {context}; "
                "add text or lower model.context_length / train.micro_batch_size"
            )


# ---------------------------------------------------------------- run


def start_run(workspace: Workspace, plan: PretrainPlan, overwrite: bool) -> Path:
    """Create (or, resuming, refresh) runs/<run>/ with its config.yaml and registry row."""
    meta = {
        "preset": plan.config.preset,
        "config": plan.config.model_dump(mode="json"),
        "params": plan.params,
        "tokenizer_sha256": plan.tokenizer.sha256,
        "world_size": plan.world_size,
        "max_steps": plan.total_steps,
        "device": describe_device(plan.device),
    }
    return open_run(
        workspace,
        plan.run,
        STAGE,
        plan.config,
        meta,
        resuming=plan.resume_from is not None,
        overwrite=overwrite,
        corpus=plan.config.data.corpus,
        tokenizer=plan.config.data.tokenizer,
    )


def join_distributed_run(
    workspace: Workspace, options: PretrainOptions, dist: DistEnv, warn: Callable[[str], None] | None = None
) -> PretrainPlan:
    """The plan of one torchrun process, after joining the process group. Rank 0 checks, builds the
    token cache and creates the run; the other ranks wait for it, then plan from what it made."""
    config = resolve_pretrain_config(workspace, options)
    distributed.init_process_group(dist, resolve_device(config.train.device, dist.local_rank))
    if dist.is_main:
        plan = make_plan(workspace, options, warn=warn)
        start_run(workspace, plan, options.overwrite)
    distributed.barrier(dist)
    if not dist.is_main:
        plan = make_plan(workspace, options, build_cache=False, check_new_run=False)
    return plan


def train(
    workspace: Workspace, plan: PretrainPlan, dist: DistEnv, console: Console | None = None
) -> TrainResult:
    try:
        return build_trainer(workspace, plan, dist, console=console).fit()
    finally:
        distributed.destroy_process_group()


SAMPLE_MAX_NEW_TOKENS = 96


def text_sampler(tokenizer: LoadedTokenizer, generation: GenerationConfig, seed: int) -> Sampler:
    """Samples for the event stream: one continuation of a document start (the end-of-text token),
    with the run's generation settings, at most SAMPLE_MAX_NEW_TOKENS tokens, and a fixed seed in a
    generator of its own, so sampling never disturbs the training RNG."""
    config = generation.model_copy(
        update={"max_new_tokens": min(generation.max_new_tokens, SAMPLE_MAX_NEW_TOKENS), "seed": seed}
    )

    def sample(model: torch.nn.Module) -> list[tuple[str, str]]:
        (completion,) = Engine(model, tokenizer).generate([""], config)
        return [("", completion.text)]

    return sample


def build_trainer(
    workspace: Workspace,
    plan: PretrainPlan,
    dist: DistEnv,
    *,
    console: Console | None = None,
    show_progress: bool = True,
) -> Trainer:
    """A Trainer over a fresh Transformer (or the resume checkpoint's state) and the token cache."""
    cfg = plan.config
    torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
    model = Transformer(cfg.model)
    seed_per_rank(cfg.train.seed, dist)
    cache = plan.cache
    batches = TokenWindows(
        cache.train,
        cache.val,
        context_length=cfg.model.context_length,
        micro_batch_size=cfg.train.micro_batch_size,
        eval_batches=cfg.train.eval_batches,
        seed=cfg.train.seed,
        device=plan.device,
        val_bytes_per_token=cache.n_bytes["val"] / max(cache.n_tokens["val"], 1),
        rank=dist.rank,
        world_size=dist.world_size,
    )
    run = RunInfo(
        name=plan.run,
        stage=STAGE,
        dir=workspace.run_dir(plan.run),
        registry=workspace.registry() if dist.is_main else None,
        preset=cfg.preset,
        tokenizer_file=plan.tokenizer.path,
        start_fields={"corpus": cfg.data.corpus, "tokenizer": cfg.data.tokenizer},
        checkpoint_fields={"tokenizer_sha256": plan.tokenizer.sha256},
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
        flops_per_token=plan.flops_per_token,
        sampler=text_sampler(plan.tokenizer, cfg.generation, cfg.train.seed),
        console=console,
        show_progress=show_progress,
    )
    if plan.resume_from is not None:
        trainer.resume(plan.resume_from)
    return trainer


def child_arguments(options: PretrainOptions, run: str, workspace_root: Path, debug: bool) -> list[str]:
    """The `llmctl ...` arguments each torchrun process gets: this command without the launch flags,
    with the run name fixed so every process (and node) agrees on it. The run goes as --run-name:
    torchrun's parser reads '--run' as an ambiguous abbreviation of its own --run-path."""
    args = [
        "--workspace",
        str(workspace_root),
        *(["--debug"] if debug else []),
        "pretrain",
        "--run-name",
        run,
    ]
    valued = {
        "--corpus": options.corpus,
        "--tokenizer": options.tokenizer,
        "--preset": options.preset,
        "--config": options.config_file,
        "--max-steps": options.max_steps,
        "--max-time": options.max_time,
        "--max-tokens": options.max_tokens,
        "--precision": options.precision,
    }
    for flag, value in valued.items():
        if value is not None:
            args += [flag, str(value)]
    for assignment in options.overrides:
        args += ["--set", assignment]
    switches = {
        "--resume": options.resume,
        "--overwrite": options.overwrite,
        "--force": options.force,
        "--fallback": options.fallback,
    }
    return args + [flag for flag, on in switches.items() if on]


def _share(device: torch.device, processes_per_node: int) -> str:
    """How a CPU's RAM is split between the node's processes, for messages."""
    if device.type != "cpu" or processes_per_node <= 1:
        return ""
    return f" (its RAM shared by {processes_per_node} processes)"
