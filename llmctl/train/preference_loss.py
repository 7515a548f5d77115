"""Preference losses (DPO sigmoid, IPO, hinge) over pairs scored in one forward.

A batch holds B pairs as 2B rows, the chosen sides first: one forward of the policy scores both.
A side's log-probability is the sum over its reply tokens (the labelled ones) of log p(token);
the reference's comes from a frozen model, the policy with its adapters off, or the batch itself
(`ref_chosen`, `ref_rejected`: precomputed before training). With the log-ratios

    r_c = log π(chosen) - log π_ref(chosen)      r_r = log π(rejected) - log π_ref(rejected)

and Δ = r_c - r_r, the per-pair losses are (ε the label smoothing, n the reply lengths)

    sigmoid  -(1 - ε) log σ(β Δ) - ε log σ(-β Δ)        (Rafailov et al. 2023; cDPO for ε > 0)
    hinge    max(0, 1 - β Δ)                            (SLiC)
    ipo      (r_c / n_c - r_r / n_r - 1 / (2β))²         (Azar et al. 2023, per-token as TRL does)

The figures each step reports (summed here, averaged per pair by the trainer): the rewards
β r_c and β r_r, their margin, and the share of pairs whose chosen reward is the higher, a tie
counting half (so a policy that is still its reference scores 0.5; TRL counts a tie as a miss).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from llmctl.data import IGNORE_INDEX
from llmctl.events import PREFERENCE_FIGURES
from llmctl.train.batches import Batch
from llmctl.train.losses import LossResult

LOSSES = ("sigmoid", "ipo", "hinge")

# the reference's log-probabilities of a batch's chosen and rejected sides
Reference = Callable[[Batch], tuple[torch.Tensor, torch.Tensor]]


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the summed log-probability of its labelled tokens, and how many there are."""
    token_logps = -F.cross_entropy(
        logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="none"
    ).view(labels.shape)
    return token_logps.sum(dim=1), (labels != IGNORE_INDEX).sum(dim=1)


def pair_losses(
    loss: str,
    beta: float,
    label_smoothing: float,
    chosen_ratio: torch.Tensor,
    rejected_ratio: torch.Tensor,
    chosen_tokens: torch.Tensor,
    rejected_tokens: torch.Tensor,
) -> torch.Tensor:
    """Each pair's loss from its log-ratios (see the module's formulas)."""
    delta = chosen_ratio - rejected_ratio
    if loss == "sigmoid":
        return -(1 - label_smoothing) * F.logsigmoid(beta * delta) - label_smoothing * F.logsigmoid(
            -beta * delta
        )
    if loss == "hinge":
        return torch.relu(1 - beta * delta)
    if loss == "ipo":
        per_token = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
        return (per_token - 1 / (2 * beta)) ** 2
    raise ValueError(f"unknown preference loss {loss!r}; use one of {', '.join(LOSSES)}")


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """The model in eval mode for a reference pass (no dropout, no recomputation), then as it was."""
    training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(training)


def score(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Chosen and rejected log-probabilities of a batch under `model`, without gradients."""
    with torch.no_grad(), evaluating(model):
        logps, _ = sequence_logps(model(batch["input_ids"]), batch["labels"])
    return logps.chunk(2)


def frozen_reference(model: nn.Module) -> Reference:
    """A separate frozen model (full-weight DPO's reference)."""
    return lambda batch: score(model, batch)


def adapters_off(model: nn.Module) -> Reference:
    """The policy itself with its LoRA adapters disabled: the base, at no extra memory."""

    def reference(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        with model.disable_adapter():
            return score(model, batch)

    return reference


@dataclass
class PreferenceLoss:
    """The trainer's loss function for DPO; `reference` is None when batches carry precomputed
    reference log-probabilities."""

    loss: str
    beta: float
    label_smoothing: float
    reference: Reference | None

    def __call__(self, model: nn.Module, batch: Batch) -> LossResult:
        logps, tokens = sequence_logps(model(batch["input_ids"]), batch["labels"])
        chosen, rejected = logps.chunk(2)
        chosen_tokens, rejected_tokens = tokens.chunk(2)
        if self.reference is None:
            ref_chosen, ref_rejected = batch["ref_chosen"], batch["ref_rejected"]
        else:
            ref_chosen, ref_rejected = self.reference(batch)
        chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
        losses = pair_losses(
            self.loss,
            self.beta,
            self.label_smoothing,
            chosen_ratio,
            rejected_ratio,
            chosen_tokens,
            rejected_tokens,
        )
        chosen_reward = self.beta * chosen_ratio.detach()
        rejected_reward = self.beta * rejected_ratio.detach()
        figures = (
            chosen_reward.sum(),
            rejected_reward.sum(),
            (chosen_reward - rejected_reward).sum(),
            (chosen_reward > rejected_reward).sum() + 0.5 * (chosen_reward == rejected_reward).sum(),
        )
        return LossResult(losses.mean(), len(chosen), dict(zip(PREFERENCE_FIGURES, figures, strict=True)))
