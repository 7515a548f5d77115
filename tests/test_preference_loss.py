"""The preference losses on hand-computed log-probabilities, the sums over reply tokens, the figures
a step reports, and the references: adapters off computes the base exactly, with no copy."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from llmctl.config import AdapterConfig, ModelConfig
from llmctl.data import IGNORE_INDEX
from llmctl.model.lora import apply_lora
from llmctl.model.transformer import Transformer
from llmctl.train.preference_loss import (
    PreferenceLoss,
    adapters_off,
    frozen_reference,
    pair_losses,
    sequence_logps,
)


def _ratios(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))  # -log σ(-x)


def test_sigmoid_with_and_without_label_smoothing():
    chosen, rejected, tokens = _ratios(1.0, 0.0), _ratios(-1.0, 0.5), _ratios(3, 3)
    # beta 0.5: Δ = 2 and -0.5, so β Δ = 1 and -0.25
    plain = pair_losses("sigmoid", 0.5, 0.0, chosen, rejected, tokens, tokens)
    assert plain.tolist() == pytest.approx([softplus(-1.0), softplus(0.25)], abs=1e-12)
    smoothed = pair_losses("sigmoid", 0.5, 0.1, chosen, rejected, tokens, tokens)
    assert smoothed[0].item() == pytest.approx(0.9 * softplus(-1.0) + 0.1 * softplus(1.0), abs=1e-12)


def test_hinge_and_ipo():
    hinge = pair_losses(
        "hinge", 0.5, 0.0, _ratios(1.0, 0.5), _ratios(-1.0, 0.0), _ratios(1, 1), _ratios(1, 1)
    )
    assert hinge.tolist() == pytest.approx([0.0, 0.75])  # max(0, 1 - β Δ)
    # IPO compares log-ratios per reply token: 2/4 - (-1/2) = 1, against 1/(2β) = 2
    ipo = pair_losses("ipo", 0.25, 0.0, _ratios(2.0), _ratios(-1.0), _ratios(4), _ratios(2))
    assert ipo.item() == pytest.approx(1.0)


def test_an_unknown_loss_is_refused():
    with pytest.raises(ValueError, match="sigmoid, ipo, hinge"):
        pair_losses("kto", 0.1, 0.0, _ratios(1.0), _ratios(0.0), _ratios(1), _ratios(1))


def test_sequence_logps_sum_the_labelled_tokens_only():
    logits = torch.zeros(1, 3, 2)
    logits[0, 0, 1] = math.log(3)  # p = (1/4, 3/4)
    labels = torch.tensor([[1, IGNORE_INDEX, 0]])
    logps, counts = sequence_logps(logits, labels)
    assert logps.item() == pytest.approx(math.log(3 / 4) + math.log(1 / 2))
    assert counts.tolist() == [2]


class FixedLogits(nn.Module):
    """A 'model' whose logits are a trainable table: the loss's arithmetic, checked by hand."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = nn.Parameter(logits.clone())

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.logits


def test_preference_loss_figures_and_gradient_from_precomputed_references():
    torch.manual_seed(0)
    logits = torch.randn(4, 3, 5, dtype=torch.float64)  # 2 pairs: chosen rows 0-1, rejected rows 2-3
    labels = torch.tensor([[1, 2, IGNORE_INDEX], [0, 4, 4], [3, IGNORE_INDEX, IGNORE_INDEX], [1, 1, 0]])
    logps = [
        sum(torch.log_softmax(logits[r, t], -1)[labels[r, t]].item() for t in range(3) if labels[r, t] >= 0)
        for r in range(4)
    ]
    batch = {
        "input_ids": labels.clamp(min=0),
        "labels": labels,
        "ref_chosen": torch.tensor([logps[0] - 0.3, logps[1] + 0.2], dtype=torch.float64),
        "ref_rejected": torch.tensor([logps[2] + 0.1, logps[3] - 0.4], dtype=torch.float64),
    }
    model = FixedLogits(logits)
    result = PreferenceLoss("sigmoid", 0.5, 0.0, reference=None)(model, batch)
    # log-ratios: chosen 0.3, -0.2; rejected -0.1, 0.4; rewards are half of them
    expected = (softplus(-0.5 * 0.4) + softplus(-0.5 * -0.6)) / 2
    assert result.loss.item() == pytest.approx(expected, abs=1e-6)  # log-softmax runs in fp32
    assert result.count == 2
    sums = {name: value.item() for name, value in result.sums.items()}
    assert sums == pytest.approx(
        {"rewards_chosen": 0.05, "rewards_rejected": 0.15, "reward_margin": -0.1, "preference_accuracy": 1.0},
        abs=1e-6,
    )
    result.loss.backward()
    # only labelled positions get a gradient
    assert model.logits.grad[0, 2].abs().sum() == 0 and model.logits.grad[2, 1:].abs().sum() == 0
    assert model.logits.grad[0, 0].abs().sum() > 0


def _tiny() -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(n_layer=1, n_head=2, d_model=32, context_length=16, vocab_size=64))


def _batch() -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[:, :6] = IGNORE_INDEX
    return {"input_ids": ids, "labels": labels}


def test_a_frozen_copy_of_the_policy_is_a_tie():
    model, batch = _tiny(), _batch()
    copy = _tiny()
    result = PreferenceLoss("sigmoid", 0.1, 0.0, frozen_reference(copy))(model, batch)
    assert result.loss.item() == pytest.approx(math.log(2))
    assert (
        result.sums["reward_margin"].item() == 0 and result.sums["preference_accuracy"].item() == 1.0
    )  # 2 ties
    assert model.training  # the reference pass leaves the policy as it found it


def test_adapters_off_scores_the_base_exactly_and_keeps_the_policy_training():
    base = _tiny()
    batch = _batch()
    with torch.no_grad():
        base_logps, _ = sequence_logps(base(batch["input_ids"]), batch["labels"])
    policy = apply_lora(_tiny(), AdapterConfig(enabled=True, r=2, dropout=0.0))
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)  # a trained adapter: the policy now differs from its base
    policy.train()
    chosen, rejected = adapters_off(policy)(batch)
    assert torch.equal(torch.cat([chosen, rejected]), base_logps)
    assert policy.training
    result = PreferenceLoss("sigmoid", 0.1, 0.0, adapters_off(policy))(policy, batch)
    assert result.sums["reward_margin"].item() != 0
    result.loss.backward()
    trained = [p for p in policy.parameters() if p.grad is not None]
    assert trained and all(p.requires_grad for p in trained)
