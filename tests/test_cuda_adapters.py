"""QLoRA on CUDA: the 4-bit base computing in the run's 16-bit precision (bf16, and fp16 through the
grad scaler), bitsandbytes' paged 8-bit AdamW, an exact resume of its state, and merging such an
adapter. Marked `cuda` (see tests/test_cuda.py for how the tolerances are chosen)."""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch
from finetune_helpers import QUICK

from llmctl.checkpoint import load as loader
from llmctl.checkpoint.files import load_trainer_state, read_config
from llmctl.checkpoint.load import load_model
from llmctl.checkpoint.refs import resolve_model_ref
from llmctl.events import read_events
from llmctl.train.finetune import FinetuneOptions, build_model, make_plan
from llmctl.workspace import Workspace

pytest_plugins = ["finetune_fixtures"]
pytestmark = pytest.mark.cuda

CUDA = torch.device("cuda", 0)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# r 64 on this 64-wide base: bitsandbytes keeps 32-bit moments for tensors under 4096 values, and
# A (r x 64) must reach that for the 8-bit optimizer to be what is tested
LORA = ["--lora-r", "64", "--lora-targets", "q_proj,v_proj", "--set", "adapter.dropout=0"]


def qlora(ft, base_workspace, run: str, precision: str, *extra: str):
    return ft(
        "qlora",
        "--model",
        "base",
        "--data",
        base_workspace / "task.jsonl",
        "--run",
        run,
        *LORA,
        *QUICK,
        "--set",
        "train.device=cuda",
        "--set",
        "train.lr=1e-2",
        "--set",
        "train.log_every=5",
        "--precision",
        precision,
        *extra,
    )


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_qlora_on_cuda_computes_in_the_runs_precision_and_learns_with_paged_8bit_adamw(
    ft, base_workspace, precision
):
    ws = Workspace(base_workspace)
    options = FinetuneOptions(
        stage="qlora",
        run=f"cq-plan-{precision}",
        model="base",
        data=str(base_workspace / "task.jsonl"),
        precision=precision,
        overrides=["train.device=cuda"],
    )
    plan = make_plan(ws, options)
    assert plan.device.type == "cuda" and plan.optimizer_name == "paged AdamW 8-bit"
    layers = [m for m in build_model(plan).modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and {layer.compute_dtype for layer in layers} == {DTYPES[precision]}
    assert {layer.weight.device.type for layer in layers} == {"cuda"}

    run = f"cq-{precision}"
    result = qlora(ft, base_workspace, run, precision, "--max-steps", "60")
    assert result.exit_code == 0, result.stderr
    events = read_events(base_workspace / "runs" / run / "events.jsonl")
    start = next(event for event in events if event["event"] == "start")
    assert start["precision"] == precision and start["device"].startswith("cuda:0")
    train = [event for event in events if event["event"] == "train"]
    assert train[-1]["loss"] < 0.85 * train[0]["loss"]  # the adapter learned the task
    assert all(event["mem_bytes"] > 0 for event in train)

    state = load_trainer_state(resolve_model_ref(ws, f"{run}:latest"))
    moments = [value for param in state["optimizer"]["state"].values() for value in param.values()]
    # 8-bit moments: one byte per trained parameter per moment, with their block scales beside
    assert any(isinstance(v, torch.Tensor) and v.dtype == torch.uint8 for v in moments)
    if precision == "fp16":
        assert state["scaler"]["scale"] > 0  # the grad scaler ran and was saved
    else:
        assert state["scaler"] == {}


def test_a_resumed_qlora_run_with_paged_8bit_adamw_ends_where_an_uninterrupted_one_does(ft, base_workspace):
    every_10 = ["--set", "train.save_every=10", "--set", "train.eval_every=10"]
    assert qlora(ft, base_workspace, "cq-whole", "bf16", *every_10, "--max-steps", "20").exit_code == 0
    assert qlora(ft, base_workspace, "cq-half", "bf16", *every_10, "--max-steps", "10").exit_code == 0
    resumed = ft("qlora", "--run", "cq-half", "--resume", "--max-steps", "20")
    assert resumed.exit_code == 0, resumed.stderr
    ws = Workspace(base_workspace)

    def adapter(run: str) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        return load_file(str(resolve_model_ref(ws, f"{run}:step-20") / "adapter_model.safetensors"))

    whole, half = adapter("cq-whole"), adapter("cq-half")
    assert whole.keys() == half.keys()
    # bitsandbytes' 8-bit kernels and the 4-bit matmuls add in a fixed order; the rest is CUDA's
    # atomics (tests/test_cuda.py), well inside 1e-3 after ten steps of lr 1e-2
    assert max((whole[k].float() - half[k].float()).abs().max().item() for k in whole) < 1e-3


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_merging_a_cuda_qlora_adapter_gives_the_logits_of_base_plus_adapter(ft, base_workspace, precision):
    run = f"cq-merge-{precision}"
    assert qlora(ft, base_workspace, run, precision, "--max-steps", "30").exit_code == 0
    merged = ft("merge", run, "--run", f"{run}-merged")
    assert merged.exit_code == 0, merged.stderr

    ws = Workspace(base_workspace)
    adapter_dir, base_dir = resolve_model_ref(ws, run), resolve_model_ref(ws, "base")
    # the base as the adapter trained on it: 4-bit layers on the GPU computing in the run's precision
    base = loader.load_quantized_base(base_dir, read_config(adapter_dir), CUDA, DTYPES[precision])
    unmerged = loader.load_adapter(base, adapter_dir).to(CUDA).eval()
    folded = load_model(ws, f"{run}-merged", device=CUDA).model
    plain = loader.load_weights(base_dir, device=CUDA).eval()
    ids = torch.randint(0, 256, (2, 48), device=CUDA)
    with torch.no_grad():
        expected, actual, before = (net(ids).float() for net in (unmerged, folded, plain))
    trained_shift = (expected - before).abs().max().item()
    assert trained_shift > 0.2  # the adapter changed the model
    # the merged fp32 weights against 16-bit matmuls: a merge that lost the adapter would be off by
    # the whole shift, 16-bit rounding of logits this size by a few hundredths
    assert (actual - expected).abs().max().item() < 0.25 * trained_shift
