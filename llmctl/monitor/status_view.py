"""`llmctl status` for people: the documents from status.py as Rich tables and a lineage tree."""

from __future__ import annotations

import time
from typing import Any

from rich import box
from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text
from rich.tree import Tree

from llmctl.monitor import units
from llmctl.monitor.render import ALERT_ICONS, STATE_STYLES

DIM = "dim"


def _table(title: str, *columns: str, right: tuple[str, ...] = ()) -> Table:
    table = Table(
        title=title,
        title_justify="left",
        title_style="bold",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        caption_justify="left",
        caption_style=DIM,
    )
    for column in columns:
        table.add_column(column, justify="right" if column in right else "left", no_wrap=column != "path")
    return table


def _ago(timestamp: float | None) -> str:
    return units.ago(time.time() - timestamp) if timestamp else units.DASH


def _checkpoint(entry: dict[str, Any] | None, with_val: bool = True) -> str:
    if not entry:
        return units.DASH
    text = f"{entry['step']:,}"
    if with_val and entry.get("val_loss") is not None:
        text += f" ({units.fixed(entry['val_loss'])})"
    return text


def _step(run: dict[str, Any]) -> str:
    if run["max_steps"]:
        return f"{run['step']:,} / {run['max_steps']:,}"
    return f"{run['step']:,}"


def _trial_of(run: dict[str, Any]) -> str:
    study = run.get("study")
    return f" · {study['name']} #{study['trial']}" if study else ""


def _state(run: dict[str, Any]) -> Text:
    return Text(run["state"], style=STATE_STYLES.get(run["state"], DIM))


def _devices(devices: list[dict[str, Any]]) -> list[str]:
    lines = []
    for device in devices:
        memory = units.gigabytes(device.get("memory_bytes"))
        if device["device"] == "cpu":
            available = device.get("memory_available_bytes")
            free = f", {units.gigabytes(available)} GB free" if available else ""
            lines.append(f"cpu  {device['name']} · {device['cores']} cores · {memory} GB RAM{free}")
        else:
            used = units.gigabytes(device.get("memory_used_bytes"))
            lines.append(f"{device['device']}  {device['name']} · {memory} GB ({used} GB in use)")
    return lines


def render_workspace(doc: dict[str, Any], width: int) -> RenderableType:
    head = Table.grid(padding=(0, 2))
    head.add_column(style="bold")
    head.add_column()
    head.add_row("workspace", doc["workspace"] + ("" if doc["exists"] else "  (not created yet)"))
    for i, line in enumerate(_devices(doc["devices"])):
        head.add_row("devices" if i == 0 else "", line)
    parts: list[RenderableType] = [head, Text()]

    corpora = _table("corpora", "name", "kind", "documents", "size", "created", right=("documents", "size"))
    for corpus in doc["corpora"]:
        documents = f"{corpus['documents']:,}" if corpus["documents"] is not None else units.DASH
        corpora.add_row(
            corpus["name"], corpus["kind"], documents, units.size(corpus["bytes"]), _ago(corpus["created"])
        )
    parts.append(
        corpora
        if doc["corpora"]
        else Text("corpora: none yet (llmctl corpus build code --source stdlib)", style=DIM)
    )

    tokenizers = _table("tokenizers", "name", "vocab", "corpus", "created", right=("vocab",))
    for tokenizer in doc["tokenizers"]:
        tokenizers.add_row(
            tokenizer["name"],
            f"{tokenizer['vocab_size']:,}",
            tokenizer["corpus"] or units.DASH,
            _ago(tokenizer["created"]),
        )
    parts.append(
        tokenizers
        if doc["tokenizers"]
        else Text("tokenizers: none yet (llmctl tokenizer train code-8k --corpus code)", style=DIM)
    )

    if doc["runs"]:
        parts.append(_runs_table(doc["runs"], width))
    else:
        parts.append(
            Text(
                "runs: none yet (llmctl pretrain --corpus code --tokenizer code-8k --preset cpu-debug)",
                style=DIM,
            )
        )
    return Group(*parts)


RUN_COLUMNS = (
    "run",
    "stage",
    "state",
    "step",
    "done",
    "elapsed",
    "val loss",
    "ppl",
    "bpb",
    "last event",
    "best ckpt",
    "latest ckpt",
)
NUMERIC_COLUMNS = RUN_COLUMNS[RUN_COLUMNS.index("step") :]  # right-aligned: every column from step on
# Columns a narrow terminal gives up first: truncating every column a little helps no one.
DROPPED_FIRST = ("latest ckpt", "bpb", "ppl", "done", "elapsed", "best ckpt", "stage")


