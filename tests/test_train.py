"""The trainer's parts, called directly: schedule, decay groups, data windows, checkpoints,
non-finite losses, precision and peak-FLOPS lookup. Tiny models on synthetic tokens keep it fast."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from llmctl.checkpoint.files import (
    CheckpointError,
    FullModelIO,
    load_trainer_state,
    read_meta,
    select_resume_checkpoint,
    write_checkpoint,
)
from llmctl.config import ModelConfig, RunConfig, TrainConfig
from llmctl.errors import LlmctlError, UsageError
from llmctl.events import EndReason, read_events
from llmctl.model.sizing import flops_per_token
from llmctl.model.transformer import Transformer
from llmctl.train.batches import TokenWindows
from llmctl.train.losses import LossResult, lm_loss
from llmctl.train.mfu import gpu_peak_flops, peak_flops
from llmctl.train.optim import CosineSchedule, param_groups
from llmctl.train.precision import Precision, resolve_precision
from llmctl.train.rng import capture_rng_state, restore_rng_state
from llmctl.train.runinfo import RunInfo
from llmctl.train.trainer import NONFINITE_STOP_AFTER, Trainer


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models on two OpenMP threads stall whenever other processes busy the cores; one is steady."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


TINY = {"n_layer": 1, "n_head": 2, "d_model": 32, "context_length": 16, "vocab_size": 64}


def tiny_config(**train) -> RunConfig:
    settings = {
        "micro_batch_size": 4,
        "max_steps": 20,
        "warmup_steps": 2,
        "eval_every": 10,
        "eval_batches": 2,
        "save_every": 5,
        "log_every": 5,
        "precision": "fp32",
        **train,
    }
    return RunConfig(model=ModelConfig(**TINY), train=TrainConfig(**settings))


def pattern_tokens(n: int, seed: int = 0) -> np.ndarray:
    """A learnable stream: a noisy repeating cycle over the vocabulary."""
    rng = np.random.default_rng(seed)
    tokens = np.arange(n) % 13 + 3
    noise = rng.random(n) < 0.1
    tokens[noise] = rng.integers(0, 64, noise.sum())
    return tokens.astype(np.uint16)


def windows(config: RunConfig, rank: int = 0, world_size: int = 1, micro: int | None = None) -> TokenWindows:
    return TokenWindows(
        pattern_tokens(4000),
        pattern_tokens(600, seed=1),
        context_length=config.model.context_length,
        micro_batch_size=micro or config.train.micro_batch_size,
        eval_batches=config.train.eval_batches,
        seed=config.train.seed,
        device=torch.device("cpu"),
        val_bytes_per_token=2.0,
        rank=rank,
        world_size=world_size,
    )


def make_trainer(tmp_path: Path, config: RunConfig, **kwargs) -> Trainer:
    torch.manual_seed(0)
    run = RunInfo(name="t", stage="pretrain", dir=tmp_path / "run", registry=None)
    return Trainer(
        config,
        Transformer(config.model),
        windows(config),
        run,
        device=torch.device("cpu"),
        precision=Precision("fp32", "cpu"),
        show_progress=False,
        **kwargs,
    )


# ---------------------------------------------------------------- schedule and optimizer


def test_schedule_warms_up_linearly_then_follows_the_cosine_to_the_floor():
    train = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10)
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])
    schedule = CosineSchedule(optimizer, train, total_steps=110)
    assert schedule.lr_at(0) == pytest.approx(1e-4)
    assert schedule.lr_at(4) == pytest.approx(5e-4)
    assert schedule.lr_at(9) == pytest.approx(1e-3)
    assert schedule.lr_at(10) == pytest.approx(1e-3)
    assert schedule.lr_at(60) == pytest.approx(1e-4 + 0.5 * 9e-4)  # half way: the cosine's midpoint
    assert schedule.lr_at(110) == pytest.approx(1e-4)
    assert schedule.lr_at(500) == pytest.approx(1e-4)
    assert CosineSchedule(optimizer, train, total_steps=None).lr_at(10_000) == pytest.approx(1e-3)

    schedule.step_index = 4
    assert schedule.apply() == pytest.approx(5e-4)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(5e-4)
    schedule.advance()
    restored = CosineSchedule(optimizer, train, total_steps=110)
    restored.load_state_dict(schedule.state_dict())
    assert restored.step_index == 5


def test_norms_biases_and_embeddings_take_no_weight_decay():
    model = Transformer(ModelConfig(**TINY, bias=True))
    model.layers[0].mlp.up_proj.weight.requires_grad_(False)  # a frozen weight is left out entirely
    decay, no_decay = param_groups(model, weight_decay=0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): name for name, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    exempt = {names[id(p)] for p in no_decay["params"]}
    assert "layers.0.self_attn.q_proj.weight" in decayed and "layers.0.mlp.down_proj.weight" in decayed
    assert {
        "embed_tokens.weight",
        "norm.weight",
        "layers.0.input_layernorm.weight",
        "layers.0.self_attn.q_proj.bias",
    } <= exempt
    assert not any(name.endswith("bias") or "norm" in name or "embed" in name for name in decayed)
    assert "layers.0.mlp.up_proj.weight" not in decayed | exempt
    # the tied lm_head is the embedding tensor: counted once, undecayed
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert sum(p.numel() for group in (decay, no_decay) for p in group["params"]) == trainable


# ---------------------------------------------------------------- data


def test_windows_resume_from_their_state_and_split_one_global_batch_between_ranks():
    config = tiny_config(micro_batch_size=4)
    source = windows(config)
    source.next_batch()
    state = source.state_dict()
    expected = [source.next_batch()["input_ids"] for _ in range(3)]
    resumed = windows(config)
    resumed.load_state_dict(state)
    assert all(torch.equal(resumed.next_batch()["input_ids"], batch) for batch in expected)

    single = windows(config).next_batch()
    halves = [windows(config, rank=rank, world_size=2, micro=2).next_batch() for rank in (0, 1)]
    assert torch.equal(torch.cat([half["input_ids"] for half in halves]), single["input_ids"])
    assert torch.equal(single["labels"][:, :-1], single["input_ids"][:, 1:])  # labels are the next tokens

    eval_a = [batch["input_ids"] for batch in windows(config).eval_batches()]
    eval_b = [batch["input_ids"] for batch in windows(config).eval_batches()]
    assert len(eval_a) == config.train.eval_batches and all(map(torch.equal, eval_a, eval_b))


# ---------------------------------------------------------------- checkpoints


def test_checkpoint_round_trip_gives_identical_logits_and_rng(tmp_path):
    config = tiny_config()
    model = Transformer(config.model)
    torch.manual_seed(5)
    rng = capture_rng_state()
    path = write_checkpoint(
        tmp_path / "step-00000001",
        model=model,
        model_io=FullModelIO(),
        config=config,
        trainer_state={"rng": [rng]},
        meta={"step": 1},
    )
    torch.rand(3)
    restore_rng_state(load_trainer_state(path)["rng"][0])
    after_restore = torch.rand(3)
    torch.manual_seed(5)
    assert torch.equal(after_restore, torch.rand(3))

    torch.manual_seed(99)
    fresh = Transformer(config.model)
    FullModelIO().load(fresh, path)
    ids = torch.randint(0, 64, (2, 16))
    assert torch.equal(model(ids), fresh(ids))
    assert fresh.lm_head.weight is fresh.embed_tokens.weight  # still tied after loading
    assert set(read_meta(path)["files"]) == {"model.safetensors", "config.yaml", "trainer_state.pt"}


def test_damaged_checkpoints_are_named_and_skipped_only_when_asked(tmp_path):
    config = tiny_config()
    run_dir = tmp_path / "run"
    for step in (5, 10):
        write_checkpoint(
            run_dir / "checkpoints" / f"step-{step:08d}",
            model=Transformer(config.model),
            model_io=FullModelIO(),
            config=config,
            trainer_state={"step": step},
            meta={"step": step},
        )
    state = run_dir / "checkpoints" / "step-00000010" / "trainer_state.pt"
    state.write_bytes(state.read_bytes()[:100])  # truncated, as by a full disk
    with pytest.raises(CheckpointError, match=f"'{state}' is corrupt or truncated"):
        select_resume_checkpoint(run_dir, fallback=False, on_skip=print)
    skipped = []
    assert select_resume_checkpoint(run_dir, fallback=True, on_skip=skipped.append).name == "step-00000005"
    assert str(state) in skipped[0]

    weights = run_dir / "checkpoints" / "step-00000005" / "model.safetensors"
    weights.write_bytes(b"\0" * weights.stat().st_size)  # same size, garbage inside
    with pytest.raises(CheckpointError, match=f"'{weights}' is corrupt or truncated"):
        FullModelIO().load(Transformer(config.model), weights.parent)
    with pytest.raises(LlmctlError, match="no checkpoint to resume"):
        select_resume_checkpoint(tmp_path / "empty", fallback=False, on_skip=print)


# ---------------------------------------------------------------- the loop


def test_training_lowers_the_loss_and_writes_events_and_checkpoints(tmp_path):
    trainer = make_trainer(tmp_path, tiny_config(max_steps=40, lr=3e-3, keep_last=1))
    first = trainer.measure()["val_loss"]
    result = trainer.fit()
    assert result.reason == "finished" and result.exit_code == 0 and result.step == 40
    assert result.best_val_loss < first - 1.0
    events = read_events(tmp_path / "run" / "events.jsonl")
    kinds = [event["event"] for event in events]
    assert kinds[0] == "start" and kinds[-1] == "end" and events[-1]["reason"] == "finished"
    train = [event for event in events if event["event"] == "train"]
    assert [event["step"] for event in train] == [5, 10, 15, 20, 25, 30, 35, 40]
    assert all(event["tokens_per_s"] > 0 and event["grad_norm"] > 0 for event in train)
    evals = [event for event in events if event["event"] == "eval"]
    assert evals[-1]["val_bpb"] == pytest.approx(evals[-1]["val_loss"] / math.log(2) / 2.0, rel=1e-5)
    # keep_last=1: the newest checkpoint, plus the best one when that is older
    kept = sorted(path.name for path in (tmp_path / "run" / "checkpoints").iterdir())
    assert kept[-1] == "step-00000040" and len(kept) <= 2


def test_accumulating_two_half_batches_follows_one_whole_batch(tmp_path):
    whole = make_trainer(tmp_path / "whole", tiny_config(max_steps=10, micro_batch_size=8))
    halves = make_trainer(
        tmp_path / "halves", tiny_config(max_steps=10, micro_batch_size=4, grad_accum_steps=2)
    )
    whole.fit(), halves.fit()
    for name, param in whole.model.named_parameters():
        assert torch.allclose(param, dict(halves.model.named_parameters())[name], atol=1e-5), name


def test_activation_checkpointing_recomputes_without_changing_the_result(tmp_path):
    plain = make_trainer(tmp_path / "plain", tiny_config(max_steps=5))
    recomputed = make_trainer(
        tmp_path / "recomputed", tiny_config(max_steps=5, activation_checkpointing=True)
    )
    assert recomputed.model.gradient_checkpointing and not plain.model.gradient_checkpointing
    plain.fit(), recomputed.fit()
    assert all(
        torch.equal(a, b)
        for a, b in zip(plain.model.parameters(), recomputed.model.parameters(), strict=True)
    )


def test_a_non_finite_loss_is_skipped_then_stops_the_run_keeping_the_last_good_checkpoint(tmp_path):
    calls = {"micro_batches": 0}

    def poisoned_after_six_steps(model, batch):
        result = lm_loss(model, batch)
        calls["micro_batches"] += 1
        if calls["micro_batches"] > 6:
            result.loss = result.loss * float("nan")
        return result

    trainer = make_trainer(tmp_path, tiny_config(), loss_fn=poisoned_after_six_steps)
    result = trainer.fit()
    assert result.reason == "nonfinite_loss" and result.exit_code == 1
    assert result.step == 6 + NONFINITE_STOP_AFTER
    assert result.last_checkpoint.name == "step-00000005"
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())  # skipped steps changed nothing
    events = read_events(tmp_path / "run" / "events.jsonl")
    alerts = [event for event in events if event["event"] == "alert"]
    assert len(alerts) == NONFINITE_STOP_AFTER and alerts[0]["kind"] == "nonfinite_loss"
    assert events[-1]["event"] == "end" and events[-1]["reason"] == "nonfinite_loss"


def test_early_stopping_after_patience_evaluations_without_improvement(tmp_path):
    # lr 0 (after a zero warmup) keeps the val loss flat, so every evaluation after the first fails to improve
    config = tiny_config(
        max_steps=100,
        lr=1e-9,
        min_lr=0,
        warmup_steps=0,
        eval_every=5,
        early_stopping_patience=2,
        early_stopping_min_delta=0.01,
    )
    result = make_trainer(tmp_path, config).fit()
    assert result.reason == "early_stopping" and result.step == 15 and result.exit_code == 0


# ---------------------------------------------------------------- precision and peaks


def _cpu_lists_bf16() -> bool:
    """Whether this CPU has bf16 matrix instructions, read from /proc/cpuinfo's flags (x86) or
    features (ARM); where there is no such file, what llmctl measured decides."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        from llmctl.train.mfu import cpu_has_fast_bf16

        return cpu_has_fast_bf16()
    flags = set()
    for line in cpuinfo.read_text().splitlines():
        if line.split(":")[0].strip() in ("flags", "Features"):
            flags |= set(line.split(":", 1)[1].split())
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def test_precision_choices():
    cpu = torch.device("cpu")
    assert resolve_precision("fp32", cpu).autocast_dtype is None
    assert resolve_precision("bf16", cpu).autocast_dtype == torch.bfloat16
    assert not resolve_precision("bf16", cpu).needs_grad_scaler
    assert resolve_precision("auto", cpu).name == ("bf16" if _cpu_lists_bf16() else "fp32")
    with pytest.raises(UsageError, match="fp16 needs a CUDA GPU"):
        resolve_precision("fp16", cpu)


