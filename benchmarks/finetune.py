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
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
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
    parser.add_argument("--runs", type=int, default=3, help="runs of each method (medians and ranges)")
    parser.add_argument(
        "--checkpointing", choices=["both", "on", "off"], default="both", help="activation checkpointing"
    )
    args = parser.parse_args()
    models = (
        args.models.split(",") if args.models else ["mini-46m"] + ["llm-200m"] * torch.cuda.is_available()
    )

    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"CUDA {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}, "
        f"load average {os.getloadavg()[0]:.1f}"
    )
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
