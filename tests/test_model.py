"""The transformer: sizes, masks, the KV cache, packing, training and the Hugging Face contract."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llmctl.config import ModelConfig, preset_names, resolve_config
from llmctl.model.hf import (
    from_hf_gpt2_config,
    from_hf_gpt2_state_dict,
    from_hf_llama_config,
    from_hf_llama_state_dict,
    to_hf_gpt2_config,
    to_hf_gpt2_state_dict,
    to_hf_llama_config,
    to_hf_llama_state_dict,
)
from llmctl.model.sizing import count_parameters
from llmctl.model.transformer import Transformer, document_positions

TOL = 1e-5

SHAPES = {
    "llama": {},
    "gqa": {"n_kv_head": 2, "tie_embeddings": False, "rope_theta": 500000.0},
    "llama3-scaling": {
        "n_kv_head": 1,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    },
    "gpt2": {"position": "learned", "norm": "layernorm", "mlp": "gelu", "bias": True},
}


def tiny(**overrides) -> ModelConfig:
    fields = {"n_layer": 2, "n_head": 4, "d_model": 32, "context_length": 64, "vocab_size": 100}
    return ModelConfig(**(fields | overrides))


def build(cfg: ModelConfig, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(cfg).eval()


def tokens(*shape: int, seed: int = 1, vocab: int = 100) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def close(a: torch.Tensor, b: torch.Tensor, tol: float = TOL) -> bool:
    return (a - b).abs().max().item() < tol


# ---------------------------------------------------------------- sizes and names


@pytest.mark.parametrize("preset", preset_names())
def test_parameter_count_equals_sizing_for_every_preset(preset: str):
    cfg = resolve_config(preset=preset).model
    with torch.device("meta"):
        model = Transformer(cfg)
    assert model.num_parameters() == count_parameters(cfg)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bias", [False, True])
def test_parameter_count_equals_sizing_for_variants(shape: str, bias: bool):
    cfg = tiny(**(SHAPES[shape] | {"bias": bias}))
    assert Transformer(cfg).num_parameters() == count_parameters(cfg)


def test_gpt2_124m_has_gpt2_size_and_vocabulary():
    cfg = resolve_config(preset="gpt2-124m").model
    with torch.device("meta"):
        model = Transformer(cfg)
    assert 123.5e6 < model.num_parameters() < 125e6
    assert cfg.vocab_size == 50257 and model.embed_tokens.num_embeddings == 50304
    assert model.embed_positions.num_embeddings == 1024


def test_names_follow_the_llama_family():
    names = set(build(tiny(n_kv_head=2, tie_embeddings=False)).state_dict())
    assert {
        "embed_tokens.weight",
        "norm.weight",
        "lm_head.weight",
        "layers.1.input_layernorm.weight",
        "layers.1.post_attention_layernorm.weight",
        "layers.1.self_attn.q_proj.weight",
        "layers.1.self_attn.k_proj.weight",
        "layers.1.self_attn.v_proj.weight",
        "layers.1.self_attn.o_proj.weight",
        "layers.1.mlp.gate_proj.weight",
        "layers.1.mlp.up_proj.weight",
        "layers.1.mlp.down_proj.weight",
    } <= names
    assert not any("rotary" in name or "inv_freq" in name for name in names)
    gpt2 = set(build(tiny(**SHAPES["gpt2"])).state_dict())
    assert {"embed_positions.weight", "layers.0.mlp.up_proj.bias", "layers.0.input_layernorm.bias"} <= gpt2
    assert not any("gate_proj" in name for name in gpt2)


def test_logits_slice_off_the_padded_vocabulary():
    model = build(tiny())
    assert model.lm_head.out_features == 128
    assert model(tokens(2, 9)).shape == (2, 9, 100)
    assert model.hidden_states(tokens(2, 9)).shape == (2, 9, 32)


def test_tied_embeddings_share_storage_and_untied_do_not():
    tied = build(tiny())
    assert tied.lm_head.weight is tied.embed_tokens.weight
    assert tied.lm_head.weight.data_ptr() == tied.embed_tokens.weight.data_ptr()
    untied = build(tiny(tie_embeddings=False))
    assert untied.lm_head.weight.data_ptr() != untied.embed_tokens.weight.data_ptr()


def test_loading_a_tied_checkpoint_into_a_meta_model_keeps_the_tie():
    cfg = tiny()
    state = {name: tensor.clone() for name, tensor in build(cfg).state_dict().items()}
    del state["lm_head.weight"]  # as a safetensors file stores it: once, under embed_tokens
    with torch.device("meta"):
        model = Transformer(cfg)
    model.load_state_dict(state, assign=True)
    assert model.lm_head.weight is model.embed_tokens.weight
    assert model.num_parameters() == count_parameters(cfg)
    assert close(model(tokens(1, 6)), build(cfg)(tokens(1, 6)))


def test_initialisation():
    cfg = tiny(n_layer=8, d_model=256, bias=True, init_std=0.02)
    model = build(cfg)
    layer = model.layers[3]
    assert layer.self_attn.q_proj.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert layer.self_attn.o_proj.weight.std().item() == pytest.approx(0.02 / 4, rel=0.05)
    assert layer.mlp.down_proj.weight.std().item() == pytest.approx(0.02 / 4, rel=0.05)
    assert model.embed_tokens.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert torch.all(layer.self_attn.q_proj.bias == 0) and torch.all(layer.mlp.up_proj.bias == 0)
    assert torch.all(layer.input_layernorm.weight == 1) and torch.all(model.norm.weight == 1)


def test_unsupported_or_incomplete_rope_scaling_is_refused():
    with pytest.raises(ValueError, match="'yarn' is not supported"):
        Transformer(tiny(rope_scaling={"rope_type": "yarn", "factor": 4.0}))
    with pytest.raises(ValueError, match="needs high_freq_factor, original_max_position_embeddings"):
        Transformer(tiny(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0}))


# ---------------------------------------------------------------- causality and the KV cache


@pytest.mark.parametrize("shape", SHAPES)
def test_changing_a_later_token_never_changes_earlier_logits(shape: str):
    model = build(tiny(**SHAPES[shape]))
    ids = tokens(2, 12)
    edited = ids.clone()
    edited[:, 7] = (edited[:, 7] + 1) % 100
    before, after = model(ids), model(edited)
    assert close(before[:, :7], after[:, :7])
    assert not close(before[:, 7:], after[:, 7:], 1e-3)


@pytest.mark.parametrize("shape", SHAPES)
def test_kv_cache_prefill_and_decode_equal_the_full_forward(shape: str):
    model = build(tiny(**SHAPES[shape]))
    ids = tokens(2, 14)
    full = model(ids)
    cache = model.new_kv_cache(2, 20)
    pieces = [model(ids[:, :6], kv_cache=cache)]
    for t in range(6, 11):  # one token at a time
        pieces.append(model(ids[:, t : t + 1], kv_cache=cache, cache_position=t))
    pieces.append(model(ids[:, 11:], kv_cache=cache, cache_position=11))  # a block of three: causal inside
    assert close(torch.cat(pieces, dim=1), full)


def test_decoding_reads_the_prefix_from_the_cache_instead_of_recomputing_it():
    model = build(tiny(n_kv_head=2))
    ids = tokens(1, 8)
    cache = model.new_kv_cache(1, 8)
    model(ids[:, :7], kv_cache=cache)
    assert cache.keys[0].shape == (1, 2, 8, 8) and torch.all(cache.keys[0][:, :, 7] == 0)
    # scribbling over the cached prefix changes the next token's logits: they come from the cache
    honest = model(ids[:, 7:], kv_cache=cache, cache_position=7)
    cache.values[1][:, :, :7] = 0
    assert not close(model(ids[:, 7:], kv_cache=cache, cache_position=7), honest, 1e-3)


def test_kv_cache_overflow_is_an_error():
    model = build(tiny())
    cache = model.new_kv_cache(1, 8)
    with pytest.raises(ValueError, match="holds 8 positions"):
        model(tokens(1, 4), kv_cache=cache, cache_position=6)


# ---------------------------------------------------------------- packing and padding


def test_document_positions_restart_at_each_document():
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2], [5, 5, 5, 5, 5, 5, 5, 5, 7]])
    assert document_positions(doc_ids).tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 6, 7, 0]]


@pytest.mark.parametrize("shape", SHAPES)
def test_packed_documents_do_not_attend_to_each_other(shape: str):
    model = build(tiny(**SHAPES[shape]))
    first, second = tokens(1, 5, seed=2), tokens(1, 7, seed=3)
    doc_ids = torch.tensor([[0] * 5 + [1] * 7])
    packed = model(torch.cat((first, second), dim=1), doc_ids=doc_ids)
    assert close(packed[:, :5], model(first))
    assert close(packed[:, 5:], model(second))
    other_first = (first + 1) % 100
    repacked = model(torch.cat((other_first, second), dim=1), doc_ids=doc_ids)
    assert close(repacked[:, 5:], packed[:, 5:])
    assert not close(repacked[:, :5], packed[:, :5], 1e-3)


def test_a_document_is_a_run_of_equal_ids_even_when_an_id_recurs():
    model = build(tiny(n_kv_head=2))
    first, second, third = tokens(1, 4, seed=2), tokens(1, 3, seed=3), tokens(1, 5, seed=4)
    doc_ids = torch.tensor([[0] * 4 + [1] * 3 + [0] * 5])
    packed = model(torch.cat((first, second, third), dim=1), doc_ids=doc_ids)
    assert close(packed[:, 7:], model(third))


@pytest.mark.parametrize("shape", SHAPES)
def test_left_padded_batch_matches_each_sequence_alone(shape: str):
    model = build(tiny(**SHAPES[shape]))
    short, long = tokens(1, 4, seed=4), tokens(1, 7, seed=5)
    pad = 3
    ids = torch.cat((torch.cat((torch.full((1, pad), 0), short), dim=1), long))
    real = torch.ones(2, 7, dtype=torch.bool)
    real[0, :pad] = False
    position_ids = (real.cumsum(-1) - 1).clamp(min=0)
    key_mask = real[:, None, None, :]  # [B, 1, 1, S]: the causal part is added by the model

    logits = model(ids, position_ids=position_ids, attn_mask=key_mask)
    assert close(logits[0, pad:], model(short)[0])
    assert close(logits[1], model(long)[0])

    # and generation on: prefill the padded batch into a cache, then decode one token per row
    cache = model.new_kv_cache(2, 10)
    model(ids, position_ids=position_ids, attn_mask=key_mask, kv_cache=cache)
    step = tokens(2, 1, seed=6)
    real = torch.cat((real, torch.ones(2, 1, dtype=torch.bool)), dim=1)
    decoded = model(
        step,
        position_ids=position_ids[:, -1:] + 1,
        attn_mask=real[:, None, None, :],
        kv_cache=cache,
        cache_position=7,
    )
    assert close(decoded[0, 0], model(torch.cat((short, step[:1]), dim=1))[0, -1])
    assert close(decoded[1, 0], model(torch.cat((long, step[1:]), dim=1))[0, -1])


def test_full_masks_are_used_as_given():
    model = build(tiny(n_kv_head=2))
    ids = tokens(2, 9)
    causal = torch.ones(9, 9, dtype=torch.bool).tril()
    assert close(model(ids, attn_mask=causal), model(ids))


# ---------------------------------------------------------------- training


def test_a_tiny_model_overfits_a_fixed_batch():
    torch.manual_seed(0)
    model = Transformer(tiny(n_kv_head=2)).train()
    batch = tokens(4, 33, seed=7)
    inputs, targets = batch[:, :-1], batch[:, 1:]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    losses = []
    for _ in range(50):
        loss = F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(4.6, abs=0.3)  # ln(100): a fresh model knows nothing
    assert losses[-1] < 0.1 * losses[0]


def test_gradient_checkpointing_gives_the_same_gradients():
    cfg = tiny(n_kv_head=2, dropout=0.1)
    ids = tokens(2, 16)
    grads = []
    for checkpointing in (False, True):
        model = build(cfg).train()
        model.gradient_checkpointing = checkpointing
        torch.manual_seed(5)
        F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten()).backward()
        grads.append({name: p.grad for name, p in model.named_parameters()})
    for name, grad in grads[0].items():
        assert torch.allclose(grad, grads[1][name], atol=1e-6), name


def test_bf16_autocast_runs_training_packing_and_the_cache():
    model = build(tiny(n_kv_head=2))
    ids = tokens(2, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model.train()
        logits = model(ids, doc_ids=torch.tensor([[0] * 5 + [1] * 7] * 2))
        F.cross_entropy(logits.float().flatten(0, 1), ids.flatten()).backward()
        model.eval()
        cache = model.new_kv_cache(2, 16)  # fp32 cache under bf16 compute: read back as bf16
        prefill = model(ids[:, :8], kv_cache=cache)
        cached = torch.cat((prefill, model(ids[:, 8:9], kv_cache=cache, cache_position=8)), dim=1)
        full = model(ids[:, :9])
    assert logits.dtype == torch.bfloat16
    assert close(cached.float(), full.float(), 0.05)


def test_peft_lora_wraps_the_attention_projections():
    peft = pytest.importorskip("peft")
    model = build(tiny(n_kv_head=2))
    ids = tokens(1, 8)
    base = model(ids)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=targets))
    trainable = {name for name, p in lora.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    assert any(name.endswith("layers.1.self_attn.v_proj.lora_A.default.weight") for name in trainable)
    assert close(lora(ids), base)  # B starts at zero: the adapter is a no-op until trained


# ---------------------------------------------------------------- the Hugging Face contract

HF_SCALINGS = {
    "none": None,
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16,
    },
    "linear": {"rope_type": "linear", "factor": 2.0},
}


def hf_llama(transformers, scaling: str, tied: bool = False):
    rope = {"rope_type": "default"} | (HF_SCALINGS[scaling] or {})
    config = transformers.LlamaConfig(
        vocab_size=100,
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        tie_word_embeddings=tied,
        rope_parameters=rope | {"rope_theta": 500000.0},
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("scaling", HF_SCALINGS)
def test_hugging_face_llama_weights_load_by_prefix_strip_and_give_the_same_logits(scaling: str):
    transformers = pytest.importorskip("transformers")
    hf = hf_llama(transformers, scaling)
    cfg = from_hf_llama_config(hf.config.to_dict())
    assert (cfg.n_kv_head, cfg.rope_theta, cfg.rope_scaling) == (2, 500000.0, HF_SCALINGS[scaling])
    ours = Transformer(cfg).eval()
    ours.load_state_dict(from_hf_llama_state_dict(hf.state_dict(), cfg))  # vocabulary 100 padded to 128
    ids = tokens(2, 40)
    with torch.no_grad():
        expected = hf(ids).logits
    assert close(ours(ids), expected, 1e-4)


@pytest.mark.parametrize("tied", [False, True])
def test_our_weights_load_into_hugging_face_llama_with_the_same_logits(tied: bool):
    transformers = pytest.importorskip("transformers")
    cfg = tiny(n_kv_head=2, tie_embeddings=tied, rope_scaling=HF_SCALINGS["llama3"])
    ours = build(cfg)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**to_hf_llama_config(cfg))).eval()
    missing, unexpected = hf.load_state_dict(to_hf_llama_state_dict(ours.state_dict(), cfg), strict=False)
    assert not unexpected and set(missing) <= ({"lm_head.weight"} if tied else set())
    ids = tokens(2, 40)
    with torch.no_grad():
        expected = hf(ids).logits
    assert close(ours(ids), expected, 1e-4)


@pytest.mark.parametrize("tied", [True, False])
def test_hugging_face_gpt2_weights_give_the_same_logits_both_ways(tied: bool):
    transformers = pytest.importorskip("transformers")
    hf_config = transformers.GPT2Config(
        vocab_size=100,
        n_positions=64,
        n_embd=32,
        n_layer=2,
        n_head=4,
        tie_word_embeddings=tied,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(hf_config).eval()
    cfg = from_hf_gpt2_config(hf_config.to_dict())
    assert cfg.model_dump() == tiny(**SHAPES["gpt2"], tie_embeddings=tied).model_dump()
    ours = Transformer(cfg).eval()
    ours.load_state_dict(from_hf_gpt2_state_dict(hf.state_dict(), cfg))
    ids = tokens(2, 40)
    with torch.no_grad():
        assert close(ours(ids), hf(ids).logits, 1e-4)

    exported = transformers.GPT2LMHeadModel(transformers.GPT2Config(**to_hf_gpt2_config(cfg))).eval()
    state = to_hf_gpt2_state_dict(ours.state_dict(), cfg)
    missing, unexpected = exported.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= ({"lm_head.weight"} if tied else set())
    with torch.no_grad():
        assert close(exported(ids).logits, hf(ids).logits, 1e-5)


def test_each_export_refuses_the_other_shape():
    with pytest.raises(ValueError, match="only the Llama shape"):
        to_hf_llama_config(tiny(**SHAPES["gpt2"]))
    with pytest.raises(ValueError, match="only the GPT-2 shape"):
        to_hf_gpt2_config(tiny(n_kv_head=2))
