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

    A run bounded by time learns its total once it has measured its steps (`fix_total`); until then,
    and for a run with no bound at all, the rate stays at `lr` after warmup. The schedule is a pure
    function of the step; its state is the step it is at and the total it fixed, if it did.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, train: TrainConfig, total_steps: int | None):
        self.optimizer = optimizer
        self.lr, self.min_lr, self.warmup = train.lr, train.min_lr, train.warmup_steps
        self.total_steps = total_steps
        self.step_index = 0
        self.estimated = False  # whether total_steps was fixed from a time budget

    def fix_total(self, total_steps: int) -> None:
        """Decay over `total_steps` from now on: the steps a time budget holds, estimated once. It is
        saved with the schedule's state, so a resumed run follows the same curve."""
        self.total_steps, self.estimated = max(1, int(total_steps)), True

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
        state = {"step_index": self.step_index}
        if self.estimated:
            state["estimated_total_steps"] = self.total_steps
        return state

    def load_state_dict(self, state: dict) -> None:
        self.step_index = int(state["step_index"])
        if "estimated_total_steps" in state:
            self.fix_total(state["estimated_total_steps"])


class TimeBudget:
    """How many optimizer steps a run bounded by `max_time` seconds holds, measured once per session.

    The first steps of a session pay for allocation, compilation and caches, so the clock starts
    after SKIP_STEPS; the estimate comes once at least MEASURE_STEPS steps and MEASURE_FRACTION of the
    budget have gone by. Evaluations cost time the training steps do not show: each evaluation
    batch is about a third of a micro-batch's forward and backward pass, so they are added in.
    """

    SKIP_STEPS = 2
    MEASURE_STEPS = 10
    MEASURE_FRACTION = 0.1

    def __init__(self, train: TrainConfig, first_step: int):
        self.max_time = train.max_time
        self.eval_share = train.eval_batches / (3 * train.grad_accum_steps * train.eval_every)
        self.start_step = first_step + self.SKIP_STEPS
        self.start_elapsed: float | None = None

    def estimate(self, step: int, elapsed: float) -> int | None:
        """The total steps of the run, counted from its first, once measured; None before."""
        if step == self.start_step:
            self.start_elapsed = elapsed
        if self.start_elapsed is None or step < self.start_step + self.MEASURE_STEPS:
            return None
        measured = elapsed - self.start_elapsed
        if measured <= 0 or measured < self.MEASURE_FRACTION * self.max_time:
            return None
        seconds_per_step = measured / (step - self.start_step) * (1 + self.eval_share)
        return step + max(0, int((self.max_time - elapsed) / seconds_per_step))


def paged_adamw_8bit(model: nn.Module, train: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """bitsandbytes' paged 8-bit AdamW (CUDA only): 8-bit moments, paged to host memory under pressure."""
    from llmctl.model.quantize import quiet_bitsandbytes_import

    quiet_bitsandbytes_import()
    import bitsandbytes as bnb

    groups = [group for group in param_groups(model, train.weight_decay) if group["params"]]
    return bnb.optim.PagedAdamW8bit(groups, lr=train.lr, betas=(train.beta1, train.beta2))
