"""Decoding speed with the KV cache against recomputing the whole sequence for every token.

    python benchmarks/generate.py [--new-tokens 256,1024] [--device cpu] [--precision fp32]
    python benchmarks/generate.py --new-tokens 256 --transformers     # and transformers' generate
    python benchmarks/generate.py --new-tokens 256 --transformers --dtypes fp32,bf16,int8 \
        --model mini27 --workspace WS --bpb-corpus stdlib             # each dtype, on a trained model
    python benchmarks/generate.py --new-tokens 256 --gguf --n-layer 6 --n-head 8 --d-model 512 \
        --context 1024 --threads 2                                    # and llama.cpp on GGUF exports

One randomly initialised model (default: 4 layers, 256 wide, 8k vocabulary, 1280 context, the
shape of a small code model), one 8k byte-level BPE trained on the standard library, one prompt
of --prompt-tokens tokens of stdlib code, batch 1, greedy. For each length in --new-tokens the
engine generates exactly that many tokens (no stop token) with the cache and without it, one
after the other in this process, and prints tokens/s, the ratio, and the time per token at
several positions: flat with the cache, growing with the sequence without it.
"""

from __future__ import annotations

import argparse
import atexit
import copy
import os
import platform
import shutil
import statistics
import sysconfig
import tempfile
import time
from pathlib import Path

import torch

from llmctl.config import GenerationConfig, ModelConfig
from llmctl.generate import Engine, resolve_device, resolve_dtype
from llmctl.model.transformer import Transformer
from llmctl.tokenizer import load_tokenizer_file
from llmctl.tokenizer_build import train_bpe

POSITIONS = (1, 64, 256, 512, 768, 1024)
WINDOW = 16  # per-token times are medians over this many neighbouring tokens


def stdlib_texts(limit_bytes: int = 3_000_000) -> list[str]:
    texts, total = [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        texts.append(path.read_text(encoding="utf-8"))
        total += len(texts[-1])
        if total >= limit_bytes:
            break
    return texts


def scratch_dir(prefix: str) -> Path:
    """A temporary directory removed when the benchmark exits (the engine reads files from it)."""
    directory = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, directory, True)
    return directory


def build_engine(args: argparse.Namespace, texts: list[str]) -> Engine:
    device = resolve_device(args.device)
    if args.model:
        from llmctl.checkpoint.load import load_model
        from llmctl.workspace import Workspace

        loaded = load_model(Workspace(args.workspace), args.model)
        return Engine(
            loaded.model,
            loaded.tokenizer,
            stop_token_ids=[],
            device=device,
            dtype=resolve_dtype(args.precision, device),
        )
    directory = scratch_dir("llmctl-bench-")
    train_bpe(texts, args.vocab).save(str(directory / "tokenizer.json"))
    tokenizer = load_tokenizer_file(directory)
    cfg = ModelConfig(
        n_layer=args.n_layer,
        n_head=args.n_head,
        d_model=args.d_model,
        context_length=args.context,
        vocab_size=tokenizer.vocab_size,
        tie_embeddings=False,
    )
    torch.manual_seed(0)
    # no stop tokens: every run generates exactly the number of tokens asked for
    return Engine(
        Transformer(cfg),
        tokenizer,
        stop_token_ids=[],
        device=device,
        dtype=resolve_dtype(args.precision, device),
    )


