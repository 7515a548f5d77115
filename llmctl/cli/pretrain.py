"""`llmctl pretrain`: train a model from scratch on a corpus's token cache."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from llmctl.cli.common import err, out, print_json, report_result, state, warn, workspace

if TYPE_CHECKING:
    from llmctl.train.pretrain import PretrainPlan


def _count(text: str | None) -> int | None:
    """'2000000', '2M', '500k', '1.5B' -> an int."""
    if text is None:
        return None
    scale = {"k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9}.get(text[-1:].lower(), 1)
    number = text[:-1] if scale != 1 else text
    try:
        return int(float(number) * scale)
    except ValueError:
        raise typer.BadParameter(f"'{text}' is not a count; use forms like 2000000, 2M or 500k") from None


def pretrain(
    corpus: str = typer.Option(None, "--corpus", "-c", help="Corpus to train on (llmctl corpus list)."),
    tokenizer: str = typer.Option(None, "--tokenizer", "-t", help="Tokenizer (llmctl tokenizer list)."),
    preset: str = typer.Option(
        None, "--preset", "-p", help="Model and training preset (llmctl presets list)."
    ),
    run: str = typer.Option(
        None, "--run", "--run-name", "-r", help="Run name \\[default: CORPUS-PRESET-TIMESTAMP]."
    ),
    config: Path = typer.Option(None, "--config", help="YAML config file layered over the preset."),
    overrides: list[str] = typer.Option([], "--set", help="dotted.key=value, repeatable (train.lr=1e-4)."),
    max_steps: int = typer.Option(None, "--max-steps", min=1, help="Stop after this many optimizer steps."),
    max_time: str = typer.Option(None, "--max-time", help="Stop after this long: 90s, 5m, 1h30m."),
    max_tokens: str = typer.Option(None, "--max-tokens", help="Stop after this many tokens: 2M, 500k."),
    precision: str = typer.Option(
        None,
        "--precision",
        help="auto, fp32, bf16 or fp16 \\[default: auto: bf16 where fast, fp16 on older GPUs].",
    ),
    resume: bool = typer.Option(
        False, "--resume", help="Continue --run from its latest checkpoint, exactly."
    ),
    fallback: bool = typer.Option(
        False, "--fallback", help="With --resume: skip a damaged latest checkpoint for the newest good one."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing run of the same name."),
    force: bool = typer.Option(
        False, "--force", help="Train even when the memory estimate exceeds the device."
    ),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Print the plan and the memory estimate; train nothing."
    ),
    as_json: bool = typer.Option(False, "--json", help="With --dry-run: print the plan as JSON."),
    nproc: int = typer.Option(
        1, "--nproc", min=1, help="Processes (GPUs) per node, through torch.distributed.run."
    ),
    nnodes: int = typer.Option(1, "--nnodes", min=1, help="Nodes taking part."),
    node_rank: int = typer.Option(0, "--node-rank", min=0, help="This node's rank (multi-node)."),
    rdzv_endpoint: str = typer.Option(
        None, "--rdzv-endpoint", help="host:port where the nodes meet (multi-node)."
    ),
) -> int:
    """Pretrain a GPT-style model on a corpus.

    Examples:

      llmctl pretrain --corpus code --tokenizer code-8k --preset cpu-debug --max-time 5m

      llmctl pretrain --corpus code --tokenizer code-8k --preset rtx4060-8g --run code-base --dry-run

      llmctl pretrain --run code-base --resume

      llmctl pretrain --corpus code --tokenizer code-8k --preset gpt2-124m --run big --nproc 4
    """
    from llmctl.errors import UsageError
    from llmctl.train import distributed
    from llmctl.train.pretrain import (
        PretrainOptions,
        child_arguments,
        join_distributed_run,
        make_plan,
        start_run,
        train,
    )

    if resume and overwrite:
        raise UsageError("--resume continues a run and --overwrite starts it over; give one of them")
    if as_json and not dry_run:
        raise UsageError("--json prints the plan of a --dry-run; training reports through events.jsonl")
    if nnodes > 1 and not rdzv_endpoint:
        raise UsageError("--nnodes above 1 needs --rdzv-endpoint HOST:PORT (the same on every node)")
    launching = (nproc > 1 or nnodes > 1) and not distributed.under_torchrun()
    dist = distributed.dist_env()
    options = PretrainOptions(
        run=run,
        corpus=corpus,
        tokenizer=tokenizer,
        preset=preset,
        config_file=config,
        overrides=list(overrides),
        max_steps=max_steps,
        max_time=max_time,
        max_tokens=_count(max_tokens),
        precision=precision,
        resume=resume,
        overwrite=overwrite,
        force=force,
        fallback=fallback,
        world_size=nproc * nnodes if launching else dist.world_size,
        local_rank=dist.local_rank,
        processes_per_node=nproc if launching else dist.local_world_size,
    )
    ws = workspace()

    if dist.enabled:  # one process of a torchrun launch
        plan = join_distributed_run(ws, options, dist, warn)
    else:
        plan = make_plan(ws, options, build_cache=not dry_run, enforce_memory=not dry_run, warn=warn)
        if dry_run:
            _show_plan(plan.summary(), as_json)
            return 0
        if not plan.fits:
            warn(f"the estimated memory exceeds the device; {plan.suggestion} (going on because of --force)")
        if launching:
            argv = child_arguments(options, plan.run, ws.root, state.debug)
            command = distributed.torchrun_command(argv, nproc, nnodes, node_rank, rdzv_endpoint)
            err.print(f"[dim]launching {nproc * nnodes} processes: {' '.join(command)}[/dim]", soft_wrap=True)
            return subprocess.call(command)
        start_run(ws, plan, options.overwrite)
    if dist.is_main:
        _announce(plan)
    result = train(ws, plan, dist, console=err)
    if dist.is_main:
        report_result("pretrain", plan.run, result)
    return result.exit_code


def _announce(plan: PretrainPlan) -> None:
    from llmctl.model.sizing import human_count

    action = f"resuming from {plan.resume_from.name}" if plan.resume_from else "starting"
    err.print(
        f"[bold]{plan.run}[/bold] · {action} · {human_count(plan.params)} params · "
        f"{plan.precision.name}{' + compile' if plan.compile else ''} · {plan.summary()['device']}"
        f"{f' × {plan.world_size}' if plan.world_size > 1 else ''}",
        soft_wrap=True,
    )


def _show_plan(summary: dict, as_json: bool) -> None:
    from rich.table import Table

    from llmctl.model.sizing import human_bytes, human_count

    if as_json:
        print_json(summary)
        return
    memory = summary["memory"]
    device_memory = summary["device_memory"]
    table = Table(
        title=f"plan for run '{summary['run']}' (dry run: nothing trained)",
        title_justify="left",
        show_header=False,
    )
    table.add_column(style="bold")
    table.add_column()
    rows = [
        ("preset", summary["preset"] or "-"),
        ("data", f"corpus {summary['corpus']} · tokenizer {summary['tokenizer']}"),
        (
            "model",
            f"{summary['params']:,} parameters ({human_count(summary['params'])}) · {summary['shape']}",
        ),
        (
            "device",
            f"{summary['device']}{' × ' + str(summary['world_size']) if summary['world_size'] > 1 else ''}",
        ),
        (
            "precision",
            f"{summary['precision']} · compile {'on' if summary['compile'] else 'off'} · activation "
            f"checkpointing {'on' if summary['activation_checkpointing'] else 'off'}",
        ),
        (
            "batch",
            f"{summary['micro_batch_size']} × {summary['grad_accum_steps']} accumulation"
            f"{' × ' + str(summary['world_size']) + ' ranks' if summary['world_size'] > 1 else ''} = "
            f"{summary['tokens_per_step']:,} tokens per step",
        ),
        (
            "length",
            (
                f"{summary['total_steps']:,} steps = {human_count(summary['total_tokens'])} tokens"
                if summary["total_steps"]
                else "no step limit"
            )
            + (f" · at most {summary['max_time_s']:.0f} s" if summary["max_time_s"] else "")
            + (
                f" · {summary['epochs']} epochs of {human_count(summary['train_tokens'])} train tokens"
                if summary["epochs"]
                else ""
            ),
        ),
        (
            "memory",
            f"{human_bytes(memory['total'])} estimated (weights {human_bytes(memory['weights'])}, "
            f"gradients {human_bytes(memory['gradients'])}, optimizer {human_bytes(memory['optimizer'])}, "
            f"activations {human_bytes(memory['activations'])})",
        ),
        (
            "device memory",
            f"{human_bytes(device_memory) if device_memory else 'unknown'}"
            + (f" (RAM / {shared} processes)" if (shared := summary["device_memory_shared_by"]) > 1 else "")
            + " · "
            + ("[green]fits[/green]" if summary["fits"] else "[red]does not fit[/red]"),
        ),
    ]
    if summary["suggestion"]:
        rows.append(("suggestion", summary["suggestion"]))
    if summary["resume_from"]:
        rows.append(("resume from", summary["resume_from"]))
    for label, value in rows:
        table.add_row(label, value)
    out.print(table)
