"""Parameter counts and memory estimates from a config alone (no torch import).

The counts are exact for llmctl's transformer (a test checks them against the real module);
the memory figures are estimates for planning a run before launching it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from llmctl.config import ModelConfig, TrainConfig

GIB = 1024**3


def count_parameters(cfg: ModelConfig) -> int:
    d, head_dim = cfg.d_model, cfg.head_dim
    kv_width = cfg.kv_heads * head_dim
    norm = 2 * d if cfg.norm == "layernorm" else d
    attention = 2 * d * d + 2 * d * kv_width
    mlp_matrices = 3 if cfg.mlp == "swiglu" else 2
    mlp = mlp_matrices * d * cfg.ff_dim
    if cfg.bias:
        attention += 2 * d + 2 * kv_width
        mlp += (mlp_matrices - 1) * cfg.ff_dim + d
    per_layer = attention + mlp + 2 * norm
    embeddings = cfg.padded_vocab_size * d
    total = embeddings + cfg.n_layer * per_layer + norm
    if not cfg.tie_embeddings:
        total += cfg.padded_vocab_size * d
    if cfg.position == "learned":
        total += cfg.context_length * d
    return total


def lookup_parameters(cfg: ModelConfig) -> int:
    """Parameters read by index, never multiplied: an untied input embedding, learned positions.
    (A tied embedding is also the output head's matrix, so it does a matmul.)"""
    lookups = 0 if cfg.tie_embeddings else cfg.padded_vocab_size * cfg.d_model
    if cfg.position == "learned":
        lookups += cfg.context_length * cfg.d_model
    return lookups


def flops_per_token(cfg: ModelConfig, n_params: int | None = None, sequence_length: int | None = None) -> int:
    """Training FLOPs per token: 6N for the matmuls plus 12·L·H·Q·T for attention (PaLM, app. B),
    N leaving out lookup-only parameters, T the rows' length (the context unless given)."""
    n = (n_params if n_params is not None else count_parameters(cfg)) - lookup_parameters(cfg)
    length = sequence_length or cfg.context_length
    return 6 * n + 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * length


@dataclass(frozen=True)
class MemoryEstimate:
    weights: int
    gradients: int
    optimizer: int
    activations: int

    @property
    def total(self) -> int:
        # allocator fragmentation and the CUDA context: a flat 10% plus 0.5 GiB
        return int((self.weights + self.gradients + self.optimizer + self.activations) * 1.1 + GIB // 2)

    def as_dict(self) -> dict[str, int]:
        return {
            "weights": self.weights,
            "gradients": self.gradients,
            "optimizer": self.optimizer,
            "activations": self.activations,
            "total": self.total,
        }


def saved_values_per_token(model: ModelConfig) -> int:
    """Activations one layer keeps for its backward pass, in values per token, counted on this
    Transformer with autograd's saved-tensor hooks: both norms' inputs and outputs (4d), the
    attention's input, query, output and o_proj input (4d) and its keys and values (2 kv), rope's
    inputs (d); SwiGLU keeps gate, up, their product and silu's output (4 ff), GELU its input
    and output (2 ff). With GELU at 4d this is Korthikanti et al.'s 17d plus rope's and the norms'."""
    kv = model.kv_heads * model.head_dim
    mlp = 4 * model.ff_dim if model.mlp == "swiglu" else 2 * model.ff_dim
    return 9 * model.d_model + 2 * kv + mlp


def estimate_training_memory(
    model: ModelConfig,
    train: TrainConfig,
    trainable_params: int | None = None,
    weight_bytes_per_param: float = 4.0,
    mixed_precision: bool | None = None,
    adapter_values_per_token: int = 0,
    sequence_length: int | None = None,
) -> MemoryEstimate:
    """Bytes for one training step at the config's micro-batch of rows of `sequence_length` tokens
    (the context unless given).

    Weights are kept in fp32 (autocast computes in 16 bits); AdamW keeps two fp32 moments per
    trainable parameter. Activations are what each layer saves for its backward pass
    (`saved_values_per_token`, attention through a fused kernel: no T×T matrix stored) at 2
    bytes a value in mixed precision, 4 in fp32, plus what adapters save per layer
    (`adapter_values_per_token`), plus the logits and their log-softmax in fp32.
    """
    n = count_parameters(model)
    trainable = n if trainable_params is None else trainable_params
    if mixed_precision is None:
        mixed_precision = train.precision != "fp32"
    value_bytes = 2 if mixed_precision else 4
    tokens = train.micro_batch_size * (sequence_length or model.context_length)
    per_layer = (saved_values_per_token(model) + adapter_values_per_token) * tokens * value_bytes
    if train.activation_checkpointing:
        # each layer keeps its input; the layer being recomputed holds its whole set again
        layers = model.d_model * tokens * value_bytes * model.n_layer + per_layer
    else:
        layers = per_layer * model.n_layer
    logits = 8 * tokens * model.padded_vocab_size
    return MemoryEstimate(
        weights=int(n * weight_bytes_per_param),
        gradients=4 * trainable,
        optimizer=8 * trainable,
        activations=int(layers + logits),
    )


def human_count(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f}{unit}"
    return str(int(n))


def human_bytes(n: float) -> str:
    for unit, size in (("TB", 1024**4), ("GB", GIB), ("MB", 1024**2), ("KB", 1024)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def bits_per_byte(nats: float, n_bytes: float) -> float:
    """Bits per UTF-8 byte of text whose tokens cost `nats` in all: nats / bytes / ln 2.

    The one definition in llmctl (the trainer's val_bpb and eval perplexity use it). Means work as
    well as totals: mean nats per token over mean bytes per token gives the same figure.
    """
    return nats / n_bytes / math.log(2)
