"""`llmctl finetune`, `llmctl qlora` and `llmctl merge`: adapt a trained model to instructions or labels."""

from __future__ import annotations

from pathlib import Path

import typer

from llmctl.cli.common import MODEL_REF_HELP, err, out, print_json, report_result, success, warn, workspace
from llmctl.cli.pretrain import _count

MODEL = typer.Option(None, "--model", "-m", help=f"Base model: {MODEL_REF_HELP}.")
DATA = typer.Option(
    None, "--data", "-d", help="Instruction corpus (llmctl corpus list) or a .jsonl/.json file."
)
RUN = typer.Option(None, "--run", "-r", help="Run name \\[default: DATA-STAGE-TIMESTAMP].")
TASK = typer.Option(None, "--task", help="sft (instruction tuning) or classify \\[default: sft].")
PROMPT_STYLE = typer.Option(
    None,
    "--prompt-style",
    help="chat (the tokenizer's template), alpaca or problem-solution \\[default: chat].",
)
PACKING = typer.Option(None, "--packing/--no-packing", help="Pack examples into rows \\[default: packing].")
LORA_R = typer.Option(None, "--lora-r", min=1, help="LoRA rank \\[default: 8].")
LORA_ALPHA = typer.Option(None, "--lora-alpha", min=0.0, help="LoRA scale numerator \\[default: 16].")
LORA_DROPOUT = typer.Option(None, "--lora-dropout", min=0.0, max=0.99, help="LoRA dropout \\[default: 0.05].")
LORA_TARGETS = typer.Option(
    None, "--lora-targets", help="Comma-separated layer names \\[default: q_proj,k_proj,v_proj,o_proj]."
)
PRESET = typer.Option(None, "--preset", "-p", help="Training settings preset (its model shape is ignored).")
CONFIG = typer.Option(None, "--config", help="YAML config file layered over the preset.")
OVERRIDES = typer.Option([], "--set", help="dotted.key=value, repeatable (train.lr=1e-4).")
MAX_STEPS = typer.Option(None, "--max-steps", min=1, help="Stop after this many optimizer steps.")
MAX_TIME = typer.Option(None, "--max-time", help="Stop after this long: 90s, 5m, 1h30m.")
MAX_TOKENS = typer.Option(None, "--max-tokens", help="Stop after this many tokens: 2M, 500k.")
PRECISION = typer.Option(None, "--precision", help="auto, fp32, bf16 or fp16 \\[default: auto].")
RESUME = typer.Option(False, "--resume", help="Continue --run from its latest checkpoint, exactly.")
FALLBACK = typer.Option(False, "--fallback", help="With --resume: skip a damaged latest checkpoint.")
OVERWRITE = typer.Option(False, "--overwrite", help="Replace an existing run of the same name.")
FORCE = typer.Option(False, "--force", help="Train even when the memory estimate exceeds the device.")
DRY_RUN = typer.Option(False, "--dry-run", help="Print the plan and the memory estimate; train nothing.")
AS_JSON = typer.Option(False, "--json", help="With --dry-run or --inspect: print JSON.")
INSPECT = typer.Option(
    False, "--inspect", help="Show a few rendered examples, trained tokens highlighted; exit."
)
INSPECT_COUNT = 3


def finetune(
    model: str = MODEL,
    data: str = DATA,
    run: str = RUN,
    task: str = TASK,
    prompt_style: str = PROMPT_STYLE,
    packing: bool = PACKING,
    lora: bool = typer.Option(False, "--lora", help="Train LoRA adapters instead of every weight."),
    lora_r: int = LORA_R,
    lora_alpha: float = LORA_ALPHA,
    lora_dropout: float = LORA_DROPOUT,
    lora_targets: str = LORA_TARGETS,
    preset: str = PRESET,
    config: Path = CONFIG,
    overrides: list[str] = OVERRIDES,
    max_steps: int = MAX_STEPS,
    max_time: str = MAX_TIME,
    max_tokens: str = MAX_TOKENS,
    precision: str = PRECISION,
    resume: bool = RESUME,
    fallback: bool = FALLBACK,
    overwrite: bool = OVERWRITE,
    force: bool = FORCE,
    dry_run: bool = DRY_RUN,
    as_json: bool = AS_JSON,
    inspect: bool = INSPECT,
) -> int:
    """Finetune a model on instructions (all weights, or LoRA adapters) or on labelled texts.

    Examples:

      llmctl finetune --model code-base --data sft --run code-sft

      llmctl finetune --model code-base --data sft --lora --lora-r 16 --run code-lora

      llmctl finetune --model code-base --data spam --task classify --run spam-clf

      llmctl finetune --model code-base --data sft --inspect
    """
    return _finetune("finetune", locals())


