"""`llmctl pretrain`: train a model from scratch on a corpus's token cache."""

from __future__ import annotations

import subprocess
from pathlib import Path

import typer

from llmctl.cli.common import (
    RUN_OPTIONS,
    announce,
    err,
    report_result,
    run_option_values,
    show_plan,
    state,
    warn,
    with_options,
    workspace,
)
from llmctl.cli.common import option as opt

DATA_OPTIONS = [
    opt("corpus", str, typer.Option(None, "--corpus", "-c", help="Corpus to train on (llmctl corpus list).")),
    opt("tokenizer", str, typer.Option(None, "--tokenizer", "-t", help="Tokenizer (llmctl tokenizer list).")),
    opt(
        "preset",
        str,
        typer.Option(None, "--preset", "-p", help="Model and training preset (llmctl presets list)."),
    ),
    opt(
        "run",
        str,
        typer.Option(
            None, "--run", "--run-name", "-r", help="Run name \\[default: CORPUS-PRESET-TIMESTAMP]."
        ),
    ),
]
LAUNCH_OPTIONS = [
    opt("as_json", bool, typer.Option(False, "--json", help="With --dry-run: print the plan as JSON.")),
    opt(
        "nproc",
        int,
        typer.Option(1, "--nproc", min=1, help="Processes (GPUs) per node, through torch.distributed.run."),
    ),
    opt("nnodes", int, typer.Option(1, "--nnodes", min=1, help="Nodes taking part.")),
    opt("node_rank", int, typer.Option(0, "--node-rank", min=0, help="This node's rank (multi-node).")),
    opt(
        "rdzv_endpoint",
        str,
        typer.Option(None, "--rdzv-endpoint", help="host:port where the nodes meet (multi-node)."),
    ),
]


@with_options(DATA_OPTIONS, RUN_OPTIONS, LAUNCH_OPTIONS)
def pretrain(**flags) -> int:
    """Pretrain a GPT-style model on a corpus.

    Examples:

      llmctl pretrain --corpus code --tokenizer code-8k --preset cpu-debug --max-time 5m

      llmctl pretrain --corpus code --tokenizer code-8k --preset rtx4060-8g --run code-base --dry-run

      llmctl pretrain --run code-base --resume

      llmctl pretrain --corpus code --tokenizer code-8k --preset gpt2-124m --run big --nproc 4
    """
    from llmctl.errors import UsageError
    from llmctl.train import distributed, recipe
    from llmctl.train.pretrain import PretrainOptions, join_distributed_run, make_plan

    values = run_option_values(flags)
    dry_run, nproc, nnodes = flags["dry_run"], flags["nproc"], flags["nnodes"]
    if flags["as_json"] and not dry_run:
        raise UsageError("--json prints the plan of a --dry-run; training reports through events.jsonl")
    if nnodes > 1 and not flags["rdzv_endpoint"]:
        raise UsageError("--nnodes above 1 needs --rdzv-endpoint HOST:PORT (the same on every node)")
    launching = (nproc > 1 or nnodes > 1) and not distributed.under_torchrun()
    dist = distributed.dist_env()
    options = PretrainOptions(
        corpus=flags["corpus"],
        tokenizer=flags["tokenizer"],
        world_size=nproc * nnodes if launching else dist.world_size,
        local_rank=dist.local_rank,
        processes_per_node=nproc if launching else dist.local_world_size,
        **values,
    )
    ws = workspace()

    if dist.enabled:  # one process of a torchrun launch
        plan = join_distributed_run(ws, options, dist, warn)
    else:
        plan = make_plan(ws, options, build_cache=not dry_run, enforce_memory=not dry_run, warn=warn)
        if dry_run:
            show_plan(plan, flags["as_json"])
            return 0
        if not plan.fits:
            warn(f"the estimated memory exceeds the device; {plan.suggestion} (going on because of --force)")
        if launching:
            argv = child_arguments(flags, plan.run, ws.root, state.debug)
            command = distributed.torchrun_command(
                argv, nproc, nnodes, flags["node_rank"], flags["rdzv_endpoint"]
            )
            err.print(f"[dim]launching {nproc * nnodes} processes: {' '.join(command)}[/dim]", soft_wrap=True)
            return subprocess.call(command)
    result = recipe.train(ws, plan, dist=dist, console=err, on_start=announce)
    if dist.is_main:
        report_result("pretrain", plan.run, result)
    return result.exit_code


# the flags each torchrun process gets again (the launch flags stay with the launcher)
VALUED_FLAGS = {
    "corpus": "--corpus",
    "tokenizer": "--tokenizer",
    "preset": "--preset",
    "config": "--config",
    "max_steps": "--max-steps",
    "max_time": "--max-time",
    "max_tokens": "--max-tokens",
    "precision": "--precision",
    "report_to": "--report-to",
}
SWITCHES = {"resume": "--resume", "overwrite": "--overwrite", "force": "--force", "fallback": "--fallback"}


def child_arguments(flags: dict, run: str, workspace_root: Path, debug: bool) -> list[str]:
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
    for name, flag in VALUED_FLAGS.items():
        if flags[name] is not None:
            args += [flag, str(flags[name])]
    for assignment in flags["overrides"]:
        args += ["--set", assignment]
    return args + [flag for name, flag in SWITCHES.items() if flags[name]]
