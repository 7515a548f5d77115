"""`llmctl registry rebuild`: registry.db made again from the workspace's files.

Everything the registry records is also on disk: a corpus's and a tokenizer's meta.json, a run's
config.yaml and events.jsonl, each checkpoint's meta.json, a HumanEval eval's summary.json. A
registry that is damaged (or deleted) is moved aside, not removed, and a new one is filled from
those files. What only the registry held is lost, and the result says so: perplexity, probes and
classification results (their rows carry no file of their own).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from llmctl.events import read_events
from llmctl.storage import writer_lock
from llmctl.workspace import EVENTS_FILE, RUN_CONFIG, Registry, Workspace, checkpoint_step, list_checkpoints

REGISTRY_FILE = "registry.db"
CHECKPOINT_FIGURES = ("tokens", "val_loss", "val_ppl", "val_bpb", "val_accuracy")


@dataclass
class Rebuilt:
    corpora: int = 0
    tokenizers: int = 0
    runs: int = 0
    checkpoints: int = 0
    evals: int = 0
    moved_aside: Path | None = None
    skipped: list[str] = field(default_factory=list)  # what could not be read, and why

    def as_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "moved_aside": str(self.moved_aside) if self.moved_aside else None}


def rebuild_registry(workspace: Workspace) -> Rebuilt:
    root = workspace.root
    result = Rebuilt()
    with writer_lock(root, "registry", "rebuild"):
        current = root / REGISTRY_FILE
        if current.exists():
            result.moved_aside = root / f"{REGISTRY_FILE}.broken-{time.strftime('%Y%m%d-%H%M%S')}"
            current.rename(result.moved_aside)
            for suffix in ("-wal", "-shm"):  # they belong to the file moved aside
                stale = root / f"{REGISTRY_FILE}{suffix}"
                if stale.exists():
                    stale.rename(result.moved_aside.with_name(result.moved_aside.name + suffix))
        registry = Registry(current)
        _corpora(workspace, registry, result)
        _tokenizers(workspace, registry, result)
        _runs(workspace, registry, result)
        _evals(workspace, registry, result)
        registry.close()
    return result


def _read(path: Path, result: Rebuilt) -> dict[str, Any] | None:
    try:
        text = path.read_text(encoding="utf-8")
        tree = yaml.safe_load(text) if path.suffix == ".yaml" else json.loads(text)
    except (OSError, ValueError, yaml.YAMLError) as exc:
        result.skipped.append(f"{path}: {type(exc).__name__}")
        return None
    if not isinstance(tree, dict):
        result.skipped.append(f"{path}: not a mapping")
        return None
    return tree


def _corpora(workspace: Workspace, registry: Registry, result: Rebuilt) -> None:
    for directory in _children(workspace.root / "corpora"):
        meta = _read(directory / "meta.json", result)
        if meta is not None:
            registry.add_corpus(directory.name, meta.get("kind", "text"), directory, meta)
            _keep_created(registry, "corpora", directory.name, meta.get("created"))
            result.corpora += 1


def _tokenizers(workspace: Workspace, registry: Registry, result: Rebuilt) -> None:
    for directory in _children(workspace.root / "tokenizers"):
        meta = _read(directory / "meta.json", result)
        if meta is None:
            continue
        stored = {key: value for key, value in meta.items() if key != "chat_template"}
        registry.add_tokenizer(
            directory.name, directory, meta.get("corpus"), meta["sha256"], meta["vocab_size"], stored
        )
        _keep_created(registry, "tokenizers", directory.name, meta.get("created"))
        result.tokenizers += 1


def _runs(workspace: Workspace, registry: Registry, result: Rebuilt) -> None:
    bases: dict[str, str] = {}  # run -> the checkpoint path it was trained from (linked at the end)
    for run_dir in _children(workspace.runs_dir):
        config = _read(run_dir / RUN_CONFIG, result) if (run_dir / RUN_CONFIG).is_file() else None
        events = read_events(run_dir / EVENTS_FILE) if (run_dir / EVENTS_FILE).is_file() else []
        checkpoints = [(path, _read(path / "meta.json", result)) for path in list_checkpoints(run_dir)]
        checkpoints = [(path, meta) for path, meta in checkpoints if meta is not None]
        if config is None and not events and not checkpoints:
            continue
        start = next((event for event in events if event["event"] == "start"), {})
        end = next((event for event in reversed(events) if event["event"] == "end"), {})
        first_meta = checkpoints[0][1] if checkpoints else {}
        stage = start.get("stage") or first_meta.get("stage") or "pretrain"
        data = (config or {}).get("data") or {}
        meta = {
            "preset": (config or {}).get("preset"),
            "config": config,
            **{
                key: start[key]
                for key in ("params", "max_steps", "world_size", "device", "task")
                if key in start
            },
            **{
                key: first_meta[key]
                for key in ("base_checkpoint", "merged_from", "labels", "tokenizer_sha256")
                if key in first_meta
            },
            "end_reason": end.get("reason"),
            "step": end.get("step"),
            "tokens": end.get("tokens"),
            "best_val_loss": end.get("best_val_loss"),
            "rebuilt": True,
        }
        if checkpoints:
            meta["latest_checkpoint"] = checkpoint_step(checkpoints[-1][0])
            evaluated = [(m["val_loss"], checkpoint_step(p)) for p, m in checkpoints if "val_loss" in m]
            meta["best_checkpoint"] = min(evaluated)[1] if evaluated else meta["latest_checkpoint"]
        corpus = data.get("corpus")
        registry.add_run(
            run_dir.name,
            stage,
            run_dir,
            corpus=corpus if corpus and registry.corpus(corpus) else None,
            tokenizer=data.get("tokenizer"),
            meta=meta,
        )
        _keep_created(registry, "runs", run_dir.name, start.get("ts"))
        result.runs += 1
        for path, checkpoint_meta in checkpoints:
            figures = {key: checkpoint_meta[key] for key in CHECKPOINT_FIGURES if key in checkpoint_meta}
            kind = checkpoint_meta.get("kind", "full")
            registry.add_checkpoint(run_dir.name, checkpoint_step(path), kind, path, figures)
            result.checkpoints += 1
        base = first_meta.get("merged_from") or first_meta.get("base_checkpoint")
        if base:
            bases[run_dir.name] = base
    with registry.transaction() as conn:
        for run, base in bases.items():
            row = registry.checkpoint_by_path(Path(base))
            if row is not None:
                conn.execute("UPDATE runs SET base_checkpoint = ? WHERE name = ?", (row["id"], run))


def _keep_created(registry: Registry, table: str, name: str, created: object) -> None:
    """The row's creation time as the files record it (the lists are ordered by it), not now."""
    if isinstance(created, int | float):
        with registry.transaction() as conn:
            conn.execute(f"UPDATE {table} SET created = ? WHERE name = ?", (created, name))


def _evals(workspace: Workspace, registry: Registry, result: Rebuilt) -> None:
    for directory in _children(workspace.root / "evals"):
        summary = (
            _read(directory / "summary.json", result) if (directory / "summary.json").is_file() else None
        )
        if summary is None:
            continue
        checkpoint = summary.get("checkpoint")
        row = registry.checkpoint_by_path(Path(checkpoint)) if checkpoint else None
        registry.add_eval(row["id"] if row else None, summary.get("kind", "humaneval"), summary)
        result.evals += 1


def _children(directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    return sorted(path for path in directory.iterdir() if path.is_dir() and not path.name.startswith("."))
