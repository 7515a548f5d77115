"""The one device script: every CUDA path and every GPU figure llmctl publishes, in one command.

    python benchmarks/gpu.py --out gpu.json                # on one GPU: about ten minutes on an H100
    python benchmarks/gpu.py --cpu-smoke --out smoke.json  # here: tiny shapes, what a CPU can do

Parts, in this order (the JSON at --out is rewritten after each, so a run cut short keeps what it
measured):
  tests     `pytest -m cuda` over tests/test_cuda.py and tests/test_cuda_adapters.py
  mfu       gpt2-124m pretraining in bf16 with torch.compile: tokens/s and MFU (goal: >= 45% on an H100)
  presets   rtx4060-8g and compact-8g under an 8 GB cap, small-16g under 16 GB (the card simulated with
            torch.cuda.set_per_process_memory_fraction): --preset-steps steps each without running out
            of memory, the peak allocated memory beside the plan's estimate (goal: within 25%)
  qlora     a Hugging Face Llama directory of deepseek-coder-1.3b-base's shape (random weights made by
            transformers here, context 512) under an 8 GB cap: NF4 base, LoRA r=8 on q_proj/v_proj,
            paged 8-bit AdamW; peak memory, step time, tokens/s, beside the plan's estimate
  llm200m   llm-200m pretraining steps under 8 and 16 GB caps: does it fit as the preset says
  decode    tokens/s of a 124M model (gpt2-124m's shape) at batch 1 and 8 in bf16, wall clock around
            each whole generate call
It prints each figure as it comes and a table last. It installs nothing: beyond torch it needs what
llmctl's `dev` extra lists (pytest, transformers, peft, bitsandbytes, tokenizers, safetensors, ...);
bring them as wheels to a machine without a package index.

--cpu-smoke runs each part at tiny shapes on the CPU (no caps, fp32 or bf16, no paged optimizer,
the cuda tests collected and skipped) so the script's own code has run before its first GPU call;
each result says which parts of it need CUDA. Its figures are not benchmarks.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llmctl.config import RunConfig, resolve_config  # noqa: E402
from llmctl.events import read_events  # noqa: E402
from llmctl.model.sizing import count_parameters, estimate_training_memory, flops_per_token  # noqa: E402
from llmctl.model.transformer import Transformer  # noqa: E402
from llmctl.train.batches import TokenWindows  # noqa: E402
from llmctl.train.mfu import peak_flops  # noqa: E402
from llmctl.train.precision import describe_device, resolve_compile, resolve_precision  # noqa: E402
from llmctl.train.runinfo import RunInfo  # noqa: E402
from llmctl.train.trainer import Trainer  # noqa: E402

GiB = 2**30
TINY = [
    "model.n_layer=1",
    "model.n_head=2",
    "model.d_model=64",
    "model.context_length=32",
    "model.vocab_size=512",
]
DEEPSEEK_CODER_1_3B = {  # deepseek-coder-1.3b-base's config.json, context cut to 512
    "hidden_size": 2048,
    "intermediate_size": 5504,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "vocab_size": 32256,
    "max_position_embeddings": 512,
    "rope_theta": 100000.0,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
}


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.smoke = args.cpu_smoke
        self.device = torch.device("cpu") if self.smoke else torch.device("cuda", 0)
        self.results: dict[str, object] = {"environment": environment(self.device, self.smoke)}
        self.scratch = Path(tempfile.mkdtemp(prefix="llmctl-gpu-"))

    def record(self, part: str, value: object) -> None:
        self.results[part] = value
        print(f"[{part}] {json.dumps(value, default=str)}", flush=True)
        if self.args.out:
            Path(self.args.out).write_text(json.dumps(self.results, indent=2, default=str) + "\n")

    def part(self, name: str, work: Callable[[], object]) -> None:
        started = time.perf_counter()
        try:
            value = work()
        except Exception as exc:  # one failing part must not cost the figures of the others
            value = {"error": f"{type(exc).__name__}: {exc}"[:500]}
        if isinstance(value, dict):
            value["part_seconds"] = round(time.perf_counter() - started, 1)
        self.record(name, value)
        release()

    # ------------------------------------------------------------ the parts

    def tests(self) -> dict:
        command = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-rfEs", "-p", "no:cacheprovider"]
        command += ["tests/test_cuda.py", "tests/test_cuda_adapters.py"]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        env.pop("LLMCTL_DEVICE", None)
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=420)
        lines = done.stdout.strip().splitlines()
        failures = [line for line in lines if line.startswith(("FAILED", "ERROR"))]
        return {
            "exit_code": done.returncode,
            "summary": lines[-1] if lines else done.stderr[-300:],
            "failed": failures,
        }

    def mfu(self) -> dict:
        config = preset("gpt2-124m", self.smoke)
        precision = "fp32" if self.smoke else "bf16"
        steps = 3 if self.smoke else self.args.mfu_steps
        events = self.train(config, precision, compile_model=not self.smoke, steps=steps, warmup=2)
        rates = [event["tokens_per_s"] for event in events[2:]]
        tokens_per_s = statistics.harmonic_mean(rates)
        params = count_parameters(config.model)
        peak = peak_flops(self.device, precision)
        mfu = flops_per_token(config.model, params) * tokens_per_s / peak if peak else None
        return {
            "model": "gpt2-124m" + (" (tiny shape)" if self.smoke else ""),
            "precision": precision,
            "compile": not self.smoke,
            "tokens_per_s": round(tokens_per_s, 1),
            "mfu": round(mfu, 4) if mfu is not None else None,
            "peak_flops": peak,
            "goal": "MFU >= 0.45 on an H100",
        }

    def presets(self) -> list[dict]:
        rows = []
        for name, cap in (("rtx4060-8g", 8), ("compact-8g", 8), ("small-16g", 16)):
            steps = 3 if self.smoke else self.args.preset_steps
            rows.append(self.capped_pretrain(name, cap, steps))
            release()
        return rows

    def llm200m(self) -> list[dict]:
        steps = 2 if self.smoke else self.args.llm200m_steps
        return [self.capped_pretrain("llm-200m", cap, steps) for cap in (8, 16)]

    def capped_pretrain(self, name: str, cap_gib: int, steps: int) -> dict:
        config = preset(name, self.smoke)
        precision = resolve_precision(config.train.precision, self.device).name
        compile_model = resolve_compile(config.train.compile, self.device)
        estimate = estimate_training_memory(config.model, config.train, mixed_precision=precision != "fp32")
        row = {"preset": name, "cap_gib": cap_gib, "steps": steps, "precision": precision}
        row["compile"] = compile_model
        with memory_cap(self.device, cap_gib * GiB):
            try:
                events = self.train(config, precision, compile_model, steps=steps, warmup=0)
            except torch.OutOfMemoryError as exc:
                return {**row, "fits": False, "oom": str(exc).splitlines()[0][:200]}
            reserved = torch.cuda.memory_reserved(self.device) if self.device.type == "cuda" else None
        row.update(fits=True, **judge(estimate, max(event["mem_bytes"] for event in events), reserved))
        row["tokens_per_s"] = round(
            statistics.harmonic_mean([e["tokens_per_s"] for e in events[1:] or events]), 1
        )
        return row

    def qlora(self) -> dict:
        from llmctl.checkpoint import load as loader
        from llmctl.checkpoint.files import read_config
        from llmctl.model.lora import apply_lora
        from llmctl.model.quantize import compute_dtype
        from llmctl.train import adapt
        from llmctl.train.optim import build_optimizer, paged_adamw_8bit
        from llmctl.train.recipe import Runtime

        directory = self.scratch / "deepseek-coder-1.3b-shape"
        shape = dict(DEEPSEEK_CODER_1_3B)
        if self.smoke:
            shape.update(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4)
            shape.update(num_key_value_heads=4, vocab_size=512, max_position_embeddings=64)
        write_hf_llama(directory, shape, self.device)
        config = read_config(directory)
        context = shape["max_position_embeddings"]
        micro = 1 if self.smoke else self.args.qlora_micro_batch
        overrides = ["adapter.enabled=true", "adapter.quantize=nf4", "adapter.r=8", "adapter.dropout=0"]
        overrides += ["adapter.targets=[q_proj,v_proj]", f"train.micro_batch_size={micro}"]
        overrides += ["train.activation_checkpointing=true", "train.lr=1e-4"]
        config = resolve_config(base=config.model_dump(), overrides=overrides)
        precision = resolve_precision("fp32" if self.smoke else "bf16", self.device)
        config.train.precision = precision.name
        sizing = adapt.size_run(config, Runtime(self.device, precision, False))
        row = {"shape": "deepseek-coder-1.3b-base" + (" (tiny)" if self.smoke else ""), "context": context}
        row.update(micro_batch=micro, params=sizing.base_params)
        with memory_cap(self.device, 8 * GiB):
            base = loader.load_quantized_base(
                directory, config, self.device, compute_dtype(self.device, precision.name)
            )
            model = apply_lora(base, config.adapter).to(self.device)
            for module in model.modules():
                if hasattr(module, "gradient_checkpointing"):
                    module.gradient_checkpointing = True
            if self.device.type == "cuda":
                optimizer = paged_adamw_8bit(model, config.train, self.device)
            else:
                optimizer = build_optimizer(model, config.train, self.device)
                row["note"] = "CPU: plain AdamW (paged 8-bit AdamW and the 8 GB cap need CUDA)"
            row["optimizer"] = type(optimizer).__name__
            reset_peak(self.device)
            times = []
            steps = 2 if self.smoke else self.args.qlora_steps
            for _ in range(steps + 1):
                ids = torch.randint(0, shape["vocab_size"], (micro, context + 1), device=self.device)
                started = time.perf_counter()
                with precision.autocast():
                    logits = model(ids[:, :-1])
                loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                synchronize(self.device)
                times.append(time.perf_counter() - started)
            peak = peak_bytes(self.device)
            reserved = torch.cuda.memory_reserved(self.device) if self.device.type == "cuda" else None
        step_s = statistics.median(times[1:])  # the first step pays for allocation and paging set-up
        row.update(judge(sizing.memory, peak, reserved))
        row.update(step_s=round(step_s, 4), tokens_per_s=round(micro * context / step_s, 1))
        row["final_loss"] = round(loss.item(), 4)
        return row

    def decode(self) -> list[dict]:
        from llmctl.config import GenerationConfig
        from llmctl.generate import Engine
        from llmctl.tokenizer import load_tokenizer_file
        from llmctl.tokenizer_build import build_byte_tokenizer

        directory = self.scratch / "byte-tokenizer"
        directory.mkdir(parents=True, exist_ok=True)
        build_byte_tokenizer().save(str(directory / "tokenizer.json"))
        tokenizer = load_tokenizer_file(directory)
        config = preset("gpt2-124m", self.smoke)
        torch.manual_seed(0)
        dtype = torch.float32 if self.smoke else torch.bfloat16
        engine = Engine(
            Transformer(config.model), tokenizer, stop_token_ids=[], device=self.device, dtype=dtype
        )
        new_tokens = 8 if self.smoke else self.args.decode_tokens
        sampling = GenerationConfig(temperature=0.0, max_new_tokens=new_tokens)
        prompt = list(range(10, 74))  # 64 tokens; the random model's ids need no text
        rows = []
        for batch in (1, 8):
            prompts = [prompt] * batch
            engine.generate(prompts, sampling)  # warm-up: allocation and kernel selection
            seconds = []
            for _ in range(3):
                synchronize(self.device)
                started = time.perf_counter()
                completions = engine.generate(prompts, sampling)
                synchronize(self.device)
                seconds.append(time.perf_counter() - started)
            generated = sum(len(c.token_ids) for c in completions)
            rows.append(
                {
                    "batch": batch,
                    "dtype": str(dtype).removeprefix("torch."),
                    "new_tokens": new_tokens,
                    "tokens_per_s": round(generated / min(seconds), 1),
                    "prompt_tokens": len(prompt),
                }
            )
        return rows

    # ------------------------------------------------------------ a Trainer on random tokens

    def train(self, config: RunConfig, precision: str, compile_model: bool, steps: int, warmup: int) -> list:
        settings = {
            "max_steps": warmup + steps,
            "log_every": 1,
            "eval_every": 10**9,
            "save_every": 10**9,
            "eval_batches": 1,
            "warmup_steps": 1,
            "precision": precision,
        }
        config = config.model_copy(update={"train": config.train.model_copy(update=settings)})
        tokens = np.random.default_rng(0).integers(0, config.model.vocab_size, 400_000).astype(np.uint16)
        batches = TokenWindows(
            tokens,
            tokens[:20_000],
            context_length=config.model.context_length,
            micro_batch_size=config.train.micro_batch_size,
            eval_batches=1,
            seed=0,
            device=self.device,
        )
        torch._dynamo.reset()
        torch.manual_seed(0)
        run_dir = self.scratch / f"run-{time.monotonic_ns()}"
        run = RunInfo(name=run_dir.name, stage="pretrain", dir=run_dir, registry=None)
        Trainer(
            config,
            Transformer(config.model),
            batches,
            run,
            device=self.device,
            precision=resolve_precision(precision, self.device),
            compile_model=compile_model,
            show_progress=False,
        ).fit()
        return [event for event in read_events(run_dir / "events.jsonl") if event["event"] == "train"]


# ---------------------------------------------------------------- helpers


CUDA_CONTEXT: list[int] = []  # the device memory the CUDA context holds, measured before any tensor


def cuda_context_bytes(device: torch.device) -> int:
    if not CUDA_CONTEXT:
        torch.cuda.init()
        free, total = torch.cuda.mem_get_info(device)
        CUDA_CONTEXT.append(total - free - torch.cuda.memory_reserved(device))
    return CUDA_CONTEXT[0]


def judge(estimate, peak_allocated: int, reserved: int | None) -> dict:
    """The plan's estimate beside what was measured. The estimate's total adds 10% and 0.5 GiB for
    the allocator's cache and the CUDA context, so it is judged against the memory the process held
    on the device (the allocator's reservation plus the context); its parts without that margin
    against the peak of allocated tensors."""
    parts = estimate.weights + estimate.gradients + estimate.optimizer + estimate.activations
    row = {"estimate_bytes": estimate.total, "peak_allocated_bytes": peak_allocated}
    row["parts_over_allocated"] = round(parts / peak_allocated, 3)
    if reserved is None:
        row["within_25_percent"] = None
        row["memory_note"] = "CPU: no cap, and the peak is the process's resident size (needs CUDA to judge)"
        return row
    held = reserved + CUDA_CONTEXT[0]
    row.update(device_held_bytes=held, estimate_over_held=round(estimate.total / held, 3))
    row["within_25_percent"] = abs(estimate.total / held - 1) <= 0.25
    return row


def preset(name: str, smoke: bool) -> RunConfig:
    config = resolve_config(preset=name)
    if smoke:
        config = resolve_config(base=config.model_dump(), overrides=[*TINY, "train.micro_batch_size=2"])
    return config


def write_hf_llama(directory: Path, shape: dict, device: torch.device) -> None:
    """A LlamaForCausalLM of `shape` with random weights, saved as transformers saves one (bf16)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device(device):  # initialising 1.3B weights on the GPU takes seconds, not minutes
        model = LlamaForCausalLM(LlamaConfig(**shape)).to(torch.bfloat16)
    model.save_pretrained(directory)
    del model


@contextlib.contextmanager
def memory_cap(device: torch.device, cap: int):
    """The process sees at most `cap` bytes of the GPU, as a card of that size would give it."""
    if device.type != "cuda":
        yield
        return
    total = torch.cuda.get_device_properties(device).total_memory
    release()
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total), device)
    reset_peak(device)
    try:
        yield
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)