def per_token_ms(step_seconds: list[float], position: int) -> float:
    """Median milliseconds of the tokens around `position` (1-based; the first token includes prefill)."""
    if position == 1:
        return step_seconds[0] * 1000
    low = max(1, position - WINDOW // 2)
    return statistics.median(step_seconds[low : low + WINDOW]) * 1000


def measure(
    engine: Engine, prompt_ids: list[int], new_tokens: int, use_cache: bool
) -> tuple[float, list[float]]:
    """Tokens per second and the seconds of each token."""
    config = GenerationConfig(temperature=0.0, max_new_tokens=new_tokens)
    generation = engine.stream([prompt_ids], config, use_cache=use_cache)
    (completion,) = generation.completions()
    assert len(completion.token_ids) == new_tokens, completion.finish_reason
    stats = generation.stats
    return stats.generated_tokens / stats.seconds, stats.step_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", default="256,1024", help="comma-separated lengths to generate")
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--n-head", type=int, default=4)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--context", type=int, default=1280)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads [default: torch's]")
    parser.add_argument(
        "--transformers",
        action="store_true",
        help="also time transformers' generate on the exported copy of the model",
    )
    parser.add_argument(
        "--gguf",
        action="store_true",
        help="also time llama.cpp (xllamacpp) on f32 and q8_0 GGUF exports of the model",
    )
    parser.add_argument("--rounds", type=int, default=3, help="with --transformers / --gguf: rounds")
    parser.add_argument(
        "--dtypes",
        default="fp32,bf16,int8",
        help="with --transformers: llmctl's dtypes to time (--dtype's names)",
    )
    parser.add_argument(
        "--model", default=None, help="a trained checkpoint (a model reference) instead of random weights"
    )
    parser.add_argument("--workspace", default=os.environ.get("LLMCTL_HOME", "."), help="where --model is")
    parser.add_argument(
        "--bpb-corpus", default=None, help="with --transformers: bits per byte on this corpus"
    )
    parser.add_argument("--bpb-documents", type=int, default=40, help="validation documents scored for it")
    parser.add_argument(
        "--no-recompute", action="store_true", help="skip the KV cache against recomputing comparison"
    )
    args = parser.parse_args()
    lengths = [int(n) for n in args.new_tokens.split(",")]
    if args.threads:
        torch.set_num_threads(args.threads)

    texts = stdlib_texts()
    engine = build_engine(args, texts)
    prompt_ids = engine.tokenizer.encode(texts[0])[: args.prompt_tokens]
    if args.prompt_tokens + max(lengths) > engine.context_length:
        parser.error(f"--prompt-tokens + the longest --new-tokens exceed the {engine.context_length} context")
    device = engine.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f} at start"
    )
    print(f"device: {device} ({name}), {str(engine.model.embed_tokens.weight.dtype).removeprefix('torch.')}")
    cfg = engine.model.cfg
    print(
        f"model: {cfg.n_layer} layers, d_model {cfg.d_model}, {cfg.n_head} heads, vocab {cfg.vocab_size}, "
        f"context {cfg.context_length}, {engine.model.num_parameters() / 1e6:.1f}M parameters; "
        f"prompt {len(prompt_ids)} tokens, batch 1, greedy"
    )
    measure(engine, prompt_ids, 8, use_cache=True)  # warm-up: allocator, kernels, lazy imports

    for new_tokens in [] if args.no_recompute else lengths:
        cached_rate, cached_steps = measure(engine, prompt_ids, new_tokens, use_cache=True)
        full_rate, full_steps = measure(engine, prompt_ids, new_tokens, use_cache=False)
        print(
            f"\n{new_tokens} new tokens: KV cache {cached_rate:8.1f} tokens/s   recompute {full_rate:8.1f} "
            f"tokens/s   ratio {cached_rate / full_rate:5.1f}x"
        )
        positions = [p for p in POSITIONS if p <= new_tokens]
        print("  ms per token at position " + "".join(f"{p:>9}" for p in positions))
        for label, steps in (("KV cache", cached_steps), ("recompute", full_steps)):
            print(f"  {label:<24}" + "".join(f"{per_token_ms(steps, p):9.2f}" for p in positions))
    if args.transformers:
        texts_for_bpb = bpb_texts(args) if args.bpb_corpus else None
        compare_with_transformers(
            engine, prompt_ids, lengths, args.rounds, args.dtypes.split(","), texts_for_bpb
        )
    if args.gguf:
        compare_with_llamacpp(engine, prompt_ids, lengths, args.rounds)
    print(f"\nload average {os.getloadavg()[0]:.1f} at the end")


