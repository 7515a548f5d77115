"""A Transformer as llama.cpp lays it out: the architecture, its hyperparameter keys and its tensors.

    the Llama shape (RoPE, RMSNorm, SwiGLU)                -> llama.cpp's `llama` architecture
    the GPT-2 shape (learned positions, LayerNorm, GELU)   -> llama.cpp's `gpt2` architecture

Anything between the two (RoPE with LayerNorm, GELU without biases, ...) has no architecture in
llama.cpp that computes the same function, and is refused by name.

llama.cpp's `llama` rotates interleaved pairs (dimensions 2i, 2i+1) where llmctl, like Hugging
Face's Llama, pairs i with i + head_dim/2. Reordering the rows of the query and key projections
head by head turns one layout into the other, so the attention scores are the same.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from llmctl.config import ModelConfig
from llmctl.errors import UsageError
from llmctl.model.transformer import Transformer, rope_inverse_frequencies, rope_scaling_type

# --quant -> (the type of matrices, the type of the vocabulary matrices, llama.cpp's file type name)
QUANTS = {
    "f32": ("F32", "F32", "ALL_F32"),
    "f16": ("F16", "F16", "MOSTLY_F16"),
    "bf16": ("BF16", "BF16", "MOSTLY_BF16"),
    "q8_0": ("Q8_0", "Q8_0", "MOSTLY_Q8_0"),
    # as llama.cpp's own quantizer does, the embedding and output matrices keep more bits
    "q4_0": ("Q4_0", "Q8_0", "MOSTLY_Q4_0"),
}
# llama.cpp types gguf's writer can read but not produce (their quantizers live in C only)
UNWRITABLE_QUANTS = ("q4_k", "q4_k_m", "q4_k_s", "q5_k", "q5_k_m", "q6_k", "q2_k", "q3_k", "iq4_nl")
VOCAB_TENSORS = ("token_embd.weight", "output.weight")


@dataclass
class GGUFTensor:
    name: str
    data: np.ndarray  # already in its GGUF type (uint8 bytes for block and bf16 types)
    gguf_type: str  # a GGMLQuantizationType name
    elements: int


def check_quant(quant: str) -> str:
    quant = quant.lower()
    if quant in QUANTS:
        return quant
    if quant in UNWRITABLE_QUANTS:
        raise UsageError(
            f"--quant {quant} is not supported: the gguf package's writer cannot quantize to "
            f"k-quants; use {', '.join(QUANTS)} (or llama.cpp's llama-quantize on an f16 export)"
        )
    raise UsageError(f"unknown --quant '{quant}'; use {', '.join(QUANTS)}")


def gguf_architecture(cfg: ModelConfig) -> str:
    """`llama` or `gpt2`, or a UsageError naming what llama.cpp cannot represent."""
    shape = (cfg.position, cfg.norm, cfg.mlp)
    if shape == ("rope", "rmsnorm", "swiglu"):
        rope_scaling_type(cfg)
        return "llama"
    if shape == ("learned", "layernorm", "gelu") and cfg.bias and cfg.kv_heads == cfg.n_head:
        return "gpt2"
    raise UsageError(
        "this model has no llama.cpp architecture to export to: GGUF export takes the Llama shape "
        "(position: rope, norm: rmsnorm, mlp: swiglu) or the GPT-2 shape (position: learned, "
        "norm: layernorm, mlp: gelu, bias: true, no grouped-query attention); this one has "
        f"position: {cfg.position}, norm: {cfg.norm}, mlp: {cfg.mlp}, bias: {str(cfg.bias).lower()}, "
        f"{cfg.n_head} query / {cfg.kv_heads} key-value heads"
    )


def add_hyperparameters(writer, cfg: ModelConfig, architecture: str, quant: str) -> None:
    """Every key llama.cpp reads for the architecture (gguf prefixes them with its name)."""
    import gguf

    writer.add_context_length(cfg.context_length)
    writer.add_embedding_length(cfg.d_model)
    writer.add_block_count(cfg.n_layer)
    writer.add_feed_forward_length(cfg.ff_dim)
    writer.add_head_count(cfg.n_head)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(gguf.LlamaFileType[QUANTS[quant][2]])
    if architecture == "gpt2":
        writer.add_layer_norm_eps(cfg.norm_eps)
        return
    writer.add_head_count_kv(cfg.kv_heads)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    if rope_scaling_type(cfg) == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(cfg.rope_scaling["factor"]))


def gguf_tensors(model: Transformer, architecture: str, quant: str) -> Iterator[GGUFTensor]:
    """The model's tensors under llama.cpp's names and layout, in the types `quant` asks for; the
    vocabulary matrices lose the rows llmctl pads them with, which are no tokens."""
    named = llama_tensors(model) if architecture == "llama" else gpt2_tensors(model)
    for name, tensor in named:
        if name in VOCAB_TENSORS:
            tensor = tensor[: model.cfg.vocab_size]
        yield encode_tensor(name, tensor.detach().float().contiguous().numpy(), quant)


def encode_tensor(name: str, array: np.ndarray, quant: str) -> GGUFTensor:
    """One tensor in its GGUF type: vectors (norms, biases, rope factors) stay f32, as llama.cpp
    computes them in f32; a matrix whose rows do not split into the type's blocks falls back to f16."""
    import gguf
    from gguf.quants import quantize

    matrix_type, vocab_type, _ = QUANTS[quant]
    wanted = vocab_type if name in VOCAB_TENSORS else matrix_type
    if array.ndim < 2 or wanted == "F32":
        return GGUFTensor(name, array.astype(np.float32), "F32", array.size)
    qtype = gguf.GGMLQuantizationType[wanted]
    if wanted == "F16" or array.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
        return GGUFTensor(name, array.astype(np.float16), "F16", array.size)
    return GGUFTensor(name, quantize(array, qtype), wanted, array.size)