@pytest.mark.parametrize(
    ("name", "sixteen_bit", "expected"),
    [
        ("NVIDIA H100 80GB HBM3", True, 989e12),
        ("NVIDIA H100 PCIe", True, 756e12),
        ("NVIDIA A100-SXM4-40GB", False, 156e12),
        ("NVIDIA GeForce RTX 4060 Ti", True, 44e12),
        ("NVIDIA GeForce RTX 4060", True, 30.2e12),
        ("NVIDIA L4", True, 121e12),
        ("Some Future GPU", True, None),
    ],
)
def test_gpu_peak_flops_table(name, sixteen_bit, expected):
    assert gpu_peak_flops(name, sixteen_bit) == expected


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_run_uses_fused_adamw_autocast_and_compile(tmp_path):
    device = torch.device("cuda")
    config = tiny_config(max_steps=30, lr=3e-3, precision="auto", compile="on")
    precision = resolve_precision("auto", device)
    source = TokenWindows(
        pattern_tokens(4000),
        pattern_tokens(600, seed=1),
        context_length=16,
        micro_batch_size=4,
        eval_batches=2,
        seed=0,
        device=device,
        val_bytes_per_token=2.0,
    )
    run = RunInfo(name="gpu", stage="pretrain", dir=tmp_path / "run", registry=None)
    torch.manual_seed(0)
    trainer = Trainer(
        config,
        Transformer(config.model),
        source,
        run,
        device=device,
        precision=precision,
        compile_model=True,
        show_progress=False,
    )
    assert trainer.optimizer.defaults["fused"] and precision.name in ("bf16", "fp16")
    first = trainer.measure()["val_loss"]
    result = trainer.fit()
    assert result.reason == "finished" and result.best_val_loss < first
    start = read_events(tmp_path / "run" / "events.jsonl")[0]
    assert start["device"].startswith("cuda:0 ") and start["compile"]


