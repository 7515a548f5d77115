"""--max-length / data.max_length: a finetune's rows are the user's length, not the base's context.

The base is a Hugging Face Llama directory of deepseek-coder-1.3b-base's shape (width 2048, 16 heads,
MLP 5504, vocabulary 32,256, context 16,384 with linear RoPE scaling) made by transformers with
random weights and two layers instead of 24: the plan at --max-length 512 against the base's
context, and a real QLoRA step on the CPU at a small length with LoRA on q_proj/v_proj and the
problem-solution prompt style.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from cli_helpers import run_cli
from finetune_helpers import write_jsonl
from hf_helpers import save_tokenizer
from safetensors.torch import load_file

from llmctl.checkpoint.refs import resolve_model_ref
from llmctl.data import sft
from llmctl.model.lora import lora_saved_values_per_token
from llmctl.model.sizing import estimate_training_memory
from llmctl.model.transformer import Transformer
from llmctl.train.finetune import FinetuneOptions, make_plan
from llmctl.train.finetune_config import DEFAULT_MAX_LENGTH
from llmctl.workspace import Workspace

pytestmark = pytest.mark.usefixtures("single_thread")

CONTEXT = 16_384
# Problems of 51 to 103 tokens, replies starting at 38 to 68: at 64 tokens some fit whole, some are
# cut, and some are dropped (their reply starts beyond the length).
RECORDS = [
    {"instruction": "def add(a, b): " * (i % 4 + 1), "output": "    return a + b\n" * (i % 3 + 1)}
    for i in range(12)
]
LENGTH = 64


@pytest.fixture(scope="module")
def deepseek_shape(tmp_path_factory) -> Path:
    """A workspace with the base directory 'coder' and the data file 'problems.jsonl'."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("max-length")
    base = root / "coder"
    save_tokenizer(base)
    config = LlamaConfig(
        vocab_size=32_256,
        hidden_size=2048,
        intermediate_size=5504,
        num_hidden_layers=2,
        num_attention_heads=16,
        num_key_value_heads=16,
        max_position_embeddings=CONTEXT,
        rope_theta=100_000.0,
        rope_scaling={"rope_type": "linear", "factor": 4.0},
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(base)  # bf16, as the hub's copy
    write_jsonl(root / "problems.jsonl", RECORDS)
    return root


def _cli(capsys, root: Path, *args: object):
    return run_cli(capsys, ["--workspace", root / "ws", *args])


def _plan_json(capsys, root: Path, *args: object) -> dict:
    result = _cli(
        capsys,
        root,
        "qlora",
        "--model",
        root / "coder",
        "--data",
        root / "problems.jsonl",
        "--prompt-style",
        "problem-solution",
        "--lora-targets",
        "q_proj,v_proj",
        "--set",
        "train.micro_batch_size=2",
        "--set",
        "train.grad_accum_steps=4",
        "--dry-run",
        "--json",
        *args,
    )
    assert result.exit_code == 0, result.stderr
    return result.json()


def test_the_plan_uses_max_length_for_rows_tokens_and_memory(capsys, monkeypatch, deepseek_shape):
    default = _plan_json(capsys, deepseek_shape)
    chosen = _plan_json(capsys, deepseek_shape, "--max-length", "512")

    # a long-context base is capped by default, and the plan says so
    assert (default["max_length"], default["max_length_source"]) == (DEFAULT_MAX_LENGTH, "cap")
    assert (chosen["max_length"], chosen["max_length_source"]) == (512, "chosen")
    assert default["tokens_per_step"] == 2 * 4 * DEFAULT_MAX_LENGTH
    assert chosen["tokens_per_step"] == 2 * 4 * 512

    # the activations are those of rows of 512 tokens, not of the base's 16,384
    plan = make_plan(
        Workspace(deepseek_shape / "ws"),
        FinetuneOptions(
            stage="qlora",
            model=str(deepseek_shape / "coder"),
            data=str(deepseek_shape / "problems.jsonl"),
            prompt_style="problem-solution",
            max_length=512,
            lora_targets=["q_proj", "v_proj"],
            overrides=["train.micro_batch_size=2"],
        ),
        inspect_only=True,
    )
    assert plan.config.model.context_length == CONTEXT  # the base's shape is untouched
    with torch.device("meta"):
        shape = Transformer(plan.config.model)
    lora_saved = lora_saved_values_per_token(shape, plan.config.adapter)  # LoRA's own activations
    at_512 = estimate_training_memory(
        plan.config.model,
        plan.config.train,
        plan.trainable,
        mixed_precision=False,
        adapter_values_per_token=lora_saved,
        sequence_length=512,
    )
    at_context = estimate_training_memory(
        plan.config.model,
        plan.config.train,
        plan.trainable,
        mixed_precision=False,
        adapter_values_per_token=lora_saved,
    )
    assert plan.memory.activations == at_512.activations
    assert chosen["memory"]["activations"] == at_512.activations
    assert at_context.activations == pytest.approx(32 * at_512.activations, rel=1e-6)
    assert default["memory"]["activations"] == pytest.approx(4 * at_512.activations, rel=1e-6)
    # attention FLOPs follow the rows' length too
    assert default["flops_per_token"] > chosen["flops_per_token"]

    monkeypatch.setenv("COLUMNS", "200")
    shown = _cli(
        capsys,
        deepseek_shape,
        "qlora",
        "--model",
        deepseek_shape / "coder",
        "--data",
        deepseek_shape / "problems.jsonl",
        "--prompt-style",
        "problem-solution",
        "--max-length",
        "512",
        "--dry-run",
    )
    assert shown.exit_code == 0, shown.stderr
    assert "512 tokens per row · --max-length (the base's context is 16,384)" in shown.stdout
    micro, accum, tokens = re.search(
        r"(\d+) × (\d+) accumulation = ([\d,]+) tokens per step", shown.stdout
    ).groups()
    assert int(micro) * int(accum) * 512 == int(tokens.replace(",", ""))


def test_examples_are_cut_and_counted_at_max_length(capsys, deepseek_shape):
    result = _cli(
        capsys,
        deepseek_shape,
        "finetune",
        "--model",
        deepseek_shape / "coder",
        "--data",
        deepseek_shape / "problems.jsonl",
        "--prompt-style",
        "problem-solution",
        "--max-length",
        LENGTH,
        "--no-packing",
        "--inspect",
        "--json",
    )
    assert result.exit_code == 0, result.stderr
    figures = result.json()["figures"]

    plan = make_plan(
        Workspace(deepseek_shape / "ws"),
        FinetuneOptions(
            model=str(deepseek_shape / "coder"),
            data=str(deepseek_shape / "problems.jsonl"),
            prompt_style="problem-solution",
        ),
        inspect_only=True,
    )
    # counted by hand from each training example rendered whole: a row of N positions holds N + 1
    # tokens; an example whose reply starts past them is dropped, a longer one is cut
    whole = [
        sft.encode_example(sft.messages_of(r, "r"), plan.tokenizer, "problem-solution", CONTEXT)
        for r in plan.data.train
    ]
    kept = [e for e in whole if any(e.trained[1 : LENGTH + 1])]
    cut = [e for e in kept if len(e.ids) > LENGTH + 1]
    assert len(cut) > 0 and len(kept) > len(cut) and len(whole) > len(kept)  # all three kinds
    assert figures["examples"] == len(kept)
    assert figures["truncated"] == len(cut)
    assert figures["dropped"] == len(whole) - len(kept)
    assert figures["tokens"] == sum(min(len(e.ids), LENGTH + 1) for e in kept)
    assert figures["rows"] == len(kept)  # unpacked: one example a row


def test_max_length_beyond_the_base_or_in_pretraining_is_refused(capsys, deepseek_shape):
    root = deepseek_shape
    result = _cli(
        capsys,
        root,
        "finetune",
        "--model",
        root / "coder",
        "--data",
        root / "problems.jsonl",
        "--max-length",
        "20000",
        "--dry-run",
    )
    assert result.exit_code == 2
    assert "--max-length 20000 exceeds the base's context of 16384 tokens" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (root / "ws" / "runs").exists()

    result = _cli(
        capsys, root, "pretrain", "--corpus", "c", "--tokenizer", "t", "--set", "data.max_length=64"
    )
    assert result.exit_code == 2
    assert "data.max_length is for finetune, qlora and dpo" in result.stderr


def test_a_qlora_step_at_a_small_length_on_the_4bit_base(capsys, deepseek_shape):
    """One real step of QLoRA (NF4 base, LoRA on q_proj/v_proj, problem-solution prompts) at 64
    tokens a row: the rows are 32 long, the trained adapters move, and only they are saved."""
    import bitsandbytes as bnb

    root, length = deepseek_shape, LENGTH
    result = _cli(
        capsys,
        root,
        "qlora",
        "--model",
        root / "coder",
        "--data",
        root / "problems.jsonl",
        "--run",
        "coder-qlora",
        "--prompt-style",
        "problem-solution",
        "--max-length",
        length,
        "--lora-targets",
        "q_proj,v_proj",
        "--set",
        "train.micro_batch_size=2",
        "--set",
        "train.eval_every=1000",
        "--set",
        "train.eval_batches=1",
        "--set",
        "train.log_every=1",
        "--set",
        "train.warmup_steps=0",
        "--set",
        "train.lr=1e-3",
        "--max-steps",
        "1",
    )
    assert result.exit_code == 0, result.stderr
    ws = Workspace(root / "ws")
    events = [json.loads(line) for line in (ws.run_dir("coder-qlora") / "events.jsonl").open()]
    start = next(e for e in events if e["event"] == "start")
    train = [e for e in events if e["event"] == "train"]
    assert start["tokens_per_step"] == 2 * length
    assert len(train) == 1 and torch.isfinite(torch.tensor(train[0]["loss"]))
    assert train[0]["tokens"] == 2 * length

    checkpoint = resolve_model_ref(ws, "coder-qlora:latest")
    adapters = load_file(checkpoint / "adapter_model.safetensors")
    assert adapters and all(("q_proj" in name or "v_proj" in name) and "lora_" in name for name in adapters)
    moved = [name for name, tensor in adapters.items() if "lora_B" in name and tensor.abs().max() > 0]
    assert len(moved) == 2 * 2  # B starts at zero: one step moved q_proj's and v_proj's in both layers

    plan = make_plan(
        ws,
        FinetuneOptions(
            stage="qlora",
            model=str(root / "coder"),
            data=str(root / "problems.jsonl"),
            prompt_style="problem-solution",
            max_length=length,
            overrides=["train.micro_batch_size=2"],
        ),
        inspect_only=True,
    )
    from llmctl.train.finetune import build_model
    from llmctl.train.finetune_data import make_batches

    model = build_model(plan)
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules()) == 2 * 7
    batch = make_batches(plan.config, plan.encoded, "sft", plan.tokenizer.pad_id, plan.device).next_batch()
    assert batch["input_ids"].shape == (2, length)