def interleave_rope_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of a query or key projection (or its bias) reordered so each head's rotary pairs go from
    (i, i + head_dim/2) to (2i, 2i + 1)."""
    half = weight.shape[0] // heads // 2
    return weight.reshape(heads, 2, half, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def llama_tensors(model: Transformer) -> Iterator[tuple[str, torch.Tensor]]:
    cfg, state = model.cfg, model.state_dict()
    yield "token_embd.weight", state["embed_tokens.weight"]
    yield "output_norm.weight", state["norm.weight"]
    if not cfg.tie_embeddings:
        yield "output.weight", state["lm_head.weight"]
    if rope_scaling_type(cfg) == "llama3":
        # llama.cpp divides each rotary frequency by its factor: unscaled over scaled frequencies
        unscaled = rope_inverse_frequencies(cfg.model_copy(update={"rope_scaling": None}))
        yield "rope_freqs.weight", unscaled / rope_inverse_frequencies(cfg)
    names = {
        "input_layernorm": "attn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "post_attention_layernorm": "ffn_norm",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    heads = {"self_attn.q_proj": cfg.n_head, "self_attn.k_proj": cfg.kv_heads}
    for i in range(cfg.n_layer):
        for ours, theirs in names.items():
            for kind in ("weight", "bias"):
                tensor = state.get(f"layers.{i}.{ours}.{kind}")
                if tensor is None:
                    continue
                if ours in heads:
                    tensor = interleave_rope_rows(tensor, heads[ours])
                yield f"blk.{i}.{theirs}.{kind}", tensor


def gpt2_tensors(model: Transformer) -> Iterator[tuple[str, torch.Tensor]]:
    cfg, state = model.cfg, model.state_dict()
    yield "token_embd.weight", state["embed_tokens.weight"]
    yield "position_embd.weight", state["embed_positions.weight"]
    for kind in ("weight", "bias"):
        yield f"output_norm.{kind}", state[f"norm.{kind}"]
    if not cfg.tie_embeddings:
        yield "output.weight", state["lm_head.weight"]
    names = {
        "input_layernorm": "attn_norm",
        "self_attn.o_proj": "attn_output",
        "post_attention_layernorm": "ffn_norm",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    for i in range(cfg.n_layer):
        layer = f"layers.{i}"
        for kind in ("weight", "bias"):
            # one fused projection: the query rows, then the key rows, then the value rows
            qkv = [state[f"{layer}.self_attn.{proj}.{kind}"] for proj in ("q_proj", "k_proj", "v_proj")]
            yield f"blk.{i}.attn_qkv.{kind}", torch.cat(qkv)
            for ours, theirs in names.items():
                yield f"blk.{i}.{theirs}.{kind}", state[f"{layer}.{ours}.{kind}"]
