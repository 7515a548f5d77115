"""`llmctl finetune`, `llmctl qlora` and `llmctl merge`: adapt a trained model to instructions or labels."""

from __future__ import annotations

import typer

from llmctl.cli.common import (
    ADAPTER_OPTIONS,
    LORA_SWITCH,
    MAX_LENGTH_OPTION,
    PROMPT_STYLE_OPTION,
    RUN_OPTIONS,
    adapt_options,
    adapter_option_values,
    announce,
    err,
    out,
    print_json,
    report_result,
    run_option_values,
    show_plan,
    success,
    warn,
    with_options,
    workspace,
)
from llmctl.cli.common import option as opt

INSPECT_COUNT = 3

# What finetune and qlora take besides the shared groups; finetune adds --lora after --packing.
DATA_OPTIONS = [
    *adapt_options("Instruction corpus (llmctl corpus list) or a .jsonl/.json file."),
    opt(
        "task",
        str,
        typer.Option(None, "--task", help="sft (instruction tuning) or classify \\[default: sft]."),
    ),
    PROMPT_STYLE_OPTION,
    MAX_LENGTH_OPTION,
    opt(
        "packing",
        bool,
        typer.Option(None, "--packing/--no-packing", help="Pack examples into rows \\[default: packing]."),
    ),
]
OUTPUT_OPTIONS = [
    opt("as_json", bool, typer.Option(False, "--json", help="With --dry-run or --inspect: print JSON.")),
    opt(
        "inspect",
        bool,
        typer.Option(
            False, "--inspect", help="Show a few rendered examples, trained tokens highlighted; exit."
        ),
    ),
]


@with_options(DATA_OPTIONS, LORA_SWITCH, ADAPTER_OPTIONS, RUN_OPTIONS, OUTPUT_OPTIONS)
def finetune(**flags) -> int:
    """Finetune a model on instructions (all weights, or LoRA adapters) or on labelled texts.

    Examples:

      llmctl finetune --model code-base --data sft --run code-sft

      llmctl finetune --model code-base --data sft --lora --lora-r 16 --run code-lora

      llmctl finetune --model code-base --data spam --task classify --run spam-clf

      llmctl finetune --model code-base --data sft --inspect
    """
    return _adapt("finetune", flags)


@with_options(DATA_OPTIONS, ADAPTER_OPTIONS, RUN_OPTIONS, OUTPUT_OPTIONS)
def qlora(**flags) -> int:
    """QLoRA: LoRA adapters on the base quantized to 4-bit NF4 (bitsandbytes); activation
    checkpointing on by default.

    Examples:

      llmctl qlora --model code-base --data sft --run code-qlora

      llmctl qlora --model code-base --data sft --dry-run

      llmctl merge code-qlora --run code-merged
    """
    return _adapt("qlora", {**flags, "lora": True})


def merge(
    adapter: str = typer.Argument(
        ..., help="Adapter checkpoint: a LoRA/QLoRA run, RUN:step-N or a directory."
    ),
    run: str = typer.Option(..., "--run", "-r", help="Name of the run that holds the merged model."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing run of the same name."),
) -> int:
    """Fold LoRA or QLoRA adapters into their base: a full checkpoint any command can load.

    Examples:

      llmctl merge code-qlora --run code-merged

      llmctl merge code-lora:step-400 --run code-lora-400
    """
    from llmctl.train.merge import merge_to_run

    result = merge_to_run(workspace(), adapter, run, overwrite)
    base = "the NF4 round trip of " if result.quantized else ""
    success(f"merged {result.adapter} into {base}{result.base} · run '{result.run}' · {result.checkpoint}")
    return 0


def _adapt(stage: str, flags: dict) -> int:
    """finetune and qlora: plan, then inspect, show the plan, or train."""
    from llmctl.errors import UsageError
    from llmctl.train import recipe
    from llmctl.train.finetune import FinetuneOptions, make_plan

    if flags["as_json"] and not (flags["dry_run"] or flags["inspect"]):
        raise UsageError("--json goes with --dry-run or --inspect")
    options = FinetuneOptions(
        stage=stage,
        model=flags["model"],
        data=flags["data"],
        task=flags["task"],
        prompt_style=flags["prompt_style"],
        max_length=flags["max_length"],
        packing=flags["packing"],
        lora=flags["lora"],
        **adapter_option_values(flags),
        **run_option_values(flags),
    )
    ws = workspace()
    plan = make_plan(ws, options, warn=warn, inspect_only=flags["inspect"])
    if flags["inspect"]:
        _show_examples(plan, flags["as_json"])
        return 0
    if not plan.fits:
        warn("the estimated memory exceeds the device (continuing because of --force)")
    if flags["dry_run"]:
        show_plan(plan, flags["as_json"])
        return 0
    result = recipe.train(ws, plan, console=err, on_start=announce)
    report_result(stage, plan.run, result)
    return result.exit_code


def _show_examples(plan, as_json: bool) -> None:
    from rich.text import Text

    from llmctl.train.finetune_data import inspect_examples

    shown, figures = inspect_examples(plan.config, plan.encoded, plan.tokenizer, plan.labels, INSPECT_COUNT)
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
