"""The `llmctl` entry point: global options, command groups, and error handling.

Command modules import only typer and rich at the top; heavy libraries (torch, datasets,
tokenizers, peft) load inside the commands that need them, so `llmctl --help` stays fast.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click
import typer

from llmctl import __version__
from llmctl.cli import config as config_cmd
from llmctl.cli import presets as presets_cmd
from llmctl.cli.common import err, state

app = typer.Typer(
    name="llmctl",
    help=(
        "Train, adapt, measure and talk to small GPT-style language models on your own hardware.\n\n"
        "Examples:\n\n"
        "  llmctl presets list\n\n"
        "  llmctl corpus build code --source stdlib\n\n"
        "  llmctl tokenizer train code-8k --corpus code --vocab-size 8192\n\n"
        "  llmctl config show --preset rtx4060-8g --set train.lr=1e-4"
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"llmctl {__version__}")
        raise typer.Exit()


@app.callback()
def _global(
    workspace: Path = typer.Option(
        None, "--workspace", "-w", envvar="LLMCTL_HOME",
        help="Workspace directory \\[default: ./llmctl-workspace].", show_default=False,
    ),
    debug: bool = typer.Option(False, "--debug", help="Show Python tracebacks for errors."),
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    state.workspace_path = workspace
    state.debug = debug


app.add_typer(presets_cmd.app, name="presets")
app.add_typer(config_cmd.app, name="config")


def _register_optional_groups() -> None:
    """Command groups added by later modules register here, in the order `--help` shows them."""
    from llmctl.cli import corpus as corpus_cmd
    from llmctl.cli import eval as eval_cmd
    from llmctl.cli import monitor as monitor_cmd
    from llmctl.cli import plot as plot_cmd
    from llmctl.cli import status as status_cmd
    from llmctl.cli import tokenizer as tokenizer_cmd
    from llmctl.cli import pretrain as pretrain_cmd
    from llmctl.cli import finetune as finetune_cmd
    from llmctl.cli import sample as sample_cmd
    from llmctl.cli import chat as chat_cmd
    from llmctl.cli import export as export_cmd
    from llmctl.cli import quickstart as quickstart_cmd
    from llmctl.cli import serve as serve_cmd

    app.command("quickstart")(quickstart_cmd.quickstart)
    app.add_typer(corpus_cmd.app, name="corpus")
    app.add_typer(tokenizer_cmd.app, name="tokenizer")
    app.command("status")(status_cmd.status)
    app.command("monitor")(monitor_cmd.monitor)
    app.command("plot", no_args_is_help=True)(plot_cmd.plot)
    app.command("pretrain", no_args_is_help=True)(pretrain_cmd.pretrain)
    app.command("finetune", no_args_is_help=True)(finetune_cmd.finetune)
    app.command("qlora", no_args_is_help=True)(finetune_cmd.qlora)
    app.command("merge", no_args_is_help=True)(finetune_cmd.merge)
    app.add_typer(eval_cmd.app, name="eval")
    app.command("sample", no_args_is_help=True)(sample_cmd.sample)
    app.command("chat", no_args_is_help=True)(chat_cmd.chat)
    app.command("export", no_args_is_help=True)(export_cmd.export)
    app.command("serve")(serve_cmd.serve)


_register_optional_groups()


def main(argv: list[str] | None = None) -> int:
    """Run the CLI and return its exit code; errors become one line on stderr."""
    from rich.markup import escape

    from llmctl.errors import LlmctlError

    command = typer.main.get_command(app)
    try:
        result = command.main(args=argv, prog_name="llmctl", standalone_mode=False)
        return result if isinstance(result, int) else 0
    except LlmctlError as exc:
        if state.debug:
            raise
        err.print(f"[red]error:[/red] {escape(exc.message)}", soft_wrap=True)
        return exc.exit_code
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.exceptions.Abort:
        err.print("aborted")
        return 130
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except KeyboardInterrupt:
        err.print("interrupted")
        return 130
    except Exception as exc:  # a bug: keep the traceback behind --debug
        if state.debug:
            raise
        err.print(f"[red]error:[/red] internal error: {type(exc).__name__}: {escape(str(exc))} "
                  "(rerun with --debug for the traceback)", soft_wrap=True)
        return 1


def run() -> None:
    sys.exit(main())