# ---------------------------------------------------------------- llmctl against transformers
# Issue 8's goal: on the CPU, batch 1, greedy, 256 new tokens, llmctl's engine at least 2x faster
# than transformers' generate running the exported copy of the same model (`llmctl export`).


def engine_checkpoint(engine: Engine) -> tuple[Path, Path]:
    """The engine's model and tokenizer written as a checkpoint; (scratch directory, checkpoint)."""
    from llmctl.checkpoint.files import FullModelIO, write_checkpoint
    from llmctl.config import RunConfig

    directory = scratch_dir("llmctl-bench-export-")
    checkpoint = write_checkpoint(
        directory / "step-00000000",
        model=engine.model,
        model_io=FullModelIO(),
        config=RunConfig(model=engine.model.cfg),
        trainer_state={},
        meta={"step": 0},
        tokenizer_file=engine.tokenizer.path,
    )
    return directory, checkpoint


def export_engine_model(engine: Engine) -> Path:
    """The engine's model exported (and round-trip checked) for transformers; the export's directory."""
    from llmctl.export.hf import export_hf
    from llmctl.workspace import Workspace

    directory, checkpoint = engine_checkpoint(engine)
    return export_hf(Workspace(directory / "workspace"), str(checkpoint), directory / "hf").directory


def time_transformers(model, prompt_ids: list[int], new_tokens: int) -> float:
    """transformers' tokens per second, generating exactly `new_tokens` greedily (min_new_tokens
    keeps an end-of-text token from stopping it early, as llmctl's engine has no stop token here)."""
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        started = time.perf_counter()
        output = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
        )
        seconds = time.perf_counter() - started
    assert output.shape[1] - ids.shape[1] == new_tokens
    return new_tokens / seconds


def compare_with_transformers(
    engine: Engine,
    prompt_ids: list[int],
    lengths: list[int],
    rounds: int,
    dtypes: list[str],
    texts: list[str] | None,
) -> None:
    from transformers import AutoModelForCausalLM

    if engine.device.type != "cpu":
        print("\nthe transformers comparison runs on the CPU only; skipped")
        return
    engine.model.to(torch.float32)  # transformers in fp32, the reference
    directory = export_engine_model(engine)
    theirs = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    ours = {
        dtype: Engine(copy.deepcopy(engine.model), engine.tokenizer, stop_token_ids=[], dtype=dtype)
        for dtype in dtypes
    }
    timers = {f"llmctl {dtype}": (lambda n, e=e: time_engine(e, prompt_ids, n)) for dtype, e in ours.items()}
    timers["transformers fp32"] = lambda n: time_transformers(theirs, prompt_ids, n)
    for timer in timers.values():
        timer(8)  # warm-up: allocator, kernels, lazy imports
    print(
        f"\nagainst transformers {transformers_version()} (fp32) on the exported copy: {rounds} rounds in "
        "rotated order, wall clock around each whole call; median (min-max)"
    )
    names = list(timers)
    for new_tokens in lengths:
        rates: dict[str, list[float]] = {name: [] for name in names}
        for round_ in range(rounds):
            for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
                rates[name].append(timers[name](new_tokens))
        baseline = statistics.median(rates["transformers fp32"])
        print(f"  {new_tokens} new tokens:")
        for name, found in rates.items():
            median = statistics.median(found)
            print(
                f"    {name:<18} {median:8.1f} tokens/s ({min(found):.1f}-{max(found):.1f})   "
                f"{median / baseline:5.2f}x transformers"
            )
    if texts:
        from llmctl.eval.perplexity import measure_perplexity

        print(f"\nbits per byte on {len(texts)} validation documents ({sum(map(len, texts)):,} characters)")
        scored = {
            dtype: measure_perplexity(e.model, e.tokenizer, texts).bits_per_byte for dtype, e in ours.items()
        }
        reference = scored.get("fp32")
        for dtype, bpb in scored.items():
            change = f"   {100 * (bpb - reference) / reference:+.2f}% against fp32" if reference else ""
            print(f"    llmctl {dtype:<11} {bpb:.4f}{change}")


