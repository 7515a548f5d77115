"""`llmctl eval probes`: the checks each probe makes, the shipped probe set (its function tests pass
with correct bodies), determinism, a trained model against an untrained one, the registry row."""

from __future__ import annotations

from pathlib import Path

import pytest
from eval_helpers import RUN, trained_workspace, untrained_checkpoint
from pretrain_helpers import one_thread

from llmctl.eval.probes import (
    CATEGORIES,
    closes_brackets,
    completes_keyword,
    indents_after_colon,
    load_probe_set,
    run_function_tests,
    writes_function,
)
from llmctl.workspace import Workspace


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    return trained_workspace(tmp_path_factory.mktemp("probes") / "workspace")


@pytest.fixture(autouse=True)
def single_thread():
    with one_thread():
        yield


@pytest.mark.parametrize(
    "prompt,continuation,passed",
    [
        ("x = max(values", ")", True),
        ("x = max(values", ", key=len)\nmore", True),
        ("total = sum([x for x in range(10", ")])", True),
        ("total = sum([x for x in range(10", "))]", False),  # the wrong closer first
        ("total = sum([x for x in range(10", ")]", False),  # one left open
        ("f(g(x", ", ')') + 1))", True),  # a bracket inside a string does not count
        ("f(x", "\n)", False),  # only the first line counts
        ("f(x", "", False),
    ],
)
def test_bracket_closing(prompt, continuation, passed):
    assert closes_brackets(prompt, continuation) is passed


def test_keyword_indentation_and_function_checks():
    assert completes_keyword("nge(", "nge(10):") and not completes_keyword("nge(", " range(")
    assert indents_after_colon("if x:\n", "\n    return 1\n")
    assert not indents_after_colon("def f():\n    for i in x:\n", "    pass\n")  # not deeper than the `for`
    assert not indents_after_colon("if x:\n", "\n\n")
    header = 'def add(a, b):\n    """Sum."""\n'
    assert writes_function(header, "    return a + b\n")
    assert not writes_function(header, "\n\n")  # a docstring alone parses, but nothing was written
    assert not writes_function(header, "    return a +\n")
    assert not writes_function(header, "x = 1\n")  # not the function's body
    assert writes_function("class C:\n    def m(self):\n", "        return 1\n")


def test_the_shipped_probe_set_is_versioned_and_its_tests_pass_with_correct_bodies():
    probe_set = load_probe_set()
    assert probe_set.version == "v1"
    assert all(len(group) >= 8 for group in (probe_set.bracket, probe_set.keyword, probe_set.indentation))
    tested = [probe for probe in probe_set.functions if probe.test]
    assert len(tested) >= 8 and all(probe.reference for probe in tested)
    references = {probe.name: probe.reference for probe in tested}
    assert all(run_function_tests(probe_set, references, workers=2).values())
    assert not any(run_function_tests(probe_set, dict.fromkeys(references, "    return None\n")).values())
    assert all(writes_function(probe.prompt, probe.reference) for probe in tested)


def test_probes_are_deterministic_and_a_trained_model_beats_an_untrained_one(cli, ws):
    first = cli("--workspace", ws, "eval", "probes", "--model", RUN, "--json")
    assert first.exit_code == 0, first.stderr
    first = first.json()
    second = cli("--workspace", ws, "eval", "probes", "--model", RUN, "--batch-size", "16", "--json").json()
    assert first["probes"] == second["probes"] and first["score"] == second["score"]
    assert first["probe_set"] == "v1" and list(first["categories"]) == list(CATEGORIES)
    assert all(0 <= figures["score"] <= 1 for figures in first["categories"].values())

    untrained = cli("--workspace", ws, "eval", "probes", "-m", untrained_checkpoint(ws), "--json").json()
    assert first["categories"]["parse"]["score"] >= untrained["categories"]["parse"]["score"]
    assert first["categories"]["indentation"]["score"] > untrained["categories"]["indentation"]["score"]
    assert first["score"] > untrained["score"]

    registry = Workspace(ws).registry()
    rows = [row for row in registry.evals() if row["kind"] == "probes"]
    assert len(rows) == 3 and rows[0]["checkpoint_id"] == registry.checkpoints(RUN)[-1]["id"]
    assert rows[0]["meta"]["score"] == first["score"] and rows[0]["meta"]["probe_set"] == "v1"
    assert rows[2]["checkpoint_id"] is None and rows[2]["meta"]["checkpoint"] == str(untrained_checkpoint(ws))


def test_the_table_names_each_category(cli, ws):
    result = cli("--workspace", ws, "eval", "probes", "--model", f"{RUN}:step-50")
    assert result.exit_code == 0, result.stderr
    for label in ("bracket", "keyword", "indentation", "function body", "parse", "mean"):
        assert label in result.stdout


def test_an_unknown_model_is_a_one_line_error(cli, ws):
    result = cli("--workspace", ws, "eval", "probes", "--model", "bsae")
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        "error: no run or checkpoint directory named 'bsae' — did you mean 'base'?"
    ]
