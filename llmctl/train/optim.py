"""AdamW with the usual decay exemptions, and the warmup-then-cosine learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from llmctl.config import TrainConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters split into decayed matrices and undecayed norms, biases and embeddings.

    Decay on a norm's gain or a bias pulls it toward zero for no benefit, and embedding rows of
    rare tokens would shrink every step they are not seen. A tied lm_head is the embedding tensor,
    so it is exempt too. Frozen parameters (LoRA's base, say) are left out entirely.
    """
    embedding_weights = {id(module.weight) for module in model.modules() if isinstance(module, nn.Embedding)}
    decay, no_decay = [], []
    for param in model.parameters():  # parameters() yields a tied tensor once
        if not param.requires_grad:
            continue
        exempt = param.ndim < 2 or id(param) in embedding_weights
        (no_decay if exempt else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, train: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    groups = [group for group in param_groups(model, train.weight_decay) if group["params"]]
    if not groups:
        raise ValueError("the model has no trainable parameters")
    # the fused kernel is one launch for all parameters; it exists for CUDA tensors only
    return torch.optim.AdamW(
        groups, lr=train.lr, betas=(train.beta1, train.beta2), fused=device.type == "cuda"
    )


class CosineSchedule:
    """Linear warmup to `lr`, then cosine decay to `min_lr` at `total_steps`, then flat at the floor.

    With no known total (a run bounded only by time) the rate stays at `lr` after warmup.
    The schedule is a pure function of the step; its state is the step it is at.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, train: TrainConfig, total_steps: int | None):
        self.optimizer = optimizer
        self.lr, self.min_lr, self.warmup = train.lr, train.min_lr, train.warmup_steps
        self.total_steps = total_steps
        self.step_index = 0

    def lr_at(self, step: int) -> float:
        """The rate for the update with zero-based index `step`."""
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        if self.total_steps is None:
            return self.lr
        if step >= self.total_steps:
            return self.min_lr
        progress = (step - self.warmup) / max(1, self.total_steps - self.warmup)
        return self.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (self.lr - self.min_lr)

    def apply(self) -> float:
        """Set the optimizer's rate for the next update and return it."""
        lr = self.lr_at(self.step_index)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def advance(self) -> None:
        self.step_index += 1

    def state_dict(self) -> dict:
        return {"step_index": self.step_index}

    def load_state_dict(self, state: dict) -> None:
        self.step_index = int(state["step_index"])


def paged_adamw_8bit(model: nn.Module, train: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """bitsandbytes' paged 8-bit AdamW (CUDA only): 8-bit moments, paged to host memory under pressure."""
    from llmctl.model.quantize import quiet_bitsandbytes_import

    quiet_bitsandbytes_import()
    import bitsandbytes as bnb

    groups = [group for group in param_groups(model, train.weight_decay) if group["params"]]
    return bnb.optim.PagedAdamW8bit(groups, lr=train.lr, betas=(train.beta1, train.beta2))