# ---------------------------------------------------------------- listeners, requested stops, loss figures


def test_listeners_hear_every_event_and_a_failing_one_is_dropped_with_an_alert(tmp_path):
    heard: list[dict] = []

    def broken(record: dict) -> None:
        if record["event"] == "eval":
            raise OSError("disk full")

    trainer = make_trainer(tmp_path, tiny_config(), listeners=[heard.append, broken])
    assert trainer.fit().reason == "finished"
    written = read_events(tmp_path / "run" / "events.jsonl")
    (alert,) = [event for event in written if event.get("kind") == "listener_failed"]
    assert "stopped following the run: OSError: disk full" in alert["message"]
    # the working listener heard exactly what was written, alert aside (the log writes it directly)
    assert heard == [
        event for event in written if event is not alert and event.get("kind") != "listener_failed"
    ]
    assert [event["event"] for event in heard][-1] == "end"


def test_a_listener_can_stop_the_run_with_its_own_reason(tmp_path):
    holder: list[Trainer] = []

    def prune_after_first_eval(record: dict) -> None:
        if record["event"] == "eval":
            holder[0].request_stop(EndReason.PRUNED)

    trainer = make_trainer(tmp_path, tiny_config(), listeners=[prune_after_first_eval])
    holder.append(trainer)
    result = trainer.fit()
    assert result.reason is EndReason.PRUNED and result.step == 10 and result.exit_code == 0
    events = read_events(tmp_path / "run" / "events.jsonl")
    assert events[-1]["event"] == "end" and events[-1]["reason"] == "pruned"
    assert [event["step"] for event in events if event["event"] == "checkpoint"][-1] == 10


