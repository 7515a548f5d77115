"""Hugging Face model directories as model references: a randomly initialised LlamaForCausalLM
(grouped-query attention, untied embeddings) saved by transformers loads into llmctl's model and
gives transformers' logits and greedy tokens; sharded and bf16 saves too."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hf_helpers import PROMPTS, hf_greedy, save_llama_dir

from llmctl.checkpoint.files import read_meta
from llmctl.checkpoint.load import load_model
from llmctl.config import GenerationConfig
from llmctl.errors import LlmctlError
from llmctl.generate import Engine
from llmctl.workspace import Workspace

pytest.importorskip("transformers")


def _compare(hf_model, loaded, atol: float = 1e-5) -> None:
    for prompt in PROMPTS:
        ids = loaded.tokenizer.encode(prompt)
        with torch.no_grad():
            theirs = hf_model(torch.tensor([ids])).logits.float()
            ours = loaded.model(torch.tensor([ids])).float()
        assert ours.shape == theirs.shape
        assert (ours - theirs).abs().max().item() < atol


def _greedy_matches(hf_model, loaded, max_new_tokens: int = 24) -> None:
    engine = Engine(loaded.model, loaded.tokenizer)
    config = GenerationConfig(temperature=0.0, max_new_tokens=max_new_tokens)
    for prompt in PROMPTS:
        ids = loaded.tokenizer.encode(prompt)
        ours = engine.generate([ids], config)[0].token_ids
        assert ours == hf_greedy(hf_model, ids, max_new_tokens, loaded.tokenizer.eot_id)


def test_llama_dir_loads_with_transformers_logits_and_greedy_tokens(tmp_path: Path) -> None:
    hf_model = save_llama_dir(tmp_path / "llama")
    loaded = load_model(Workspace(tmp_path / "ws"), str(tmp_path / "llama"))

    assert loaded.config.model.kv_heads == 2 and not loaded.config.model.tie_embeddings
    assert loaded.meta["format"] == "hf" and loaded.meta["kind"] == "full"
    assert loaded.tokenizer.eot_id == loaded.tokenizer.tokenizer.token_to_id("</s>")
    assert loaded.config.generation.temperature == 0.0  # transformers' default: greedy
    _compare(hf_model, loaded)
    _greedy_matches(hf_model, loaded)


def test_sharded_save_loads_shard_by_shard(tmp_path: Path) -> None:
    hf_model = save_llama_dir(tmp_path / "sharded", max_shard_size="60KB")
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2

    loaded = load_model(Workspace(tmp_path / "ws"), str(tmp_path / "sharded"))
    _compare(hf_model, loaded)
    assert set(read_meta(tmp_path / "sharded")["files"]) == set(index["weight_map"].values())


def test_bf16_weights_stay_bf16_unless_asked(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    save_llama_dir(tmp_path / "bf16", dtype=torch.bfloat16, max_shard_size="80KB")
    workspace = Workspace(tmp_path / "ws")
    kept = load_model(workspace, str(tmp_path / "bf16"))
    assert {param.dtype for param in kept.model.parameters()} == {torch.bfloat16}

    # the same bf16 weights widened on both sides compare exactly in fp32
    widened = load_model(workspace, str(tmp_path / "bf16"), dtype=torch.float32)
    hf_model = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.float32).eval()
    _compare(hf_model, widened)


def test_tied_embeddings_stay_tied(tmp_path: Path) -> None:
    hf_model = save_llama_dir(tmp_path / "tied", tie=True)
    loaded = load_model(Workspace(tmp_path / "ws"), str(tmp_path / "tied"))
    assert loaded.model.lm_head.weight is loaded.model.embed_tokens.weight
    _compare(hf_model, loaded)


def test_sample_cli_takes_a_model_directory(tmp_path: Path, cli) -> None:
    hf_model = save_llama_dir(tmp_path / "llama")
    result = cli(
        "sample",
        "--model",
        tmp_path / "llama",
        "--prompt",
        PROMPTS[0],
        "--temperature",
        "0",
        "--max-new-tokens",
        "16",
        "--dtype",
        "fp32",  # transformers' greedy tokens are fp32's (auto on a CPU decodes with int8 weights)
        "--json",
    )
    assert result.exit_code == 0, result.stderr
    document = result.json()
    completion = document["completions"][0]
    loaded = load_model(Workspace(tmp_path / "ws"), str(tmp_path / "llama"))
    ids = loaded.tokenizer.encode_prompt(PROMPTS[0])  # <s> first, as the model was trained
    assert document["prompt_tokens"] == len(ids)
    expected = hf_greedy(hf_model, ids, 16, loaded.tokenizer.eot_id)
    assert completion["tokens"] == len(expected)
    # a random model emits stray bytes; an unfinished UTF-8 character at the end is held back
    assert loaded.tokenizer.decode(expected).startswith(completion["text"])


def test_prompts_open_with_bos_as_transformers_tokenizer_adds_it(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    hf_model = save_llama_dir(tmp_path / "llama")
    their_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "llama")
    loaded = load_model(Workspace(tmp_path / "ws"), str(tmp_path / "llama"))
    bos = loaded.tokenizer.tokenizer.token_to_id("<s>")
    assert loaded.tokenizer.add_bos and loaded.tokenizer.document_start_id == bos
    engine = Engine(loaded.model, loaded.tokenizer)
    config = GenerationConfig(temperature=0.0, max_new_tokens=24)
    for prompt in PROMPTS:
        ids = their_tokenizer(prompt).input_ids
        assert ids[0] == bos  # the premise: transformers' tokenizer prepends <s>
        assert loaded.tokenizer.encode_prompt(prompt) == ids
        ours = engine.generate([prompt], config)[0].token_ids  # the engine encodes the text itself
        assert ours == hf_greedy(hf_model, ids, 24, loaded.tokenizer.eot_id)


def test_perplexity_reads_documents_after_bos_as_transformers_does(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from llmctl.eval.perplexity import measure_perplexity

    hf_model = save_llama_dir(tmp_path / "llama")
    their_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "llama")
    loaded = load_model(Workspace(tmp_path / "ws"), str(tmp_path / "llama"))
    text = PROMPTS[2]
    ids = their_tokenizer(text).input_ids
    with torch.no_grad():  # transformers' loss: the mean over every token after <s>
        expected = hf_model(torch.tensor([ids]), labels=torch.tensor([ids])).loss.item() * (len(ids) - 1)
    result = measure_perplexity(loaded.model, loaded.tokenizer, [text])
    assert result.tokens == len(ids) - 1
    assert result.nats == pytest.approx(expected, rel=1e-4)


def test_a_tokenizer_without_bos_in_its_encoding_gets_none(tmp_path: Path) -> None:
    save_llama_dir(tmp_path / "plain", add_bos=False)
    loaded = load_model(Workspace(tmp_path / "ws"), str(tmp_path / "plain"))
    assert not loaded.tokenizer.add_bos
    assert loaded.tokenizer.encode_prompt(PROMPTS[0]) == loaded.tokenizer.encode(PROMPTS[0])
    assert loaded.tokenizer.document_start_id == loaded.tokenizer.eot_id


def test_unsupported_model_type_is_one_line_naming_it(tmp_path: Path, cli) -> None:
    save_llama_dir(tmp_path / "falcon")
    config = json.loads((tmp_path / "falcon" / "config.json").read_text())
    (tmp_path / "falcon" / "config.json").write_text(json.dumps({**config, "model_type": "falcon"}))

    result = cli("sample", "--model", tmp_path / "falcon", "--prompt", "x")
    assert result.exit_code != 0
    message = result.stderr.strip()
    assert len(message.splitlines()) == 1
    assert "model_type 'falcon'" in message and "llama" in message and "mistral" in message


def test_sliding_window_mistral_is_refused_and_plain_mistral_loads(tmp_path: Path) -> None:
    hf_model = save_llama_dir(tmp_path / "mistral")
    path = tmp_path / "mistral" / "config.json"
    config = json.loads(path.read_text())
    workspace = Workspace(tmp_path / "ws")

    path.write_text(json.dumps({**config, "model_type": "mistral", "sliding_window": None, "head_dim": None}))
    _compare(hf_model, load_model(workspace, str(tmp_path / "mistral")))

    path.write_text(json.dumps({**config, "model_type": "mistral", "sliding_window": 16}))
    with pytest.raises(LlmctlError, match="sliding window"):
        load_model(workspace, str(tmp_path / "mistral"))


def test_directory_without_tokenizer_or_weights_says_what_is_missing(tmp_path: Path) -> None:
    save_llama_dir(tmp_path / "llama")
    workspace = Workspace(tmp_path / "ws")
    (tmp_path / "llama" / "model.safetensors").unlink()
    with pytest.raises(LlmctlError, match="neither model.safetensors"):
        load_model(workspace, str(tmp_path / "llama"))
    (tmp_path / "llama" / "tokenizer.json").unlink()
    with pytest.raises(LlmctlError, match="without a tokenizer.json"):
        load_model(workspace, str(tmp_path / "llama"))


def test_a_models_own_chat_template_renders_through_jinja(tmp_path: Path) -> None:
    save_llama_dir(tmp_path / "llama")
    config_path = tmp_path / "llama" / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    template = (
        "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}[assistant] {% endif %}"
    )
    config_path.write_text(json.dumps({**config, "chat_template": template}))
    (tmp_path / "llama" / "chat_template.jinja").unlink(missing_ok=True)

    loaded = load_model(Workspace(tmp_path / "ws"), str(tmp_path / "llama"))
    rendered = loaded.tokenizer.render_chat([{"role": "user", "content": "hi"}])
    assert rendered == "<s>[user] hi\n[assistant] "


def test_eval_perplexity_takes_a_model_directory(tmp_path: Path, cli) -> None:
    save_llama_dir(tmp_path / "llama")
    text = tmp_path / "code.py"
    text.write_text("def add(a, b):\n    return a + b\n" * 4)
    result = cli("eval", "perplexity", "--model", tmp_path / "llama", "--file", text, "--json")
    assert result.exit_code == 0, result.stderr
    summary = result.json()
    assert summary["checkpoint"] == str((tmp_path / "llama").resolve()) and summary["step"] is None
    assert summary["tokens"] > 0
