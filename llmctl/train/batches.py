"""Batches for the trainer: random training windows and fixed evaluation windows over a token array.

A batch is a dict of tensors for one rank's micro-batch: `input_ids` and `labels` [B, T] (label
-100 carries no loss), and optionally `position_ids`, `doc_ids`, `attn_mask` which the model
takes as keyword arguments. Finetuning supplies its own source with the same methods.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import numpy as np
import torch

MODEL_INPUTS = ("position_ids", "doc_ids", "attn_mask")

Batch = dict[str, torch.Tensor]


class BatchSource(Protocol):
    """What the trainer needs from its data. `state_dict` must capture everything that decides the
    next batches, so a resumed run sees exactly the batches an uninterrupted one would."""

    def next_batch(self) -> Batch: ...

    def eval_batches(self) -> Iterator[Batch]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...

    @property
    def bytes_per_token(self) -> float | None:
        """Mean UTF-8 bytes of text per evaluated token, for bits per byte; None if unknown."""


def _to_device(windows: np.ndarray, device: torch.device) -> Batch:
    tokens = torch.from_numpy(windows.astype(np.int64))
    if device.type == "cuda":
        # pinned host memory lets the copy overlap with the previous step's kernels
        tokens = tokens.pin_memory().to(device, non_blocking=True)
    return {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}


class TokenWindows:
    """Pretraining batches: windows of context_length + 1 tokens at random offsets.

    Every rank draws the same global batch from one seeded generator and keeps its own slice,
    so ranks see disjoint windows and N ranks with micro-batch B/N see exactly the batches one
    process with micro-batch B sees. Evaluation uses evenly spaced windows of the validation
    split, the same ones at every evaluation, so successive val losses are comparable.
    """

    def __init__(
        self,
        train: np.ndarray,
        val: np.ndarray,
        *,
        context_length: int,
        micro_batch_size: int,
        eval_batches: int,
        seed: int,
        device: torch.device,
        val_bytes_per_token: float | None = None,
        rank: int = 0,
        world_size: int = 1,
    ):
        for split, tokens in (("train", train), ("val", val)):
            if len(tokens) < context_length + 1:
                raise ValueError(
                    f"the {split} split has {len(tokens)} tokens, "
                    f"fewer than one window of {context_length + 1}"
                )
        self.train, self.val = train, val
        self.window = context_length + 1
        self.micro_batch_size = micro_batch_size
        self.n_eval_batches = eval_batches
        self.device = device
        self.rank, self.world_size = rank, world_size
        self._val_bytes_per_token = val_bytes_per_token
        self._rng = np.random.default_rng(seed)
        self._offsets = np.arange(self.window)

    @property
    def bytes_per_token(self) -> float | None:
        return self._val_bytes_per_token

    def _windows(self, tokens: np.ndarray, starts: np.ndarray) -> np.ndarray:
        mine = starts[self.rank * self.micro_batch_size : (self.rank + 1) * self.micro_batch_size]
        return tokens[mine[:, None] + self._offsets]

    def next_batch(self) -> Batch:
        starts = self._rng.integers(
            0, len(self.train) - self.window + 1, size=self.micro_batch_size * self.world_size
        )
        return _to_device(self._windows(self.train, starts), self.device)

    def eval_batches(self) -> Iterator[Batch]:
        per_batch = self.micro_batch_size * self.world_size
        last_start = len(self.val) - self.window
        # as many evenly spaced windows as asked for, fewer when the split is smaller than that
        n_batches = max(1, min(self.n_eval_batches, (last_start + 1) // per_batch))
        starts = np.linspace(0, last_start, n_batches * per_batch).astype(np.int64)
        for batch_starts in starts.reshape(n_batches, per_batch):
            yield _to_device(self._windows(self.val, batch_starts), self.device)

    def state_dict(self) -> dict:
        return {"rng": self._rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self._rng.bit_generator.state = state["rng"]