def release() -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def environment(device: torch.device, smoke: bool) -> dict:
    flags = set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    versions = {}
    for package in ("transformers", "peft", "bitsandbytes"):
        with contextlib.suppress(Exception):
            versions[package] = __import__(package).__version__
    return {
        "device": describe_device(device),
        "mode": "cpu-smoke" if smoke else "gpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        **versions,
        "cpu": platform.processor() or platform.machine(),
        "cpu_flags": sorted(flags & {"avx2", "avx512f", "avx512_bf16", "amx_bf16"}),
        "load_average": round(os.getloadavg()[0], 2),
        "threads": torch.get_num_threads(),
    }


def table(results: dict) -> str:
    lines = ["", "| part | figure |", "| --- | --- |"]
    env = results["environment"]
    lines.append(f"| device | {env['device']} ({env['mode']}, load average {env['load_average']}) |")
    for part, value in results.items():
        if part == "environment" or not isinstance(value, (dict, list)):
            continue
        for row in value if isinstance(value, list) else [value]:
            shown = ", ".join(f"{k}={v}" for k, v in row.items() if k not in ("failed",))
            lines.append(f"| {part} | {shown} |")
    return "\n".join(lines)


PARTS = ("tests", "mfu", "presets", "qlora", "llm200m", "decode")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU (no GPU needed)")
    parser.add_argument("--out", help="write every figure to this JSON file (after each part)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    parser.add_argument("--mfu-steps", type=int, default=40)
    parser.add_argument("--preset-steps", type=int, default=200)
    parser.add_argument("--llm200m-steps", type=int, default=20)
    parser.add_argument("--qlora-steps", type=int, default=10)
    parser.add_argument("--qlora-micro-batch", type=int, default=4)
    parser.add_argument("--decode-tokens", type=int, default=256)
    args = parser.parse_args()
    if not args.cpu_smoke and not torch.cuda.is_available():
        parser.error("no CUDA GPU is visible; run with --cpu-smoke to check the script on this CPU")
    chosen = [part.strip() for part in args.parts.split(",") if part.strip()]
    unknown = sorted(set(chosen) - set(PARTS))
    if unknown:
        parser.error(f"unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    bench = Bench(args)
    if not args.cpu_smoke:
        cuda_context_bytes(bench.device)
    print(json.dumps(bench.results["environment"]), flush=True)
    started = time.perf_counter()
    for name in chosen:
        bench.part(name, getattr(bench, name))
    bench.results["total_seconds"] = round(time.perf_counter() - started, 1)
    bench.record("total_seconds", bench.results["total_seconds"])
    print(table(bench.results))
    failed = [
        name for name in chosen if isinstance(bench.results[name], dict) and "error" in bench.results[name]
    ]
    tests = bench.results.get("tests")
    return 1 if failed or (isinstance(tests, dict) and tests.get("exit_code") not in (0, None)) else 0


if __name__ == "__main__":
    sys.exit(main())
