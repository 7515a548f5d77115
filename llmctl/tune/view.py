"""`tune show` for people: a study's trials as a Rich table, its best trial and the parameters'
importances; the storage's studies as a list."""

from __future__ import annotations

from typing import Any

from rich import box
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from llmctl.monitor import units
from llmctl.tune.report import describe_params, describe_value

STATE_STYLES = {"complete": "green", "pruned": "yellow", "fail": "red", "running": "cyan", "waiting": "dim"}
BAR_WIDTH = 30


def _table(title: str, *columns: str, right: tuple[str, ...] = ()) -> Table:
    table = Table(title=title, title_justify="left", title_style="bold", box=box.SIMPLE_HEAD, pad_edge=False)
    for column in columns:
        table.add_column(column, justify="right" if column in right else "left")
    return table


def tally(doc: dict[str, Any]) -> str:
    c = doc["counts"]
    running = f", {c['running']} running" if c["running"] else ""
    return (
        f"{c['done']} trials: {c['complete']} complete, {c['pruned']} pruned, {c['failed']} failed{running}"
    )


def render_study(doc: dict[str, Any]) -> RenderableType:
    objective = doc.get("objective", "value")
    keys = list(dict.fromkeys(key for trial in doc["trials"] for key in trial["params"]))
    best_number = (doc["best"] or {}).get("number")
    head = Text.assemble(
        ("study ", "dim"),
        (doc["study"], "bold"),
        (f"  {doc.get('stage', '')} · {doc['direction']} {objective} · {tally(doc)}", "dim"),
    )
    table = _table(
        "", "#", "state", objective, *keys, "step", "time", "run", right=("#", objective, "step", "time")
    )
    for trial in doc["trials"]:
        if trial["state"] == "complete":
            value = units.figure(trial["value"]) + (" ★" if trial["number"] == best_number else "")
        elif trial["last_reported"] is not None:
            value = Text(f"({units.figure(trial['last_reported'])})", style="dim")
        else:
            value = units.DASH
        retry = f" (retry of {trial['retry_of']})" if trial["retry_of"] is not None else ""
        table.add_row(
            str(trial["number"]),
            Text(trial["state"] + retry, style=STATE_STYLES.get(trial["state"], "")),
            value,
            *(describe_value(trial["params"][key]) if key in trial["params"] else units.DASH for key in keys),
            f"{trial['last_step']:,}" if trial["last_step"] is not None else units.DASH,
            units.duration(trial["duration_s"]),
            trial["run"] or units.DASH,
        )
    parts: list[RenderableType] = [head, table]
    best = doc["best"]
    if best:
        parts.append(
            Text.assemble(
                ("best  ", "bold"),
                f"trial {best['number']} · {objective} {units.figure(best['value'])} · "
                f"{describe_params(best['params'])} · run {best['run']}",
                (f"  (llmctl tune best {doc['study']} --write best.yaml)", "dim"),
            )
        )
    else:
        parts.append(Text("best  none yet: no trial has completed", style="dim"))
    if doc["importances"]:
        parts.append(Text("importance", style="bold"))
        widest = max(len(key) for key in doc["importances"])
        for key, share in doc["importances"].items():
            bar = "█" * max(1, round(share * BAR_WIDTH))
            parts.append(Text(f"  {key:<{widest}}  {share:5.2f}  {bar}"))
    return Group(*parts)


def render_studies(summaries: list[dict[str, Any]]) -> RenderableType:
    if not summaries:
        return Text("studies: none yet (llmctl tune --study NAME --param KEY=KIND:RANGE ...)", style="dim")
    table = _table("studies", "study", "stage", "objective", "trials", "best", right=("trials", "best"))
    for summary in summaries:
        table.add_row(
            summary["study"],
            summary.get("stage") or units.DASH,
            f"{summary['direction']} {summary.get('objective') or 'value'}",
            str(summary["trials"]),
            units.figure(summary["best"]),
        )
    return table
