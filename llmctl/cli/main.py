"""The `llmctl` entry point: global options, command groups, and error handling.

Command modules import only typer and rich at the top; heavy libraries (torch, datasets,
tokenizers, peft) load inside the commands that need them, so `llmctl --help` stays fast.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import typer

try:  # typer >= 0.26 vendors click; its exceptions are not the click package's
    from typer._click.exceptions import ClickException
except ImportError:  # pragma: no cover - older typer uses click itself
    from click.exceptions import ClickException

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
        None,
        "--workspace",
        "-w",
        envvar="LLMCTL_HOME",
        help="Workspace directory \\[default: ./llmctl-workspace].",
        show_default=False,
    ),
    debug: bool = typer.Option(False, "--debug", help="Show Python tracebacks for errors."),
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    state.workspace_path = workspace
    state.debug = debug


def _register_commands() -> None:
    """Every command, in the order of a model's life, which is the order `--help` shows.

    Each module imports only typer and rich at its top; heavy libraries load inside commands.
    """
    from llmctl.cli import chat as chat_cmd
    from llmctl.cli import corpus as corpus_cmd
    from llmctl.cli import dpo as dpo_cmd
    from llmctl.cli import eval as eval_cmd
    from llmctl.cli import export as export_cmd
    from llmctl.cli import finetune as finetune_cmd
    from llmctl.cli import monitor as monitor_cmd
    from llmctl.cli import plot as plot_cmd
    from llmctl.cli import pretrain as pretrain_cmd
    from llmctl.cli import quickstart as quickstart_cmd
    from llmctl.cli import registry as registry_cmd
    from llmctl.cli import report as report_cmd
    from llmctl.cli import sample as sample_cmd
    from llmctl.cli import serve as serve_cmd
    from llmctl.cli import status as status_cmd
    from llmctl.cli import tokenizer as tokenizer_cmd
    from llmctl.cli import tune as tune_cmd

    app.command("quickstart", rich_help_panel="Prepare")(quickstart_cmd.quickstart)
    app.add_typer(presets_cmd.app, name="presets", rich_help_panel="Prepare")
    app.add_typer(config_cmd.app, name="config", rich_help_panel="Prepare")
    app.add_typer(corpus_cmd.app, name="corpus", rich_help_panel="Prepare")
    app.add_typer(tokenizer_cmd.app, name="tokenizer", rich_help_panel="Prepare")
    app.command("pretrain", no_args_is_help=True, rich_help_panel="Train")(pretrain_cmd.pretrain)
    app.command("finetune", no_args_is_help=True, rich_help_panel="Train")(finetune_cmd.finetune)
    app.command("qlora", no_args_is_help=True, rich_help_panel="Train")(finetune_cmd.qlora)
    app.command("dpo", no_args_is_help=True, rich_help_panel="Train")(dpo_cmd.dpo)
    app.command("merge", no_args_is_help=True, rich_help_panel="Train")(finetune_cmd.merge)
    app.add_typer(tune_cmd.app, name="tune", rich_help_panel="Train")
    app.add_typer(eval_cmd.app, name="eval", rich_help_panel="Use")
    app.command("sample", no_args_is_help=True, rich_help_panel="Use")(sample_cmd.sample)
    app.command("chat", no_args_is_help=True, rich_help_panel="Use")(chat_cmd.chat)
    app.command("export", no_args_is_help=True, rich_help_panel="Use")(export_cmd.export)
    app.command("serve", rich_help_panel="Use")(serve_cmd.serve)
    app.command("status", rich_help_panel="Watch")(status_cmd.status)
    app.command("monitor", rich_help_panel="Watch")(monitor_cmd.monitor)
    app.command("plot", no_args_is_help=True, rich_help_panel="Watch")(plot_cmd.plot)
    app.command("report", no_args_is_help=True, rich_help_panel="Watch")(report_cmd.report)
    app.add_typer(registry_cmd.app, name="registry", rich_help_panel="Watch")


_register_commands()


class _WarningLine(logging.Handler):
    """The library's warnings (the `llmctl` logger) as the CLI's own `warning:` lines."""

    def emit(self, record: logging.LogRecord) -> None:
        from rich.markup import escape

        err.print(f"[yellow]warning:[/yellow] {escape(record.getMessage())}", soft_wrap=True)


def _show_library_warnings() -> None:
    logger = logging.getLogger("llmctl")
    if not any(isinstance(handler, _WarningLine) for handler in logger.handlers):
        logger.addHandler(_WarningLine(logging.WARNING))
        logger.propagate = False


def main(argv: list[str] | None = None) -> int:
    """Run the CLI and return its exit code; errors become one line on stderr."""
    from rich.markup import escape

    from llmctl.errors import LlmctlError

    _show_library_warnings()

    command = typer.main.get_command(app)
    try:
        result = command.main(args=argv, prog_name="llmctl", standalone_mode=False)
        return result if isinstance(result, int) else 0
    except LlmctlError as exc:
        if state.debug:
            raise
        err.print(f"[red]error:[/red] {escape(exc.message)}", soft_wrap=True)
        return exc.exit_code
    except typer.Exit as exc:
        return exc.exit_code
    except typer.Abort:
        err.print("aborted")
        return 130
    except ClickException as exc:
        exc.show()
        return exc.exit_code
    except KeyboardInterrupt:
        err.print("interrupted")
        return 130
    except Exception as exc:  # a bug: keep the traceback behind --debug
        if state.debug:
            raise
        err.print(
            f"[red]error:[/red] internal error: {type(exc).__name__}: {escape(str(exc))} "
            "(rerun with --debug for the traceback)",
            soft_wrap=True,
        )
        return 1


def run() -> None:
    code = main()
    if "torch" in sys.modules:
        # After a command that used torch has finished and written everything, the interpreter's
        # teardown can still abort in torch's native threads ("terminate called without an active
        # exception", exit 134; pytorch#38228). Skip the teardown so the exit code is the command's.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
