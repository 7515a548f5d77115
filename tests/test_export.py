"""`llmctl export --format hf`: an llmctl-trained model loads in transformers (AutoModelForCausalLM,
AutoTokenizer) with the same logits, greedy tokens, token ids and chat rendering; the GPT-2 shape
exports as GPT2LMHeadModel; a failed round-trip check leaves nothing that looks like a model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from finetune_helpers import QUICK, task_records, write_jsonl
from hf_helpers import hf_greedy, save_llama_dir
from pretrain_helpers import BASE
from tiny_checkpoints import write_run_checkpoint

from llmctl.checkpoint.load import load_model
from llmctl.config import GenerationConfig, ModelConfig
from llmctl.generate import Engine
from llmctl.model import hf
from llmctl.workspace import Workspace

transformers = pytest.importorskip("transformers")

PROMPTS = ["def parse(line):\n    ", "import os\n", "class Reader:\n"]


pytestmark = pytest.mark.usefixtures("single_thread")


def _agrees_with_transformers(ws: Path, ref: str, directory: Path, model_class: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    theirs = AutoModelForCausalLM.from_pretrained(directory).eval()
    their_tokenizer = AutoTokenizer.from_pretrained(directory)
    assert type(theirs).__name__ == model_class
    ours = load_model(Workspace(ws), ref)
    engine = Engine(ours.model, ours.tokenizer)
    for prompt in PROMPTS:
        ids = ours.tokenizer.encode(prompt)
        assert their_tokenizer(prompt).input_ids == ids  # AutoTokenizer adds nothing llmctl does not
        with torch.no_grad():
            diff = (ours.model(torch.tensor([ids])) - theirs(torch.tensor([ids])).logits).abs().max().item()
        assert diff < 1e-4
        budget = min(24, ours.config.model.context_length - len(ids))
        greedy = engine.generate([ids], GenerationConfig(temperature=0.0, max_new_tokens=budget))[0].token_ids
        assert greedy == hf_greedy(theirs, ids, budget, ours.tokenizer.eot_id)
        assert their_tokenizer.decode(greedy) == ours.tokenizer.decode(greedy)


def test_a_pretrained_model_exports_and_loads_in_transformers(cli, ws, tmp_path):
    trained = cli(
        *BASE,
        "--run",
        "base",
        "--max-steps",
        "40",
        "--set",
        "train.lr=3e-3",
        "--set",
        "train.eval_every=20",
        "--set",
        "train.save_every=20",
    )
    assert trained.exit_code == 0, trained.stderr

    result = cli("export", "--model", "base", "--out", tmp_path / "export", "--json")
    assert result.exit_code == 0, result.stderr
    document = result.json()
    assert document["architecture"] == "LlamaForCausalLM"
    assert document["verification"]["ok"] and document["verification"]["max_abs_diff"] < 1e-4
    assert document["verification"]["greedy_tokens"] > 0
    files = {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    }
    assert set(document["files"]) == files
    _agrees_with_transformers(ws, "base", tmp_path / "export", "LlamaForCausalLM")

    from transformers import AutoTokenizer

    tokenizer_config = json.loads((tmp_path / "export" / "tokenizer_config.json").read_text())
    assert tokenizer_config["eos_token"] == "<|endoftext|>" and tokenizer_config["pad_token"] == "<|pad|>"
    chat = [{"role": "user", "content": "hi"}]
    rendered = AutoTokenizer.from_pretrained(tmp_path / "export").apply_chat_template(
        chat, tokenize=False, add_generation_prompt=True
    )
    assert rendered == load_model(Workspace(ws), "base").tokenizer.render_chat(chat)

    # and the export is a model reference of its own
    back = load_model(Workspace(ws), str(tmp_path / "export"))
    assert back.meta["format"] == "hf" and back.tokenizer.chat_template == tokenizer_config["chat_template"]


def test_gpt2_shape_exports_as_gpt2_and_comes_back(cli, workspace_dir, tmp_path):
    shape = ModelConfig(
        n_layer=2,
        n_head=4,
        d_model=64,
        context_length=64,
        vocab_size=262,
        position="learned",
        norm="layernorm",
        mlp="gelu",
        bias=True,
    )
    write_run_checkpoint(workspace_dir, "gpt", model_config=shape)
    # random weights are too flat for greedy paths to mean much; widen them
    checkpoint = next((workspace_dir / "runs" / "gpt" / "checkpoints").iterdir())
    from safetensors.torch import load_file, save_file

    tensors = {name: tensor * 8 for name, tensor in load_file(checkpoint / "model.safetensors").items()}
    save_file(tensors, str(checkpoint / "model.safetensors"))
    meta = json.loads((checkpoint / "meta.json").read_text())
    meta["files"]["model.safetensors"] = (checkpoint / "model.safetensors").stat().st_size
    (checkpoint / "meta.json").write_text(json.dumps(meta))

    result = cli("export", "--model", "gpt", "--out", tmp_path / "gpt2", "--json")
    assert result.exit_code == 0, result.stderr
    assert result.json()["architecture"] == "GPT2LMHeadModel"
    assert json.loads((tmp_path / "gpt2" / "config.json").read_text())["model_type"] == "gpt2"
    _agrees_with_transformers(workspace_dir, "gpt", tmp_path / "gpt2", "GPT2LMHeadModel")

    back = load_model(Workspace(workspace_dir), str(tmp_path / "gpt2"))
    original = load_model(Workspace(workspace_dir), "gpt")
    ids = torch.tensor([original.tokenizer.encode(PROMPTS[0])])
    with torch.no_grad():
        assert torch.allclose(back.model(ids), original.model(ids), atol=1e-5)


def test_an_adapter_run_is_merged_into_its_base_first(cli, workspace_dir, tmp_path):
    write_run_checkpoint(workspace_dir, "chat")
    data = write_jsonl(tmp_path / "task.jsonl", task_records())
    tuned = cli(
        "finetune",
        "--lora",
        "--model",
        "chat",
        "--data",
        data,
        "--run",
        "lora",
        *QUICK,
        "--set",
        "train.lr=5e-2",
        "--max-steps",
        "3",
    )
    assert tuned.exit_code == 0, tuned.stderr

    result = cli("export", "--model", "lora", "--out", tmp_path / "merged", "--json")
    assert result.exit_code == 0, result.stderr
    assert result.json()["verification"]["ok"]
    assert not (tmp_path / "merged" / "adapter_model.safetensors").exists()
    _agrees_with_transformers(workspace_dir, "lora", tmp_path / "merged", "LlamaForCausalLM")
    # the merge moved the weights: the export is the adapted model, not the base
    base, merged = load_model(Workspace(workspace_dir), "chat"), load_model(Workspace(workspace_dir), "lora")
    ids = torch.tensor([base.tokenizer.encode(PROMPTS[0])])
    with torch.no_grad():
        assert not torch.allclose(base.model(ids), merged.model(ids), atol=1e-4)


def test_a_failed_check_leaves_no_model_directory(cli, workspace_dir, tmp_path, monkeypatch):
    write_run_checkpoint(workspace_dir, "chat")
    mapping = hf.to_hf_llama_config
    # a config that misstates the rotary base: transformers then computes other logits
    monkeypatch.setattr(hf, "to_hf_llama_config", lambda cfg: {**mapping(cfg), "rope_theta": 77.0})

    result = cli("export", "--model", "chat", "--out", tmp_path / "exports" / "chat")
    assert result.exit_code != 0
    assert "round-trip check failed" in result.stderr and "logits differ" in result.stderr
    assert list((tmp_path / "exports").iterdir()) == []  # no directory, no staging left behind

    skipped = cli("export", "-m", "chat", "-o", tmp_path / "exports" / "chat", "--no-verify", "--json")
    assert skipped.exit_code == 0, skipped.stderr
    assert skipped.json()["verification"] is None and skipped.json()["skipped_verification"] == "--no-verify"


def test_overwrite_replaces_only_an_earlier_export_never_other_files_or_the_workspace(
    cli, workspace_dir, tmp_path, monkeypatch
):
    write_run_checkpoint(workspace_dir, "chat")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")

    refused = cli("export", "--model", "chat", "--out", tmp_path / "taken")
    assert refused.exit_code == 2 and "--overwrite" in refused.stderr
    forced = cli("export", "--model", "chat", "--out", tmp_path / "taken", "--overwrite")
    assert forced.exit_code == 2 and "holds files llmctl did not write" in forced.stderr
    assert [p.name for p in (tmp_path / "taken").iterdir()] == ["notes.txt"]
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"

    # run in a project folder holding the workspace: `--out . --overwrite` must not empty it
    monkeypatch.chdir(workspace_dir.parent)
    before = sorted(str(p) for p in workspace_dir.parent.rglob("*"))
    for out in (".", str(workspace_dir)):
        here = cli("export", "--model", "chat", "--out", out, "--overwrite")
        assert here.exit_code == 2 and "holds the workspace" in here.stderr, here.stderr
        assert len(here.stderr.strip().splitlines()) == 1
    assert sorted(str(p) for p in workspace_dir.parent.rglob("*")) == before

    first = cli("export", "--model", "chat", "--out", tmp_path / "export", "--no-verify")
    assert first.exit_code == 0, first.stderr
    (tmp_path / "export" / "stale.txt").write_text("from an earlier export")
    replaced = cli("export", "--model", "chat", "--out", tmp_path / "export", "--overwrite", "--no-verify")
    assert replaced.exit_code == 0, replaced.stderr
    assert not (tmp_path / "export" / "stale.txt").exists()
    assert (tmp_path / "export" / "model.safetensors").is_file()


def test_unknown_format_is_refused(cli, workspace_dir, tmp_path):
    result = cli("export", "--model", "x", "--out", tmp_path / "x", "--format", "onnx")
    assert result.exit_code == 2 and "unknown --format 'onnx'" in result.stderr


def test_without_transformers_the_check_is_skipped_and_said(cli, workspace_dir, tmp_path, monkeypatch):
    from llmctl.export import hf as export

    write_run_checkpoint(workspace_dir, "chat")
    monkeypatch.setattr(export, "transformers_available", lambda: False)
    result = cli("export", "--model", "chat", "--out", tmp_path / "chat")
    assert result.exit_code == 0, result.stderr
    assert "round-trip check skipped: transformers is not installed" in result.stderr
    assert (tmp_path / "chat" / "model.safetensors").is_file()


def test_an_imported_bf16_model_exports_in_bf16_and_checks_in_fp32(cli, workspace_dir, tmp_path):
    save_llama_dir(tmp_path / "llama-bf16", dtype=torch.bfloat16, max_shard_size="80KB")
    result = cli("export", "--model", tmp_path / "llama-bf16", "--out", tmp_path / "again", "--json")
    assert result.exit_code == 0, result.stderr
    document = result.json()
    assert document["dtype"] == "bfloat16" and document["verification"]["ok"]
    config = json.loads((tmp_path / "again" / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16" and config["num_key_value_heads"] == 2
    tokenizer_config = json.loads((tmp_path / "again" / "tokenizer_config.json").read_text())
    assert (tokenizer_config["bos_token"], tokenizer_config["eos_token"]) == ("<s>", "</s>")
