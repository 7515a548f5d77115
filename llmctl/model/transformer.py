"""The decoder-only transformer: Llama-family names and math, with switches for the GPT-2 shape.

Parameter names match Hugging Face's Llama (`model.` prefix aside), so a Llama state dict loads
one to one; docs/model.md lists the shapes, the masks and the KV cache.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from llmctl.config import ModelConfig

# ---------------------------------------------------------------- norms


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # statistics in fp32 whatever the input dtype, then back, exactly as LlamaRMSNorm
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.d_model, cfg.norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)


# ---------------------------------------------------------------- rotary positions

# each supported rope_scaling type and the keys it needs (Hugging Face's names)
ROPE_SCALINGS = {
    "default": (),
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


def rope_scaling_type(cfg: ModelConfig) -> str:
    scaling = cfg.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in ROPE_SCALINGS:
        supported = ", ".join(ROPE_SCALINGS)
        raise ValueError(f"model.rope_scaling type '{kind}' is not supported; use one of {supported}")
    missing = [key for key in ROPE_SCALINGS[kind] if key not in scaling]
    if missing:
        raise ValueError(f"model.rope_scaling of type '{kind}' needs {', '.join(missing)}")
    return kind


def rope_inverse_frequencies(cfg: ModelConfig, device: torch.device | None = None) -> torch.Tensor:
    """[head_dim / 2] fp32 inverse frequencies, scaled as Hugging Face's rope init functions do."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim))
    kind = rope_scaling_type(cfg)
    if kind == "linear":
        return inv_freq / cfg.rope_scaling["factor"]
    if kind == "llama3":
        s = cfg.rope_scaling
        factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old_context = s["original_max_position_embeddings"]
        # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, the band between blended
        wavelength = 2 * math.pi / inv_freq
        scaled = torch.where(wavelength > old_context / low, inv_freq / factor, inv_freq)
        smooth = (old_context / wavelength - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        in_band = (wavelength >= old_context / high) & (wavelength <= old_context / low)
        return torch.where(in_band, blended, scaled)
    return inv_freq


class RopeTable:
    """fp32 cos and sin of every position's angles, computed once and indexed at each forward.

    Held outside the module's buffers, so a model built on the meta device or cast to bf16 never
    carries stale or rounded values; rebuilt when the model moves or needs more positions.
    """

    def __init__(self, cfg: ModelConfig):
        self.cfg = cfg
        self.cos = self.sin = None

    def __call__(self, position_ids: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [B or 1, 1, T, head_dim] for positions [B or 1, T], all below `length`."""
        device = position_ids.device
        if self.cos is None or self.cos.device != device or self.cos.shape[0] < length:
            # built as ordinary tensors even inside inference_mode, as training may index them later
            with torch.inference_mode(False):
                positions = torch.arange(length, device=device, dtype=torch.float32)
                freqs = positions[:, None] * rope_inverse_frequencies(self.cfg, device)
                angles = torch.cat((freqs, freqs), dim=-1)
                self.cos, self.sin = angles.cos(), angles.sin()
        return self.cos[position_ids][:, None], self.sin[position_ids][:, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # rotate_half pairs dimension i with i + head_dim/2 (Hugging Face's Llama layout, not interleaved)
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


# ---------------------------------------------------------------- KV cache


@dataclass
class KVCache:
    """Preallocated keys and values, one [B, n_kv_head, max_length, head_dim] pair per layer."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0]

    @property
    def max_length(self) -> int:
        return self.keys[0].shape[2]


# ---------------------------------------------------------------- blocks


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_head * cfg.head_dim, bias=cfg.bias)
        self.k_proj = nn.Linear(cfg.d_model, cfg.kv_heads * cfg.head_dim, bias=cfg.bias)
        self.v_proj = nn.Linear(cfg.d_model, cfg.kv_heads * cfg.head_dim, bias=cfg.bias)
        self.o_proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.d_model, bias=cfg.bias)
        self.dropout = cfg.dropout

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        mask: torch.Tensor | None,
        cache: tuple[torch.Tensor, torch.Tensor] | None,
        cache_position: int | torch.Tensor,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k_cache, v_cache = cache
            if isinstance(cache_position, torch.Tensor):  # one new token per row, each at its own position
                rows = torch.arange(B, device=x.device)
                k_cache[rows, :, cache_position] = k[:, :, 0].to(k_cache.dtype)
                v_cache[rows, :, cache_position] = v[:, :, 0].to(v_cache.dtype)
                end = mask.shape[-1]
            else:
                end = cache_position + T
                k_cache[:, :, cache_position:end] = k
                v_cache[:, :, cache_position:end] = v
            k, v = k_cache[:, :, :end].to(q.dtype), v_cache[:, :, :end].to(q.dtype)
        # Each key/value head serves n_head / n_kv_head consecutive query heads (HF's repeat_kv order).
        # Repeating them copies K/V, which in decoding means the whole cache at every token; SDPA's
        # enable_gqa shares them instead, but with a mask its fused GPU kernels fall back to the slow
        # math path, so heads are shared only when decoding without a mask and repeated otherwise.
        share_kv_heads = cache is not None and mask is None
        if self.n_kv_head != self.n_head and not share_kv_heads:
            k = k.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
            v = v.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=mask is None and cache is None,
            enable_gqa=share_kv_heads,
        )
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))


