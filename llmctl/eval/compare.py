"""The same evals over several checkpoints, for one table and one figure: before and after a
finetune, or every checkpoint of a run.

Checkpoints are loaded one at a time. Each result is recorded against its checkpoint exactly as
the eval's own command records it, so `compare` leaves the same registry rows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from llmctl.checkpoint.load import load_model
from llmctl.checkpoint.refs import resolve_model_ref
from llmctl.errors import LlmctlError, UsageError
from llmctl.eval.perplexity import measure_perplexity, name_source
from llmctl.eval.probes import run_probes
from llmctl.eval.results import describe_checkpoint, record
from llmctl.generate import Engine, resolve_device
from llmctl.model.decode_dtype import resolve_decode_dtype
from llmctl.workspace import Workspace, checkpoint_step, list_checkpoints

EVALS = ("perplexity", "probes")


def parse_evals(text: str) -> list[str]:
    """'perplexity,probes' → ['perplexity', 'probes'], in the order given."""
    chosen = list(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    unknown = [name for name in chosen if name not in EVALS]
    if unknown or not chosen:
        raise UsageError(f"--evals takes {' and/or '.join(EVALS)}, separated by commas; got '{text}'")
    return chosen


def checkpoint_refs(workspace: Workspace, refs: list[str], run: str | None) -> list[str]:
    """The references to compare: those given, or `run:step-N` for every checkpoint of `run`."""
    if run is not None and refs:
        raise UsageError("give checkpoints (REF ...) or --run RUN, not both")
    if run is None:
        if len(refs) < 2:
            raise UsageError(
                "compare needs two checkpoints or more (REF REF ...), or --run RUN for every "
                "checkpoint of a run"
            )
        for ref in refs:
            resolve_model_ref(workspace, ref)  # a bad reference fails before any model loads
        return refs
    resolve_model_ref(workspace, run)
    return [f"{run}:step-{checkpoint_step(path)}" for path in list_checkpoints(workspace.run_dir(run))]


def compare_checkpoints(
    workspace: Workspace,
    refs: list[str],
    evals: list[str],
    *,
    texts: Iterable[str] | None = None,
    source: dict[str, str] | None = None,
    stride: int | None = None,
    batch_size: int = 8,
    device: str = "auto",
    dtype: str | None = None,
    workers: int = 1,
    on_result: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """One row per checkpoint: what names it, and each eval's summary (as its command prints it).

    `texts` (re-iterable) and `source` say what perplexity scores. `on_result(row)` follows each
    checkpoint.
    """
    if "perplexity" in evals and texts is None:
        raise UsageError("perplexity needs texts to score (from text_source)")
    torch_device = resolve_device(device)
    if dtype is not None:
        resolve_decode_dtype(dtype, torch_device)  # a bad --dtype fails before any model loads
    rows = []
    for ref in refs:
        loaded = load_model(workspace, ref, torch_device, dtype=torch.float32)  # perplexity in fp32
        checkpoint = describe_checkpoint(workspace, ref, loaded.path)
        row: dict[str, Any] = dict(checkpoint)
        if "perplexity" in evals:
            result = measure_perplexity(
                loaded.model, loaded.tokenizer, texts, stride=stride, batch_size=batch_size
            )
            row["perplexity"] = {
                "kind": "perplexity",
                **checkpoint,
                "source": source,
                **result.as_dict(),
                "batch_size": batch_size,
            }
            row["perplexity"]["eval_id"] = record(workspace, "perplexity", row["perplexity"])
        if "probes" in evals:
            # probes generate in the dtype asked for (the checkpoint's own by default), converting
            # the model perplexity has finished with
            name = dtype or loaded.config.generation.dtype
            engine = Engine(loaded.model, loaded.tokenizer, device=torch_device, dtype=name)
            row["probes"] = {
                "kind": "probes",
                **checkpoint,
                **run_probes(engine, batch_size=batch_size, workers=workers),
                "dtype": engine.dtype,
            }
            row["probes"]["eval_id"] = record(workspace, "probes", row["probes"])
        rows.append(row)
        if on_result is not None:
            on_result(row)
    return rows


def _label(ref: str) -> str:
    """A checkpoint directory as 'run/step-00000500' (its run's folder and its own), a reference as given."""
    path = Path(ref)
    return f"{path.parent.parent.name}/{path.name}" if len(path.parts) > 2 else ref


def plot_comparison(rows: list[dict[str, Any]], out: Path) -> Path:
    """Bits per byte and probe scores against the step (or the checkpoint, when the checkpoints
    are not the steps of one run), one panel per eval, saved as a PNG."""
    try:
        import matplotlib
    except ImportError as exc:
        raise LlmctlError("--plot needs matplotlib: pip install matplotlib") from exc
    matplotlib.use("Agg")
    from matplotlib import pyplot

    panels = [name for name in EVALS if name in rows[0]]
    runs = {row["run"] for row in rows}
    one_run = len(runs) == 1 and None not in runs and all(row["step"] is not None for row in rows)
    xs = [row["step"] for row in rows] if one_run else list(range(len(rows)))
    figure, axes = pyplot.subplots(
        len(panels), 1, figsize=(10, 1 + 3.4 * len(panels)), sharex=True, layout="constrained", squeeze=False
    )
    for ax, panel in zip(axes[:, 0], panels, strict=True):
        if panel == "perplexity":
            ax.plot(xs, [row["perplexity"]["bits_per_byte"] for row in rows], marker="o", linewidth=1.6)
            ax.set_ylabel("bits per byte")
            named = name_source(rows[0]["perplexity"]["source"])
            ax.set_title(f"bits per byte on {named} (lower is better)", loc="left", fontsize=10)
        else:
            ax.plot(
                xs,
                [row["probes"]["score"] for row in rows],
                marker="o",
                linewidth=2.2,
                color="black",
                label="mean",
            )
            # categories often tie (at 0 early on): distinct markers keep each visible
            for category, marker in zip(rows[0]["probes"]["categories"], "s^vDP", strict=True):
                scores = [row["probes"]["categories"][category]["score"] for row in rows]
                ax.plot(
                    xs,
                    scores,
                    marker=marker,
                    markersize=5,
                    linewidth=1,
                    alpha=0.75,
                    label=category.replace("_", " "),
                )
            ax.set_ylim(-0.05, 1.05)
            ax.set_ylabel("score")
            ax.set_title(
                f"code probes {rows[0]['probes']['probe_set']} (higher is better)", loc="left", fontsize=10
            )
            ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
        ax.grid(True, alpha=0.3)
    last = axes[-1, 0]
    if one_run:
        last.set_xlabel(f"step of run {rows[0]['run']}")
        if len(xs) <= 12:
            last.set_xticks(xs)
    else:
        last.set_xticks(xs, [_label(row["model"]) for row in rows], rotation=15, ha="right", fontsize=8)
        last.set_xlabel("checkpoint")
    figure.suptitle("checkpoint comparison", fontsize=12)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=110)
    pyplot.close(figure)
    return out