def qlora(
    model: str = MODEL,
    data: str = DATA,
    run: str = RUN,
    task: str = TASK,
    prompt_style: str = PROMPT_STYLE,
    packing: bool = PACKING,
    lora_r: int = LORA_R,
    lora_alpha: float = LORA_ALPHA,
    lora_dropout: float = LORA_DROPOUT,
    lora_targets: str = LORA_TARGETS,
    preset: str = PRESET,
    config: Path = CONFIG,
    overrides: list[str] = OVERRIDES,
    max_steps: int = MAX_STEPS,
    max_time: str = MAX_TIME,
    max_tokens: str = MAX_TOKENS,
    precision: str = PRECISION,
    resume: bool = RESUME,
    fallback: bool = FALLBACK,
    overwrite: bool = OVERWRITE,
    force: bool = FORCE,
    dry_run: bool = DRY_RUN,
    as_json: bool = AS_JSON,
    inspect: bool = INSPECT,
) -> int:
    """QLoRA: LoRA adapters on the base quantized to 4-bit NF4 (bitsandbytes); activation
    checkpointing on by default.

    Examples:

      llmctl qlora --model code-base --data sft --run code-qlora

      llmctl qlora --model code-base --data sft --dry-run

      llmctl merge code-qlora --run code-merged
    """
    return _finetune("qlora", {**locals(), "lora": True})


def merge(
    adapter: str = typer.Argument(
        ..., help="Adapter checkpoint: a LoRA/QLoRA run, RUN:step-N or a directory."
    ),
    run: str = typer.Option(..., "--run", "-r", help="Name of the run that holds the merged model."),
    overwrite: bool = OVERWRITE,
) -> int:
    """Fold LoRA or QLoRA adapters into their base: a full checkpoint any command can load.

    Examples:

      llmctl merge code-qlora --run code-merged

      llmctl merge code-lora:step-400 --run code-lora-400
    """
    from llmctl.train.finetune import merge_to_run

    result = merge_to_run(workspace(), adapter, run, overwrite)
    base = "the NF4 round trip of " if result.quantized else ""
    success(f"merged {result.adapter} into {base}{result.base} · run '{result.run}' · {result.checkpoint}")
    return 0


# ---------------------------------------------------------------- shared by finetune and qlora


def _finetune(stage: str, flags: dict) -> int:
    from llmctl.errors import UsageError
    from llmctl.train.finetune import FinetuneOptions, build_trainer, make_plan, start_finetune_run

    if flags["as_json"] and not (flags["dry_run"] or flags["inspect"]):
        raise UsageError("--json goes with --dry-run or --inspect")
    if flags["resume"] and flags["overwrite"]:
        raise UsageError("--resume continues a run and --overwrite starts it over; give one of them")

    targets = flags["lora_targets"]
    options = FinetuneOptions(
        stage=stage,
        run=flags["run"],
        model=flags["model"],
        data=flags["data"],
        task=flags["task"],
        prompt_style=flags["prompt_style"],
        packing=flags["packing"],
        lora=flags["lora"],
        lora_r=flags["lora_r"],
        lora_alpha=flags["lora_alpha"],
        lora_dropout=flags["lora_dropout"],
        lora_targets=[name.strip() for name in targets.split(",") if name.strip()]
        if targets is not None
        else None,
        preset=flags["preset"],
        config_file=flags["config"],
        overrides=list(flags["overrides"]),
        max_steps=flags["max_steps"],
        max_time=flags["max_time"],
        max_tokens=_count(flags["max_tokens"]),
        precision=flags["precision"],
        resume=flags["resume"],
        overwrite=flags["overwrite"],
        force=flags["force"],
        fallback=flags["fallback"],
    )
    ws = workspace()
    plan = make_plan(ws, options, warn=warn, inspect_only=flags["inspect"])
    if flags["inspect"]:
        _show_examples(plan, flags["as_json"])
        return 0
    if not plan.fits:
        warn("the estimated memory exceeds the device (continuing because of --force)")
    if flags["dry_run"]:
        _show_plan(plan.summary(), flags["as_json"])
        return 0
    start_finetune_run(ws, plan, options.overwrite)
    _announce(plan)
    trainer = build_trainer(ws, plan, console=err)
    result = trainer.fit()
    report_result(stage, plan.run, result)
    return result.exit_code


