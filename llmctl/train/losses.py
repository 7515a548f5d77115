"""What a stage asks the trainer to minimise: a loss over one micro-batch.

A loss function takes the (possibly wrapped) model and a batch, and returns the batch's mean loss
over `count` items (tokens, or examples for classification) and optional summed figures that
evaluation reports per item as `val_<name>`. The trainer is indifferent to which loss it runs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from llmctl.data import IGNORE_INDEX
from llmctl.model.sizing import bits_per_byte
from llmctl.train import distributed
from llmctl.train.batches import MODEL_INPUTS, Batch, BatchSource
from llmctl.train.distributed import DistEnv
from llmctl.train.precision import Precision


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


@torch.no_grad()
def measure_loss(
    model: nn.Module,
    batches: BatchSource,
    loss_fn: LossFn,
    precision: Precision,
    dist: DistEnv,
    device: torch.device,
) -> dict[str, float]:
    """Validation loss, perplexity and bits per byte over the source's evaluation batches (summed
    over ranks), and each of the loss's summed figures per item as `val_<name>`.

    bits per byte = summed nats / (evaluated tokens x the split's mean bytes per token) / ln 2,
    so it compares across tokenizers; see docs/pretrain.md.
    """
    nats = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    sums: dict[str, torch.Tensor] = {}
    for batch in batches.eval_batches():
        with precision.autocast():
            result = loss_fn(model, batch)
        nats += result.loss.double() * result.count
        count += result.count
        for name, value in result.sums.items():
            sums[name] = sums.get(name, 0) + value.double()
    names = sorted(sums)
    totals = distributed.all_reduce(
        [nats.item(), count.item(), *(sums[name].item() for name in names)], dist, device
    )
    val_loss = totals[0] / max(totals[1], 1.0)
    metrics = {"val_loss": val_loss, "val_ppl": math.exp(val_loss) if val_loss < 700 else math.inf}
    if batches.bytes_per_token:
        metrics["val_bpb"] = bits_per_byte(val_loss, batches.bytes_per_token)
    for name, total in zip(names, totals[2:], strict=True):
        metrics[f"val_{name}"] = total / max(totals[1], 1.0)
    return metrics