def bpb_texts(args: argparse.Namespace) -> list[str]:
    from itertools import islice

    from llmctl.eval.perplexity import text_source
    from llmctl.workspace import Workspace

    _, texts = text_source(Workspace(args.workspace), args.bpb_corpus, None)
    return list(islice(texts, args.bpb_documents))


# ---------------------------------------------------------------- llmctl against llama.cpp
# Issue 17: the same model exported to GGUF (f32 and q8_0) and run by llama.cpp through xllamacpp,
# batch 1, greedy, on the same number of threads; the speed `llmctl chat` users compare with.


def time_llamacpp(llama, prompt_ids: list[int], new_tokens: int) -> float:
    """llama.cpp's tokens per second: the wall clock around one whole /completion request
    (prompt included), generating exactly `new_tokens` greedily."""
    started = time.perf_counter()
    continuation = llama.greedy(prompt_ids, new_tokens, ignore_eos=True)
    seconds = time.perf_counter() - started
    assert len(continuation.tokens) == new_tokens
    return new_tokens / seconds


def time_engine(engine: Engine, prompt_ids: list[int], new_tokens: int) -> float:
    """llmctl's tokens per second, by the same wall clock around the whole call."""
    config = GenerationConfig(temperature=0.0, max_new_tokens=new_tokens)
    started = time.perf_counter()
    (completion,) = engine.generate([prompt_ids], config)
    seconds = time.perf_counter() - started
    assert len(completion.token_ids) == new_tokens
    return new_tokens / seconds


def compare_with_llamacpp(engine: Engine, prompt_ids: list[int], lengths: list[int], rounds: int) -> None:
    import xllamacpp

    from llmctl.export.gguf import export_gguf
    from llmctl.export.llamacpp import LlamaCpp
    from llmctl.workspace import Workspace

    if engine.device.type != "cpu":
        print("\nthe llama.cpp comparison runs on the CPU only; skipped")
        return
    engine.model.to(torch.float32)
    directory, checkpoint = engine_checkpoint(engine)
    threads = torch.get_num_threads()
    runners = {"llmctl": None}
    for quant in ("f32", "q8_0"):
        started = time.perf_counter()
        result = export_gguf(
            Workspace(directory / "workspace"), str(checkpoint), directory / f"{quant}.gguf", quant
        )
        check = result.verification
        figure = (
            f"max |Δ log-prob| {check.max_logprob_diff:.1e}"
            if check.perplexity is None
            else f"perplexity {check.perplexity:.2f} against llmctl's {check.reference_perplexity:.2f}"
        )
        seconds = time.perf_counter() - started
        print(f"\nexported {quant}: {result.size / 1e6:.1f} MB in {seconds:.1f} s (with its check), {figure}")
        # llama.cpp as users run it: its default f16 KV cache and flash-attention choice
        runners[f"llama.cpp {quant}"] = LlamaCpp(result.path, engine.context_length, threads, exact=False)
    timers = {"llmctl": lambda n: time_engine(engine, prompt_ids, n)}
    for name, llama in runners.items():
        if llama is not None:
            timers[name] = lambda n, llama=llama: time_llamacpp(llama, prompt_ids, n)
    for timer in timers.values():
        timer(8)  # warm-up
    print(
        f"\nagainst llama.cpp (xllamacpp {xllamacpp.__version__}), {threads} threads each, "
        f"{rounds} rounds in rotated order, wall clock around each whole call"
    )
    names = list(timers)
    for new_tokens in lengths:
        rates: dict[str, list[float]] = {name: [] for name in names}
        for round_ in range(rounds):
            for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
                rates[name].append(timers[name](new_tokens))
        cells = "   ".join(
            f"{name} {statistics.median(r):7.1f} tokens/s (best {max(r):.1f})" for name, r in rates.items()
        )
        print(f"  {new_tokens} new tokens, median of {rounds}: {cells}")
    for llama in runners.values():
        if llama is not None:
            llama.close()


def transformers_version() -> str:
    import transformers

    return transformers.__version__


if __name__ == "__main__":
    main()
