"""LoRA's targets and scaling: the default covers every linear layer of the blocks, groups and lists
expand to the layers peft wraps, the planned counts per group are peft's trainable counts, the dry
run shows them and where the learning rate came from, and --rslora reaches peft and merges exactly."""

from __future__ import annotations

import json

import pytest
import torch
from finetune_helpers import QUICK
from pretrain_helpers import nothing_written, one_thread

from llmctl.checkpoint import load as loader
from llmctl.checkpoint.load import load_model
from llmctl.checkpoint.refs import resolve_model_ref
from llmctl.config import AdapterConfig, resolve_config
from llmctl.errors import UsageError
from llmctl.model.lora import apply_lora, lora_parameter_counts, resolve_targets
from llmctl.model.transformer import Transformer
from llmctl.workspace import Workspace

pytest_plugins = ["finetune_fixtures"]

SHAPE = ["model.n_layer=2", "model.d_model=64", "model.n_head=4", "model.tie_embeddings=false"]
BLOCK_LINEARS = {
    "swiglu": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gelu": ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"],
}


def tiny(mlp: str = "swiglu") -> Transformer:
    torch.manual_seed(0)
    return Transformer(resolve_config(overrides=[*SHAPE, f"model.mlp={mlp}"]).model)


def trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("mlp", ["swiglu", "gelu"])
def test_default_targets_are_every_linear_layer_of_the_blocks(mlp):
    model = tiny(mlp)
    assert resolve_targets(model, AdapterConfig().targets) == BLOCK_LINEARS[mlp]
    wrapped = apply_lora(model, AdapterConfig(enabled=True))
    wrapped_layers = {name for name, module in wrapped.named_modules() if hasattr(module, "lora_A")}
    block_linears = [
        n for n, m in tiny(mlp).named_modules() if isinstance(m, torch.nn.Linear) and "layers." in n
    ]
    # every linear layer of every block carries an adapter, and the output head none
    assert {name.removeprefix("base_model.model.") for name in wrapped_layers} == set(block_linears)
    assert len(block_linears) == 2 * len(BLOCK_LINEARS[mlp])


@pytest.mark.parametrize(
    ("targets", "groups"),
    [
        (["all-linear"], {"attention", "mlp"}),
        (["attention"], {"attention"}),
        (["mlp"], {"mlp"}),
        (["attention", "lm_head"], {"attention", "lm_head"}),
        (["q_proj", "v_proj", "down_proj"], {"attention", "mlp"}),
    ],
)
def test_counts_per_group_are_what_peft_trains(targets, groups):
    adapter = AdapterConfig(enabled=True, r=4, targets=targets)
    counts = lora_parameter_counts(tiny(), adapter)
    assert set(counts) == groups
    assert sum(counts.values()) == trainable(apply_lora(tiny(), adapter))
    if targets == ["all-linear"]:
        by_group = {
            group: trainable(apply_lora(tiny(), adapter.model_copy(update={"targets": [group]})))
            for group in ("attention", "mlp")
        }
        assert counts == by_group
        ff = tiny().layers[0].mlp.up_proj.out_features
        # 2 layers × r 4 × (in + out): four 64→64 projections, three between 64 and ff
        assert counts == {"attention": 2 * 4 * 4 * (64 + 64), "mlp": 2 * 4 * 3 * (64 + ff)}


def test_groups_and_names_mix_and_unknown_names_list_the_groups():
    assert resolve_targets(tiny(), ["attention", "q_proj", "lm_head"]) == [
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "lm_head",
    ]
    with pytest.raises(
        UsageError, match=r"LoRA targets attn match no module.*groups attention, mlp, all-linear"
    ):
        resolve_targets(tiny(), ["attn"])


def dry_run(ft, base_workspace, *args):
    result = ft(
        "finetune",
        "--model",
        "base",
        "--data",
        base_workspace / "task.jsonl",
        "--run",
        "plan",
        *args,
        "--dry-run",
    )
    assert result.exit_code == 0, result.stderr
    assert nothing_written(base_workspace, "plan")
    return result


def test_dry_run_shows_capacity_per_group_and_the_learning_rates_source(ft, base_workspace):
    plan = dry_run(ft, base_workspace, "--lora", "--json").json()
    counts = plan["adapter_params"]
    assert plan["adapter"]["targets"] == ["all-linear"] and set(counts) == {"attention", "mlp"}
    assert sum(counts.values()) == plan["trainable_params"]

    text = dry_run(
        ft, base_workspace, "--lora", "--lora-targets", "attention,lm_head", "--lora-r", "4"
    ).stdout
    base = Workspace(base_workspace)
    model = loader.load_weights(resolve_model_ref(base, "base"))
    expected = lora_parameter_counts(
        model, AdapterConfig(enabled=True, r=4, targets=["attention", "lm_head"])
    )
    assert (
        f"attention {expected['attention'] / 1000:.1f}K · lm_head {expected['lm_head'] / 1000:.1f}K" in text
    )
    assert "learning rate" in text and "the adapter default" in text

    chosen = dry_run(ft, base_workspace, "--lora", "--set", "train.lr=0.005").stdout
    assert "0.005 · from --set train.lr" in chosen
    full = dry_run(ft, base_workspace).stdout
    assert "the all-weights default" in full and "adapter params" not in full


def test_rslora_reaches_peft_and_merges_exactly(ft, base_workspace):
    result = ft(
        "finetune",
        "--model",
        "base",
        "--data",
        base_workspace / "task.jsonl",
        "--run",
        "rslora",
        "--lora",
        "--rslora",
        "--lora-r",
        "4",
        "--lora-alpha",
        "8",
        "--lora-targets",
        "mlp",
        *QUICK,
        "--set",
        "train.lr=1e-2",
        "--max-steps",
        "6",
    )
    assert result.exit_code == 0, result.stderr
    ws = Workspace(base_workspace)
    checkpoint = resolve_model_ref(ws, "rslora:latest")
    peft_config = json.loads((checkpoint / "adapter_config.json").read_text())
    assert peft_config["use_rslora"] is True
    assert set(peft_config["target_modules"]) == {"gate_proj", "up_proj", "down_proj"}
    with one_thread():
        unmerged = loader.load_adapter(loader.load_weights(resolve_model_ref(ws, "base")), checkpoint).eval()
        scaling = {m.scaling["default"] for m in unmerged.modules() if hasattr(m, "scaling")}
        assert scaling == {8 / 4**0.5}  # alpha / sqrt(r) = 4, not alpha / r = 2
        merged = load_model(ws, "rslora").model
        ids = torch.randint(0, 256, (2, 32))
        assert torch.allclose(merged(ids), unmerged(ids), atol=1e-5)
        assert not torch.allclose(
            merged(ids), loader.load_weights(resolve_model_ref(ws, "base"))(ids), atol=1e-3
        )


def test_adapter_flags_without_adapters_are_refused(ft, base_workspace):
    result = ft(
        "finetune", "--model", "base", "--data", base_workspace / "task.jsonl", "--run", "bad", "--rslora"
    )
    assert result.exit_code == 2 and "--rslora shapes LoRA adapters" in result.stderr
    assert nothing_written(base_workspace, "bad")
