"""Hugging Face Llama checkpoints and ours: the same names, so no per-layer table.

A Llama state dict differs from ours only by the `model.` prefix on everything but `lm_head`
and by our vocabulary being padded to a multiple of 64 rows. Configs map field by field.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from llmctl.config import ModelConfig

VOCAB_ROWS = ("embed_tokens.weight", "lm_head.weight")
StateDict = Mapping[str, torch.Tensor]


def from_hf_llama_state_dict(state_dict: StateDict, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """An HF LlamaForCausalLM state dict as one `Transformer(cfg).load_state_dict` accepts."""
    ours = {}
    for name, tensor in state_dict.items():
        name = name.removeprefix("model.")
        if name.endswith("rotary_emb.inv_freq"):  # older transformers saved this buffer
            continue
        if name in VOCAB_ROWS:
            tensor = F.pad(tensor, (0, 0, 0, cfg.padded_vocab_size - tensor.shape[0]))
        ours[name] = tensor
    if cfg.tie_embeddings:
        ours["lm_head.weight"] = ours["embed_tokens.weight"]
    return ours


def to_hf_llama_state_dict(state_dict: StateDict, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our state dict as LlamaForCausalLM names it; a tied lm_head is left out (HF ties it on load)."""
    _require_llama_shape(cfg)
    hf = {}
    for name, tensor in state_dict.items():
        if name in VOCAB_ROWS:
            tensor = tensor[: cfg.vocab_size]
        if name == "lm_head.weight":
            if not cfg.tie_embeddings:
                hf[name] = tensor
        else:
            hf[f"model.{name}"] = tensor
    return hf


def to_hf_llama_config(cfg: ModelConfig) -> dict[str, Any]:
    """config.json fields for LlamaForCausalLM (rope in the rope_theta / rope_scaling form every
    transformers version reads)."""
    _require_llama_shape(cfg)
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.ff_dim,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.context_length,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": cfg.rope_scaling,
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": cfg.bias,
        "mlp_bias": cfg.bias,
        "hidden_act": "silu",
        "initializer_range": cfg.init_std,
    }


def from_hf_llama_config(config: Mapping[str, Any]) -> ModelConfig:
    """A ModelConfig from a Llama config.json (transformers 4's rope_theta / rope_scaling or 5's
    rope_parameters)."""
    if config.get("model_type") != "llama":
        raise ValueError(f"model_type '{config.get('model_type')}' is not supported; llmctl imports 'llama'")
    if config.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act '{config['hidden_act']}' is not supported; llmctl's SwiGLU uses 'silu'")
    if config.get("attention_bias", False) != config.get("mlp_bias", False):
        raise ValueError("attention_bias and mlp_bias must agree: llmctl has one bias switch for all linears")
    rope = dict(config.get("rope_parameters") or {})
    theta = rope.pop("rope_theta", config.get("rope_theta", 10000.0))
    scaling = rope or config.get("rope_scaling")
    if scaling and scaling.get("rope_type", scaling.get("type")) == "default":
        scaling = None
    n_head = config["num_attention_heads"]
    if config.get("head_dim", config["hidden_size"] // n_head) * n_head != config["hidden_size"]:
        raise ValueError("Llama configs whose head_dim × heads differs from hidden_size are not supported")
    return ModelConfig(
        n_layer=config["num_hidden_layers"],
        n_head=n_head,
        n_kv_head=config.get("num_key_value_heads") or n_head,
        d_model=config["hidden_size"],
        d_ff=config["intermediate_size"],
        context_length=config["max_position_embeddings"],
        vocab_size=config["vocab_size"],
        bias=bool(config.get("attention_bias", False)),
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        rope_theta=theta,
        rope_scaling=scaling,
        norm_eps=config.get("rms_norm_eps", 1e-6),
        init_std=config.get("initializer_range", 0.02),
    )


def _require_llama_shape(cfg: ModelConfig) -> None:
    if (cfg.position, cfg.norm, cfg.mlp) != ("rope", "rmsnorm", "swiglu"):
        raise ValueError(
            "only the Llama shape (position: rope, norm: rmsnorm, mlp: swiglu) maps to LlamaForCausalLM; "
            f"this model has position: {cfg.position}, norm: {cfg.norm}, mlp: {cfg.mlp}"
        )
