"""What every command module shares: the workspace, the consoles, JSON output, the options that
several commands take (declared once here), and how a training stage's plan and end are shown.

Keep this module light: it is imported by `llmctl --help`.
"""

from __future__ import annotations

import inspect
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import typer
from rich.console import Console

from llmctl.errors import UsageError
from llmctl.events import EndReason

if TYPE_CHECKING:
    from llmctl.train.recipe import Plan
    from llmctl.train.runinfo import TrainResult
    from llmctl.workspace import Workspace


@dataclass
class AppState:
    workspace_path: Path | None = None
    debug: bool = False


state = AppState()

# Every form `--model` accepts (llmctl.checkpoints.resolve_model_ref), in one place so that the
# help of sample, chat, eval, finetune, qlora, export and serve cannot drift apart.
MODEL_REF_HELP = (
    "RUN (its best checkpoint), RUN:best, RUN:latest, RUN:step-N, a checkpoint directory "
    "or a Hugging Face model directory"
)

# Results go to stdout; progress, notes and errors go to stderr so `--json` output stays clean.
out = Console(highlight=False)
err = Console(stderr=True, highlight=False)


def workspace() -> Workspace:
    from llmctl.workspace import Workspace

    return Workspace(state.workspace_path)


def print_json(document: Any) -> None:
    sys.stdout.write(json.dumps(document, indent=2, default=str) + "\n")
    sys.stdout.flush()


def note(message: str) -> None:
    err.print(f"[dim]{message}[/dim]")


def warn(message: str) -> None:
    err.print(f"[yellow]warning:[/yellow] {message}")


def success(message: str) -> None:
    err.print(f"[green]✓[/green] {message}")


def report_result(stage: str, run: str, result: TrainResult) -> None:
    """How a training run ended, with the command that continues an interrupted one."""
    best = f" · best val loss {result.best_val_loss:.4f}" if result.best_val_loss is not None else ""
    where = f" · {result.last_checkpoint}" if result.last_checkpoint else ""
    if result.reason is EndReason.INTERRUPTED:
        warn(
            f"run '{run}' interrupted at step {result.step:,}{where}; continue it with: "
            f"llmctl {stage} --run {run} --resume"
        )
    elif result.exit_code == 0:
        success(f"run '{run}' ended ({result.reason}) at step {result.step:,}{best}{where}")


# ---------------------------------------------------------------- options several commands take


def count(text: str | None) -> int | None:
    """'2000000', '2M', '500k', '1.5B' -> an int."""
    if text is None:
        return None
    scale = {"k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9}.get(text[-1:].lower(), 1)
    number = text[:-1] if scale != 1 else text
    try:
        return int(float(number) * scale)
    except ValueError:
        raise typer.BadParameter(f"'{text}' is not a count; use forms like 2000000, 2M or 500k") from None


Command = TypeVar("Command", bound=Callable[..., Any])


def option(name: str, annotation: type, declaration: Any) -> inspect.Parameter:
    """One command-line parameter: its Python name, type and typer.Option/Argument."""
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=declaration, annotation=annotation)


def with_options(*groups: Sequence[inspect.Parameter]) -> Callable[[Command], Command]:
    """Give a command the parameters of `groups`, in order, so commands that share options declare
    them once: the command takes them as keyword arguments (Typer reads the signature set here)."""

    def decorate(command: Command) -> Command:
        command.__signature__ = inspect.Signature([param for group in groups for param in group])
        return command

    return decorate


MODEL = typer.Option(..., "--model", "-m", help=f"Model: {MODEL_REF_HELP}.")
DEVICE = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N.")
# The weights while generating (sample, chat, serve, eval humaneval, eval probes, eval compare):
# converted once at load (llmctl.model.decode_dtype); --precision is its older name.
DTYPE = typer.Option(
    None,
    "--dtype",
    "--precision",
    show_default=False,
    help="Weights while generating: fp32, bf16, int8 (weight-only linear layers) or auto "
    "\\[default: the checkpoint's generation.dtype, auto: int8 on a CPU, bf16 on a GPU].",
)

# Sampling flags of sample and chat; None means "the checkpoint's generation config decides".
MAX_NEW_TOKENS = typer.Option(
    None,
    "--max-new-tokens",
    "-n",
    show_default=False,
    help="Tokens to generate at most \\[default: the checkpoint's].",
)
TEMPERATURE = typer.Option(
    None,
    "--temperature",
    "-t",
    show_default=False,
    help="0 is greedy; higher is more varied \\[default: the checkpoint's].",
)
TOP_K = typer.Option(None, "--top-k", show_default=False, help="Sample among the k likeliest tokens only.")
TOP_P = typer.Option(
    None,
    "--top-p",
    show_default=False,
    help="Sample among the likeliest tokens holding this share of probability, in (0, 1].",
)
MIN_P = typer.Option(
    None,
    "--min-p",
    show_default=False,
    help="Drop tokens less likely than this fraction of the likeliest one.",
)
REPETITION_PENALTY = typer.Option(
    None, "--repetition-penalty", show_default=False, help="Above 1 discourages tokens already in the text."
)
SEED = typer.Option(None, "--seed", show_default=False, help="Make sampling reproducible.")

