"""Finetuning cost: step time and peak memory of full finetuning, LoRA and QLoRA on the same base,
and of preference tuning (DPO) against them.

    python benchmarks/finetune.py [--models mini-46m] [--steps 4] [--micro-batch 2] [--runs 3]
                                  [--checkpointing both|on|off]
    python benchmarks/finetune.py --dpo            # also DPO full / precomputed / LoRA / QLoRA
    python benchmarks/finetune.py --quick          # a smoke test of the script itself

For each model shape (mini-46m on a CPU; llm-200m too on a CUDA GPU) the script writes a base
checkpoint with random weights and a byte-level tokenizer, and an instruction file long enough to
fill the packed rows. Then each method runs as `llmctl finetune` (full), `llmctl finetune --lora`
and `llmctl qlora`, each in a process of its own, the same micro-batch and context, for --steps
optimizer steps, and every method with the same activation-checkpointing setting: a table with it
off and one with it on (--checkpointing both), so each table compares the methods alone and the
two tables show what checkpointing does. Every method runs --runs times, the order rotated from
run to run; the table gives the median peak and step time with the range of the runs. Step time
is the median over the logged steps after the first (warm-up); peak memory is the process's
maximum resident set (ru_maxrss of that child, from wait4) on a CPU, or
torch.cuda.max_memory_allocated as the trainer logs it on a GPU.
Goal: QLoRA's peak memory at most 50% of full finetuning's at the same checkpointing setting.

With --dpo, `llmctl dpo` runs the same way for each method (full weights with its frozen reference,
full weights with --precompute-reference, --lora and --qlora, whose reference is the base with its
adapters off), on pairs whose sides each fill about a row, at half the micro-batch in pairs: a pair
is two sequences, so each forward holds as many sequences as SFT's. Each DPO method is compared
with SFT of the same method. Goal: LoRA and QLoRA DPO within 1.25x of SFT's peak memory (their
reference costs no weights).

With --learning, the script measures what each method learns instead of what it costs: a tiny base
(2 layers, 128 wide) pretrained here for a minute on the standard library's code, then taught
QA_PAIRS (short questions with one- or two-word answers it has never seen) in the chat style, each
method for the same --learn-steps steps, then asked every question greedily as `llmctl chat` would
(the adapter merged into its base, QLoRA's into the NF4 round trip). Exact match is the share of
answers equal to the trained ones. Each method runs at each learning rate of its sweep, and once at
the command's defaults. Goal: LoRA and QLoRA at their defaults at least 75% of full finetuning's
best exact match.

    python benchmarks/finetune.py --learning [--learn-steps 100]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import multiprocessing
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from llmctl.checkpoint.files import FullModelIO, write_checkpoint
from llmctl.config import RunConfig, resolve_config
from llmctl.events import read_events
from llmctl.model.sizing import count_parameters, human_bytes, human_count
from llmctl.model.transformer import Transformer
from llmctl.tokenizer_build import build_byte_tokenizer

METHODS = {"full": ["finetune"], "lora": ["finetune", "--lora"], "qlora": ["qlora"]}
# each DPO method and the SFT method it is compared with
DPO_METHODS = {
    "dpo-full": (["dpo"], "full"),
    "dpo-full-precomputed": (["dpo", "--precompute-reference"], "full"),
    "dpo-lora": (["dpo", "--lora"], "lora"),
    "dpo-qlora": (["dpo", "--qlora"], "qlora"),
}
QUICK_SHAPE = [
    "model.n_layer=2",
    "model.d_model=64",
    "model.n_head=2",
    "model.context_length=64",
    "model.vocab_size=512",
]


def write_base(root: Path, preset: str, quick: bool) -> Path:
    """A checkpoint of the preset's shape with random weights, and a byte tokenizer beside it."""
    config = resolve_config(preset=preset, overrides=QUICK_SHAPE if quick else [])
    tokenizer_file = root / "tokenizer.json"
    build_byte_tokenizer().save(str(tokenizer_file))
    torch.manual_seed(0)
    return write_checkpoint(
        root / "base" / "step-00000001",
        model=Transformer(config.model),
        model_io=FullModelIO(),
        config=config,
        trainer_state={},
        meta={"step": 1},
        tokenizer_file=tokenizer_file,
    )


