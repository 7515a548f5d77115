"""`llmctl tune`: hyperparameter search with Optuna over any stage, and `tune show` / `tune best`.

`tune show` and `tune best` read the study's storage without importing torch.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import typer

from llmctl.cli.common import (
    MODEL_REF_HELP,
    RUN_OPTIONS,
    count,
    err,
    out,
    print_json,
    show_plan,
    state,
    success,
    warn,
    with_options,
    workspace,
)
from llmctl.cli.common import option as opt
from llmctl.tune.storage import ENV as STORAGE_ENV

app = typer.Typer(
    help="Search hyperparameters with Optuna: each trial a real run, pruned on its evaluations.",
    no_args_is_help=True,
)

STORAGE = typer.Option(
    None,
    "--storage",
    envvar=STORAGE_ENV,
    help="Optuna storage URL shared by several machines (postgresql://..., mysql+pymysql://...) "
    "\\[default: the workspace's studies.db].",
)
STUDY_OPTIONS = [
    opt("study", str, typer.Option(None, "--study", "-s", help="Study name: the same name joins the study.")),
    opt("stage", str, typer.Option("pretrain", "--stage", help="pretrain, finetune, qlora or dpo.")),
    opt("storage", str, STORAGE),
]
DATA_OPTIONS = [
    opt("corpus", str, typer.Option(None, "--corpus", "-c", help="pretrain: the corpus.")),
    opt("tokenizer", str, typer.Option(None, "--tokenizer", "-t", help="pretrain: the tokenizer.")),
    opt(
        "model",
        str,
        typer.Option(None, "--model", "-m", help=f"finetune, qlora, dpo: the base, {MODEL_REF_HELP}."),
    ),
    opt(
        "data",
        str,
        typer.Option(
            None, "--data", "-d", help="finetune, qlora: the instruction data; dpo: the preference pairs."
        ),
    ),
    opt("task", str, typer.Option(None, "--task", help="finetune, qlora: sft or classify.")),
    opt("preset", str, typer.Option(None, "--preset", "-p", help="Preset every trial starts from.")),
]
SEARCH_OPTIONS = [
    opt(
        "params",
        list[str],
        typer.Option(
            [],
            "--param",
            help="KEY=KIND:RANGE, repeatable: train.lr=log:1e-4..3e-3, model.n_layer=choice:2,4.",
        ),
    ),
    opt("objective", str, typer.Option("val_loss", "--objective", help="The evaluation figure to optimise.")),
    opt(
        "direction",
        str,
        typer.Option(None, "--direction", help="minimize or maximize \\[default: maximize for accuracy]."),
    ),
    opt("trials", int, typer.Option(20, "--trials", "-n", min=1, help="Trials the study runs to, in all.")),
    opt("trial_time", str, typer.Option(None, "--trial-time", help="Each trial's budget in time: 90s, 2m.")),
    opt("trial_steps", int, typer.Option(None, "--trial-steps", min=1, help="Each trial's budget in steps.")),
    opt("trial_tokens", str, typer.Option(None, "--trial-tokens", help="Each trial's budget in tokens: 2M.")),
    opt("sampler", str, typer.Option("tpe", "--sampler", help="tpe, random or grid.")),
    opt("seed", int, typer.Option(None, "--seed", help="The sampler's seed.")),
    opt("pruner", str, typer.Option("median", "--pruner", help="median, hyperband or none.")),
    opt(
        "startup_trials",
        int,
        typer.Option(5, "--startup-trials", min=0, help="Trials sampled at random and never pruned first."),
    ),
    opt(
        "baseline",
        bool,
        typer.Option(False, "--baseline", help="First trial: the config's own values of the swept keys."),
    ),
    opt("jobs", int, typer.Option(1, "--jobs", "-j", min=1, help="Trials at once, as processes here.")),
    opt(
        "as_json",
        bool,
        typer.Option(False, "--json", help="Print the result (or the --dry-run plan) as JSON."),
    ),
]
SHARED = ("config", "overrides", "precision", "force", "dry_run")
TRAINING_OPTIONS = [option for option in RUN_OPTIONS if option.name in SHARED]
CONTEXT = [inspect.Parameter("ctx", inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context)]
TUNE_GROUPS = (STUDY_OPTIONS, DATA_OPTIONS, TRAINING_OPTIONS, SEARCH_OPTIONS)


@app.callback(invoke_without_command=True)
@with_options(CONTEXT, *TUNE_GROUPS)
def tune(ctx: typer.Context, **flags) -> int:
    """Search hyperparameters: every trial is a real run of the stage, registered as a trial of its
    study, pruned by Optuna on the run's own evaluations. Running the same command again (or in a
    second terminal, or on a second machine with --storage) continues and shares the study.

    Examples:

      llmctl tune --study lr-sweep --preset cpu-debug --corpus code --tokenizer code-8k
      --param train.lr=log:1e-4..3e-3 --param model.n_layer=choice:2,4 --trials 20 --trial-time 2m

      llmctl tune show lr-sweep --plot sweep.png

      llmctl tune best lr-sweep --write best.yaml
    """
    if ctx.invoked_subcommand is not None:
        return 0
    from llmctl.errors import UsageError
    from llmctl.tune import sweep as sweeps

    if not flags["study"]:
        raise UsageError("tune needs --study NAME (the same name continues or joins the study)")
    request = sweeps.SweepRequest(
        study=flags["study"],
        stage=flags["stage"],
        inputs={key: flags[key] for key in ("corpus", "tokenizer", "model", "data", "task")},
        preset=flags["preset"],
        config_file=flags["config"],
        overrides=list(flags["overrides"]),
        params=list(flags["params"]),
        objective=flags["objective"],
        direction=flags["direction"],
        trials=flags["trials"],
        trial_time=flags["trial_time"],
        trial_steps=flags["trial_steps"],
        trial_tokens=count(flags["trial_tokens"]),
        precision=flags["precision"],
        force=flags["force"],
        sampler=flags["sampler"],
        seed=flags["seed"],
        pruner=flags["pruner"],
        startup_trials=flags["startup_trials"],
        baseline=flags["baseline"],
        storage=flags["storage"],
    )
    ws = workspace()
    with sweeps.prepared(ws, request, warn) as sweep:
        if flags["dry_run"]:
            return _show_sweep_plan(sweep, flags["as_json"])
        if flags["jobs"] > 1:
            from llmctl.tune.jobs import run_jobs
            from llmctl.tune.report import study_document

            _, study = sweeps.open_sweep_study(ws, sweep)
            code = run_jobs(child_arguments(flags, ws.root, state.debug), flags["jobs"])
            return (
                _report(sweeps.SweepResult(request.study, [], study_document(study)), flags["as_json"])
                or code
            )
        result = sweeps.run_sweep(ws, sweep, lambda line: err.print(line, markup=False), err, state.debug)
    return _report(result, flags["as_json"])


@app.command("show")
def show(
    study: str = typer.Argument(None, help="A study; without one, the storage's studies."),
    storage: str = STORAGE,
    plot: Path = typer.Option(None, "--plot", help="Also draw the study to this PNG."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document."),
) -> int:
    """A study's trials, its best trial and the parameters' importances (or every study).

    Examples: llmctl tune show · llmctl tune show lr-sweep · llmctl tune show lr-sweep --plot sweep.png
    """
    from llmctl.tune import report
    from llmctl.tune.storage import load_study, open_existing

    store = open_existing(workspace(), storage)
    if study is None:
        summaries = report.study_summaries(store)
        if as_json:
            print_json(summaries)
            return 0
        from llmctl.tune.view import render_studies

        out.print(render_studies(summaries))
        return 0
    loaded = load_study(store, study)
    document = report.study_document(loaded)
    if plot is not None:
        from llmctl.tune.plot import plot_study

        plot_study(document, loaded, plot)
        success(f"wrote {plot}")
    if as_json:
        print_json(document)
        return 0
    from llmctl.tune.view import render_study

    out.print(render_study(document))
    return 0


@app.command("best")
def best(
    study: str = typer.Argument(..., help="The study."),
    write: Path = typer.Option(None, "--write", "-o", help="Write the best values as a config YAML."),
    storage: str = STORAGE,
    as_json: bool = typer.Option(False, "--json", help="Print the best trial as JSON."),
) -> int:
    """The best trial's values, as a config file any command takes with --config.

    Examples: llmctl tune best lr-sweep · llmctl tune best lr-sweep --write best.yaml
    """
    from llmctl.tune import report
    from llmctl.tune.storage import load_study, open_existing

    loaded = load_study(open_existing(workspace(), storage), study)
    text = report.best_config(loaded)
    if write is not None:
        report.write_file(write, text)
        success(f"wrote {write} (llmctl pretrain --config {write} ...)")
    if as_json:
        print_json(report.best(loaded))
    elif write is None:
        out.print(text, markup=False, highlight=False, end="")
    return 0


def _show_sweep_plan(sweep, as_json: bool) -> int:
    if as_json:
        print_json(
            {
                "study": sweep.request.study,
                "question": {**sweep.question.__dict__, "space": list(sweep.question.space)},
                "storage": sweep.storage_url,
                "plan": sweep.base.summary(),
            }
        )
        return 0
    err.print(f"[bold]{sweep.request.study}[/bold] searches {'  '.join(sweep.space.specs)}", soft_wrap=True)
    show_plan(sweep.base, False)
    return 0


def _report(result, as_json: bool) -> int:
    from llmctl.tune.report import describe_params
    from llmctl.tune.view import tally

    doc = result.document
    if as_json:
        print_json({"study": result.study, "ran": result.ran, "counts": doc["counts"], "best": doc["best"]})
    best = doc["best"]
    found = ""
    if best:
        found = f" · best trial {best['number']}: {doc['objective']} {best['value']:.4g}"
        found += f" ({describe_params(best['params'])})"
    if result.interrupted:
        warn(f"study '{result.study}' stopped ({tally(doc)}); continue it with the same command")
        return 128 + result.interrupted
    success(f"study '{result.study}': {tally(doc)}{found}")
    return 0


def child_arguments(flags: dict, workspace_root: Path, debug: bool) -> list[str]:
    """This command's arguments for each --jobs process: the same flags, one job each."""
    args = ["--workspace", str(workspace_root), *(["--debug"] if debug else []), "tune"]
    for group in TUNE_GROUPS:
        for param in group:
            name, value, flag = param.name, flags[param.name], param.default.param_decls[0]
            if name in ("jobs", "as_json", "dry_run") or value is None or value is False:
                continue
            if value is True:
                args.append(flag)
            elif isinstance(value, list):
                args += [part for item in value for part in (flag, str(item))]
            else:
                args += [flag, str(value)]
    return [*args, "--jobs", "1"]
