"""`llmctl merge`: fold an adapter checkpoint into its base, as a run of its own.

The merged run goes through the same run machinery as training (`open_run`: its directory, its
config.yaml written atomically, its registry row) and the same checkpoint writer, so it is a run
like any other: one full checkpoint at the adapter's step, linked to the adapter it came from.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from llmctl.checkpoint import load as loader
from llmctl.checkpoint.files import FullModelIO, checkpoint_kind, read_config, read_meta, write_checkpoint
from llmctl.checkpoint.refs import resolve_model_ref
from llmctl.errors import UsageError
from llmctl.storage import refuse_if_busy, writer_lock
from llmctl.train.runs import discard_run, open_run
from llmctl.workspace import Workspace, check_name, checkpoint_dir

STAGE = "merge"


@dataclass
class MergeResult:
    run: str
    checkpoint: Path
    adapter: Path
    base: Path
    quantized: bool


def merge_to_run(workspace: Workspace, ref: str, run: str, overwrite: bool = False) -> MergeResult:
    """Fold the adapter checkpoint `ref` names into its base and register the result as run `run`,
    one full checkpoint at the adapter's step."""
    check_name(run, "run")
    adapter_path = resolve_model_ref(workspace, ref)
    meta = read_meta(adapter_path)
    if checkpoint_kind(meta) != "adapter":
        raise UsageError(
            f"'{ref}' is a full checkpoint; merge takes an adapter (a finetune --lora or qlora run)"
        )
    base_path = loader.base_of(meta, adapter_path)
    registry = workspace.registry()
    refuse_if_busy(workspace.root, "run", run, "replacing")
    if (workspace.run_dir(run).exists() or registry.run(run) is not None) and not overwrite:
        raise UsageError(f"run '{run}' already exists; pick another name or pass --overwrite")
    config = read_config(adapter_path)
    quantized = config.adapter.quantize == "nf4"
    model = loader.load_weights(adapter_path, meta, config=config)
    config.adapter.enabled, config.adapter.quantize = False, "none"

    with writer_lock(workspace.root, "run", run):
        step = int(meta["step"])
        figures = {key: meta[key] for key in ("val_loss", "val_ppl", "val_accuracy") if key in meta}
        lineage = {key: meta.get(key) for key in ("task", "labels", "tokenizer_sha256")}
        adapter_row = registry.checkpoint_by_path(adapter_path)
        run_dir = open_run(
            workspace,
            run,
            STAGE,
            config,
            {
                "merged_from": str(adapter_path),
                "base_checkpoint": str(base_path),
                "quantized_base": quantized,
                "latest_checkpoint": step,
                "best_checkpoint": step,
                **lineage,
            },
            resuming=False,
            overwrite=overwrite,
            tokenizer=config.data.tokenizer,
            base_checkpoint=adapter_row["id"] if adapter_row else None,
        )
        try:
            checkpoint = write_checkpoint(
                checkpoint_dir(run_dir, step),
                model=model,
                model_io=FullModelIO(),
                config=config,
                trainer_state={"step": step},
                meta={
                    "run": run,
                    "stage": STAGE,
                    "step": step,
                    "created": time.time(),
                    "merged_from": str(adapter_path),
                    "base_checkpoint": str(base_path),
                    **lineage,
                    **figures,
                },
                tokenizer_file=adapter_path / "tokenizer.json",
            )
            registry.add_checkpoint(run, step, "full", checkpoint, figures)
        except BaseException:
            discard_run(workspace, run)  # a merge that did not finish leaves no run behind
            raise
        return MergeResult(run, checkpoint, adapter_path, base_path, quantized)
