"""`llmctl eval classify`: the metrics against a hand computation, a classifier finetuned in the
test measured on its data (accuracy, per-class figures, confusion matrix, registry row), and
one-line errors."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from eval_helpers import RUN, trained_workspace
from pretrain_helpers import one_thread

from llmctl.cli.main import main
from llmctl.eval.classify import classification_metrics
from llmctl.workspace import Workspace

SPAM = ["win", "free", "prize", "cash", "claim", "urgent"]
HAM = ["lunch", "meeting", "mom", "home", "later", "thanks"]


def messages(seed: int, per_class: int) -> list[dict]:
    rng = random.Random(seed)
    return [
        {"text": " ".join(rng.choices(words, k=4)), "label": label}
        for _ in range(per_class)
        for words, label in ((SPAM, "spam"), (HAM, "ham"))
    ]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    """The eval workspace plus run 'clf': its base finetuned to tell spam from ham."""
    root = trained_workspace(tmp_path_factory.mktemp("classify") / "workspace")
    data = write_jsonl(root / "spam.jsonl", messages(seed=0, per_class=40))
    finetune = [
        "finetune",
        "--model",
        RUN,
        "--data",
        data,
        "--task",
        "classify",
        "--run",
        "clf",
        "--max-steps",
        "60",
        "--set",
        "train.micro_batch_size=8",
        "--set",
        "train.lr=2e-3",
        "--set",
        "train.warmup_steps=5",
        "--set",
        "train.eval_every=30",
        "--set",
        "train.eval_batches=2",
        "--set",
        "train.log_every=30",
        "--set",
        "train.precision=fp32",
    ]
    with one_thread():
        assert main(["--workspace", str(root), *finetune]) == 0
    return root


@pytest.fixture(autouse=True)
def single_thread():
    with one_thread():
        yield


def test_metrics_match_a_hand_computation():
    labels = ["a", "b", "c"]
    truth = [0, 0, 0, 1, 1, 2]
    predicted = [0, 0, 1, 1, 2, 0]
    metrics = classification_metrics(labels, truth, predicted)
    assert metrics["confusion"] == [[2, 1, 0], [0, 1, 1], [1, 0, 0]]
    assert metrics["accuracy"] == pytest.approx(3 / 6)
    a, b, c = (metrics["per_class"][label] for label in labels)
    assert (a["precision"], a["recall"], a["support"]) == (pytest.approx(2 / 3), pytest.approx(2 / 3), 3)
    assert (b["precision"], b["recall"], b["f1"]) == (
        pytest.approx(1 / 2),
        pytest.approx(1 / 2),
        pytest.approx(1 / 2),
    )
    assert (c["precision"], c["recall"], c["f1"]) == (0.0, 0.0, 0.0)
    assert metrics["macro"]["f1"] == pytest.approx((2 / 3 + 1 / 2 + 0) / 3)
    # a class that neither occurs nor is predicted stays out of the macro mean
    alone = classification_metrics(["x", "y"], [0, 0], [0, 0])
    assert alone["macro"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0}
    assert alone["per_class"]["y"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}


def test_a_finetuned_classifier_is_measured_and_recorded(cli, ws, tmp_path):
    fresh = write_jsonl(tmp_path / "fresh.jsonl", messages(seed=1, per_class=15))
    result = cli(
        "--workspace", ws, "eval", "classify", "-m", "clf", "--data", fresh, "--split", "all", "--json"
    )
    assert result.exit_code == 0, result.stderr
    summary = result.json()
    assert summary["labels"] == ["ham", "spam"] and summary["examples"] == 30 and summary["skipped"] == 0
    assert summary["accuracy"] >= 0.9
    assert sum(map(sum, summary["confusion"])) == 30
    assert [summary["per_class"][label]["support"] for label in ("ham", "spam")] == [15, 15]
    correct = sum(summary["confusion"][i][i] for i in range(2))
    assert summary["accuracy"] == pytest.approx(correct / 30)

    checkpoint = Workspace(ws).registry().checkpoints("clf")[-1]
    (row,) = [row for row in Workspace(ws).registry().evals(checkpoint["id"]) if row["kind"] == "classify"]
    assert row["meta"]["accuracy"] == summary["accuracy"] and summary["checkpoint_id"] == checkpoint["id"]


def test_the_table_shows_per_class_figures_and_the_confusion_matrix(cli, ws):
    result = cli("--workspace", ws, "eval", "classify", "-m", "clf", "--data", ws / "spam.jsonl")
    assert result.exit_code == 0, result.stderr
    for text in (
        "precision",
        "recall",
        "f1",
        "support",
        "ham",
        "spam",
        "macro mean",
        "accuracy",
        "confusion",
    ):
        assert text in result.stdout
    assert "(val)" in result.stdout  # the examples finetuning held out


@pytest.mark.parametrize(
    "flags,message",
    [
        (("-m", RUN, "--data", "spam.jsonl"), f"'{RUN}' is a language model, not a classifier"),
        (("-m", "clf", "--data", "missing.jsonl"), "data file 'missing.jsonl' does not exist"),
        (("-m", "clf", "--data", "x.jsonl", "--split", "test"), "unknown --split 'test'"),
        (("-m", "nope", "--data", "x.jsonl"), "no run or checkpoint directory named 'nope'"),
        (("-m", "clf"), "say what to classify: --data"),
    ],
)
def test_bad_input_is_a_one_line_error(cli, ws, flags, message):
    result = cli("--workspace", ws, "eval", "classify", *flags)
    assert result.exit_code == 2 and result.stdout == ""
    assert message in result.stderr
