"""The adapter defaults learn what full finetuning learns: on a tiny chat model, `finetune --lora`
(and `qlora`) with no LoRA flag and no learning rate answers an instruction task it has never seen.
A regression in the default targets, rank, scale or learning rate fails here."""

from __future__ import annotations

from pathlib import Path

import pytest
from cli_helpers import run_cli
from finetune_helpers import QUICK, TASK, greedy_answer, task_records, write_jsonl
from pretrain_helpers import events_of, one_thread
from tiny_checkpoints import write_run_checkpoint

from llmctl.checkpoint.load import load_model
from llmctl.workspace import Workspace

# Enough for the defaults on this base: at 100 steps LoRA answered 6 of 8, full finetuning none
STEPS = "200"


@pytest.fixture(scope="module")
def chat_base(tmp_path_factory) -> tuple[Path, Path, Path]:
    """A workspace, a base that already ends its replies with <|end|>, and TASK's pairs."""
    root = tmp_path_factory.mktemp("lora-defaults")
    base = write_run_checkpoint(root, "chat-base")
    return root, base, write_jsonl(root / "task.jsonl", task_records())


def answered(chat_base, capsys, monkeypatch, command: str, run: str, *args: str) -> set[str]:
    """The questions a run at the command's defaults (QUICK sets batches and logging) answers exactly."""
    root, base, data = chat_base
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    with one_thread():
        result = run_cli(
            capsys,
            ["--workspace", root, command, "--model", base, "--data", data, "--run", run, *args, *QUICK]
            + ["--max-steps", STEPS],
        )
        assert result.exit_code == 0, result.stderr
        loaded = load_model(Workspace(root), run)
        return {q for q, a in TASK if greedy_answer(loaded.model, loaded.tokenizer, q) == a}


def test_default_lora_learns_the_task(chat_base, capsys, monkeypatch):
    right = answered(chat_base, capsys, monkeypatch, "finetune", "lora", "--lora")
    start = events_of(chat_base[0], "lora")[0]
    base = load_model(Workspace(chat_base[0]), str(chat_base[1])).model
    d, ff = base.cfg.d_model, base.layers[0].mlp.up_proj.out_features
    # rank 16 on every block's q, k, v, o (d -> d) and gate, up, down (d <-> ff), and nothing else
    assert start["trainable_params"] == base.cfg.n_layer * 16 * (4 * (d + d) + 3 * (d + ff))
    assert len(right) >= 0.75 * len(TASK), right


@pytest.mark.slow
def test_default_lora_and_qlora_learn_the_pairs_full_finetuning_learns(chat_base, capsys, monkeypatch):
    full = answered(chat_base, capsys, monkeypatch, "finetune", "same-full")
    lora = answered(chat_base, capsys, monkeypatch, "finetune", "same-lora", "--lora")
    qlora = answered(chat_base, capsys, monkeypatch, "qlora", "same-qlora")
    assert len(full) >= len(TASK) / 2, full
    assert len(full & lora) >= 0.75 * len(full) and len(full & qlora) >= 0.75 * len(full), (full, lora, qlora)
