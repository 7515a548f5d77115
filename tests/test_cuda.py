"""Every CUDA path of training, generation, evaluation and serving, each checked against a value:
the CPU's result, the fp32 result, or an uninterrupted run. Marked `cuda`: run with `pytest -m cuda`
on a machine with a GPU (benchmarks/gpu.py does); skipped, naming the missing GPU, elsewhere.

Tolerances. CUDA's fp32 is not bit-reproducible between runs: the embedding's backward and
scaled_dot_product_attention's backward add with atomics, in an order that changes from run to run
(a relative error near 1e-7 per sum). Over ten AdamW steps at lr 3e-3 on these tiny models that moves
weights by well under 1e-4, while one wrong input to a resumed step (a dropout mask drawn from the
wrong CUDA RNG state, a grad scale off by a factor of two) moves them by about the learning rate.
So resumed and uninterrupted runs are compared at atol 1e-4 (RESUME_ATOL), and each resume test
also shows that the wrong state lands outside it. Comparisons with the CPU turn TF32 off, since the
trainer turns it on process-wide.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from pretrain_helpers import BASE, events_of
from tiny_checkpoints import write_run_checkpoint

from llmctl.checkpoint.load import load_model
from llmctl.config import GenerationConfig, ModelConfig, RunConfig, TrainConfig
from llmctl.model.transformer import Transformer
from llmctl.tokenizer import render_chat
from llmctl.train.batches import TokenWindows
from llmctl.train.optim import build_optimizer
from llmctl.train.precision import Precision
from llmctl.train.runinfo import RunInfo
from llmctl.train.trainer import Trainer
from llmctl.workspace import Workspace

pytestmark = pytest.mark.cuda

CUDA = torch.device("cuda", 0)
ROOT = Path(__file__).resolve().parents[1]
RESUME_ATOL = 1e-4
TINY = {"n_layer": 2, "n_head": 2, "d_model": 64, "context_length": 32, "vocab_size": 64}
GREEDY = GenerationConfig(temperature=0.0, max_new_tokens=40)


@pytest.fixture(autouse=True)
def full_fp32_matmuls():
    """The trainer turns TF32 on for the whole process; comparisons with the CPU need it off."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def pattern_tokens(n: int, seed: int = 0) -> np.ndarray:
    """A learnable stream: a noisy repeating cycle over the vocabulary."""
    rng = np.random.default_rng(seed)
    tokens = np.arange(n) % 13 + 3
    noise = rng.random(n) < 0.1
    tokens[noise] = rng.integers(0, 64, noise.sum())
    return tokens.astype(np.uint16)


def config(dropout: float = 0.0, **train) -> RunConfig:
    settings = {
        "micro_batch_size": 8,
        "max_steps": 20,
        "warmup_steps": 2,
        "lr": 3e-3,
        "eval_every": 10,
        "eval_batches": 2,
        "save_every": 10,
        "log_every": 1,
        **train,
    }
    return RunConfig(model=ModelConfig(**TINY, dropout=dropout), train=TrainConfig(**settings))


def windows(cfg: RunConfig, device: torch.device = CUDA) -> TokenWindows:
    return TokenWindows(
        pattern_tokens(8000),
        pattern_tokens(1000, seed=1),
        context_length=cfg.model.context_length,
        micro_batch_size=cfg.train.micro_batch_size,
        eval_batches=cfg.train.eval_batches,
        seed=cfg.train.seed,
        device=device,
        val_bytes_per_token=2.0,
    )


def trainer(run_dir: Path, cfg: RunConfig, precision: str, compile_model: bool = False) -> Trainer:
    torch.manual_seed(0)
    return Trainer(
        cfg,
        Transformer(cfg.model),
        windows(cfg),
        RunInfo(name=run_dir.name, stage="pretrain", dir=run_dir, registry=None),
        device=CUDA,
        precision=Precision(precision, "cuda"),
        compile_model=compile_model,
        show_progress=False,
    )


def losses(run_dir: Path) -> list[float]:
    from llmctl.events import read_events

    return [event["loss"] for event in read_events(run_dir / "events.jsonl") if event["event"] == "train"]


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().float().cpu().clone() for name, tensor in model.state_dict().items()}


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max((a[name] - b[name]).abs().max().item() for name in a)


