"""The CLI shell: help, version, JSON output, and one-line errors with exit codes."""

from __future__ import annotations

import subprocess
import sys

from llmctl import __version__


def test_version(cli):
    result = cli("--version")
    assert result.exit_code == 0 and __version__ in result.stdout


def test_help_lists_commands_with_examples(cli):
    result = cli("--help")
    assert result.exit_code == 0
    for word in ("presets", "config", "corpus", "tokenizer", "llmctl corpus build code --source stdlib"):
        assert word in result.stdout


def test_presets_list_json_is_one_document(cli):
    result = cli("presets", "list", "--json")
    rows = result.json()
    by_name = {row["name"]: row for row in rows}
    assert 26.5e6 < by_name["mini-27m"]["params"] < 28.5e6
    assert by_name["cpu-debug"]["context"] == 128
    assert all(row["est_memory_bytes"] > 0 for row in rows)
    assert result.stderr == ""


def test_config_show_json_applies_set(cli):
    result = cli("config", "show", "--preset", "rtx4060-8g", "--set", "train.lr=1e-4", "--json")
    document = result.json()
    assert document["train"]["lr"] == 1e-4 and document["model"]["d_model"] == 512


def test_errors_are_one_line_with_exit_code_2(cli):
    result = cli("config", "show", "--set", "train.lrr=1e-4")
    assert result.exit_code == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "did you mean 'train.lr'" in lines[0]


def test_no_traceback_without_debug_and_one_with_it(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    command = [sys.executable, "-m", "llmctl", "config", "show", "--config", str(bad)]
    plain = subprocess.run(command, capture_output=True, text=True)
    assert plain.returncode == 2
    assert "Traceback" not in plain.stderr and "not valid YAML" in plain.stderr

    debug = subprocess.run(command[:3] + ["--debug"] + command[3:], capture_output=True, text=True)
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_error_messages_print_brackets_literally(cli):
    # a preset name with brackets would be eaten by Rich markup if errors were not escaped
    result = cli("config", "show", "--preset", "[bold]x")
    assert result.exit_code == 2 and "'[bold]x'" in result.stderr


def test_a_missing_required_option_is_a_usage_error_not_an_internal_one(cli):
    result = cli("eval", "classify")
    assert result.exit_code == 2
    assert "internal error" not in result.stderr and "--model" in result.stderr


def test_an_unknown_command_is_a_usage_error(cli):
    result = cli("trian")
    assert result.exit_code == 2 and "No such command" in result.stderr


def test_every_model_flag_names_every_accepted_reference_form():
    import click
    import typer

    from llmctl.cli.common import MODEL_REF_HELP
    from llmctl.cli.main import app

    def commands(group: click.Command, prefix: str = ""):
        for name, command in getattr(group, "commands", {}).items():
            yield f"{prefix}{name}", command
            yield from commands(command, f"{prefix}{name} ")

    helps = {
        name: option.help
        for name, command in commands(typer.main.get_command(app))
        for option in command.params
        if "--model" in getattr(option, "opts", ())
    }
    expected = {
        "sample",
        "chat",
        "finetune",
        "qlora",
        "export",
        "serve",
        "eval perplexity",
        "eval humaneval",
        "eval probes",
        "eval classify",
    }
    assert expected <= set(helps)
    forms = ("RUN (its best", "RUN:best", "RUN:latest", "RUN:step-N", "checkpoint directory", "Hugging Face")
    assert all(form in MODEL_REF_HELP for form in forms)
    assert {name: MODEL_REF_HELP in text for name, text in helps.items()} == dict.fromkeys(helps, True)
