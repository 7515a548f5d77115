"""A synthetic preference set learnt end to end: a tiny model instruction-tuned on replies in two
styles (polite and curt, half each), then preference-tuned on pairs that prefer the polite one.
On pairs about topics it never saw, its preference accuracy goes from 0.5 (the SFT model is its
own reference) to at least 0.9, and its chat replies to new prompts take the preferred style."""

from __future__ import annotations

import pytest
from finetune_helpers import QUICK, greedy_answer, write_jsonl
from preference_helpers import DISPREFERRED, PREFERRED, TOPICS, style_pairs

from llmctl.checkpoint.load import load_model
from llmctl.workspace import Workspace

pytest_plugins = ["finetune_fixtures"]

HELD_OUT = ["lions", "coins", "hills", "drums", "pears", "boats", "ropes", "caves", "roses", "nets"]


def _polite_share(ws: Workspace, run: str) -> float:
    loaded = load_model(ws, run)
    replies = [
        greedy_answer(loaded.model, loaded.tokenizer, f"Tell me about {topic}.", max_new_tokens=10)
        for topic in HELD_OUT
    ]
    return sum(reply.startswith(PREFERRED.strip()) for reply in replies) / len(replies)


@pytest.mark.slow
def test_held_out_preference_accuracy_and_the_chat_style_follow_the_pairs(ft, base_workspace, tmp_path):
    pairs = style_pairs(TOPICS)
    # SFT on both styles alike: the model learns the format, and either opening
    sft_records = [
        {"instruction": pair["prompt"], "output": reply}
        for pair in pairs
        for reply in (pair["chosen"], pair["rejected"])
    ]
    sft_file = write_jsonl(tmp_path / "sft.jsonl", sft_records)
    sft = ft(
        "finetune", "--model", "base", "--data", sft_file, "--run", "style-sft",
        *QUICK, "--set", "train.lr=3e-3", "--max-steps", "150",
    )  # fmt: skip
    assert sft.exit_code == 0, sft.stderr
    held_out = write_jsonl(tmp_path / "held-out.jsonl", style_pairs(HELD_OUT, seed=1))
    ws = Workspace(base_workspace)
    before = ft(
        "eval",
        "preference",
        "--model",
        "style-sft",
        "--reference",
        "style-sft",
        "--data",
        held_out,
        "--split",
        "all",
        "--json",
    )
    assert before.json()["accuracy"] == 0.5
    polite_before = _polite_share(ws, "style-sft")

    # a gentle push: pushed much harder, DPO lowers the chosen replies' likelihood too, and the
    # model learns to say nothing at all (both rewards fall; the rejected one only faster)
    pairs_file = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    dpo = ft(
        "dpo", "--model", "style-sft", "--data", pairs_file, "--run", "style-dpo",
        *QUICK, "--set", "train.lr=1e-4", "--beta", "0.1", "--max-steps", "20",
    )  # fmt: skip
    assert dpo.exit_code == 0, dpo.stderr
    after = ft(
        "eval", "preference", "--model", "style-dpo", "--data", held_out, "--split", "all", "--json"
    ).json()
    assert after["reference"] == str(load_model(ws, "style-sft").path)
    assert after["accuracy"] >= 0.9 and after["reward_margin"] > 0
    polite_after = _polite_share(ws, "style-dpo")
    assert polite_after >= 0.8 and polite_after > polite_before, (polite_before, polite_after)
    curt = load_model(ws, "style-dpo")
    reply = greedy_answer(curt.model, curt.tokenizer, "Tell me about lions.", max_new_tokens=10)
    assert not reply.startswith(DISPREFERRED.strip()), reply
