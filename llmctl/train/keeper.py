"""A run's checkpoints as training writes them (rank 0): each written whole, registered, announced
in the event stream; the newest `keep_last` and the best one kept, the rest deleted with their rows."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from torch import nn

from llmctl.checkpoint.files import ModelIO, write_checkpoint
from llmctl.config import RunConfig
from llmctl.storage import staging_name
from llmctl.train.run_log import RunLog
from llmctl.workspace import Registry, checkpoint_dir, checkpoint_step, list_checkpoints


class CheckpointKeeper:
    def __init__(
        self,
        run_dir: Path,
        run_name: str,
        stage: str,
        registry: Registry | None,
        model_io: ModelIO,
        *,
        keep_last: int,
        tokenizer_file: Path | None,
        checkpoint_fields: dict[str, Any],
    ):
        self.run_dir, self.run_name, self.stage, self.registry = run_dir, run_name, stage, registry
        self.model_io = model_io
        self.keep_last = keep_last
        self.tokenizer_file = tokenizer_file
        self.checkpoint_fields = checkpoint_fields

    def save(
        self,
        events: RunLog,
        *,
        model: nn.Module,
        config: RunConfig,
        trainer_state: dict[str, Any],
        metrics: dict[str, float],
        best_step: int | None,
    ) -> Path:
        """Write the checkpoint of `trainer_state['step']`, register and announce it, prune."""
        step, tokens = trainer_state["step"], trainer_state["tokens"]
        meta = {
            "run": self.run_name,
            "stage": self.stage,
            "step": step,
            "tokens": tokens,
            "created": time.time(),
            **self.checkpoint_fields,
            **metrics,
        }
        path = write_checkpoint(
            checkpoint_dir(self.run_dir, step),
            model=model,
            model_io=self.model_io,
            config=config,
            trainer_state=trainer_state,
            meta=meta,
            tokenizer_file=self.tokenizer_file,
        )
        if self.registry is not None:
            self.registry.add_checkpoint(
                self.run_name, step, self.model_io.kind, path, {"tokens": tokens, **metrics}
            )
        events.write(
            "checkpoint",
            step,
            path=str(path),
            kind=self.model_io.kind,
            best=best_step == step,
            val_loss=metrics.get("val_loss"),
        )
        self._prune(best_step)
        return path

    def best_on_disk(self, best_step: int | None) -> int | None:
        if best_step is not None and checkpoint_dir(self.run_dir, best_step).is_dir():
            return best_step
        return None

    def latest(self) -> Path | None:
        checkpoints = list_checkpoints(self.run_dir)
        return checkpoints[-1] if checkpoints else None

    def _prune(self, best_step: int | None) -> None:
        checkpoints = list_checkpoints(self.run_dir)
        keep = {checkpoint_step(path) for path in checkpoints[-self.keep_last :]}
        if best_step is not None:
            keep.add(best_step)
        for path in checkpoints:
            step = checkpoint_step(path)
            if step in keep:
                continue
            if self.registry is not None:
                row = self.registry.checkpoint_at(self.run_name, step)
                if row is not None:
                    self.registry.remove_checkpoint(row["id"])
            # rename first so a crash mid-delete never leaves a partial directory under a step name
            doomed = path.with_name(staging_name(".del-", path.name))
            path.rename(doomed)
            shutil.rmtree(doomed, ignore_errors=True)
