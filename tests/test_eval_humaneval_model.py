"""`llmctl eval humaneval --model`: completions generated in batches, cut at the stop sequences,
saved beside the results, scored in the sandbox and recorded against the checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from eval_helpers import RUN, trained_workspace
from pretrain_helpers import one_thread

from llmctl.eval.generation import _plan
from llmctl.eval.humaneval import STOP_SEQUENCES, truncate_completion
from llmctl.workspace import Workspace


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    return trained_workspace(tmp_path_factory.mktemp("humaneval") / "workspace")


@pytest.fixture(autouse=True)
def single_thread():
    with one_thread():
        yield


@pytest.mark.parametrize("n_prompts,n_samples,batch_size", [(5, 1, 2), (5, 3, 8), (3, 5, 2), (1, 4, 4)])
def test_batches_hold_at_most_batch_size_rows_and_every_sample_once(n_prompts, n_samples, batch_size):
    calls = list(_plan(n_prompts, n_samples, batch_size))
    assert all(len(call.prompts) * call.num_samples <= batch_size for call in calls)
    rows = sorted(
        (prompt, call.first_sample + sample)
        for call in calls
        for prompt in call.prompts
        for sample in range(call.num_samples)
    )
    assert rows == [(prompt, sample) for prompt in range(n_prompts) for sample in range(n_samples)]


def test_generated_completions_are_saved_cut_scored_and_recorded(cli, ws, tmp_path):
    out = tmp_path / "he"
    result = cli(
        "--workspace",
        ws,
        "eval",
        "humaneval",
        "--model",
        RUN,
        "--limit",
        "2",
        "--n-samples",
        "3",
        "--batch-size",
        "2",
        "--temperature",
        "0.8",
        "--max-new-tokens",
        "40",
        "--k",
        "1,2,10",
        "--out",
        out,
        "--workers",
        "2",
        "--json",
    )
    assert result.exit_code == 0, result.stderr
    summary = result.json()

    lines = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    assert [line["task_id"] for line in lines] == ["HumanEval/0"] * 3 + ["HumanEval/1"] * 3
    assert all(truncate_completion(line["completion"]) == line["completion"] for line in lines)
    assert all(line["finish_reason"] in ("stop", "length", "context") for line in lines)
    assert len({line["completion"] for line in lines}) > 1  # sampled, not six copies of one text
    problems = [json.loads(line) for line in (out / "problems.jsonl").read_text().splitlines()]
    assert [problem["n"] for problem in problems] == [3, 3]

    assert (
        summary["problems"] == 2
        and summary["samples"] == 6
        and set(summary["pass_at_k"]) == {"pass@1", "pass@2"}
    )
    assert summary["k_above_n"] == [10]
    assert summary["completions_file"] == str(out / "completions.jsonl")
    generation = summary["generation"]
    assert (generation["n_samples"], generation["temperature"], generation["top_p"]) == (3, 0.8, 0.95)
    assert generation["stop"] == list(STOP_SEQUENCES) and generation["generated_tokens"] > 0
    checkpoint = Workspace(ws).registry().checkpoints(RUN)[-1]
    assert summary["checkpoint_id"] == checkpoint["id"] and summary["model"] == RUN
    row = [row for row in Workspace(ws).registry().evals(checkpoint["id"]) if row["id"] == summary["eval_id"]]
    assert row and row[0]["kind"] == "humaneval" and row[0]["meta"]["generation"]["n_samples"] == 3


def test_the_same_seed_gives_the_same_completions(cli, ws, tmp_path):
    texts = []
    for name in ("a", "b"):
        flags = ("--limit", "1", "--n-samples", "2", "--max-new-tokens", "24", "--temperature", "1.0")
        result = cli("--workspace", ws, "eval", "humaneval", "-m", RUN, *flags, "--out", tmp_path / name)
        assert result.exit_code == 0, result.stderr
        assert "humaneval · base" in result.stdout and "completions:" in result.stdout
        texts.append((tmp_path / name / "completions.jsonl").read_text())
    assert texts[0] == texts[1]


@pytest.mark.parametrize(
    "flags,message",
    [
        ((), "give --model REF to generate completions or --completions FILE"),
        (("-m", RUN, "--completions", "c.jsonl"), "not both"),
        (("-m", "nope"), "no run or checkpoint directory named 'nope'"),
        (("-m", RUN, "--top-p", "0"), "invalid --top-p 0.0"),
        (("-m", RUN, "--temperature", "-1"), "invalid --temperature -1.0"),
        (("-m", RUN, "--k", "x"), "--k takes positive whole numbers"),
    ],
)
def test_bad_input_is_a_one_line_error(cli, ws, flags, message):
    result = cli("--workspace", ws, "eval", "humaneval", "--limit", "1", *flags)
    assert result.exit_code == 2 and result.stdout == ""
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