def test_dpo_rows_and_pairs_follow_max_length(capsys, deepseek_shape):
    pairs = deepseek_shape / "pairs.jsonl"
    write_jsonl(
        pairs, [{"prompt": r["instruction"], "chosen": r["output"], "rejected": "pass\n"} for r in RECORDS]
    )
    common = [
        "dpo",
        "--model",
        deepseek_shape / "coder",
        "--data",
        pairs,
        "--prompt-style",
        "problem-solution",
    ]
    common += ["--lora", "--set", "train.micro_batch_size=2", "--dry-run", "--json"]
    default = _cli(capsys, deepseek_shape, *common)
    chosen = _cli(capsys, deepseek_shape, *common, "--max-length", LENGTH)
    assert default.exit_code == 0 and chosen.exit_code == 0, chosen.stderr
    default, chosen = default.json(), chosen.json()
    assert (default["max_length"], chosen["max_length"]) == (DEFAULT_MAX_LENGTH, LENGTH)
    assert chosen["tokens_per_step"] == 2 * LENGTH
    # a pair is two sequences of LENGTH: its activations are those of 2 × 2 rows at that length
    assert default["memory"]["activations"] > 16 * chosen["memory"]["activations"]
    # pairs whose reply starts past 64 tokens are dropped, longer ones cut (both counted in the notes)
    assert chosen["train_pairs"] < default["train_pairs"]
    assert any("cut to 64 tokens" in note for note in chosen["notes"])