class SwiGLU(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.ff_dim, bias=cfg.bias)
        self.up_proj = nn.Linear(cfg.d_model, cfg.ff_dim, bias=cfg.bias)
        self.down_proj = nn.Linear(cfg.ff_dim, cfg.d_model, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class GELUMLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.up_proj = nn.Linear(cfg.d_model, cfg.ff_dim, bias=cfg.bias)
        self.down_proj = nn.Linear(cfg.ff_dim, cfg.d_model, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.up_proj(x), approximate="tanh"))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = make_norm(cfg)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = make_norm(cfg)
        self.mlp = SwiGLU(cfg) if cfg.mlp == "swiglu" else GELUMLP(cfg)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        mask: torch.Tensor | None,
        cache: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache_position: int | torch.Tensor = 0,
    ) -> torch.Tensor:
        x = x + self.resid_dropout(self.self_attn(self.input_layernorm(x), rope, mask, cache, cache_position))
        return x + self.resid_dropout(self.mlp(self.post_attention_layernorm(x)))


# ---------------------------------------------------------------- the model


def document_starts(doc_ids: torch.Tensor) -> torch.Tensor:
    """True where a document begins: a document is a run of equal ids, so an id may recur later."""
    first = torch.ones_like(doc_ids[:, :1], dtype=torch.bool)
    return torch.cat((first, doc_ids[:, 1:] != doc_ids[:, :-1]), dim=1)


