"""Parameter counts promised by the presets, and the memory estimate's behaviour."""

from __future__ import annotations

import pytest

from llmctl.config import resolve_config
from llmctl.model.sizing import count_parameters, estimate_training_memory


@pytest.mark.parametrize(
    ("preset", "low", "high"),
    [
        ("mini-27m", 26.5e6, 28.5e6),
        ("mini-46m", 45e6, 48e6),
        ("llm-200m", 190e6, 210e6),
        ("gpt2-124m", 123.5e6, 125e6),
    ],
)
def test_presets_keep_their_size_promises(preset: str, low: float, high: float):
    assert low <= count_parameters(resolve_config(preset=preset).model) <= high


def test_activation_checkpointing_and_bigger_batches_move_the_estimate():
    # a tiny vocabulary so the per-layer activations, not the logits, dominate
    cfg = resolve_config(preset="rtx4060-8g", overrides=["model.vocab_size=64"])
    base = estimate_training_memory(cfg.model, cfg.train)
    checkpointed = estimate_training_memory(
        cfg.model, cfg.train.model_copy(update={"activation_checkpointing": True})
    )
    doubled = estimate_training_memory(cfg.model, cfg.train.model_copy(update={"micro_batch_size": 64}))
    assert checkpointed.activations < base.activations / 3
    assert doubled.activations > 1.9 * base.activations
    assert base.weights == 4 * count_parameters(cfg.model)
    assert base.optimizer == 2 * base.weights