def test_a_loss_s_own_figures_are_averaged_into_train_events(tmp_path):
    def loss_with_figures(model, batch) -> LossResult:
        result = lm_loss(model, batch)
        items = batch["input_ids"].shape[0]
        # per row: a constant 2.0 and the row's index, so the per-item mean is known exactly
        sums = {"two": torch.tensor(2.0 * items), "row": torch.tensor(float(sum(range(items))))}
        return LossResult(result.loss, items, sums)

    config = tiny_config(max_steps=10)
    trainer = make_trainer(tmp_path, config, loss_fn=loss_with_figures)
    trainer.fit()
    train = [event for event in read_events(tmp_path / "run" / "events.jsonl") if event["event"] == "train"]
    rows = config.train.micro_batch_size
    assert [event["two"] for event in train] == [pytest.approx(2.0)] * 2
    assert all(event["row"] == pytest.approx((rows - 1) / 2) for event in train)
    evals = [event for event in read_events(tmp_path / "run" / "events.jsonl") if event["event"] == "eval"]
    assert evals[-1]["val_two"] == pytest.approx(2.0)


def test_mfu_is_the_hand_counted_flops_at_the_measured_rate_over_the_peak(tmp_path):
    config = tiny_config(max_steps=10, log_every=5)
    # by hand for TINY (tied 64-token table, one layer of width 32, context 16): attention 4·32·32,
    # MLP 3·32·ff, two norms, the final norm and the table as the head; 12·L·H·Q·T for attention
    ff = config.model.ff_dim
    multiplied = 4 * 32 * 32 + 3 * 32 * ff + 2 * 32 + 32 + 64 * 32
    hand = 6 * multiplied + 12 * 1 * 2 * 16 * 16
    assert flops_per_token(config.model) == hand
    trainer = make_trainer(tmp_path, config, flops_per_token=hand)
    assert trainer.peak_flops == peak_flops(torch.device("cpu"), "fp32") > 0
    trainer.fit()
    train = [e for e in read_events(tmp_path / "run" / "events.jsonl") if e["event"] == "train"]
    assert len(train) == 2
    for event in train:
        assert event["mfu"] == pytest.approx(hand * event["tokens_per_s"] / trainer.peak_flops, abs=1e-4)