def _runs_table(runs: list[dict[str, Any]], width: int) -> Table:
    cells = []
    for run in runs:
        best = run["best_eval"] or {}
        cells.append(
            {
                "run": run["name"],
                "stage": (run["stage"] or units.DASH) + _trial_of(run),
                "state": _state(run),
                "step": _step(run),
                "done": units.DASH if run["progress"] is None else f"{100 * run['progress']:.0f}%",
                "elapsed": units.duration(run["elapsed_s"]),
                "val loss": units.fixed(best.get("val_loss")),
                "ppl": units.figure(best.get("val_ppl")),
                "bpb": units.fixed(best.get("val_bpb")),
                "last event": units.ago(run["last_event_age_s"]),
                "best ckpt": _checkpoint(run["best_checkpoint"]),
                "latest ckpt": _checkpoint(run["latest_checkpoint"], with_val=False),
            }
        )
    columns = list(RUN_COLUMNS)
    measure = Console(width=10_000).measure
    for drop in (None, *DROPPED_FIRST):
        if drop is not None:
            columns.remove(drop)
        table = _table("runs", *columns, right=NUMERIC_COLUMNS)
        for row in cells:
            table.add_row(*(row[column] for column in columns))
        if measure(table).maximum <= width:
            break
    table.caption = "val loss, ppl, bpb: the best evaluation so far"
    return table


def _config_summary(config: dict[str, Any] | None) -> Table | Text:
    if not config:
        return Text("config: no config.yaml in the run directory", style=DIM)
    model, train, data = (config.get(key) or {} for key in ("model", "train", "data"))
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    grid.add_row("preset", str(config.get("preset") or units.DASH))
    grid.add_row(
        "model",
        f"{model.get('n_layer')} layers · {model.get('n_head')} heads"
        f"{' (' + str(model['n_kv_head']) + ' kv)' if model.get('n_kv_head') else ''}"
        f" · d_model {model.get('d_model')} · context {model.get('context_length')}"
        f" · vocab {model.get('vocab_size')}",
    )
    batch = (train.get("micro_batch_size") or 0) * (train.get("grad_accum_steps") or 1)
    limits = [
        f"{train['max_steps']:,} steps" if train.get("max_steps") else None,
        f"{units.duration(train['max_time'])} max" if train.get("max_time") else None,
        f"{units.count(train['max_tokens'])} tokens max" if train.get("max_tokens") else None,
    ]
    grid.add_row(
        "train",
        f"lr {units.rate(train.get('lr'))} → {units.rate(train.get('min_lr'))}"
        f" (warmup {train.get('warmup_steps')}) · batch {batch}"
        f" ({train.get('micro_batch_size')} × {train.get('grad_accum_steps')})"
        f" · {' · '.join(limit for limit in limits if limit) or 'no limit'}"
        f" · precision {train.get('precision')}",
    )
    grid.add_row(
        "data", f"corpus {data.get('corpus') or units.DASH} · tokenizer {data.get('tokenizer') or units.DASH}"
    )
    return grid


def _lineage_tree(node: dict[str, Any], tree: Tree | None = None) -> Tree:
    label = Text.assemble(("run ", DIM), (node["run"], "bold"), (f"  {node['stage'] or ''}", DIM))
    tree = tree.add(label) if tree is not None else Tree(label)
    base = node.get("base_checkpoint")
    if base:
        if "step" in base:
            val = f"  val {units.fixed(base['val_loss'])}" if base.get("val_loss") is not None else ""
            branch = tree.add(
                Text.assemble(
                    ("base checkpoint ", DIM), (f"{base['run']}:step-{base['step']}", "bold"), (val, DIM)
                )
            )
            if base.get("lineage"):
                _lineage_tree(base["lineage"], branch)
        else:
            tree.add(Text.assemble(("base checkpoint ", DIM), (str(base["path"]), "bold")))
    corpus = node.get("corpus")
    if corpus:
        detail = f"  {corpus.get('kind') or ''}" + (
            f" · {corpus['documents']:,} documents" if corpus.get("documents") else ""
        )
        tree.add(Text.assemble(("corpus ", DIM), (corpus["name"], "bold"), (detail, DIM)))
    tokenizer = node.get("tokenizer")
    if tokenizer:
        detail = f"  vocab {tokenizer['vocab_size']:,}" if tokenizer.get("vocab_size") else ""
        detail += f" · trained on {tokenizer['corpus']}" if tokenizer.get("corpus") else ""
        tree.add(Text.assemble(("tokenizer ", DIM), (tokenizer["name"], "bold"), (detail, DIM)))
    adapter = node.get("adapter")
    if adapter:
        kind = "QLoRA (nf4)" if adapter.get("quantize") == "nf4" else "LoRA"
        targets = ", ".join(adapter.get("targets") or [])
        tree.add(
            Text.assemble(
                ("adapter ", DIM),
                (f"{kind} r={adapter['r']} α={adapter['alpha']}", "bold"),
                (f"  on {targets}", DIM),
            )
        )
    return tree


