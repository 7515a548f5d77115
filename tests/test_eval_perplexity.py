"""`llmctl eval perplexity` with a briefly trained model: bits per byte against a hand computation
from the model's logits, sliding windows that score each token once, trained against untrained,
the registry row, and one-line errors."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from eval_helpers import RUN, STEPS, trained_workspace, untrained_checkpoint
from pretrain_helpers import one_thread

from llmctl.checkpoint.load import load_model
from llmctl.eval.perplexity import bits_per_byte, measure_perplexity, sliding_spans
from llmctl.workspace import Workspace

SHORT = "def add(a, b):\n    return a + b\n"  # fits in the 64-token window
LONG = Path(math.__file__ if math.__file__.endswith(".py") else __file__).read_text()[:900]


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    return trained_workspace(tmp_path_factory.mktemp("perplexity") / "workspace")


@pytest.fixture(scope="module")
def loaded(ws):
    return load_model(Workspace(ws), RUN)


@pytest.fixture(autouse=True)
def single_thread():
    with one_thread():
        yield


def nats_by_hand(loaded, text: str, window: int) -> float:
    """Each token predicted from the `window` tokens before it (end-of-text first), one forward each."""
    sequence = [loaded.tokenizer.eot_id, *loaded.tokenizer.encode(text)]
    nats = 0.0
    with torch.no_grad():
        for position in range(1, len(sequence)):
            context = torch.tensor([sequence[max(0, position - window) : position]])
            logits = loaded.model(context)[0, -1]
            nats -= F.log_softmax(logits.double(), dim=-1)[sequence[position]].item()
    return nats


def test_bits_per_byte_of_a_file_is_the_hand_computation_from_the_logits(cli, ws, loaded, tmp_path):
    path = tmp_path / "add.py"
    path.write_text(SHORT)
    result = cli("--workspace", ws, "eval", "perplexity", "--model", RUN, "--file", path, "--json")
    assert result.exit_code == 0, result.stderr
    summary = result.json()

    sequence = torch.tensor([[loaded.tokenizer.eot_id, *loaded.tokenizer.encode(SHORT)]])
    with torch.no_grad():
        logits = loaded.model(sequence)[0, :-1]
    nats = F.cross_entropy(logits.double(), sequence[0, 1:], reduction="sum").item()
    n_bytes = len(SHORT.encode("utf-8"))
    assert summary["tokens"] == sequence.shape[1] - 1 and summary["bytes"] == n_bytes
    assert summary["nats"] == pytest.approx(nats, rel=1e-5)
    assert summary["bits_per_byte"] == pytest.approx(nats / n_bytes / math.log(2), rel=1e-5)
    assert summary["loss"] == pytest.approx(nats / summary["tokens"], rel=1e-5)
    assert summary["perplexity"] == pytest.approx(math.exp(summary["loss"]), rel=1e-9)
    assert summary["source"] == {"file": str(path.resolve())} and summary["step"] == STEPS


def test_a_text_that_fits_the_window_scores_the_same_with_any_stride(loaded):
    results = [
        measure_perplexity(loaded.model, loaded.tokenizer, [SHORT], stride=stride) for stride in (1, 5, 64)
    ]
    assert {result.tokens for result in results} == {len(loaded.tokenizer.encode(SHORT))}
    assert results[0].nats == pytest.approx(results[1].nats, rel=1e-6)
    assert results[0].nats == pytest.approx(results[2].nats, rel=1e-6)


def test_a_long_text_has_every_token_scored_once_with_the_context_the_stride_leaves(loaded):
    n_tokens = len(loaded.tokenizer.encode(LONG))
    assert n_tokens > 3 * 64
    for stride in (1, 7, 32, 64):
        result = measure_perplexity(
            loaded.model, loaded.tokenizer, [LONG, "", SHORT], stride=stride, batch_size=5
        )
        assert result.tokens == n_tokens + len(loaded.tokenizer.encode(SHORT)) and result.documents == 2
    # stride 1: every token sees the whole window before it, which one forward per token reproduces
    slid = measure_perplexity(loaded.model, loaded.tokenizer, [LONG], stride=1, batch_size=16)
    assert slid.nats == pytest.approx(nats_by_hand(loaded, LONG, window=64), rel=1e-5)
    assert slid.bits_per_byte == pytest.approx(bits_per_byte(slid.nats, len(LONG.encode())), rel=1e-12)
    # more context per token (a smaller stride) predicts better
    assert slid.loss < measure_perplexity(loaded.model, loaded.tokenizer, [LONG], stride=64).loss


@pytest.mark.parametrize(
    "n_tokens,window,stride", [(1, 4, 1), (10, 4, 1), (10, 4, 3), (10, 4, 4), (9, 16, 8), (100, 16, 5)]
)
def test_spans_cover_every_target_once_and_keep_window_minus_stride_context(n_tokens, window, stride):
    spans = sliding_spans(n_tokens, window, stride)
    targets = [t for span in spans for t in range(span.first, span.end + 1)]
    assert targets == list(range(1, n_tokens + 1))
    for index, span in enumerate(spans):
        assert span.end - span.start <= window  # the model reads positions start .. end - 1
        if index:
            assert span.first - span.start >= window - stride


def test_a_trained_model_has_lower_bits_per_byte_than_an_untrained_one(cli, ws, tmp_path):
    path = tmp_path / "sample.py"
    path.write_text(LONG)
    trained = cli("--workspace", ws, "eval", "perplexity", "-m", RUN, "-f", path, "--json").json()
    untrained = cli(
        "--workspace", ws, "eval", "perplexity", "-m", untrained_checkpoint(ws), "-f", path, "--json"
    )
    assert untrained.exit_code == 0, untrained.stderr
    untrained = untrained.json()
    assert trained["bits_per_byte"] < untrained["bits_per_byte"] - 0.5
    assert untrained["loss"] == pytest.approx(math.log(512), abs=0.5)  # about uniform over the vocabulary


def test_a_corpus_split_is_scored_and_every_result_is_a_registry_row(cli, ws):
    result = cli(
        "--workspace",
        ws,
        "eval",
        "perplexity",
        "-m",
        f"{RUN}:step-50",
        "--corpus",
        "code",
        "--stride",
        "64",
        "--batch-size",
        "16",
    )
    assert result.exit_code == 0, result.stderr
    assert "bits per byte" in result.stdout and "code/val" in result.stdout

    registry = Workspace(ws).registry()
    checkpoint = registry.checkpoint_at(RUN, 50)
    (row,) = [
        row for row in registry.evals(checkpoint["id"]) if row["meta"]["source"].get("corpus") == "code"
    ]
    assert row["kind"] == "perplexity" and row["meta"]["checkpoint_id"] == checkpoint["id"]
    assert row["meta"]["model"] == f"{RUN}:step-50" and row["meta"]["stride"] == 64
    assert row["meta"]["bits_per_byte"] > 0 and row["meta"]["documents"] >= 1


@pytest.mark.parametrize(
    "flags,message",
    [
        (("-m", "nope", "--corpus", "code"), "no run or checkpoint directory named 'nope'"),
        (("-m", RUN), "say what to score: --corpus NAME"),
        (("-m", RUN, "--corpus", "code", "--file", "x.txt"), "give --corpus or --file, not both"),
        (("-m", RUN, "--corpus", "nope"), "corpus 'nope' does not exist"),
        (("-m", RUN, "--file", "missing.txt"), "text file 'missing.txt' does not exist"),
        (
            ("-m", RUN, "--corpus", "code", "--stride", "65"),
            "the stride must be between 1 and the window (64",
        ),
    ],
)
def test_bad_input_is_a_one_line_error(cli, ws, flags, message):
    result = cli("--workspace", ws, "eval", "perplexity", *flags)
    assert result.exit_code == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert result.stdout == ""
