"""Pretraining throughput, and what five minutes of cpu-debug learn.

    python benchmarks/pretrain.py [--steps 20] [--models cpu-debug,6L-384] [--no-compile]
    python benchmarks/pretrain.py --learning [--minutes 5] [--workspace DIR]
    python benchmarks/pretrain.py --quick          # a smoke test of the script itself

Throughput (the default): tokens/s and MFU of llmctl's Trainer on random tokens, for
  - cpu-debug (2 layers, 256 wide, context 128, batch 16, 8k vocabulary) and
  - a 6-layer, 6-head, 384-wide model at context 256, batch 8, 8k vocabulary,
in fp32 and bf16 autocast, with torch.compile off and on, against a plain eager loop (model, AdamW,
cross-entropy, nothing else) over the same model and batches in the same process, in fp32 and in
bf16 autocast: each Trainer row is compared with the plain loop of its own precision, and with the
fp32 one. Both are timed by wall clock over the same span of steps after the untimed warm-up
steps (the Trainer from its events' elapsed training time, which covers whole steps). Every
configuration is run once untimed before the first timed round; then --rounds timed rounds, the
order rotated each round, each configuration keeping its best round, so a busy neighbour slows
every configuration alike. On a CUDA GPU it adds gpt2-124m in bf16 with compile.
Goals: on CPU the Trainer at least 1.5x the plain loop on the 6-layer model; on an H100 an MFU of
45% or more for gpt2-124m.

Learning (--learning): the stdlib corpus, an 8k tokenizer and `llmctl pretrain --preset cpu-debug
--max-time 5m`, then the validation curve (loss and bits per byte) from the run's events, starting
from the untrained model's figures (step 0).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from llmctl.config import RunConfig, resolve_config
from llmctl.events import read_events
from llmctl.model.sizing import count_parameters, flops_per_token
from llmctl.model.transformer import Transformer
from llmctl.train.batches import TokenWindows
from llmctl.train.distributed import DistEnv
from llmctl.train.mfu import peak_flops
from llmctl.train.precision import describe_device, resolve_precision
from llmctl.train.pretrain import PretrainOptions, make_plan
from llmctl.train.runinfo import RunInfo
from llmctl.train.trainer import Trainer
from llmctl.workspace import Workspace

SIX_LAYER = {"n_layer": 6, "n_head": 6, "d_model": 384, "context_length": 256, "vocab_size": 8192}


@dataclass
class Case:
    name: str
    config: RunConfig


def cases(names: list[str], quick: bool) -> list[Case]:
    found = []
    for name in names:
        if name == "6L-384":
            config = resolve_config(
                overrides=[f"model.{k}={v}" for k, v in SIX_LAYER.items()] + ["train.micro_batch_size=8"]
            )
        else:
            config = resolve_config(preset=name)
        if quick:
            config = resolve_config(
                base=config.model_dump(),
                overrides=[
                    "model.n_layer=1",
                    "model.d_model=64",
                    "model.n_head=2",
                    "model.context_length=32",
                    "model.vocab_size=512",
                    "train.micro_batch_size=2",
                ],
            )
        found.append(Case(name, config))
    return found


def cpu_flags() -> str:
    """The matrix instruction sets the CPU lists (what bf16's speed depends on)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    listed = next(
        (line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []
    )
    return (
        ", ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in listed) or "none listed"
    )


def random_tokens(config: RunConfig, n: int = 200_000) -> np.ndarray:
    return np.random.default_rng(0).integers(0, config.model.vocab_size, n).astype(np.uint16)


def trainer_tokens_per_s(
    config: RunConfig,
    device: torch.device,
    precision: str,
    compile_model: bool,
    steps: int,
    warmup: int,
    run_dir: Path,
) -> float:
    """The Trainer's own tokens/s over the steps after `warmup` (which absorb compilation), from
    its per-step train events: the harmonic mean of equal-sized steps is total tokens / total time."""
    settings = {
        "max_steps": warmup + steps,
        "log_every": 1,
        "eval_every": 10**9,
        "save_every": 10**9,
        "eval_batches": 1,
        "warmup_steps": 1,
        "precision": precision,
        "compile": "on" if compile_model else "off",
    }
    config = config.model_copy(update={"train": config.train.model_copy(update=settings)})
    tokens = random_tokens(config)
    batches = TokenWindows(
        tokens,
        tokens[:10_000],
        context_length=config.model.context_length,
        micro_batch_size=config.train.micro_batch_size,
        eval_batches=1,
        seed=0,
        device=device,
    )
    # each configuration compiles a fresh model; without a reset, Dynamo's cache of earlier ones
    # reaches its recompile limit and later configurations silently run eager
    torch._dynamo.reset()
    torch.manual_seed(0)
    run = RunInfo(name=run_dir.name, stage="pretrain", dir=run_dir, registry=None)
    Trainer(
        config,
        Transformer(config.model),
        batches,
        run,
        device=device,
        precision=resolve_precision(precision, device),
        compile_model=compile_model,
        show_progress=False,
    ).fit()
    train = [e for e in read_events(run_dir / "events.jsonl") if e["event"] == "train"]
    timed = train[-1]["elapsed_s"] - train[warmup - 1]["elapsed_s"] if warmup else train[-1]["elapsed_s"]
    return (train[-1]["tokens"] - (train[warmup - 1]["tokens"] if warmup else 0)) / timed


def plain_loop_tokens_per_s(
    config: RunConfig, device: torch.device, precision: str, steps: int, warmup: int
) -> float:
    """The baseline: forward (in bf16 autocast for bf16), cross-entropy, backward, AdamW step;
    nothing else. Timed by wall clock from the end of the warm-up steps to the last step's end."""
    torch.manual_seed(0)
    model = Transformer(config.model).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tokens = torch.from_numpy(random_tokens(config).astype(np.int64))
    batch, context = config.train.micro_batch_size, config.model.context_length
    generator = torch.Generator().manual_seed(0)
    autocast = resolve_precision(precision, device).autocast
    started = time.perf_counter()
    for step in range(warmup + steps):
        if step == warmup:
            started = time.perf_counter()
        starts = torch.randint(0, len(tokens) - context - 1, (batch,), generator=generator)
        window = torch.stack([tokens[s : s + context + 1] for s in starts.tolist()]).to(device)
        with autocast():
            logits = model(window[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), window[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()
    return steps * batch * context / (time.perf_counter() - started)


def throughput(args: argparse.Namespace) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model_names = args.models.split(",")
    if device.type == "cuda" and "gpt2-124m" not in model_names and not args.quick:
        model_names.append("gpt2-124m")
    print(
        f"device: {describe_device(device)} · {platform.processor() or platform.machine()} · "
        f"{torch.get_num_threads()} threads · torch {torch.__version__} · load average "
        f"{os.getloadavg()[0]:.1f} · CPU flags: {cpu_flags()}"
    )
    for case in cases(model_names, args.quick):
        cfg = case.config
        params = count_parameters(cfg.model)
        per_token = flops_per_token(cfg.model, params)
        variants = [("fp32", False), ("bf16", False)]
        if not args.no_compile:
            variants += [("fp32", True), ("bf16", True)]
        if case.name == "gpt2-124m":
            variants = [("bf16", True)]
        configurations = [("plain", precision, False) for precision in ("fp32", "bf16")]
        configurations += [("Trainer", precision, compiled) for precision, compiled in variants]
        results: dict[tuple[str, str, bool], list[float]] = {c: [] for c in configurations}
        with tempfile.TemporaryDirectory() as scratch:

            def measure(configuration: tuple[str, str, bool], tag: str, cfg=cfg, name=case.name) -> float:
                kind, precision, compiled = configuration
                if kind == "plain":
                    return plain_loop_tokens_per_s(cfg, device, precision, args.steps, args.warmup)
                run_dir = Path(scratch) / f"{name}-{precision}-{compiled}-{tag}"
                return trainer_tokens_per_s(
                    cfg, device, precision, compiled, args.steps, args.warmup, run_dir
                )

            for configuration in configurations:  # untimed: allocator, kernels, caches warm for each
                measure(configuration, "warm")
            for round_index in range(args.rounds):
                shift = round_index % len(configurations)
                for configuration in configurations[shift:] + configurations[:shift]:
                    results[configuration].append(measure(configuration, str(round_index)))
        best = {configuration: max(values) for configuration, values in results.items()}
        print(
            f"\n### {case.name}: {params / 1e6:.1f}M parameters, {cfg.model.n_layer} layers × "
            f"{cfg.model.d_model}, context {cfg.model.context_length}, batch {cfg.train.micro_batch_size}, "
            f"vocab {cfg.model.vocab_size} · load average {os.getloadavg()[0]:.1f}\n"
        )
        print(
            "| configuration | tokens/s (best of rounds) | median | MFU | vs plain loop, same precision "
            "| vs plain fp32 loop |"
        )
        print("|---|---|---|---|---|---|")
        for configuration, values in results.items():
            kind, precision, compiled = configuration
            label = f"{'plain loop' if kind == 'plain' else 'Trainer'} {precision}"
            label += " + compile" if compiled else ""
            peak = peak_flops(device, precision)
            mfu = f"{per_token * best[configuration] / peak * 100:.1f}%" if peak else "?"
            same = best[configuration] / best[("plain", precision, False)]
            print(
                f"| {label} | {best[configuration]:,.0f} | {statistics.median(values):,.0f} | {mfu} | "
                f"**{same:.2f}x** | {best[configuration] / best[('plain', 'fp32', False)]:.2f}x |"
            )


def learning(args: argparse.Namespace) -> None:
    workspace = Path(args.workspace or tempfile.mkdtemp(prefix="llmctl-bench-"))
    env = {**os.environ, "LLMCTL_HOME": str(workspace)}

    def llmctl(*command: str) -> None:
        subprocess.run([sys.executable, "-m", "llmctl", *command], env=env, check=True)

    if not (workspace / "corpora" / "stdlib").is_dir():
        llmctl("corpus", "build", "stdlib", "--source", "stdlib")
    if not (workspace / "tokenizers" / "stdlib-8k").is_dir():
        llmctl("tokenizer", "train", "stdlib-8k", "--corpus", "stdlib", "--vocab-size", "8192")
    run = f"learn-{time.strftime('%H%M%S')}"
    # the run's own starting point: the same seed builds the same initial model, and measure()
    # evaluates it on the same validation windows the run's evaluations use
    options = PretrainOptions(run=run, corpus="stdlib", tokenizer="stdlib-8k", preset="cpu-debug")
    plan = make_plan(Workspace(workspace), options)
    initial = plan.build_trainer(Workspace(workspace), DistEnv(), show_progress=False).measure()
    llmctl(
        "pretrain",
        "--corpus",
        "stdlib",
        "--tokenizer",
        "stdlib-8k",
        "--preset",
        "cpu-debug",
        "--run",
        run,
        "--max-time",
        f"{args.minutes}m",
        "--set",
        "train.eval_every=25",
    )
    events = read_events(workspace / "runs" / run / "events.jsonl")
    start = next(e for e in events if e["event"] == "start")
    print(
        f"\nrun {run}: {start['params']:,} parameters, {start['precision']}, {start['device']}, "
        f"load average {os.getloadavg()[0]:.1f}\n"
    )
    print("| step | wall clock | val loss | val bits/byte |")
    print("|---|---|---|---|")
    print(f"| 0 | 0 s | {initial['val_loss']:.3f} | {initial['val_bpb']:.3f} |")
    for event in (e for e in events if e["event"] == "eval"):
        # since the run started, evaluations included: what a person waiting would see
        seconds = event["ts"] - start["ts"]
        print(f"| {event['step']} | {seconds:.0f} s | {event['val_loss']:.3f} | {event['val_bpb']:.3f} |")
    print(f"\nthe workspace stays for a look: llmctl -w {workspace} plot {run} --out curve.png")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default="cpu-debug,6L-384", help="comma-separated presets or 6L-384")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per configuration and round")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved repetitions; the best is kept")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    parser.add_argument(
        "--quick", action="store_true", help="tiny shapes and few steps: check the script runs"
    )
    parser.add_argument("--learning", action="store_true", help="the 5-minute cpu-debug learning curve")
    parser.add_argument("--minutes", type=float, default=5)
    parser.add_argument("--workspace", help="with --learning: reuse this workspace's corpus and tokenizer")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.warmup, args.rounds = 3, 1, 1
    learning(args) if args.learning else throughput(args)


if __name__ == "__main__":
    main()
