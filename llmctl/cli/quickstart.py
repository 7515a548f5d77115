"""`llmctl quickstart`: the whole pipeline, from the standard library's code to a model you can chat with."""

from __future__ import annotations

import typer

from llmctl.cli.common import err, out, success, workspace

NEXT_COMMANDS = (
    ("talk to the finetuned model", "llmctl chat --model quickstart-sft"),
    ("watch a run's curves", "llmctl monitor quickstart-base"),
    ("score it on HumanEval", "llmctl eval humaneval --model quickstart-sft"),
    ("export it for transformers", "llmctl export --model quickstart-sft --out exports/quickstart-sft"),
)


def quickstart(
    minutes: float = typer.Option(5.0, "--minutes", "-n", min=0.1, help="Minutes of pretraining."),
    fresh: bool = typer.Option(
        False, "--fresh", help="Train both runs again (the corpora and the tokenizer are still reused)."
    ),
) -> None:
    """The whole pipeline in about N + 3 minutes on 2 CPU cores: corpus to chat-ready model.

    Builds a code corpus from the standard library, trains a tokenizer, pretrains for N minutes,
    finetunes on docstring-to-code pairs, evaluates and samples. Run it again and it reuses what
    it built.

    Examples:

      llmctl quickstart

      llmctl quickstart --minutes 20 --workspace ~/llmctl
    """
    from llmctl.quickstart import QuickstartOptions, run_quickstart

    options = QuickstartOptions(minutes=minutes, fresh=fresh)
    steps = run_quickstart(workspace(), options, err, on_step=_announce)
    _summary(steps)
    success(f"quickstart done in {sum(step.seconds for step in steps) / 60:.1f} minutes")
    out.print("\n[bold]next[/bold]")
    for purpose, command in NEXT_COMMANDS:
        out.print(f"  {command:<70} [dim]# {purpose}[/dim]")


def _announce(step) -> None:
    verb = {"build": "building", "reuse": "reusing", "resume": "resuming", "run": "running"}[step.action]
    err.rule(f"[bold]{step.name}[/bold] · {verb} {step.target}", align="left")


def _summary(steps) -> None:
    from rich.table import Table

    table = Table(title="quickstart", title_justify="left")
    table.add_column("step")
    table.add_column("made")
    table.add_column("result")
    table.add_column("time", justify="right")
    for step in steps:
        made = f"{step.target} [dim]({step.action})[/dim]"
        table.add_row(step.name, made, _describe(step), f"{step.seconds:.0f} s")
    out.print(table)


def _describe(step) -> str:
    from rich.markup import escape

    figures = step.figures
    if step.name == "sample":
        return f"{escape(figures['request'])}\n[cyan]{escape(figures['completion'])}[/cyan]"
    shown = (f"{key.replace('_', ' ')} {value:,}" for key, value in figures.items() if value is not None)
    return " · ".join(shown)
