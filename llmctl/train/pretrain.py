"""Pretraining as a recipe: resolve the config, check everything, plan, then hand the Trainer a
fresh Transformer and random windows of the corpus's token cache.

Every check runs before anything is written, so a refused run leaves no runs/<name> directory and
no registry row. Only the token cache (under the corpus, reusable) may be built before training.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llmctl.checkpoint.files import read_meta
from llmctl.config import RunConfig, load_yaml_file, resolve_config
from llmctl.data.store import CorpusStore
from llmctl.data.tokencache import TokenCache, build_token_cache, load_token_cache
from llmctl.errors import UsageError
from llmctl.model.sizing import count_parameters, estimate_training_memory, flops_per_token, human_count
from llmctl.model.transformer import Transformer
from llmctl.tokenizer import LoadedTokenizer, load_tokenizer
from llmctl.train import distributed, recipe
from llmctl.train.allocator import return_large_frees_to_the_os
from llmctl.train.batches import TokenWindows
from llmctl.train.distributed import DistEnv, seed_per_rank
from llmctl.train.precision import Precision, resolve_device
from llmctl.train.recipe import Plan, Row, Size, StageParts
from llmctl.train.runs import RunOptions, check_run_name, starts_over
from llmctl.workspace import RUN_CONFIG, Workspace, check_name

STAGE = "pretrain"


@dataclass
class PretrainOptions(RunOptions):
    corpus: str | None = None
    tokenizer: str | None = None
    world_size: int = 1
    local_rank: int = 0
    processes_per_node: int = 1


@dataclass(frozen=True, kw_only=True)
class PretrainPlan(Plan):
    cache: TokenCache | None  # None only on ranks that plan before rank 0 built it
    suggestion: str | None  # the smallest change that would fit, when the estimate does not

    def details(self) -> dict[str, Any]:
        cfg = self.config
        train_tokens = self.cache.n_tokens["train"] if self.cache else None
        total = self.total_tokens
        return {
            "corpus": cfg.data.corpus,
            "tokenizer": cfg.data.tokenizer,
            "shape": f"{cfg.model.n_layer} layers × {cfg.model.d_model} wide, {cfg.model.n_head} heads, "
            f"context {cfg.model.context_length}, vocab {cfg.model.vocab_size}",
            "train_tokens": train_tokens,
            "epochs": round(total / train_tokens, 2) if total and train_tokens else None,
            "suggestion": self.suggestion,
        }

    def head_rows(self) -> list[Row]:
        cfg, params = self.config, self.params
        return [
            ("preset", cfg.preset or "-"),
            ("data", f"corpus {cfg.data.corpus} · tokenizer {cfg.data.tokenizer}"),
            ("model", f"{params:,} parameters ({human_count(params)}) · {self.details()['shape']}"),
        ]

    def length_note(self) -> str:
        details = self.details()
        if not details["epochs"]:
            return ""
        return f" · {details['epochs']} epochs of {human_count(details['train_tokens'])} train tokens"

    def tail_rows(self) -> list[Row]:
        return [("suggestion", self.suggestion)] if self.suggestion else []

    def registry_links(self) -> dict[str, Any]:
        return {"corpus": self.config.data.corpus, "tokenizer": self.config.data.tokenizer}

    def stage_parts(self, dist: DistEnv) -> StageParts:
        """A fresh Transformer and random windows of the token cache."""
        cfg, cache = self.config, self.cache
        if self.device.type == "cpu":
            return_large_frees_to_the_os()  # the heap would grow a third past the live tensors
        torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
        model = Transformer(cfg.model)
        seed_per_rank(cfg.train.seed, dist)
        batches = TokenWindows(
            cache.train,
            cache.val,
            context_length=cfg.model.context_length,
            micro_batch_size=cfg.train.micro_batch_size,
            eval_batches=cfg.train.eval_batches,
            seed=cfg.train.seed,
            device=self.device,
            val_bytes_per_token=cache.n_bytes["val"] / max(cache.n_tokens["val"], 1),
            rank=dist.rank,
            world_size=dist.world_size,
        )
        return StageParts(
            model,
            batches,
            # the end-of-text token starts a document: a sample is the start of one
            sampler=recipe.event_sampler(self.tokenizer, cfg.generation, cfg.train.seed, prompt=""),
            start_fields={"corpus": cfg.data.corpus, "tokenizer": cfg.data.tokenizer},
            checkpoint_fields={"tokenizer_sha256": self.tokenizer.sha256},
        )


# ---------------------------------------------------------------- config


def resolve_pretrain_config(workspace: Workspace, options: PretrainOptions) -> RunConfig:
    flags = {
        "data.corpus": options.corpus,
        "data.tokenizer": options.tokenizer,
        **recipe.limit_flags(options),
    }
    base = None
    if options.resume:
        saved = workspace.run_dir(options.run) / RUN_CONFIG
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
    recipe.apply_limit_rules(config, options)
    if base is not None and config.model.model_dump() != base["model"]:
        raise UsageError("model.* settings cannot change when resuming; start a new run to change the model")
    if config.data.max_length is not None:
        raise UsageError(
            "data.max_length is for finetune, qlora and dpo; pretraining rows are model.context_length "
            "tokens long (set that instead)"
        )
    if not config.data.corpus or not config.data.tokenizer:
        raise UsageError(
            "pretrain needs a corpus and a tokenizer: --corpus NAME --tokenizer NAME "
            "(llmctl corpus list, llmctl tokenizer list)"
        )
    return config


def _match_vocab(config: RunConfig, tokenizer: LoadedTokenizer, resuming: bool) -> None:
    """model.vocab_size follows the tokenizer, unless the user chose it (then it must match)."""
    if config.model.vocab_size == tokenizer.vocab_size:
        return
    if config.set_by_user("model.vocab_size") and not resuming:
        raise UsageError(
            f"model.vocab_size is {config.model.vocab_size} but tokenizer '{tokenizer.name}' has "
            f"{tokenizer.vocab_size} tokens; drop the setting (the tokenizer's size is used) "
            "or pick a matching tokenizer"
        )
    config.model.vocab_size = tokenizer.vocab_size


# ---------------------------------------------------------------- memory


def _memory(config: RunConfig, precision: Precision):
    return estimate_training_memory(config.model, config.train, mixed_precision=precision.name != "fp32")


def suggest_fit(config: RunConfig, precision: Precision, budget: int) -> str:
    """The smallest change that brings the estimate under `budget`, keeping the global batch."""
    train = config.train
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
                return "try " + " ".join(changes) + " (same global batch)"
            if micro == 1:
                break
            micro, accum = micro // 2, accum * 2
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
    _match_vocab(config, tokenizer, resuming=options.resume)

    run = options.run or f"{config.data.corpus}-{config.preset or 'custom'}-{time.strftime('%Y%m%d-%H%M%S')}"
    resume_from = _check_run_name(workspace, run, options, tokenizer, check_new_run, warn)

    runtime = recipe.resolve_runtime(config, options.local_rank)
    if runtime.device.type == "cuda" and options.processes_per_node > 1:
        # every process of the node takes the GPU of its local rank: the last one must exist too
        resolve_device(config.train.device, options.processes_per_node - 1)
    memory = _memory(config, runtime.precision)
    device_memory = runtime.memory
    shared_by = options.processes_per_node if runtime.device.type == "cpu" else 1
    if device_memory is not None:
        device_memory //= shared_by
    fits = device_memory is None or memory.total <= device_memory
    suggestion = None if fits else suggest_fit(config, runtime.precision, device_memory)
    if enforce_memory:
        recipe.check_fits(
            memory, device_memory, runtime.device, force=options.force, fix=suggestion, shared_by=shared_by
        )
    cache = _token_cache(store, tokenizer, build_cache)
    if cache is not None:
        _check_cache(cache, config, store.name)
    params = count_parameters(config.model)
    return PretrainPlan(
        stage=STAGE,
        run=run,
        config=config,
        tokenizer=tokenizer,
        runtime=runtime,
        size=Size.of(config, params, params, flops_per_token(config.model, params), options.world_size),
        memory=memory,
        device_memory=device_memory,
        memory_shared_by=shared_by,
        resume_from=resume_from,
        overwrite=starts_over(options, resume_from),
        world_size=options.world_size,
        suggestion=suggestion,
        cache=cache,
    )


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
    checkpoint = check_run_name(workspace, run, options, warn, writer=check_new_run)
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


# ---------------------------------------------------------------- distributed


def join_distributed_run(
    workspace: Workspace, options: PretrainOptions, dist: DistEnv, warn: Callable[[str], None] | None = None
) -> PretrainPlan:
    """The plan of one torchrun process, after joining the process group. Rank 0 checks, builds the
    token cache and creates the run; the other ranks wait for it, then plan from what it made."""
    config = resolve_pretrain_config(workspace, options)
    distributed.init_process_group(dist, resolve_device(config.train.device, dist.local_rank))
    if dist.is_main:
        plan = make_plan(workspace, options, warn=warn)
        recipe.start_run(workspace, plan)
    distributed.barrier(dist)
    if not dist.is_main:
        plan = make_plan(workspace, options, build_cache=False, check_new_run=False)
    return plan