def _preference_row(train: dict[str, Any], last_eval: dict[str, Any]) -> str | None:
    """A dpo run's latest rewards and preference accuracy, in training and at the last evaluation."""
    if train.get("preference_accuracy") is None and last_eval.get("val_preference_accuracy") is None:
        return None
    parts = []
    if train.get("preference_accuracy") is not None:
        rewards = (
            f"chosen {units.figure(train.get('rewards_chosen'), 3)}, "
            f"rejected {units.figure(train.get('rewards_rejected'), 3)}"
        )
        parts.append(
            f"train acc {units.percent(train['preference_accuracy'])} · margin "
            f"{units.figure(train.get('reward_margin'), 3)} ({rewards})"
        )
    if last_eval.get("val_preference_accuracy") is not None:
        parts.append(
            f"val acc {units.percent(last_eval['val_preference_accuracy'])} · margin "
            f"{units.figure(last_eval.get('val_reward_margin'), 3)} at step {last_eval.get('step', 0):,}"
        )
    return " · ".join(parts)


def render_run(doc: dict[str, Any]) -> RenderableType:
    run = doc["run"]
    best = run["best_eval"] or {}
    head = Table.grid(padding=(0, 2))
    head.add_column(style="bold")
    head.add_column()
    head.add_row(
        "run",
        Text.assemble(
            (run["name"], "bold"), "  ", _state(run), (f"  {run['stage'] or ''} · {run['path']}", DIM)
        ),
    )
    progress = f"step {_step(run)}"
    if run["progress"] is not None:
        progress += f" ({100 * run['progress']:.0f}%)"
    progress += f" · elapsed {units.duration(run['elapsed_s'])}"
    if run["eta_s"] is not None:
        progress += f" · ETA {units.duration(run['eta_s'])}"
    head.add_row("progress", progress + f" · last event {units.ago(run['last_event_age_s'])}")
    if best:
        head.add_row(
            "best val",
            f"loss {units.fixed(best.get('val_loss'))} · ppl {units.figure(best.get('val_ppl'))}"
            f" · bpb {units.fixed(best.get('val_bpb'))} at step {best.get('step', 0):,}",
        )
    preference = _preference_row(doc["train"] or {}, doc["last_eval"] or {})
    if preference:
        head.add_row("preference", preference)
    if doc["end"]:
        head.add_row("ended", f"{doc['end']['reason']} at step {doc['end']['step']:,}")
    if run.get("study"):
        study = run["study"]
        head.add_row("study", f"trial {study['trial']} of {study['name']} (llmctl tune show {study['name']})")
    parts: list[RenderableType] = [
        head,
        Text(),
        _config_summary(doc["config"]),
        Text(),
        Text("lineage", style="bold"),
        _lineage_tree(doc["lineage"]),
        Text(),
    ]

    checkpoints = _table(
        "checkpoints",
        "step",
        "kind",
        "val loss",
        "ppl",
        "bpb",
        "created",
        "path",
        right=("step", "val loss", "ppl", "bpb"),
    )
    best_step = (run["best_checkpoint"] or {}).get("step")
    for entry in doc["checkpoints"]:
        marker = " ★" if entry["step"] == best_step else ""
        checkpoints.add_row(
            f"{entry['step']:,}{marker}",
            entry["kind"],
            units.fixed(entry.get("val_loss")),
            units.figure(entry.get("val_ppl")),
            units.fixed(entry.get("val_bpb")),
            _ago(entry["created"]),
            entry["path"],
        )
    parts.append(checkpoints if doc["checkpoints"] else Text("checkpoints: none yet", style=DIM))

    if doc["evals"]:
        evals = _table("evaluations", "checkpoint", "kind", "results", "created")
        for entry in doc["evals"]:
            results = "  ".join(
                f"{key} {units.figure(value)}"
                for key, value in entry.items()
                if isinstance(value, (int, float))
                and not isinstance(value, bool)
                and key not in ("checkpoint_step", "created")
            )
            evals.add_row(
                f"step-{entry['checkpoint_step']:08d}", entry["kind"], results, _ago(entry["created"])
            )
        parts.append(evals)

    alerts = Text("alerts\n", style="bold")
    for alert in doc["alerts"] or []:
        icon, style = ALERT_ICONS.get(alert["level"], ("•", "yellow"))
        alerts.append(f"{icon} {alert['message']}\n", style=style)
    if not doc["alerts"]:
        alerts.append("✓ none\n", style="green")
    parts.append(alerts)
    return Group(*parts)