def checkpoint(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step-{step:08d}"


# ---------------------------------------------------------------- precision


def test_bf16_autocast_computes_in_bf16_keeps_fp32_weights_and_follows_the_fp32_curve(tmp_path):
    fp32 = trainer(tmp_path / "fp32", config(), "fp32")
    assert fp32.fit().reason == "finished"
    bf16 = trainer(tmp_path / "bf16", config(), "bf16")
    batch = bf16.batches.next_batch()
    with bf16.precision.autocast():
        logits = bf16.model(batch["input_ids"])
    assert logits.dtype == torch.bfloat16
    assert all(param.dtype == torch.float32 for param in bf16.model.parameters())
    bf16 = trainer(tmp_path / "bf16b", config(), "bf16")
    first = bf16.measure()["val_loss"]
    result = bf16.fit()
    assert result.reason == "finished" and result.best_val_loss < first - 0.3  # it learned
    # bf16 keeps 8 bits of mantissa: a loss near 3 is within a few hundredths of fp32's
    np.testing.assert_allclose(losses(tmp_path / "bf16b"), losses(tmp_path / "fp32"), rtol=0.05)


def test_fp16_trains_through_the_grad_scaler_and_an_exact_resume_restores_its_state(tmp_path):
    whole = trainer(tmp_path / "whole", config(), "fp16")
    assert whole.scaler.is_enabled()
    assert whole.fit().reason == "finished"
    saved = torch.load(checkpoint(tmp_path / "whole", 10) / "trainer_state.pt", weights_only=False)["scaler"]
    # the scaler counts clean steps toward growing its scale and halves it on an overflow: ten
    # steps leave a state (not the initial 2**16 and 0) that the resumed run must continue from
    assert saved["_growth_tracker"] > 0 or saved["scale"] < 65536.0

    resumed = trainer(tmp_path / "resumed", config(), "fp16")
    resumed.resume(checkpoint(tmp_path / "whole", 10))
    assert resumed.scaler.state_dict() == saved
    resumed.fit()
    assert max_difference(weights(resumed.model), weights(whole.model)) < RESUME_ATOL
    # a resume that started a fresh scaler would end ten clean steps short in its growth count
    assert resumed.scaler.state_dict() == whole.scaler.state_dict()


def test_a_resumed_run_draws_dropout_from_the_cuda_rng_it_saved(tmp_path):
    whole = trainer(tmp_path / "whole", config(dropout=0.2), "fp32")
    whole.fit()
    state = torch.load(checkpoint(tmp_path / "whole", 10) / "trainer_state.pt", weights_only=False)
    assert len(state["rng"][0]["cuda"]) == torch.cuda.device_count()

    resumed = trainer(tmp_path / "resumed", config(dropout=0.2), "fp32")
    resumed.resume(checkpoint(tmp_path / "whole", 10))
    assert torch.equal(torch.cuda.get_rng_state(CUDA), state["rng"][0]["cuda"][0])
    resumed.fit()
    assert max_difference(weights(resumed.model), weights(whole.model)) < RESUME_ATOL

    reseeded = trainer(tmp_path / "reseeded", config(dropout=0.2), "fp32")
    reseeded.resume(checkpoint(tmp_path / "whole", 10))
    torch.cuda.manual_seed(12345)  # other dropout masks from here on: the weights must tell
    reseeded.fit()
    assert max_difference(weights(reseeded.model), weights(whole.model)) > 10 * RESUME_ATOL


# ---------------------------------------------------------------- optimizer, TF32, compile, batches


def test_cuda_training_uses_the_fused_adamw_whose_step_equals_the_unfused_one():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**TINY)).to(CUDA)
    twin, initial = copy.deepcopy(model), weights(model)
    fused = build_optimizer(model, config().train, CUDA)
    assert fused.defaults["fused"]
    plain = torch.optim.AdamW(
        [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in _groups(twin)],
        lr=fused.defaults["lr"],
        betas=fused.defaults["betas"],
        foreach=False,
    )
    ids = torch.randint(0, 64, (4, 32), device=CUDA)
    for _ in range(3):
        # one backward's gradients into both: atomics make two backward passes differ in the last
        # bits, which Adam's first steps (about lr times the gradient's sign) would magnify
        fused.zero_grad()
        model(ids).float().logsumexp(-1).mean().backward()
        for mine, theirs in zip(model.parameters(), twin.parameters(), strict=True):
            theirs.grad = mine.grad.clone()
        fused.step()
        plain.step()
    assert max_difference(weights(model), weights(twin)) < 1e-6
    assert max_difference(weights(model), initial) > 1e-3  # the steps moved the weights