def document_positions(doc_ids: torch.Tensor) -> torch.Tensor:
    """Each token's position within its document."""
    index = torch.arange(doc_ids.shape[1], device=doc_ids.device).expand_as(doc_ids)
    start_index = torch.where(document_starts(doc_ids), index, 0).cummax(dim=1).values
    return index - start_index


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        rope_scaling_type(cfg)  # refuse an unsupported scaling now rather than at the first forward
        self.embed_tokens = nn.Embedding(cfg.padded_vocab_size, cfg.d_model)
        if cfg.position == "learned":
            self.embed_positions = nn.Embedding(cfg.context_length, cfg.d_model)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.n_layer))
        self.norm = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.padded_vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.gradient_checkpointing = False
        self.rope = RopeTable(cfg)

        self.apply(self._init_weights)
        # GPT-2's scaled init: each layer adds two residual branches, so their outputs shrink with depth
        residual_std = cfg.init_std / math.sqrt(2 * cfg.n_layer)
        for layer in self.layers:
            nn.init.normal_(layer.self_attn.o_proj.weight, std=residual_std)
            nn.init.normal_(layer.mlp.down_proj.weight, std=residual_std)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=self.cfg.init_std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=self.cfg.init_std)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """As nn.Module's, keeping a tied lm_head tied: it may be left out of the state dict (as
        safetensors files store shared tensors once), and assign=True (loading into a meta-device
        model) would otherwise give it a Parameter of its own."""
        tied = self.cfg.tie_embeddings
        if tied and "lm_head.weight" not in state_dict and "embed_tokens.weight" in state_dict:
            state_dict = {**state_dict, "lm_head.weight": state_dict["embed_tokens.weight"]}
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        if tied:
            self.lm_head.weight = self.embed_tokens.weight
        return result

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def new_kv_cache(
        self,
        batch_size: int,
        max_length: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> KVCache:
        cfg = self.cfg
        weight = self.embed_tokens.weight
        shape = (batch_size, cfg.kv_heads, max_length or cfg.context_length, cfg.head_dim)
        options = {"device": device or weight.device, "dtype": dtype or weight.dtype}
        return KVCache(
            keys=[torch.zeros(shape, **options) for _ in range(cfg.n_layer)],
            values=[torch.zeros(shape, **options) for _ in range(cfg.n_layer)],
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        position_ids: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        cache_position: int = 0,
    ) -> torch.Tensor:
        """Logits [B, T, vocab_size] for token ids [B, T] (the padded vocabulary rows sliced off)."""
        hidden = self.hidden_states(
            input_ids,
            position_ids=position_ids,
            doc_ids=doc_ids,
            attn_mask=attn_mask,
            kv_cache=kv_cache,
            cache_position=cache_position,
        )
        return self.logits(hidden)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)[..., : self.cfg.vocab_size]

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        *,
        position_ids: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        cache_position: int | torch.Tensor = 0,
    ) -> torch.Tensor:
        """[B, T, d_model] after the final norm. See docs/model.md for the arguments; a tensor
        `cache_position` [B] decodes one token per row, each row at its own position."""
        T = input_ids.shape[1]
        device = input_ids.device
        if isinstance(cache_position, torch.Tensor):
            return self._decode_rows(input_ids, cache_position, kv_cache)
        if kv_cache is not None:
            if doc_ids is not None:
                raise ValueError("doc_ids (packed training sequences) cannot be combined with a KV cache")
            if cache_position + T > kv_cache.max_length:
                raise ValueError(
                    f"KV cache holds {kv_cache.max_length} positions; "
                    f"cannot write {T} more at position {cache_position}"
                )
        if position_ids is None:
            if doc_ids is not None:
                position_ids = document_positions(doc_ids)
            else:
                position_ids = (cache_position + torch.arange(T, device=device))[None]
        mask = self._attention_mask(T, cache_position, doc_ids, attn_mask, kv_cache is not None, device)
        return self._layers(input_ids, position_ids, mask, kv_cache, cache_position, cache_position + T)

    def _decode_rows(
        self, input_ids: torch.Tensor, positions: torch.Tensor, kv_cache: KVCache | None
    ) -> torch.Tensor:
        """One token per row at `positions` [B]: each row attends to its own first positions."""
        if kv_cache is None or input_ids.shape[1] != 1:
            raise ValueError("per-row cache positions decode one token per row into a KV cache")
        end = int(positions.max()) + 1
        if end > kv_cache.max_length:
            raise ValueError(f"KV cache holds {kv_cache.max_length} positions; cannot write at {end - 1}")
        keys = torch.arange(end, device=input_ids.device)
        mask = (keys[None, :] <= positions[:, None])[:, None, None, :]
        return self._layers(input_ids, positions[:, None], mask, kv_cache, positions, end)

    def _layers(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        mask: torch.Tensor | None,
        kv_cache: KVCache | None,
        cache_position: int | torch.Tensor,
        end: int,
    ) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        rope = None
        if self.cfg.position == "learned":
            x = x + self.embed_positions(position_ids)
        else:
            # a position never exceeds its column (padding and packing only restart it lower)
            rope = self.rope(position_ids, max(self.cfg.context_length, end))

        caches = [None] * len(self.layers)
        if kv_cache is not None:
            caches = list(zip(kv_cache.keys, kv_cache.values, strict=True))
        for layer, cache in zip(self.layers, caches, strict=True):
            if self.gradient_checkpointing and self.training:
                x = checkpoint(layer, x, rope, mask, cache, cache_position, use_reentrant=False)
            else:
                x = layer(x, rope, mask, cache, cache_position)
        return self.norm(x)

    @staticmethod
    def _attention_mask(
        T: int,
        cache_position: int,
        doc_ids: torch.Tensor | None,
        attn_mask: torch.Tensor | None,
        use_cache: bool,
        device: torch.device,
    ) -> torch.Tensor | None:
        """Boolean mask broadcastable to [B, 1, T, S] (True = may attend), or None where SDPA's own
        causal path (no cache) or full attention (one new token over the cache) is already exact."""
        if doc_ids is None and attn_mask is None and (not use_cache or T == 1):
            return None
        query_pos = cache_position + torch.arange(T, device=device)[:, None]
        key_pos = torch.arange(cache_position + T, device=device)[None]
        mask = key_pos <= query_pos
        if doc_ids is not None:
            document = document_starts(doc_ids).cumsum(dim=1)
            mask = (mask & (document[:, :, None] == document[:, None, :]))[:, None]
        if attn_mask is not None:
            # a query allowed no key (a left-pad position) would turn softmax into NaN, and 0 · NaN
            # in later layers would spread it to real tokens; letting every query see itself keeps it finite
            mask = (mask & attn_mask) | (key_pos == query_pos)
        return mask
