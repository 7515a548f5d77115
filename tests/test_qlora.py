"""`llmctl qlora` on a tiny pretrained base: the base's linear layers become 4-bit NF4, LoRA on top
learns the instruction task on the CPU, --dry-run shows the memory saved against LoRA on the
unquantized base, and a missing bitsandbytes is a clear error."""

from __future__ import annotations

import json
import sys

import bitsandbytes as bnb
from finetune_helpers import QUICK, exact_match
from pretrain_helpers import nothing_written

from llmctl.checkpoint.load import load_model
from llmctl.checkpoint.refs import resolve_model_ref
from llmctl.train.finetune import FinetuneOptions, build_model, make_plan
from llmctl.workspace import Workspace

pytest_plugins = ["finetune_fixtures"]

LORA = [
    "--lora-r",
    "4",
    "--lora-targets",
    "q_proj,k_proj,v_proj,o_proj,lm_head",
    "--set",
    "adapter.dropout=0",
]


def test_qlora_quantizes_the_base_and_learns_the_task(ft, base_workspace):
    ws = Workspace(base_workspace)
    plan = make_plan(
        ws,
        FinetuneOptions(stage="qlora", run="q-model", model="base", data=str(base_workspace / "task.jsonl")),
    )
    model = build_model(plan)
    four_bit = [name for name, module in model.named_modules() if isinstance(module, bnb.nn.Linear4bit)]
    assert len(four_bit) == 2 * 7  # every projection of both layers; the output head stays full precision
    layer = model.get_submodule(four_bit[0])
    assert layer.weight.quant_type == "nf4" and layer.weight.compress_statistics  # double quantization
    assert plan.config.train.activation_checkpointing  # on by default for qlora

    result = ft(
        "qlora",
        "--model",
        "base",
        "--data",
        base_workspace / "task.jsonl",
        "--run",
        "q",
        *LORA,
        *QUICK,
        "--set",
        "train.lr=1e-2",
        "--set",
        "train.eval_every=40",  # training goes on after evaluations (eval-mode forwards of the 4-bit layers)
        "--max-steps",
        "120",
    )
    assert result.exit_code == 0, result.stderr
    checkpoint = resolve_model_ref(ws, "q")
    meta = json.loads((checkpoint / "meta.json").read_text())
    assert meta["kind"] == "adapter" and ws.registry().run("q")["stage"] == "qlora"
    assert "quantize: nf4" in (checkpoint / "config.yaml").read_text()
    tuned = load_model(ws, "q")  # the NF4 round trip of the base with the adapter merged in
    assert exact_match(tuned.model, tuned.tokenizer) >= 0.75


def test_dry_run_shows_the_memory_saved_against_lora_on_the_unquantized_base(ft, base_workspace):
    result = ft(
        "qlora", "--model", "base", "--data", base_workspace / "task.jsonl", "--run", "q-plan", "--dry-run"
    )
    assert result.exit_code == 0, result.stderr
    assert "for LoRA on the unquantized base: 4-bit saves" in result.stdout
    # a small adapter: its fp32 weights count the same in both, and on this tiny shape the default
    # adapter (r 16 on every block layer) would be a large share of what 4-bit does not touch
    small = ["--lora-r", "8", "--lora-targets", "attention"]
    plan = ft(
        "qlora", "--model", "base", "--data", base_workspace / "task.jsonl", *small, "--dry-run", "--json"
    ).json()
    assert plan["method"] == "qlora" and plan["activation_checkpointing"]
    lora = plan["lora_unquantized_memory"]
    assert plan["memory"]["weights"] < lora["weights"] / 2 and plan["memory_saved"] > 0
    assert nothing_written(base_workspace, "q-plan")


def test_a_missing_bitsandbytes_is_named(ft, base_workspace, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # what `import bitsandbytes` sees when absent
    result = ft("qlora", "--model", "base", "--data", base_workspace / "task.jsonl", "--run", "q-none")
    assert result.exit_code == 1
    assert "qlora needs bitsandbytes, which cannot be loaded" in result.stderr
    assert (
        "pip install 'bitsandbytes>=0.43'" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    )
    assert nothing_written(base_workspace, "q-none")
