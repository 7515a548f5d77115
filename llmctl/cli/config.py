"""`llmctl config`: the resolved config and the list of keys."""

from __future__ import annotations

from pathlib import Path

import typer

from llmctl.cli.common import out, print_json

app = typer.Typer(help="Show the resolved config and every key it accepts.", no_args_is_help=True)


@app.command("show")
def show(
    preset: str = typer.Option(None, "--preset", "-p", help="Preset name (llmctl presets list)."),
    config_file: Path = typer.Option(None, "--config", "-c", help="A YAML file of overrides."),
    overrides: list[str] = typer.Option([], "--set", help="dotted.key=value, repeatable."),
    sources: bool = typer.Option(
        False, "--sources", help="Say where each value came from: default, preset, config or set."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document."),
) -> None:
    """Print the config after defaults < preset < --config < --set.

    Examples:

      llmctl config show --preset rtx4060-8g --set train.lr=1e-4

      llmctl config show --preset cpu-debug --config my.yaml --sources
    """
    from llmctl.config import resolve_config

    cfg = resolve_config(preset=preset, config_file=config_file, overrides=overrides)
    if sources:
        _show_sources(cfg, as_json)
    elif as_json:
        print_json(cfg.model_dump(mode="json"))
    else:
        from rich.syntax import Syntax

        out.print(Syntax(cfg.to_yaml(), "yaml", theme="ansi_dark", background_color="default"))


def _show_sources(cfg, as_json: bool) -> None:
    """Every key with its value and the layer that set it."""
    from llmctl.config import CONFIG_KEYS

    rows = {
        key: {"value": _lookup(cfg.model_dump(mode="json"), key), "source": cfg.sources.get(key, "default")}
        for key in CONFIG_KEYS
    }
    if as_json:
        print_json(rows)
        return
    width = max(map(len, CONFIG_KEYS))
    for key, row in rows.items():
        style = "dim" if row["source"] == "default" else ""
        out.print(f"{key:<{width}} = {row['value']!r}  [{row['source']}]", style=style, markup=False)


def _lookup(tree: dict, key: str):
    for part in key.split("."):
        tree = tree[part]
    return tree


@app.command("keys")
def keys(as_json: bool = typer.Option(False, "--json", help="Print one JSON document.")) -> None:
    """Every config key with its default, for --set and YAML files."""
    from llmctl.config import CONFIG_KEYS, RunConfig

    defaults = RunConfig().model_dump(mode="json")
    table = {key: _lookup(defaults, key) for key in CONFIG_KEYS}
    if as_json:
        print_json(table)
        return
    for key, value in table.items():
        out.print(f"{key} = {value!r}")