def _announce(plan) -> None:
    from llmctl.model.sizing import human_count

    action = f"resuming from {plan.resume_from.name}" if plan.resume_from else "starting"
    method = plan.summary()["method"]
    err.print(
        f"[bold]{plan.run}[/bold] · {plan.stage} ({method}, {plan.task}) · {action} · "
        f"{human_count(plan.trainable)} of {human_count(plan.params)} params trained · "
        f"{plan.precision.name} · {plan.summary()['device']}",
        soft_wrap=True,
    )


def _show_examples(plan, as_json: bool) -> None:
    from rich.text import Text

    from llmctl.train.finetune import inspect_examples

    shown, figures = inspect_examples(plan, INSPECT_COUNT)
    if as_json:
        examples = [
            {"pieces": [{"text": text, "trained": trained} for text, trained in example.pieces]}
            for example in shown
        ]
        print_json({"figures": figures, "examples": examples})
        return
    for number, example in enumerate(shown, 1):
        cut = " · cut to the context" if example.truncated else ""
        out.rule(f"example {number} · {example.tokens} tokens · {example.trained} trained{cut}", align="left")
        text = Text()
        for piece, trained in example.pieces:
            text.append(piece, style="bold green" if trained else "dim")
        out.print(text)
    out.rule()
    out.print(
        "[bold green]trained tokens[/bold green] carry the loss; [dim]dim tokens[/dim] are context only"
    )
    out.print(" · ".join(f"{key} {value}" for key, value in figures.items()))


def _show_plan(summary: dict, as_json: bool) -> None:
    from rich.table import Table

    from llmctl.model.sizing import human_bytes, human_count

    if as_json:
        print_json(summary)
        return
    memory = summary["memory"]
    table = Table(
        title=f"plan for run '{summary['run']}' (dry run: nothing trained)",
        title_justify="left",
        show_header=False,
    )
    table.add_column(style="bold")
    table.add_column()
    adapter = summary["adapter"]
    method = summary["method"]
    if adapter:
        method += (
            f" · r {adapter['r']}, alpha {adapter['alpha']:g}, dropout {adapter['dropout']:g}, "
            f"targets {','.join(adapter['targets'])}"
        )
    data = f"{summary['data']} · {summary['train_examples']:,} examples in {summary['train_rows']:,} rows"
    if summary["task"] == "sft":
        data += f" · {summary['prompt_style']} style · {'packed' if summary['packing'] else 'padded'}"
    else:
        data += f" · labels {', '.join(summary['labels'])}"
    rows = [
        ("base", summary["base"]),
        ("task", f"{summary['task']} · {method}"),
        ("data", data),
        ("validation", f"{summary['val_examples']:,} examples: {summary['validation']}"),
        (
            "parameters",
            f"{human_count(summary['trainable_params'])} trained of {human_count(summary['params'])} "
            f"({100 * summary['trainable_fraction']:.2f}%)",
        ),
        (
            "device",
            f"{summary['device']} · {summary['precision']} · activation checkpointing "
            f"{'on' if summary['activation_checkpointing'] else 'off'} · {summary['optimizer']}",
        ),
        (
            "batch",
            f"{summary['micro_batch_size']} × {summary['grad_accum_steps']} accumulation = "
            f"{summary['tokens_per_step']:,} tokens per step",
        ),
        (
            "length",
            (f"{summary['total_steps']:,} steps" if summary["total_steps"] else "no step limit")
            + (f" · {summary['epochs']} epochs" if summary["epochs"] else ""),
        ),
        (
            "memory",
            f"{human_bytes(memory['total'])} estimated (weights {human_bytes(memory['weights'])}, "
            f"gradients {human_bytes(memory['gradients'])}, optimizer {human_bytes(memory['optimizer'])}, "
            f"activations {human_bytes(memory['activations'])})",
        ),
    ]
    if "memory_saved" in summary:
        rows.append(
            (
                "vs LoRA",
                f"{human_bytes(summary['lora_unquantized_memory']['total'])} for LoRA on the "
                f"unquantized base: 4-bit saves {human_bytes(summary['memory_saved'])} "
                f"({100 * summary['memory_saved_fraction']:.0f}%)",
            )
        )
    device_memory = summary["device_memory"]
    rows.append(
        (
            "device memory",
            f"{human_bytes(device_memory) if device_memory else 'unknown'} · "
            + ("[green]fits[/green]" if summary["fits"] else "[red]does not fit[/red]"),
        )
    )
    if summary["resume_from"]:
        rows.append(("resume from", summary["resume_from"]))
    rows += [("note", note) for note in summary["notes"]]
    for label, value in rows:
        table.add_row(label, value)
    out.print(table)