def write_data(path: Path, context_length: int, n: int = 256) -> Path:
    """Instruction records of about a third of the context each (byte tokens), enough to fill packed rows."""
    prompt_words, response_words = max(1, context_length // 24), max(1, context_length // 18)
    words = ["the", "model", "learns", "to", "answer", "each", "question", "with", "a", "short", "reply"]
    with path.open("w") as handle:
        for i in range(n):
            prompt = " ".join(words[(i + k) % len(words)] for k in range(prompt_words))
            response = " ".join(words[(3 * i + k) % len(words)] for k in range(response_words))
            handle.write(json.dumps({"instruction": f"{i}: {prompt}?", "output": response}) + "\n")
    return path


def write_pairs(path: Path, context_length: int, n: int = 64) -> Path:
    """Preference pairs whose prompt and either reply fill about a row of the context (byte tokens)."""
    words = ["the", "model", "learns", "to", "answer", "each", "question", "with", "a", "short", "reply"]
    prompt_words, reply_words = max(1, context_length // 18), max(1, context_length // 9)
    with path.open("w") as handle:
        for i in range(n):
            prompt = " ".join(words[(i + k) % len(words)] for k in range(prompt_words))
            chosen = " ".join(words[(3 * i + k) % len(words)] for k in range(reply_words))
            rejected = " ".join(words[(5 * i + k) % len(words)] for k in range(reply_words))
            handle.write(
                json.dumps({"prompt": f"{i}: {prompt}?", "chosen": chosen, "rejected": rejected}) + "\n"
            )
    return path


def run_method(
    workspace: Path,
    method: str,
    command: list[str],
    base: Path,
    data: Path,
    steps: int,
    micro_batch: int,
    extra: list[str] = (),
) -> dict:
    """One method in its own process; its step times from the event log and its peak memory."""
    run = f"bench-{method}"
    shutil.rmtree(workspace / "runs" / run, ignore_errors=True)  # a repeated run starts clean
    command = [
        sys.executable,
        "-c",
        "import sys; from llmctl.cli.main import run; sys.argv[0] = 'llmctl'; run()",
        "--workspace",
        str(workspace),
        *command,
        "--model",
        str(base),
        "--data",
        str(data),
        "--run",
        run,
        "--max-steps",
        str(steps),
        "--set",
        f"train.micro_batch_size={micro_batch}",
        "--set",
        "train.log_every=1",
        "--set",
        "train.eval_every=100000",
        "--set",
        "train.save_every=100000",
        "--set",
        "train.eval_batches=1",
        "--set",
        "train.warmup_steps=1",
        "--overwrite",
        *extra,
    ]
    started = time.perf_counter()
    log = workspace.parent / f"{method}.log"
    with log.open("w") as output:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=output)
        _, status, usage = os.wait4(process.pid, 0)
    exit_code = os.waitstatus_to_exitcode(status)
    events = read_events(workspace / "runs" / run / "events.jsonl")
    ends = [event for event in events if event["event"] == "end"]
    if not ends or ends[-1]["reason"] != "finished":
        raise SystemExit(f"{method} failed ({exit_code}):\n{log.read_text()[-2000:]}")
    start = next(event for event in events if event["event"] == "start")
    train = [event for event in events if event["event"] == "train"]
    step_times = [start["tokens_per_step"] / event["tokens_per_s"] for event in train[1:]]
    cuda = start["device"].startswith("cuda")
    return {
        "method": method,
        "params": start["params"],
        "trainable_params": start["trainable_params"],
        "step_s": statistics.median(step_times),
        "tokens_per_step": start["tokens_per_step"],
        "peak_bytes": max(event["mem_bytes"] for event in train) if cuda else usage.ru_maxrss * 1024,
        "activation_checkpointing": start["activation_checkpointing"],
        "wall_s": time.perf_counter() - started,
        "device": start["device"],
        "exit_code": exit_code,  # a run that finished and then crashed on the way out is still measured
    }


# ---------------------------------------------------------------- --learning: what each method learns

QA_PAIRS = [
    ("What is the capital of France?", "Paris"),
    ("What color is the sky?", "blue"),
    ("What do bees make?", "honey"),
    ("How many legs does a spider have?", "eight"),
    ("What is frozen water called?", "ice"),
    ("Which planet is the largest?", "Jupiter"),
    ("What is the opposite of hot?", "cold"),
    ("Which animal says moo?", "a cow"),
    ("What color is grass?", "green"),
    ("How many days are in a week?", "seven"),
    ("What do we breathe?", "air"),
    ("Which fruit is yellow and long?", "banana"),
    ("What falls from clouds?", "rain"),
    ("What is the capital of Italy?", "Rome"),
    ("Which bird cannot fly and lives in ice?", "penguin"),
    ("What do cats drink?", "milk"),
    ("Which star heats the Earth?", "the Sun"),
    ("How many hours are in a day?", "24"),
    ("What gas do plants take in?", "carbon dioxide"),
    ("What is the opposite of up?", "down"),
]
LEARN_SHAPE = [
    "model.n_layer=2",
    "model.d_model=128",
    "model.n_head=4",
    "model.context_length=128",
    "model.tie_embeddings=false",
]
# what the figures never depend on (evaluation changes no weight), and fp32 for every method alike
NEUTRAL_SETTINGS = [
    "train.precision=fp32",
    "train.log_every=10",
    "train.eval_every=100000",
    "train.save_every=100000",
    "train.eval_batches=1",
]
SWEEP_SETTINGS = [*NEUTRAL_SETTINGS, "train.micro_batch_size=8", "train.warmup_steps=10"]
# (label, extra options, learning rates swept); alpha is 2r wherever r is set
LEARN_METHODS = [
    ("full", {}, (3e-4, 1e-3, 3e-3)),
    (
        "LoRA attention r 8",
        {"lora": True, "lora_r": 8, "lora_alpha": 16, "lora_targets": ["attention"]},
        None,
    ),
    (
        "LoRA all-linear r 8",
        {"lora": True, "lora_r": 8, "lora_alpha": 16, "lora_targets": ["all-linear"]},
        None,
    ),
    (
        "LoRA all-linear r 16",
        {"lora": True, "lora_r": 16, "lora_alpha": 32, "lora_targets": ["all-linear"]},
        None,
    ),
    (
        "LoRA all-linear r 64",
        {"lora": True, "lora_r": 64, "lora_alpha": 128, "lora_targets": ["all-linear"]},
        None,
    ),
    (
        "QLoRA all-linear r 16",
        {"stage": "qlora", "lora_r": 16, "lora_alpha": 32, "lora_targets": ["all-linear"]},
        None,
    ),
]
ADAPTER_LRS = (1e-3, 3e-3, 1e-2)
DEFAULT_METHODS = [("full", {}), ("LoRA", {"lora": True}), ("QLoRA", {"stage": "qlora"})]


def pretrain_base(workspace: Path, steps: int) -> None:
    """Run 'base': the tiny shape pretrained on standard-library code with a byte tokenizer."""
    from llmctl.cli.main import main
    from llmctl.data.build import BuildOptions, build_corpus
    from llmctl.tokenizer_build import train_tokenizer
    from llmctl.workspace import Workspace

    ws = Workspace(workspace)
    build_corpus(ws, "code", ["stdlib"], BuildOptions(limit=40, val_fraction=0.1))
    train_tokenizer(ws, "bytes", "code", vocab_size=None, kind="byte")
    shape = [arg for key in LEARN_SHAPE for arg in ("--set", key)]
    settings = ["train.micro_batch_size=8", "train.lr=3e-3", "train.warmup_steps=20", "train.precision=fp32"]
    args = ["--workspace", str(workspace), "pretrain", "--corpus", "code", "--tokenizer", "bytes"]
    args += ["--preset", "cpu-debug", "--run", "base", *shape, "--max-steps", str(steps)]
    with contextlib.redirect_stdout(io.StringIO()):
        code = main(args + [arg for key in settings for arg in ("--set", key)])
    if code:
        raise SystemExit(f"pretraining the base failed ({code})")


@torch.no_grad()
def exact_match(workspace: Path, run: str) -> float:
    """The share of QA_PAIRS the run's model answers exactly, greedily, as `llmctl chat` loads it."""
    from llmctl.checkpoint.load import load_model
    from llmctl.data.sft import render_prompt
    from llmctl.tokenizer import END_OF_TURN_TOKEN
    from llmctl.workspace import Workspace

    loaded = load_model(Workspace(workspace), run)
    model, tokenizer = loaded.model.eval(), loaded.tokenizer
    stops = {tokenizer.eot_id, tokenizer.special_ids.get(END_OF_TURN_TOKEN)}
    hits = 0
    for question, answer in QA_PAIRS:
        ids = tokenizer.encode(render_prompt([{"role": "user", "content": question}], "chat"))
        reply: list[int] = []
        for _ in range(len(answer) + 4):
            token = int(model(torch.tensor([ids + reply]))[0, -1].argmax())
            if token in stops:
                break
            reply.append(token)
        hits += tokenizer.decode(reply).strip() == answer
    return hits / len(QA_PAIRS)


def learn(workspace: Path, data: Path, run: str, options: dict, lr: float | None, steps: int | None) -> dict:
    """One finetune through the library, as the command runs it; its final loss and exact match.
    Without `lr` (and `steps`) it runs at the command's defaults, but for NEUTRAL_SETTINGS."""
    from llmctl.train import recipe
    from llmctl.train.finetune import FinetuneOptions, make_plan
    from llmctl.workspace import Workspace

    torch.set_num_threads(1)  # tiny matmuls on two shared cores: one thread is steadier
    overrides = [*NEUTRAL_SETTINGS] if lr is None else [*SWEEP_SETTINGS, f"train.lr={lr}"]
    ws = Workspace(workspace)
    settings = FinetuneOptions(
        run=run, model="base", data=str(data), max_steps=steps, overrides=overrides, **options
    )
    plan = make_plan(ws, settings)
    started = time.perf_counter()
    recipe.train(ws, plan)
    seconds = time.perf_counter() - started
    train = [e for e in read_events(workspace / "runs" / run / "events.jsonl") if e["event"] == "train"]
    return {
        "lr": plan.config.train.lr,
        "trainable": plan.trainable,
        "adapter": plan.config.adapter,
        "loss": train[-1]["loss"],
        "exact": exact_match(workspace, run),
        "steps": plan.size.total_steps,
        "train_s": seconds,
    }


def learn_alone(*args) -> dict:
    """`learn` in a fresh process of its own, as each `llmctl finetune` runs: in one process, a LoRA
    run after twenty others once learned far less than the same run alone."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(learn, *args).result()


def report_learning(args: argparse.Namespace) -> None:
    root = Path(tempfile.mkdtemp(prefix="llmctl-bench-learning-"))
    torch.set_num_threads(1)
    try:
        workspace = root / "workspace"
        started = time.perf_counter()
        pretrain_base(workspace, args.pretrain_steps)
        data = root / "qa.jsonl"
        data.write_text("".join(json.dumps({"instruction": q, "output": a}) + "\n" for q, a in QA_PAIRS))
        print(
            f"\n## learning: {len(QA_PAIRS)} question/answer pairs; sweeps {args.learn_steps} steps, "
            f"micro-batch 8 packed rows of 128 tokens, warmup 10; base pretrained {args.pretrain_steps} "
            f"steps in {time.perf_counter() - started:.0f} s\n"
        )
        print("| method | trained params | lr | final loss | exact match | per lr swept |")
        print("|---|---:|---:|---:|---:|---|")
        best = {}
        count = 0
        for label, options, lrs in LEARN_METHODS:
            results = []
            for lr in lrs or ADAPTER_LRS:
                count += 1
                results.append(learn_alone(workspace, data, f"learn-{count}", options, lr, args.learn_steps))
            top = max(results, key=lambda r: (r["exact"], -r["loss"]))
            best[label] = top
            sweep = ", ".join(f"{r['lr']:g}: {r['exact']:.0%}" for r in results)
            print(
                f"| {label} | {human_count(top['trainable'])} | {top['lr']:g} | {top['loss']:.3f} | "
                f"{top['exact']:.0%} | {sweep} |",
                flush=True,
            )
        defaults = {}
        for label, options in DEFAULT_METHODS:
            count += 1
            result = learn_alone(workspace, data, f"learn-{count}", options, None, None)
            defaults[label] = result
            adapter = result["adapter"]
            shape = (
                ""
                if label == "full"
                else f"r {adapter.r}, alpha {adapter.alpha:g}, {','.join(adapter.targets)}, "
            )
            print(
                f"| {label} defaults: {shape}{result['steps']} steps | {human_count(result['trainable'])} | "
                f"{result['lr']:g} | {result['loss']:.3f} | {result['exact']:.0%} | |",
                flush=True,
            )
        full, full_default = best["full"]["exact"], defaults["full"]["exact"]
        ratios = ", ".join(
            f"{label} {defaults[label]['exact'] / full:.0%} and {defaults[label]['exact'] / full_default:.0%}"
            for label in ("LoRA", "QLoRA")
        )
        print(
            f"\nat the defaults, of full finetuning's exact match (best swept {full:.0%}, at its defaults "
            f"{full_default:.0%}): {ratios} (goal: at least 75%)"
            f" · {time.perf_counter() - started:.0f} s in all · load average after {os.getloadavg()[0]:.1f}"
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)


def cpu_flags() -> str:
    flags = Path("/proc/cpuinfo").read_text().split("flags", 2)[1] if Path("/proc/cpuinfo").exists() else ""
    return ", ".join(name for name in ("avx512_bf16", "avx512f", "avx2") if f" {name}" in flags) or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", help="comma-separated presets [default: mini-46m, plus llm-200m on CUDA]")
    parser.add_argument(
        "--steps", type=int, default=4, help="optimizer steps per method (the first is warm-up)"
    )
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument(
        "--quick", action="store_true", help="a tiny shape: checks the script, measures nothing"
    )
    parser.add_argument("--dpo", action="store_true", help="also DPO (full, precomputed, LoRA, QLoRA)")
    parser.add_argument(
        "--learning", action="store_true", help="exact match after finetuning, per method (not cost)"
    )
    parser.add_argument(
        "--learn-steps", type=int, default=100, help="finetuning steps per method (--learning)"
    )
    parser.add_argument("--pretrain-steps", type=int, default=600, help="steps of the base (--learning)")
    parser.add_argument("--runs", type=int, default=3, help="runs of each method (medians and ranges)")
    parser.add_argument(
        "--checkpointing", choices=["both", "on", "off"], default="both", help="activation checkpointing"
    )
    args = parser.parse_args()
    if args.dpo and args.checkpointing != "both":
        # DPO runs with each command's defaults, so it is compared with SFT at those (QLoRA's is on)
        parser.error(
            "--dpo compares with SFT at each command's default checkpointing: leave --checkpointing both"
        )
    models = (
        args.models.split(",") if args.models else ["mini-46m"] + ["llm-200m"] * torch.cuda.is_available()
    )

    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"CUDA {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}, "
        f"load average {os.getloadavg()[0]:.1f}, CPU flags {cpu_flags()}"
    )
    if args.learning:
        report_learning(args)
        return
    for preset in models:
        root = Path(tempfile.mkdtemp(prefix="llmctl-bench-finetune-"))
        try:
            base = write_base(root, preset, args.quick)
            config: RunConfig = resolve_config(preset=preset, overrides=QUICK_SHAPE if args.quick else [])
            data = write_data(root / "data.jsonl", config.model.context_length)
            print(
                f"\n## {preset}: {human_count(count_parameters(config.model))} parameters, context "
                f"{config.model.context_length}, micro-batch {args.micro_batch}, {args.steps} steps\n"
            )
            settings = {"both": ["off", "on"], "on": ["on"], "off": ["off"]}[args.checkpointing]
            results = {}
            for setting in settings:
                runs: dict[str, list[dict]] = {method: [] for method in METHODS}
                names = list(METHODS)
                for index in range(args.runs):
                    for method in names[index % len(names) :] + names[: index % len(names)]:
                        runs[method].append(
                            run_method(
                                root / "workspace",
                                method,
                                METHODS[method],
                                base,
                                data,
                                args.steps,
                                args.micro_batch,
                                ["--set", f"train.activation_checkpointing={str(setting == 'on').lower()}"],
                            )
                        )
                results[setting] = report_sft(setting, runs)
            if args.dpo:  # against SFT with each command's own default (QLoRA checkpointed)
                defaults = {m: results.get("on" if m == "qlora" else "off") for m in METHODS}
                sft = {m: r[m] for m, r in defaults.items() if r is not None}
                pairs = write_pairs(root / "pairs.jsonl", config.model.context_length)
                report_dpo(root / "workspace", base, pairs, args, sft)
        finally:
            shutil.rmtree(root, ignore_errors=True)


def report_sft(setting: str, runs: dict[str, list[dict]]) -> dict[str, dict]:
    """The table of one checkpointing setting: medians over the runs, with their range."""
    print(f"\n### activation checkpointing {setting} · {len(runs['full'])} runs of each method\n")
    print("| method | trained params | step time (median, range) | peak memory (median, range) | vs full |")
    print("|---|---:|---:|---:|---:|")
    medians = {}
    for method, results in runs.items():
        peaks = sorted(r["peak_bytes"] for r in results)
        steps = sorted(r["step_s"] for r in results)
        medians[method] = {
            **results[0],
            "peak_bytes": statistics.median(peaks),
            "step_s": statistics.median(steps),
        }
    for method, results in runs.items():
        peaks = sorted(r["peak_bytes"] for r in results)
        steps = sorted(r["step_s"] for r in results)
        median = medians[method]
        print(
            f"| {method} | {human_count(median['trainable_params'])} | {median['step_s']:.2f} s "
            f"({steps[0]:.2f}–{steps[-1]:.2f}) | {human_bytes(median['peak_bytes'])} "
            f"({human_bytes(peaks[0])}–{human_bytes(peaks[-1])}) | "
            f"{median['peak_bytes'] / medians['full']['peak_bytes']:.0%} |"
        )
        for result in results:
            if result["exit_code"]:
                print(f"\nnote: a {method} run finished its steps, then exited with {result['exit_code']}")
    ratio = medians["qlora"]["peak_bytes"] / medians["full"]["peak_bytes"]
    print(
        f"\nQLoRA peak / full peak, checkpointing {setting} = {ratio:.2f} (goal: at most 0.50) · "
        f"device {medians['full']['device']} · load average after {os.getloadavg()[0]:.1f}"
    )
    return medians


def report_dpo(
    workspace: Path, base: Path, pairs: Path, args: argparse.Namespace, sft: dict[str, dict]
) -> None:
    """Each DPO method against SFT of the same method, the same sequences per forward."""
    pairs_per_batch = max(1, args.micro_batch // 2)
    print(
        f"\n### DPO: {pairs_per_batch} pair(s) per micro-batch = {2 * pairs_per_batch} sequences "
        f"(SFT: {args.micro_batch})\n"
    )
    print("| method | reference | step time | vs SFT | peak memory | vs SFT |")
    print("|---|---|---:|---:|---:|---:|")
    ratios = {}
    for method, (command, baseline) in DPO_METHODS.items():
        result = run_method(workspace, method, command, base, pairs, args.steps, pairs_per_batch)
        against = sft[baseline]
        ratios[method] = result["peak_bytes"] / against["peak_bytes"]
        reference = (
            "precomputed"
            if "precomputed" in method
            else "frozen copy"
            if "full" in method
            else "adapters off"
        )
        slower = result["step_s"] / against["step_s"]
        print(
            f"| {method} | {reference} | {result['step_s']:.2f} s | {slower:.2f}x | "
            f"{human_bytes(result['peak_bytes'])} | {ratios[method]:.2f}x |"
        )
    print(
        f"\nDPO peak / SFT peak: LoRA {ratios['dpo-lora']:.2f}, QLoRA {ratios['dpo-qlora']:.2f} "
        f"(goal: at most 1.25) · load average after {os.getloadavg()[0]:.1f}"
    )


if __name__ == "__main__":
    main()
