"""What `llmctl status` reports, as JSON-ready documents: the workspace at a glance, or one run.

Devices are found without torch: `nvidia-smi` when it is installed, /proc for the CPU.
Runs are judged from their event logs (see state.py) and the registry.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from llmctl.events import jsonable
from llmctl.monitor.runs import LOG_NAME, known_runs, read_run_config
from llmctl.monitor.watch import RunWatch
from llmctl.workspace import Registry, Workspace

LINEAGE_DEPTH = 8  # base checkpoints chain finetune on finetune; a cycle would be a registry bug


# ---------------------------------------------------------------- devices


def devices() -> list[dict[str, Any]]:
    """GPUs (through nvidia-smi) then the CPU, each with its memory."""
    return [*_nvidia_gpus(), _cpu()]


def _nvidia_gpus() -> list[dict[str, Any]]:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    query = "--query-gpu=index,name,memory.total,memory.used"
    try:
        done = subprocess.run(
            [exe, query, "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return []
    gpus = []
    for line in done.stdout.splitlines():
        fields = [field.strip() for field in line.split(",")]
        if len(fields) != 4:
            continue
        index, name, total_mib, used_mib = fields
        try:
            gpus.append(
                {
                    "device": f"cuda:{int(index)}",
                    "name": name,
                    "memory_bytes": int(float(total_mib)) << 20,
                    "memory_used_bytes": int(float(used_mib)) << 20,
                }
            )
        except ValueError:
            continue
    return gpus


def _cpu() -> dict[str, Any]:
    name = platform.processor() or platform.machine()
    meminfo: dict[str, int] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.partition(":")[2].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, value = line.partition(":")
            meminfo[key] = int(value.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        total = meminfo.get("MemTotal") or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = None
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "device": "cpu",
        "name": name,
        "cores": usable,
        "memory_bytes": total,
        "memory_available_bytes": meminfo.get("MemAvailable"),
    }


# ---------------------------------------------------------------- runs


def _checkpoint_entry(row: dict[str, Any]) -> dict[str, Any]:
    meta = row["meta"]
    return {
        "step": row["step"],
        "kind": row["kind"],
        "path": row["path"],
        "created": row["created"],
        **{
            key: meta[key]
            for key in ("val_loss", "val_ppl", "val_bpb", "val_accuracy", "val_preference_accuracy", "tokens")
            if key in meta
        },
    }


def _best_and_latest(checkpoints: list[dict[str, Any]]) -> tuple[dict | None, dict | None]:
    scored = [c for c in checkpoints if isinstance(c.get("val_loss"), (int, float))]
    best = min(scored, key=lambda c: c["val_loss"]) if scored else None
    return best, (checkpoints[-1] if checkpoints else None)


def run_summary(
    workspace: Workspace, name: str, log: Path | None = None, now: float | None = None, skim: bool = False
) -> dict[str, Any]:
    """One run's row: identity, state, progress, best evaluation and checkpoints.

    `log` defaults to the run's events.jsonl in the workspace (pass it for a copied log). With
    `skim`, train lines are skipped but the latest (see RunWatch): fast, but no derived alerts.
    """
    return _row_and_state(workspace, name, log, now, skim)[0]


def _row_and_state(
    workspace: Workspace, name: str, log: Path | None, now: float | None, skim: bool
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The run's row, and the summary of its folded log the row was made from."""
    now = time.time() if now is None else now
    log = log or workspace.run_dir(name) / LOG_NAME
    registry = workspace.registry(create=False)
    row = registry.run(name) or {}
    watch = RunWatch(log, history_points=2, skim=skim)
    watch.refresh()
    summary = watch.state.summary(now)
    checkpoints = [_checkpoint_entry(c) for c in registry.checkpoints(name)]
    best_checkpoint, latest_checkpoint = _best_and_latest(checkpoints)
    # A log copied without its registry still names its checkpoints.
    best_checkpoint = best_checkpoint or summary["best_checkpoint"]
    latest_checkpoint = latest_checkpoint or summary["latest_checkpoint"]
    best_eval = summary["best_eval"]
    if best_eval is None and best_checkpoint is not None:
        best_eval = {key: best_checkpoint.get(key) for key in ("step", "val_loss", "val_ppl", "val_bpb")}
    run_row = {
        "name": name,
        "stage": row.get("stage") or summary["stage"],
        "state": summary["state"] if summary["starts"] else ("registered" if row else "waiting"),
        "preset": summary["preset"],
        "device": summary["device"],
        "step": summary["step"],
        "max_steps": summary["max_steps"],
        "progress": summary["progress"],
        "elapsed_s": summary["elapsed_s"],
        "eta_s": summary["eta_s"],
        "last_event_age_s": summary["last_event_age_s"],
        "best_eval": best_eval,
        "best_checkpoint": best_checkpoint,
        "latest_checkpoint": latest_checkpoint,
        "corpus": row.get("corpus"),
        "tokenizer": row.get("tokenizer"),
        "study": _study_of(row),
        "path": str(log.parent),
    }
    return run_row, summary