def _groups(model: torch.nn.Module) -> list[dict]:
    from llmctl.train.optim import param_groups

    return param_groups(model, config().train.weight_decay)


def test_the_trainer_turns_on_tf32_matmuls_and_they_round_as_tf32_does(tmp_path):
    a, b = torch.randn(512, 512, device=CUDA), torch.randn(512, 512, device=CUDA)
    exact = (a.double() @ b.double()).float()
    ieee_error = ((a @ b) - exact).abs().max().item()
    trainer(tmp_path / "t", config(), "fp32")
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    tf32_error = ((a @ b) - exact).abs().max().item()
    # TF32 keeps 10 mantissa bits (about 1e-3 relative per product), IEEE fp32 23
    assert tf32_error > 20 * ieee_error and tf32_error < 1.0


def test_a_compiled_model_trains_as_the_eager_one_does(tmp_path):
    eager = trainer(tmp_path / "eager", config(max_steps=10), "bf16")
    eager.fit()
    compiled = trainer(tmp_path / "compiled", config(max_steps=10), "bf16", compile_model=True)
    assert type(compiled.train_model).__name__ == "OptimizedModule"
    compiled.fit()
    # inductor fuses bf16 kernels differently from eager (fp32 between fused ops): the same curve to
    # bf16's precision; weights are not compared, Adam magnifies last-bit differences of tiny gradients
    curve = losses(tmp_path / "compiled")
    np.testing.assert_allclose(curve, losses(tmp_path / "eager"), rtol=0.03)
    assert curve[-1] < curve[0] - 0.3


def test_batches_copied_from_pinned_memory_hold_the_cpu_batches():
    cfg = config()
    on_gpu, on_cpu = windows(cfg, CUDA), windows(cfg, torch.device("cpu"))
    drawn = [on_gpu.next_batch() for _ in range(50)]  # non-blocking copies queued back to back
    expected = [on_cpu.next_batch() for _ in range(50)]
    torch.cuda.synchronize()
    for got, want in zip(drawn, expected, strict=True):
        assert got["input_ids"].device == CUDA and got["input_ids"].dtype == torch.int64
        assert torch.equal(got["input_ids"].cpu(), want["input_ids"])
        assert torch.equal(got["labels"].cpu(), want["labels"])
    evals = [batch["input_ids"].cpu() for batch in on_gpu.eval_batches()]
    assert all(torch.equal(a, b["input_ids"]) for a, b in zip(evals, on_cpu.eval_batches(), strict=True))


# ---------------------------------------------------------------- DDP through torchrun


