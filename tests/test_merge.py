"""`llmctl merge`: LoRA and QLoRA adapters folded into full checkpoints whose logits equal base +
adapter, registered as runs linked to the adapter, loadable by every command; and its errors."""

from __future__ import annotations

import json

import pytest
import torch
from finetune_helpers import QUICK

from llmctl.checkpoint import load as loader
from llmctl.checkpoint.files import read_config
from llmctl.checkpoint.load import load_model
from llmctl.checkpoint.refs import resolve_model_ref
from llmctl.workspace import Workspace

pytest_plugins = ["finetune_fixtures"]

LORA = [
    "--lora-r",
    "4",
    "--lora-targets",
    "q_proj,v_proj,gate_proj,lm_head",
    "--set",
    "adapter.dropout=0",
    "--set",
    "train.lr=1e-2",
    "--max-steps",
    "15",
]


@pytest.mark.parametrize(("command", "run"), [("finetune", "m-lora"), ("qlora", "m-qlora")])
def test_merged_logits_equal_base_plus_adapter(ft, base_workspace, command, run):
    extra = ["--lora"] if command == "finetune" else []
    trained = ft(
        command,
        "--model",
        "base",
        "--data",
        base_workspace / "task.jsonl",
        "--run",
        run,
        *extra,
        *LORA,
        *QUICK,
    )
    assert trained.exit_code == 0, trained.stderr
    merged = ft("merge", run, "--run", f"{run}-merged")
    assert merged.exit_code == 0, merged.stderr

    ws = Workspace(base_workspace)
    adapter_dir = resolve_model_ref(ws, run)
    base_dir = resolve_model_ref(ws, "base")
    if command == "qlora":  # the base as the adapter trained on it: 4-bit layers computing in fp32
        base = loader.load_quantized_base(base_dir, read_config(adapter_dir), torch.device("cpu"))
    else:
        base = loader.load_weights(base_dir)
    unmerged = loader.load_adapter(base, adapter_dir).eval()
    folded = load_model(ws, f"{run}-merged")
    ids = torch.randint(0, folded.tokenizer.vocab_size, (2, 48))
    with torch.no_grad():
        expected, actual = unmerged(ids), folded.model(ids)
        assert not torch.allclose(expected, loader.load_weights(base_dir)(ids), atol=1e-3)  # it trained
    assert torch.allclose(actual, expected, atol=1e-4, rtol=1e-4)

    meta = json.loads((folded.path / "meta.json").read_text())
    assert meta["kind"] == "full" and meta["merged_from"] == str(adapter_dir)
    assert (folded.path / "model.safetensors").is_file() and not (
        folded.path / "adapter_model.safetensors"
    ).exists()
    row = ws.registry().run(f"{run}-merged")
    assert row["stage"] == "merge" and ws.registry().checkpoint(row["base_checkpoint"])["run"] == run
    assert not read_config(folded.path).adapter.enabled


def test_merge_refuses_full_checkpoints_and_taken_names(ft):
    full = ft("merge", "base", "--run", "base-merged")
    assert full.exit_code == 2 and "'base' is a full checkpoint; merge takes an adapter" in full.stderr
    taken = ft("merge", "nosuch", "--run", "base")
    assert taken.exit_code == 2 and "no run or checkpoint directory named 'nosuch'" in taken.stderr
