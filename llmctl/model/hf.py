"""Hugging Face checkpoints and ours.

Llama: the same names, so no per-layer table. A Llama state dict differs from ours only by the
`model.` prefix on everything but `lm_head` and by our vocabulary being padded to a multiple of
64 rows. GPT-2 (our GPT-2 shape) needs its own names: one fused `c_attn` for q, k and v, and
Conv1D weights stored [in, out] where nn.Linear stores [out, in]. Configs map field by field.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from llmctl.config import ModelConfig

VOCAB_ROWS = ("embed_tokens.weight", "lm_head.weight")
StateDict = Mapping[str, torch.Tensor]

# ---------------------------------------------------------------- Llama


def from_hf_llama_state_dict(state_dict: StateDict, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """An HF LlamaForCausalLM state dict as one `Transformer(cfg).load_state_dict` accepts."""
    ours = {}
    for name, tensor in state_dict.items():
        name = name.removeprefix("model.")
        if name.endswith("rotary_emb.inv_freq"):  # older transformers saved this buffer
            continue
        ours[name] = _pad_vocab(tensor, cfg) if name in VOCAB_ROWS else tensor
    if cfg.tie_embeddings and "embed_tokens.weight" in ours:  # a shard without it ties nothing
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
    if (config.get("head_dim") or config["hidden_size"] // n_head) * n_head != config["hidden_size"]:
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


# ---------------------------------------------------------------- GPT-2

GPT2_LAYER_NAMES = {  # ours -> GPT-2's, inside layers.N / transformer.h.N
    "input_layernorm": "ln_1",
    "self_attn.o_proj": "attn.c_proj",
    "post_attention_layernorm": "ln_2",
    "mlp.up_proj": "mlp.c_fc",
    "mlp.down_proj": "mlp.c_proj",
}
QKV = ("q_proj", "k_proj", "v_proj")


def _gpt2_names(cfg: ModelConfig) -> dict[str, str]:
    """Our name -> GPT-2's for every tensor but q/k/v (fused there) and lm_head (unprefixed)."""
    names = {"embed_positions.weight": "transformer.wpe.weight"}
    names |= {f"norm.{kind}": f"transformer.ln_f.{kind}" for kind in ("weight", "bias")}
    for i in range(cfg.n_layer):
        for ours, theirs in GPT2_LAYER_NAMES.items():
            for kind in ("weight", "bias"):
                names[f"layers.{i}.{ours}.{kind}"] = f"transformer.h.{i}.{theirs}.{kind}"
    return names


def _is_conv1d(our_name: str) -> bool:
    # GPT-2's Conv1D stores [in, out], the transpose of nn.Linear's [out, in]
    return our_name.endswith("_proj.weight")


def from_hf_gpt2_state_dict(state_dict: StateDict, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """An HF GPT2LMHeadModel state dict as one `Transformer(cfg).load_state_dict` accepts."""
    _require_gpt2_shape(cfg)
    ours = {}
    for our_name, hf_name in _gpt2_names(cfg).items():
        tensor = state_dict[hf_name]
        ours[our_name] = tensor.t() if _is_conv1d(our_name) else tensor
    for i in range(cfg.n_layer):
        fused = f"transformer.h.{i}.attn.c_attn"
        weights = state_dict[f"{fused}.weight"].t().chunk(3, dim=0)
        biases = state_dict[f"{fused}.bias"].chunk(3)
        for proj, weight, bias in zip(QKV, weights, biases, strict=True):
            ours[f"layers.{i}.self_attn.{proj}.weight"] = weight
            ours[f"layers.{i}.self_attn.{proj}.bias"] = bias
    ours["embed_tokens.weight"] = _pad_vocab(state_dict["transformer.wte.weight"], cfg)
    if cfg.tie_embeddings:
        ours["lm_head.weight"] = ours["embed_tokens.weight"]
    else:
        ours["lm_head.weight"] = _pad_vocab(state_dict["lm_head.weight"], cfg)
    return ours


def to_hf_gpt2_state_dict(state_dict: StateDict, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our GPT-2-shaped state dict as GPT2LMHeadModel names it; a tied lm_head is left out."""
    _require_gpt2_shape(cfg)
    hf = {}
    for our_name, hf_name in _gpt2_names(cfg).items():
        tensor = state_dict[our_name]
        hf[hf_name] = tensor.t().contiguous() if _is_conv1d(our_name) else tensor
    for i in range(cfg.n_layer):
        attn = f"layers.{i}.self_attn"
        fused = f"transformer.h.{i}.attn.c_attn"
        hf[f"{fused}.weight"] = torch.cat([state_dict[f"{attn}.{p}.weight"] for p in QKV]).t().contiguous()
        hf[f"{fused}.bias"] = torch.cat([state_dict[f"{attn}.{p}.bias"] for p in QKV])
    hf["transformer.wte.weight"] = state_dict["embed_tokens.weight"][: cfg.vocab_size]
    if not cfg.tie_embeddings:
        hf["lm_head.weight"] = state_dict["lm_head.weight"][: cfg.vocab_size]
    return hf


def to_hf_gpt2_config(cfg: ModelConfig) -> dict[str, Any]:
    """config.json fields for GPT2LMHeadModel (no dropout: exports are for inference)."""
    _require_gpt2_shape(cfg)
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.context_length,
        "n_embd": cfg.d_model,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_inner": cfg.ff_dim,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "initializer_range": cfg.init_std,
    }


def from_hf_gpt2_config(config: Mapping[str, Any]) -> ModelConfig:
    if config.get("model_type") != "gpt2":
        raise ValueError(f"model_type '{config.get('model_type')}' is not GPT-2")
    if config.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        act = config["activation_function"]
        raise ValueError(f"activation_function '{act}' is not supported; GPT-2's is gelu_new")
    if config.get("scale_attn_by_inverse_layer_idx") or config.get("reorder_and_upcast_attn"):
        raise ValueError("GPT-2 variants with per-layer attention scaling or reordering are not supported")
    return ModelConfig(
        n_layer=config["n_layer"],
        n_head=config["n_head"],
        d_model=config["n_embd"],
        d_ff=config.get("n_inner"),
        context_length=config["n_positions"],
        vocab_size=config["vocab_size"],
        position="learned",
        norm="layernorm",
        mlp="gelu",
        bias=True,
        tie_embeddings=bool(config.get("tie_word_embeddings", True)),
        norm_eps=config.get("layer_norm_epsilon", 1e-5),
        init_std=config.get("initializer_range", 0.02),
    )


def _pad_vocab(tensor: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    return F.pad(tensor, (0, 0, 0, cfg.padded_vocab_size - tensor.shape[0]))


def _require_gpt2_shape(cfg: ModelConfig) -> None:
    shape = (cfg.position, cfg.norm, cfg.mlp, cfg.bias, cfg.kv_heads == cfg.n_head)
    if shape != ("learned", "layernorm", "gelu", True, True):
        raise ValueError(
            "only the GPT-2 shape (position: learned, norm: layernorm, mlp: gelu, bias: true, "
            "no grouped-query attention) maps to GPT2LMHeadModel"
        )


def _require_llama_shape(cfg: ModelConfig) -> None:
    if (cfg.position, cfg.norm, cfg.mlp) != ("rope", "rmsnorm", "swiglu"):
        raise ValueError(
            "only the Llama shape (position: rope, norm: rmsnorm, mlp: swiglu) maps to LlamaForCausalLM; "
            f"this model has position: {cfg.position}, norm: {cfg.norm}, mlp: {cfg.mlp}"
        )
