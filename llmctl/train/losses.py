"""What a stage asks the trainer to minimise: a loss over one micro-batch.

A loss function takes the (possibly wrapped) model and a batch, and returns the batch's mean loss
over `count` items (tokens, or examples for classification) and optional summed figures that
evaluation reports per item as `val_<name>`. The trainer is indifferent to which loss it runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from llmctl.data import IGNORE_INDEX
from llmctl.train.batches import MODEL_INPUTS, Batch


@dataclass
class LossResult:
    loss: torch.Tensor
    count: torch.Tensor | int
    sums: dict[str, torch.Tensor] = field(default_factory=dict)


LossFn = Callable[[nn.Module, Batch], LossResult]


def lm_loss(model: nn.Module, batch: Batch) -> LossResult:
    """Next-token cross-entropy; labels of -100 (SFT prompts, padding) carry no loss."""
    inputs = {name: batch[name] for name in MODEL_INPUTS if name in batch}
    logits = model(batch["input_ids"], **inputs)
    labels = batch["labels"]
    loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)
    return LossResult(loss, (labels != IGNORE_INDEX).sum())


def classify_loss(model: nn.Module, batch: Batch) -> LossResult:
    """Cross-entropy over the classes per example; `correct` becomes the eval event's val_accuracy."""
    logits = model(batch["input_ids"], class_positions=batch["class_positions"])
    labels = batch["class_labels"]
    loss = F.cross_entropy(logits.float(), labels)
    correct = (logits.argmax(dim=-1) == labels).sum()
    return LossResult(loss, labels.numel(), {"accuracy": correct})
