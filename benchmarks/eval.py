"""HumanEval scoring speed: the 164 canonical solutions through the sandbox.

    python benchmarks/eval.py [--workers 1,2] [--repeats 1]

Measures seconds to score all 164 canonical HumanEval solutions (one sample each, so 164
sandboxed processes) with each worker count, and the mean seconds per program as the harness
saw them; and, for scale, the median seconds of an empty program: the sandbox's own cost
(interpreter start-up, namespaces, limits, clean-up). Every run must give pass@1 = 1.0, or the
figures mean nothing. Worker counts are interleaved across repeats and the best time kept, so a
busy neighbour inflates each alike.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

from llmctl.eval.humaneval import Sample, evaluate, load_problems
from llmctl.eval.sandbox import SandboxLimits, run_program, sandbox_profile

EMPTY_PROGRAM_RUNS = 20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", default="1,2", help="worker counts to time, comma separated")
    parser.add_argument("--repeats", type=int, default=1, help="runs per worker count; the best is kept")
    args = parser.parse_args()
    worker_counts = [int(part) for part in args.workers.split(",")]

    problems = load_problems()
    samples = [Sample(p.task_id, p.canonical_solution, line) for line, p in enumerate(problems, start=1)]
    profile = sandbox_profile()
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
          f"load average {os.getloadavg()[0]:.1f} at start")
    print(f"sandbox: network {profile.network_isolation}, user {profile.user}, "
          f"private /tmp {profile.private_tmp}")

    best: dict[int, float] = {}
    per_program: dict[int, float] = {}
    empty = float("inf")
    for _ in range(args.repeats):
        empty = min(empty, statistics.median(run_program("pass").seconds for _ in range(EMPTY_PROGRAM_RUNS)))
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
        print(f"{workers:>7}  {best[workers]:>22.2f}  {len(samples) / best[workers]:>10.1f}  "
              f"{per_program[workers]:>14.3f}")
    print(f"empty program, one at a time: {empty:.3f} s (median of {EMPTY_PROGRAM_RUNS}, best repeat)")
    if 1 in best and len(best) > 1:
        for workers in worker_counts:
            if workers != 1:
                print(f"speed-up with {workers} workers: {best[1] / best[workers]:.2f}x")


if __name__ == "__main__":
    main()