def _study_of(row: dict[str, Any]) -> dict[str, Any] | None:
    """The hyperparameter study a trial's run belongs to (llmctl tune), or None."""
    meta = row.get("meta") or {}
    return {"name": meta["study"], "trial": meta.get("trial")} if meta.get("study") else None


def workspace_status(workspace: Workspace) -> dict[str, Any]:
    registry = workspace.registry(create=False)
    now = time.time()
    runs = [run_summary(workspace, name, now=now, skim=True) for name in known_runs(workspace)]
    return jsonable(
        {
            "workspace": str(workspace.root),
            "exists": workspace.exists,
            "devices": devices(),
            "corpora": [_corpus_entry(row) for row in registry.corpora()],
            "tokenizers": [_tokenizer_entry(row) for row in registry.tokenizers()],
            "runs": runs,
        }
    )


def _corpus_entry(row: dict[str, Any]) -> dict[str, Any]:
    meta = row["meta"]
    return {
        "name": row["name"],
        "kind": row["kind"],
        "documents": meta.get("documents"),
        "bytes": meta.get("bytes"),
        "created": row["created"],
        "path": row["path"],
    }


def _tokenizer_entry(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": row["name"],
        "vocab_size": row["vocab_size"],
        "corpus": row["corpus"],
        "kind": row["meta"].get("kind"),
        "created": row["created"],
        "path": row["path"],
    }


# ---------------------------------------------------------------- one run in detail


def run_status(workspace: Workspace, name: str, log: Path | None = None) -> dict[str, Any]:
    """A run's summary plus its config, lineage, checkpoints, evaluations and last alerts."""
    registry = workspace.registry(create=False)
    summary, live = _row_and_state(workspace, name, log, None, skim=False)
    config = read_run_config(Path(summary["path"]))
    checkpoint_ids = {row["id"]: row["step"] for row in registry.checkpoints(name)}
    evals = [
        {
            "checkpoint_step": checkpoint_ids[row["checkpoint_id"]],
            "kind": row["kind"],
            "created": row["created"],
            **row["meta"],
        }
        for checkpoint_id in checkpoint_ids
        for row in registry.evals(checkpoint_id)
    ]
    return jsonable(
        {
            "run": summary,
            "config": config,
            "lineage": lineage(registry, name, config),
            "checkpoints": [_checkpoint_entry(row) for row in registry.checkpoints(name)],
            "evals": evals,
            "train": live["train"],
            "last_eval": live["last_eval"],
            "end": live["end"],
            "alerts": live["alerts"],
        }
    )


def lineage(registry: Registry, name: str, config: dict[str, Any] | None, depth: int = 0) -> dict[str, Any]:
    """Where a run came from: corpus, tokenizer, the checkpoint it started from (and that run's
    own lineage), and the adapter it trains."""
    row = registry.run(name) or {}
    data = (config or {}).get("data") or {}
    corpus_name = row.get("corpus") or data.get("corpus")
    tokenizer_name = row.get("tokenizer") or data.get("tokenizer")
    corpus = registry.corpus(corpus_name) if corpus_name else None
    tokenizer = registry.tokenizer(tokenizer_name) if tokenizer_name else None
    node: dict[str, Any] = {
        "run": name,
        "stage": row.get("stage"),
        "corpus": _corpus_entry(corpus) if corpus else ({"name": corpus_name} if corpus_name else None),
        "tokenizer": _tokenizer_entry(tokenizer)
        if tokenizer
        else ({"name": tokenizer_name} if tokenizer_name else None),
        "base_checkpoint": None,
        "adapter": None,
    }
    base = registry.checkpoint(row["base_checkpoint"]) if row.get("base_checkpoint") else None
    if base is not None:
        node["base_checkpoint"] = {"run": base["run"], **_checkpoint_entry(base)}
        if depth < LINEAGE_DEPTH:
            base_config = (
                read_run_config(Path(registry.run(base["run"])["path"]))
                if registry.run(base["run"])
                else None
            )
            node["base_checkpoint"]["lineage"] = lineage(registry, base["run"], base_config, depth + 1)
    elif row.get("meta", {}).get("base"):
        node["base_checkpoint"] = {"path": row["meta"]["base"]}
    adapter = (config or {}).get("adapter") or {}
    if adapter.get("enabled"):
        node["adapter"] = {key: adapter.get(key) for key in ("r", "alpha", "dropout", "targets", "quantize")}
    return node
