"""Parameter counts promised by the presets, the memory estimate's behaviour, and FLOPs per token
counted by hand."""

from __future__ import annotations

import pytest

from llmctl.config import ModelConfig, resolve_config
from llmctl.model.sizing import count_parameters, estimate_training_memory, flops_per_token, lookup_parameters


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


# ---------------------------------------------------------------- FLOPs per token, by hand

# A Llama shape: untied embeddings (the input table is a lookup), grouped-query attention
LLAMA = ModelConfig(
    n_layer=2,
    n_head=4,
    n_kv_head=2,
    d_model=64,
    d_ff=128,
    vocab_size=300,
    context_length=32,
    tie_embeddings=False,
)
# A GPT-2 shape: learned positions (a lookup), LayerNorm and biases, tied embeddings (the one table is
# also the output head, so it multiplies)
GPT2 = ModelConfig(
    n_layer=2,
    n_head=4,
    d_model=64,
    vocab_size=300,
    context_length=32,
    position="learned",
    norm="layernorm",
    mlp="gelu",
    bias=True,
    tie_embeddings=True,
)


def test_flops_per_token_count_matmuls_by_hand_not_lookups():
    # Llama, per layer: q 64·64, k and v 64·32 each, o 64·64; gate, up, down 3·64·128; 2 RMSNorms of 64
    layer = 4096 + 2048 + 2048 + 4096 + 3 * 64 * 128 + 2 * 64
    head = 320 * 64  # vocabulary padded to 320
    multiplied = 2 * layer + 64 + head  # the final norm; not the input embedding (another 320·64)
    attention = 12 * 2 * 4 * 16 * 32  # 12 · layers · heads · head_dim · T
    assert count_parameters(LLAMA) == multiplied + 320 * 64
    assert flops_per_token(LLAMA) == 6 * multiplied + attention == 616_320
    assert lookup_parameters(LLAMA) == 320 * 64

    # GPT-2, per layer: attention 4·64·64 + 4·64 biases; MLP 2·64·256 + 256 + 64 biases; 2 LayerNorms of 2·64
    layer = 4 * 64 * 64 + 4 * 64 + 2 * 64 * 256 + 256 + 64 + 2 * 2 * 64
    multiplied = 2 * layer + 2 * 64 + 320 * 64  # the final norm; the tied table as the head
    assert count_parameters(GPT2) == multiplied + 32 * 64  # and 32 learned positions, looked up
    assert flops_per_token(GPT2) == 6 * multiplied + attention == 772_608

    # shorter rows (a finetune's --max-length) shrink the attention term only
    assert flops_per_token(LLAMA, sequence_length=8) == flops_per_token(LLAMA) - attention * 3 // 4