# What every training stage (pretrain, finetune, qlora) takes besides its data and model.
RUN_OPTIONS = [
    option("config", Path, typer.Option(None, "--config", help="YAML config file layered over the preset.")),
    option(
        "overrides",
        list[str],
        typer.Option([], "--set", help="dotted.key=value, repeatable (train.lr=1e-4)."),
    ),
    option(
        "max_steps",
        int,
        typer.Option(None, "--max-steps", min=1, help="Stop after this many optimizer steps."),
    ),
    option("max_time", str, typer.Option(None, "--max-time", help="Stop after this long: 90s, 5m, 1h30m.")),
    option(
        "max_tokens", str, typer.Option(None, "--max-tokens", help="Stop after this many tokens: 2M, 500k.")
    ),
    option(
        "precision",
        str,
        typer.Option(
            None,
            "--precision",
            help="auto, fp32, bf16 or fp16 \\[default: auto: bf16 where fast, fp16 on older GPUs].",
        ),
    ),
    option(
        "report_to",
        str,
        typer.Option(
            None,
            "--report-to",
            help="Mirror the run to trackers: tensorboard, wandb, mlflow (comma-separated), or none.",
        ),
    ),
    option(
        "resume",
        bool,
        typer.Option(False, "--resume", help="Continue --run from its latest checkpoint, exactly."),
    ),
    option(
        "fallback",
        bool,
        typer.Option(
            False,
            "--fallback",
            help="With --resume: skip a damaged latest checkpoint for the newest good one.",
        ),
    ),
    option(
        "overwrite",
        bool,
        typer.Option(False, "--overwrite", help="Replace an existing run of the same name."),
    ),
    option(
        "force",
        bool,
        typer.Option(False, "--force", help="Train even when the memory estimate exceeds the device."),
    ),
    option(
        "dry_run",
        bool,
        typer.Option(False, "--dry-run", help="Print the plan and the memory estimate; train nothing."),
    ),
]


# What the stages that adapt a trained model take (finetune, qlora, dpo), declared once.
def adapt_options(data_help: str) -> list[inspect.Parameter]:
    """--model, --data and --run, the data described by `data_help`."""
    return [
        option("model", str, typer.Option(None, "--model", "-m", help=f"Base model: {MODEL_REF_HELP}.")),
        option("data", str, typer.Option(None, "--data", "-d", help=data_help)),
        option(
            "run", str, typer.Option(None, "--run", "-r", help="Run name \\[default: DATA-STAGE-TIMESTAMP].")
        ),
    ]


PROMPT_STYLE_OPTION = option(
    "prompt_style",
    str,
    typer.Option(
        None,
        "--prompt-style",
        help="chat (the tokenizer's template), alpaca or problem-solution \\[default: chat].",
    ),
)
MAX_LENGTH_OPTION = option(
    "max_length",
    int,
    typer.Option(
        None,
        "--max-length",
        min=8,
        help="Tokens per row: examples are cut and rows packed at N "
        "\\[default: the base's context, at most 2048].",
    ),
)
LORA_SWITCH = [
    option("lora", bool, typer.Option(False, "--lora", help="Train LoRA adapters instead of every weight.")),
]
ADAPTER_OPTIONS = [
    option("lora_r", int, typer.Option(None, "--lora-r", min=1, help="LoRA rank \\[default: 16].")),
    option(
        "lora_alpha",
        float,
        typer.Option(None, "--lora-alpha", min=0.0, help="LoRA scale numerator \\[default: 32]."),
    ),
    option(
        "lora_dropout",
        float,
        typer.Option(None, "--lora-dropout", min=0.0, max=0.99, help="LoRA dropout \\[default: 0.05]."),
    ),
    option(
        "lora_targets",
        str,
        typer.Option(
            None,
            "--lora-targets",
            help="attention, mlp, all-linear (both), or comma-separated layer names (q_proj,v_proj,lm_head) "
            "\\[default: all-linear].",
        ),
    ),
    option(
        "rslora",
        bool,
        typer.Option(
            None, "--rslora/--no-rslora", help="Rank-stabilised scaling, alpha/sqrt(r) \\[default: off]."
        ),
    ),
    option(
        "preset",
        str,
        typer.Option(None, "--preset", "-p", help="Training settings preset (its model shape is ignored)."),
    ),
]


def adapter_option_values(flags: dict[str, Any]) -> dict[str, Any]:
    """The LoRA fields of llmctl.train.finetune.FinetuneOptions from ADAPTER_OPTIONS."""
    targets = flags["lora_targets"]
    return {
        "lora_r": flags["lora_r"],
        "lora_alpha": flags["lora_alpha"],
        "lora_dropout": flags["lora_dropout"],
        "lora_rslora": flags["rslora"],
        "lora_targets": None
        if targets is None
        else [name.strip() for name in targets.split(",") if name.strip()],
    }


def run_option_values(flags: dict[str, Any]) -> dict[str, Any]:
    """The llmctl.train.runs.RunOptions fields from a training command's RUN_OPTIONS, checked."""
    if flags["resume"] and flags["overwrite"]:
        raise UsageError("--resume continues a run and --overwrite starts it over; give one of them")
    return {
        "run": flags["run"],
        "preset": flags["preset"],
        "config_file": flags["config"],
        "overrides": list(flags["overrides"]),
        "max_steps": flags["max_steps"],
        "max_time": flags["max_time"],
        "max_tokens": count(flags["max_tokens"]),
        "precision": flags["precision"],
        "resume": flags["resume"],
        "overwrite": flags["overwrite"],
        "force": flags["force"],
        "fallback": flags["fallback"],
        "report_to": flags["report_to"],
    }


# ---------------------------------------------------------------- a training stage's plan and end


def show_plan(plan: Plan, as_json: bool) -> None:
    """What a dry run prints: the plan's rows as a table, or its summary as JSON."""
    if as_json:
        print_json(plan.summary())
        return
    from rich.table import Table

    table = Table(
        title=f"plan for run '{plan.run}' (dry run: nothing trained)", title_justify="left", show_header=False
    )
    table.add_column(style="bold")
    table.add_column()
    for label, value in plan.rows():
        table.add_row(label, value)
    out.print(table)


def announce(plan: Plan) -> None:
    err.print(plan.headline(), soft_wrap=True)
