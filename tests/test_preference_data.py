"""Preference pairs: every shape people have normalised to one schema, `corpus build --format
preference` (and auto-detection) with dropped pairs counted, the fields a wrong file lacks, and
rendering: each side exactly as finetune renders an example, both cut alike."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llmctl.data import IGNORE_INDEX, preference, sft
from llmctl.data.sources import Skip
from llmctl.workspace import Workspace

PLAIN = {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "I won't.", "system": "Be kind."}
TRL_CONVERSATIONAL = {
    "prompt": [{"role": "user", "content": "Name a colour."}],
    "chosen": [{"role": "assistant", "content": "Blue."}],
    "rejected": [{"role": "assistant", "content": "I won't."}],
}
ULTRAFEEDBACK = {
    "prompt": "Name a colour.",
    "prompt_id": "abc",
    "chosen": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}],
    "rejected": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "I won't."}],
    "score_chosen": 8.0,
    "score_rejected": 2.0,
}
HH_RLHF = {
    "chosen": "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Name a colour.\n\nAssistant: Blue.",
    "rejected": "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Name a colour.\n\nAssistant: I won't.",
}
PROMPT = [{"role": "user", "content": "Name a colour."}]


@pytest.mark.parametrize(
    ("record", "prompt"),
    [
        (PLAIN, [{"role": "system", "content": "Be kind."}, *PROMPT]),
        (TRL_CONVERSATIONAL, PROMPT),
        (ULTRAFEEDBACK, PROMPT),
        (
            HH_RLHF,
            [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}, *PROMPT],
        ),
    ],
    ids=["plain", "trl-conversational", "ultrafeedback", "hh-rlhf"],
)
def test_every_shape_normalises_to_the_shared_prompt_and_two_replies(record, prompt):
    pair = preference.normalize(record)
    assert pair["messages"] == prompt
    assert (pair["chosen"], pair["rejected"]) == ("Blue.", "I won't.")
    assert pair["format"] == "preference" and "Chosen:\nBlue." in pair["text"]


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        ({"prompt": "q", "chosen": "same", "rejected": "same"}, "identical"),
        ({"prompt": "q", "chosen": "", "rejected": "no"}, "empty"),
        ({"prompt": "", "chosen": "yes", "rejected": "no"}, "empty"),
        ({"prompt": "q", "chosen": 3, "rejected": "no"}, "malformed"),
        # the sides differ before their last reply: no shared prompt
        (
            {
                "chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "x"}],
                "rejected": [{"role": "user", "content": "b"}, {"role": "assistant", "content": "y"}],
            },
            "malformed",
        ),
    ],
)
def test_pairs_that_teach_nothing_are_skipped_with_a_reason(record, reason):
    assert preference.normalize(record) == Skip(reason)


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def test_corpus_build_counts_dropped_pairs_and_is_a_preference_corpus(cli, workspace_dir, tmp_path):
    rows = [PLAIN, ULTRAFEEDBACK, HH_RLHF] + [
        {"prompt": f"Question {i}?", "chosen": f"Answer {i}.", "rejected": "No."} for i in range(8)
    ]
    rows += [
        rows[3],  # a duplicate
        {"prompt": "q", "chosen": "same", "rejected": "same"},
        {"prompt": "q", "chosen": "", "rejected": "x"},
    ]
    result = cli(
        "corpus", "build", "prefs", "--source", _write(tmp_path / "prefs.jsonl", rows), "--format", "auto"
    )
    assert result.exit_code == 0, result.stderr
    assert "detected format 'preference'" in result.stderr
    shown = cli("corpus", "show", "prefs", "--json").json()
    assert shown["kind"] == "preference"
    (source,) = shown["sources"]
    assert source["dropped"] == {"duplicate": 1, "empty": 1, "identical": 1}
    assert source["documents"] == 11
    pairs = preference.open_pairs(Workspace(workspace_dir), "prefs")
    assert pairs.corpus == "prefs" and len(pairs.train) + len(pairs.val) == 11
    assert all(set(pair) >= {"messages", "chosen", "rejected"} for pair in pairs.train)


def test_wrong_fields_name_those_found_and_those_needed(cli, workspace_dir, tmp_path):
    bad = _write(tmp_path / "bad.jsonl", [{"question": "q", "good": "a", "bad": "b"}])
    built = cli("corpus", "build", "bad", "--source", bad, "--format", "preference")
    assert built.exit_code == 2 and built.stderr.count("\n") == 1
    assert "fields found: question, good, bad" in built.stderr and "'chosen' and 'rejected'" in built.stderr
    assert not (workspace_dir / "corpora" / "bad").exists()
    with pytest.raises(Exception, match="fields found: question, good, bad.*'chosen' and 'rejected'"):
        preference.open_pairs(Workspace(workspace_dir), str(bad))


def test_finetune_and_dpo_refuse_each_others_data(cli, workspace_dir, tmp_path):
    rows = [{"prompt": f"Q{i}?", "chosen": f"A{i}.", "rejected": "No."} for i in range(4)]
    assert (
        cli(
            "corpus", "build", "prefs", "--source", _write(tmp_path / "p.jsonl", rows), "-f", "preference"
        ).exit_code
        == 0
    )
    with pytest.raises(Exception, match="corpus 'prefs' holds preference data; finetuning needs instruction"):
        sft.open_data(Workspace(workspace_dir), "prefs")
    with pytest.raises(Exception, match="holds preference pairs.*llmctl dpo"):
        sft.open_data(Workspace(workspace_dir), str(tmp_path / "p.jsonl"))
    alpaca = _write(tmp_path / "a.jsonl", [{"instruction": "Say hi.", "output": "Hi."}] * 2)
    assert cli("corpus", "build", "sft", "--source", alpaca, "-f", "alpaca").exit_code == 0
    with pytest.raises(Exception, match="corpus 'sft' holds instruct data; dpo needs preference pairs"):
        preference.open_pairs(Workspace(workspace_dir), "sft")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from tiny_checkpoints import byte_tokenizer_file

    from llmctl.tokenizer import load_tokenizer_file

    return load_tokenizer_file(byte_tokenizer_file(tmp_path_factory.mktemp("tok")))


@pytest.mark.parametrize("style", ["chat", "alpaca"])
def test_each_side_renders_exactly_as_finetune_renders_the_example(tokenizer, style):
    pair_record = preference.normalize(PLAIN)
    (pair,) = preference.encode_pairs([pair_record], tokenizer, style, 256, "pairs").pairs
    for side, reply in ((pair.chosen, "Blue."), (pair.rejected, "I won't.")):
        example = sft.encode_example(
            [*pair_record["messages"], {"role": "assistant", "content": reply}], tokenizer, style, 257
        )
        assert (side.ids, side.trained) == (example.ids, example.trained)
        assert tokenizer.decode(
            [t for t, trained in zip(side.ids, side.trained, strict=True) if trained]
        ).startswith(reply)
    # the prompt is shared token for token; only the replies differ
    first_trained = pair.chosen.trained.index(True)
    assert pair.chosen.ids[:first_trained] == pair.rejected.ids[:first_trained]
    assert not any(pair.chosen.trained[:first_trained])


def test_long_pairs_are_cut_alike_and_counted_and_hopeless_ones_dropped(tokenizer):
    long_reply = {"prompt": "Name a colour.", "chosen": "Blue " * 40, "rejected": "Red " * 10}
    hopeless = {"prompt": "word " * 80, "chosen": "Blue.", "rejected": "Red."}
    encoded = preference.encode_pairs(
        [preference.normalize(long_reply), preference.normalize(hopeless)], tokenizer, "chat", 64, "pairs"
    )
    assert (encoded.truncated, encoded.dropped) == (1, 1)
    (pair,) = encoded.pairs
    assert len(pair.chosen.ids) == 65 and pair.chosen.truncated and not pair.rejected.truncated
    prompt_length = pair.chosen.trained.index(True)
    assert pair.chosen.ids[:prompt_length] == pair.rejected.ids[:prompt_length]


def test_collate_puts_chosen_rows_first_and_labels_only_replies(tokenizer):
    records = [preference.normalize(PLAIN), preference.normalize({**PLAIN, "chosen": "Green, surely."})]
    pairs = preference.encode_pairs(records, tokenizer, "chat", 64, "pairs").pairs
    reference = {"chosen": torch.tensor([-1.0, -2.0]), "rejected": torch.tensor([-3.0, -4.0])}
    batch = preference.collate_pairs(pairs[::-1], 64, tokenizer.pad_id, torch.device("cpu"), reference)
    assert batch["input_ids"].shape == (4, 64)
    rows = [pairs[1].chosen, pairs[0].chosen, pairs[1].rejected, pairs[0].rejected]
    for row, example in zip(batch["input_ids"], rows, strict=True):
        assert row[: len(example.ids) - 1].tolist() == example.ids[:-1]
    labelled = (batch["labels"] != IGNORE_INDEX).sum(dim=1).tolist()
    assert labelled == [example.n_trained for example in rows]
    assert batch["ref_chosen"].tolist() == [-2.0, -1.0] and batch["ref_rejected"].tolist() == [-4.0, -3.0]
