"""HumanEval speed: scoring the 164 canonical solutions through the sandbox, and generating
completions for HumanEval prompts batched against one prompt at a time.

    python benchmarks/eval.py [--workers 1,2] [--repeats 1] [--part all|scoring|generation]
                              [--prompts 16] [--batch-size 8] [--max-new-tokens 64] [--model REF]

Scoring: seconds to score all 164 canonical HumanEval solutions (one sample each, so 164
sandboxed programs) with each worker count, and the mean seconds per program as the sandbox
measured them; and, for scale, the median wall-clock seconds of an empty program as the caller
sees them: the sandbox's own cost (processes, namespaces, limits, clean-up); and, where the tree
has run_tests, the cost of one call across the boundary (a test that calls the candidate 1,000
times against one that calls it once). Every run must give pass@1 = 1.0, or the figures mean
nothing. Worker counts are interleaved across repeats and the best time kept, so a busy
neighbour inflates each alike. The script uses only what older trees have too, so the same file
can time the tree before a change (PYTHONPATH=<that tree>).

Generation: the first --prompts HumanEval prompts through `llmctl.eval.generation` (the path
`eval humaneval --model` takes), greedy, exactly --max-new-tokens tokens each (no stop strings,
so both ways do the same work), --batch-size prompts per forward against one at a time; the
same model in the same process, interleaved across repeats, best kept. The model is --model
(a reference in $LLMCTL_HOME) or, by default, random weights in the cpu-debug preset's shape
with a 1024-token context and the byte-level tokenizer (speed does not depend on the weights).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

from llmctl.eval import sandbox
from llmctl.eval.humaneval import Sample, evaluate, load_problems
from llmctl.eval.sandbox import SandboxLimits, run_program, sandbox_profile

EMPTY_PROGRAM_RUNS = 20
CALLS = 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", default="1,2", help="worker counts to time, comma separated")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each setting; the best is kept")
    parser.add_argument("--part", choices=("all", "scoring", "generation"), default="all")
    parser.add_argument("--prompts", type=int, default=16, help="HumanEval prompts generated for")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per forward when batched")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens generated per prompt")
    parser.add_argument("--model", help="a model reference in $LLMCTL_HOME [default: random weights]")
    args = parser.parse_args()

    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"load average {os.getloadavg()[0]:.1f} at start"
    )
    if args.part in ("all", "scoring"):
        scoring(args)
    if args.part in ("all", "generation"):
        generation(args)


def scoring(args: argparse.Namespace) -> None:
    worker_counts = [int(part) for part in args.workers.split(",")]
    problems = load_problems()
    samples = [Sample(p.task_id, p.canonical_solution, line) for line, p in enumerate(problems, start=1)]
    profile = sandbox_profile()
    print(
        f"sandbox: network {profile.network_isolation}, processes {profile.process_isolation}, "
        f"filesystem {getattr(profile, 'filesystem', '-')}, user {profile.user}, "
        f"private /tmp {profile.private_tmp}"
    )

    best: dict[int, float] = {}
    per_program: dict[int, float] = {}
    empty = per_call = float("inf")
    for _ in range(args.repeats):
        empty = min(
            empty, statistics.median(_wall_clock(run_program, "pass") for _ in range(EMPTY_PROGRAM_RUNS))
        )
        if hasattr(sandbox, "run_tests"):
            per_call = min(per_call, _per_call())
        for workers in worker_counts:
            started = time.perf_counter()
            report = evaluate(problems, samples, ks=[1], limits=SandboxLimits(), workers=workers)
            seconds = time.perf_counter() - started
            if report.pass_at_k["pass@1"] != 1.0:
                raise SystemExit(f"canonical solutions scored pass@1 = {report.pass_at_k['pass@1']}, not 1.0")
            if seconds < best.get(workers, float("inf")):
                best[workers] = seconds
                per_program[workers] = statistics.fmean(r.seconds for p in report.problems for r in p.results)

    print(f"\n{'workers':>7}  {'seconds (164 programs)':>22}  {'programs/s':>10}  {'mean s/program':>14}")
    for workers in worker_counts:
        print(
            f"{workers:>7}  {best[workers]:>22.2f}  {len(samples) / best[workers]:>10.1f}  "
            f"{per_program[workers]:>14.3f}"
        )
    print(f"empty program, one at a time: {empty:.3f} s (median of {EMPTY_PROGRAM_RUNS}, best repeat)")
    if per_call != float("inf"):
        print(f"one call across the boundary: {per_call * 1e6:.0f} µs (best repeat)")
    if 1 in best and len(best) > 1:
        for workers in worker_counts:
            if workers != 1:
                print(f"speed-up with {workers} workers: {best[1] / best[workers]:.2f}x")


def _wall_clock(function, *args) -> float:
    started = time.perf_counter()
    function(*args)
    return time.perf_counter() - started


def _per_call() -> float:
    """Seconds one call of the candidate costs: CALLS calls against one, each the median of 5."""

    def timed(calls: int) -> float:
        program = sandbox.TestProgram(
            "def f(x):\n    return [x, str(x)]\n",
            f"def check(candidate):\n    for i in range({calls}):\n"
            "        assert candidate(i) == [i, str(i)]\n",
            "f",
        )
        return statistics.median(_wall_clock(sandbox.run_tests, program) for _ in range(5))

    return (timed(CALLS) - timed(1)) / (CALLS - 1)


def generation(args: argparse.Namespace) -> None:
    import torch

    from llmctl.config import GenerationConfig
    from llmctl.eval.generation import generate_completions

    engine = _engine(args.model)
    prompts = [problem.prompt for problem in load_problems()[: args.prompts]]
    lengths = [len(engine.tokenizer.encode(prompt)) + 1 for prompt in prompts]
    config = GenerationConfig(temperature=0, max_new_tokens=args.max_new_tokens)
    print(
        f"\ngeneration: {args.model or 'random weights, cpu-debug shape, 1024-token context, bytes'}, "
        f"{engine.model.num_parameters() / 1e6:.1f}M parameters, {torch.get_num_threads()} threads; "
        f"{len(prompts)} prompts of {min(lengths)}-{max(lengths)} tokens "
        f"(mean {sum(lengths) / len(lengths):.0f}), {args.max_new_tokens} new tokens each"
    )
    generate_completions(engine, prompts[:2], config.model_copy(update={"max_new_tokens": 2}))  # warm-up
    best: dict[int, tuple[float, int]] = {}
    for _ in range(args.repeats):
        for batch_size in (1, args.batch_size):
            started = time.perf_counter()
            generated = generate_completions(engine, prompts, config, batch_size=batch_size)
            seconds = time.perf_counter() - started
            if seconds < best.get(batch_size, (float("inf"), 0))[0]:
                best[batch_size] = (seconds, generated.generated_tokens)
    print(f"{'prompts per forward':>19}  {'seconds':>8}  {'tokens/s':>9}")
    for batch_size, (seconds, tokens) in best.items():
        print(f"{batch_size:>19}  {seconds:>8.2f}  {tokens / seconds:>9.1f}")
    print(
        f"batched ({args.batch_size} prompts) is {best[1][0] / best[args.batch_size][0]:.2f}x "
        f"as fast as one prompt at a time"
    )


def _engine(ref: str | None):
    """The engine for `ref`, or random weights in the cpu-debug shape with the byte tokenizer."""
    import tempfile
    from pathlib import Path

    import torch

    from llmctl.config import ModelConfig
    from llmctl.generate import Engine, load_engine
    from llmctl.model.transformer import Transformer
    from llmctl.tokenizer import BYTE_VOCAB_SIZE, load_tokenizer_file
    from llmctl.tokenizer_build import build_byte_tokenizer
    from llmctl.workspace import Workspace

    if ref is not None:
        return load_engine(Workspace(), ref).engine
    torch.manual_seed(0)
    model = Transformer(
        ModelConfig(n_layer=2, n_head=4, d_model=256, context_length=1024, vocab_size=BYTE_VOCAB_SIZE)
    )
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "tokenizer.json"
        build_byte_tokenizer().save(str(path))
        tokenizer = load_tokenizer_file(path)
    return Engine(model, tokenizer)


if __name__ == "__main__":
    main()
