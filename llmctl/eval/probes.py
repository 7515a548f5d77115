"""Code probes: small deterministic checks of what a model has learned about Python.

Every probe is a prompt continued with greedy decoding, so a checkpoint scores the same every
time. The probe set is a versioned file shipped in the package (probes_v1.json); a change to
any probe is a new version, and results name the version they were measured with.

    bracket        the first line of the continuation closes every bracket the prompt left open,
                   innermost first, and closes nothing it should not
    keyword        a prompt that stops inside a word is continued with the rest of it ("ra" → "nge(")
    indentation    after a line ending in a colon, the next line with text is indented deeper
    function_body  the body written for a signature and docstring passes its tests in the sandbox
    parse          after a function header (signature, maybe a docstring) the model writes a body
                   (a line indented under the `def`) and, cut at the HumanEval stop sequences,
                   the function parses with ast.parse

Each category scores the share of its probes passed (0 to 1); `score` is the mean of the five.
"""

from __future__ import annotations

import ast
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmctl.config import GenerationConfig
from llmctl.eval.generation import generate_completions
from llmctl.eval.humaneval import STOP_SEQUENCES, Problem, Sample, evaluate
from llmctl.eval.sandbox import SandboxLimits
from llmctl.generate import Engine

PROBE_FILE = Path(__file__).with_name("probes_v1.json")
CATEGORIES = ("bracket", "keyword", "indentation", "function_body", "parse")
OPENING = {"(": ")", "[": "]", "{": "}"}
CLOSING = set(OPENING.values())

# Greedy, and only as many tokens as the check reads.
LINE = GenerationConfig(temperature=0, max_new_tokens=16)
WORD = GenerationConfig(temperature=0, max_new_tokens=8)
FUNCTION = GenerationConfig(temperature=0, max_new_tokens=128)


@dataclass(frozen=True)
class Probe:
    name: str
    prompt: str
    expect: str | None = None  # keyword probes: the rest of the word
    entry_point: str | None = None  # function probes with tests
    test: str | None = None
    reference: str | None = None  # a correct body, to check the test itself


@dataclass(frozen=True)
class ProbeSet:
    version: str
    bracket: list[Probe]
    keyword: list[Probe]
    indentation: list[Probe]
    functions: list[Probe]  # the parse probes; those with a test are also function_body probes


def load_probe_set(path: Path = PROBE_FILE) -> ProbeSet:
    tree = json.loads(path.read_text(encoding="utf-8"))
    groups = {
        name: [Probe(**record) for record in tree[name]]
        for name in ("bracket", "keyword", "indentation", "functions")
    }
    return ProbeSet(tree["version"], **groups)


# ---------------------------------------------------------------- checks


def closes_brackets(prompt: str, continuation: str) -> bool:
    """Whether the continuation's first line closes the prompt's open brackets in order (brackets
    inside string literals of the continuation do not count)."""
    stack = _open_brackets(prompt)
    quote = None
    for char in continuation.split("\n", 1)[0]:
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in OPENING:
            stack.append(OPENING[char])
        elif char in CLOSING:
            if not stack or stack.pop() != char:
                return False
            if not stack:
                return True
    return False


def _open_brackets(prompt: str) -> list[str]:
    """The closers the prompt's open brackets need, innermost last."""
    stack: list[str] = []
    for char in prompt:
        if char in OPENING:
            stack.append(OPENING[char])
        elif char in CLOSING and stack:
            stack.pop()
    return stack


def completes_keyword(expect: str, continuation: str) -> bool:
    return continuation.startswith(expect)


def indents_after_colon(prompt: str, continuation: str) -> bool:
    colon_line = prompt.rstrip("\n").rsplit("\n", 1)[-1]
    line = next((line for line in continuation.split("\n") if line.strip()), None)
    return line is not None and _indent(line) > _indent(colon_line)


