"""`llmctl eval compare`: every checkpoint of a run or a list of references through the same evals,
one table, a PNG, one registry row per eval and checkpoint, and one-line errors before any load."""

from __future__ import annotations

from pathlib import Path

import pytest
from eval_helpers import RUN, trained_workspace, untrained_checkpoint
from pretrain_helpers import one_thread

from llmctl.workspace import Workspace

TEXT = Path(__file__).read_text()[:1500]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    return trained_workspace(tmp_path_factory.mktemp("compare") / "workspace")


@pytest.fixture(autouse=True)
def single_thread():
    with one_thread():
        yield


def test_every_checkpoint_of_a_run_in_one_document_with_a_plot_and_registry_rows(cli, ws, tmp_path):
    text = tmp_path / "sample.py"
    text.write_text(TEXT)
    plot = tmp_path / "plots" / "compare.png"
    result = cli("--workspace", ws, "eval", "compare", "--run", RUN, "--file", text, "--plot", plot, "--json")
    assert result.exit_code == 0, result.stderr
    document = result.json()

    assert document["evals"] == ["perplexity", "probes"] and document["source"] == {
        "file": str(text.resolve())
    }
    rows = document["checkpoints"]
    assert [row["model"] for row in rows] == [f"{RUN}:step-50", f"{RUN}:step-100", f"{RUN}:step-150"]
    assert [row["step"] for row in rows] == [50, 100, 150]
    assert rows[-1]["perplexity"]["bits_per_byte"] < rows[0]["perplexity"]["bits_per_byte"]
    assert all(0 <= row["probes"]["score"] <= 1 and row["probes"]["probe_set"] == "v1" for row in rows)
    assert document["plot"] == str(plot.resolve())
    assert plot.read_bytes().startswith(PNG_SIGNATURE) and plot.stat().st_size > 10_000

    registry = Workspace(ws).registry()
    for row, checkpoint in zip(rows, registry.checkpoints(RUN), strict=True):
        kinds = sorted(stored["kind"] for stored in registry.evals(checkpoint["id"]))
        assert kinds == ["perplexity", "probes"] and row["checkpoint_id"] == checkpoint["id"]
        assert row["perplexity"]["eval_id"] and row["probes"]["eval_id"]


def test_references_compare_in_a_table_and_a_figure(cli, ws, tmp_path):
    plot = tmp_path / "probes.png"
    result = cli(
        "--workspace",
        ws,
        "eval",
        "compare",
        f"{RUN}:step-50",
        untrained_checkpoint(ws),
        RUN,
        "--evals",
        "probes",
        "--plot",
        plot,
    )
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    header = next(line for line in lines if "checkpoint" in line)
    for column in ("step", "probes", "brackets", "words", "indent", "body", "parse"):
        assert column in header
    assert any(line.strip().startswith(f"{RUN}:step-50 ") for line in lines)
    assert any(line.strip().startswith(f"{RUN} ") for line in lines)
    assert "untrained" in result.stdout  # its directory, folded over lines in the first column
    assert "bpb" not in header and plot.read_bytes().startswith(PNG_SIGNATURE)
    assert f"{RUN}:step-50: probes" in result.stderr  # progress, one line per checkpoint


@pytest.mark.parametrize(
    "flags,message",
    [
        ((RUN, "--evals", "probes"), "compare needs two checkpoints or more"),
        ((RUN, f"{RUN}:step-50", "--run", RUN, "--evals", "probes"), "not both"),
        ((RUN, f"{RUN}:step-50", "--evals", "probes,speed"), "--evals takes perplexity and/or probes"),
        ((RUN, f"{RUN}:step-50"), "perplexity needs --corpus NAME or --file PATH"),
        ((RUN, "nope", "--evals", "probes"), "no run or checkpoint directory named 'nope'"),
        ((RUN, f"{RUN}:step-7", "--evals", "probes"), "has no checkpoint at step 7"),
        (("--run", "nope", "--evals", "probes"), "no run or checkpoint directory named 'nope'"),
        ((RUN, f"{RUN}:step-50", "--corpus", "nope"), "corpus 'nope' does not exist"),
    ],
)
def test_bad_input_is_a_one_line_error_before_any_model_loads(cli, ws, flags, message):
    before = len(Workspace(ws).registry().evals())
    result = cli("--workspace", ws, "eval", "compare", *flags)
    assert result.exit_code == 2 and result.stdout == ""
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert len(Workspace(ws).registry().evals()) == before