@pytest.mark.usefixtures("single_thread")
def test_one_process_under_torchrun_trains_with_nccl_ddp_as_a_plain_run_does(cli, ws):
    schedule = [
        "--max-steps",
        "20",
        "--precision",
        "fp32",
        "--set",
        "train.device=cuda",
        "--set",
        "train.compile=off",
    ]
    assert cli(*BASE, "--run", "plain", *schedule).exit_code == 0
    env = {**os.environ, "LLMCTL_HOME": str(ws), "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1"]
    child = subprocess.run(
        [*command, "-m", "llmctl", *BASE, "--run", "ddp", *schedule],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert child.returncode == 0, child.stderr[-3000:]

    def first(run: str, field: str):
        return next(event[field] for event in events_of(ws, run) if event["event"] == "start")

    assert first("ddp", "distributed") == "nccl" and first("plain", "distributed") is None
    assert first("ddp", "world_size") == 1 and first("ddp", "device").startswith("cuda:0")
    curve = {
        run: [event["loss"] for event in events_of(ws, run) if event["event"] == "train"]
        for run in ("plain", "ddp")
    }
    # DDP's bucketed all-reduce over one rank divides by 1: the same steps, to CUDA's fp32 noise
    np.testing.assert_allclose(curve["ddp"], curve["plain"], atol=1e-3)


# ---------------------------------------------------------------- generation, eval, serve


@pytest.fixture(scope="module")
def chat_checkpoint(tmp_path_factory) -> Path:
    """tiny_checkpoints' chat model: it answers 'hi' greedily with GREETING."""
    return write_run_checkpoint(tmp_path_factory.mktemp("chat"), "chat")


@pytest.mark.parametrize(("dtype", "agree"), [("fp32", 40), ("bf16", 12), ("fp16", 12)])
def test_generation_on_cuda_in_each_dtype_matches_the_cpu(chat_checkpoint, dtype, agree):
    from llmctl.generate import Engine

    workspace = Workspace(chat_checkpoint.parents[3])
    prompt = render_chat([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    loaded = load_model(workspace, str(chat_checkpoint))
    cpu = Engine(copy.deepcopy(loaded.model), loaded.tokenizer)
    want = cpu.generate([prompt], GREEDY)[0]
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    gpu = Engine(loaded.model, loaded.tokenizer, device=CUDA, dtype=torch_dtype)
    got = gpu.generate([prompt], GREEDY)[0]
    assert gpu.device.type == "cuda" and gpu.model.embed_tokens.weight.dtype == torch_dtype
    # the model is confident on its trained replies: 16-bit rounding keeps the first tokens
    assert got.token_ids[:agree] == want.token_ids[:agree], (got.text, want.text)
    ids = torch.tensor([cpu.tokenizer.encode(prompt)])
    with torch.no_grad():
        expected = cpu.model(ids).float().log_softmax(-1)
        actual = gpu.model(ids.to(CUDA)).float().log_softmax(-1).cpu()
    # relative to the largest log-probability: weights rounded to 8 (bf16) or 11 (fp16) mantissa bits
    tolerance = {"fp32": 1e-5, "bf16": 0.03, "fp16": 0.005}[dtype]
    assert (actual - expected).abs().max().item() < tolerance * expected.abs().max().item()


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    from eval_helpers import trained_workspace

    return trained_workspace(tmp_path_factory.mktemp("cuda-eval") / "workspace")


def test_eval_perplexity_on_cuda_equals_the_cpu(cli, trained, tmp_path):
    from eval_helpers import RUN

    path = tmp_path / "text.py"
    path.write_text(
        "def add(a, b):\n    return a + b\n\n\nclass Stack:\n    def push(self, x):\n        pass\n"
    )

    def measure(*flags: str) -> dict:
        result = cli("--workspace", trained, "eval", "perplexity", "-m", RUN, "-f", path, "--json", *flags)
        assert result.exit_code == 0, result.stderr
        return result.json()

    cpu, gpu = measure("--device", "cpu", "--dtype", "fp32"), measure("--device", "cuda", "--dtype", "fp32")
    assert gpu["tokens"] == cpu["tokens"] and gpu["nats"] == pytest.approx(cpu["nats"], rel=1e-5)
    bf16 = measure("--device", "cuda", "--dtype", "bf16")
    assert bf16["bits_per_byte"] == pytest.approx(cpu["bits_per_byte"], rel=0.03)


def test_eval_humaneval_model_on_cuda_writes_the_cpus_greedy_completions(cli, trained, tmp_path):
    from eval_helpers import RUN

    texts = {}
    for device in ("cpu", "cuda"):
        flags = (
            "--limit",
            "2",
            "--n-samples",
            "1",
            "--max-new-tokens",
            "32",
            "--temperature",
            "0",
            "--dtype",
        )
        out = tmp_path / device
        result = cli(
            "--workspace",
            trained,
            "eval",
            "humaneval",
            "-m",
            RUN,
            *flags,
            "fp32",
            "--device",
            device,
            "--out",
            out,
        )
        assert result.exit_code == 0, result.stderr
        lines = (out / "completions.jsonl").read_text().splitlines()
        texts[device] = [(row["task_id"], row["completion"]) for row in map(json.loads, lines)]
    assert texts["cuda"] == texts["cpu"] and len(texts["cpu"]) == 2


def test_serve_on_cuda_answers_as_the_cpu_server_does(chat_checkpoint):
    httpx = pytest.importorskip("httpx")
    from serve_helpers import running_server

    from llmctl.serve.app import ServeSettings

    root = chat_checkpoint.parents[3]
    reg = Workspace(root).registry()
    if reg.run("chat") is None:
        reg.add_run("chat", "finetune", root / "runs" / "chat")
        reg.add_checkpoint("chat", 100, "full", chat_checkpoint, {"val_loss": None})
    body = {"model": "chat", "messages": [{"role": "user", "content": "hi"}], "temperature": 0}
    replies = {}
    for device in ("cpu", "cuda"):
        with running_server(ServeSettings(root, device=device, dtype="fp32")) as url:
            response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)
            assert response.status_code == 200, response.text
            replies[device] = response.json()["choices"][0]["message"]["content"]
            models = httpx.get(f"{url}/v1/models", timeout=60).json()
            assert any(model["id"] == "chat" for model in models["data"])
    assert replies["cuda"] == replies["cpu"] and replies["cpu"].startswith("Hello")