def writes_function(prompt: str, body: str) -> bool:
    """Whether the continuation adds code to the function the prompt opens (its first line with
    text is indented under the prompt's last `def`) and prompt + continuation parses."""
    header = [line for line in prompt.split("\n") if line.lstrip().startswith("def ")][-1]
    line = next((line for line in body.split("\n") if line.strip()), None)
    return line is not None and _indent(line) > _indent(header) and parses(prompt + body)


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def parses(program: str) -> bool:
    try:
        ast.parse(program)
    except (SyntaxError, ValueError):  # ValueError: a null byte in the source
        return False
    return True


# ---------------------------------------------------------------- running


@dataclass
class ProbeResult:
    category: str
    name: str
    passed: bool
    continuation: str


def run_probes(
    engine: Engine,
    probe_set: ProbeSet | None = None,
    *,
    batch_size: int = 16,
    limits: SandboxLimits = SandboxLimits(),
    workers: int = 1,
) -> dict[str, Any]:
    """Every probe of the set (v1 by default) with greedy decoding; the summary of the scores."""
    probe_set = probe_set or load_probe_set()
    results: list[ProbeResult] = []

    def continue_all(probes: list[Probe], config: GenerationConfig, stops: tuple[str, ...]) -> list[str]:
        generated = generate_completions(
            engine, [probe.prompt for probe in probes], config, batch_size=batch_size, stop_sequences=stops
        )
        return [texts[0] for texts in generated.texts]

    for probe, text in zip(probe_set.bracket, continue_all(probe_set.bracket, LINE, ("\n",)), strict=True):
        results.append(ProbeResult("bracket", probe.name, closes_brackets(probe.prompt, text), text))
    for probe, text in zip(probe_set.keyword, continue_all(probe_set.keyword, WORD, ("\n",)), strict=True):
        results.append(ProbeResult("keyword", probe.name, completes_keyword(probe.expect or "", text), text))
    for probe, text in zip(probe_set.indentation, continue_all(probe_set.indentation, LINE, ()), strict=True):
        results.append(ProbeResult("indentation", probe.name, indents_after_colon(probe.prompt, text), text))

    bodies = continue_all(probe_set.functions, FUNCTION, STOP_SEQUENCES)
    body_of = {probe.name: body for probe, body in zip(probe_set.functions, bodies, strict=True)}
    for probe, passed in run_function_tests(probe_set, body_of, limits, workers).items():
        results.append(ProbeResult("function_body", probe, passed, body_of[probe]))
    for probe, body in zip(probe_set.functions, bodies, strict=True):
        results.append(ProbeResult("parse", probe.name, writes_function(probe.prompt, body), body))
    return summarize(probe_set.version, results)


def run_function_tests(
    probe_set: ProbeSet, body_of: dict[str, str], limits: SandboxLimits = SandboxLimits(), workers: int = 1
) -> dict[str, bool]:
    """Whether each function probe that has a test passes it with the body given for it."""
    tested = [probe for probe in probe_set.functions if probe.test]
    problems = [
        Problem(f"probe/{probe.name}", probe.prompt, probe.entry_point or probe.name, probe.test or "")
        for probe in tested
    ]
    samples = [
        Sample(problem.task_id, body_of[probe.name], line)
        for line, (probe, problem) in enumerate(zip(tested, problems, strict=True), start=1)
    ]
    report = evaluate(problems, samples, ks=[1], limits=limits, workers=workers)
    return {probe.name: outcome.correct == 1 for probe, outcome in zip(tested, report.problems, strict=True)}


def summarize(version: str, results: list[ProbeResult]) -> dict[str, Any]:
    categories = {}
    for category in CATEGORIES:
        passed = sum(result.passed for result in results if result.category == category)
        total = sum(result.category == category for result in results)
        categories[category] = {"score": passed / total, "passed": passed, "total": total}
    return {
        "probe_set": version,
        "score": sum(figures["score"] for figures in categories.values()) / len(categories),
        "categories": categories,
        "probes": [vars(result) for result in results],
    }
