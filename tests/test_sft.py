"""SFT examples, called directly: rendering in each prompt style, the label mask against the rendered
text, packing (no attention across examples, positions restarting), padding, the batch source's
exact resume, data files of every format, classification records, and their errors."""

from __future__ import annotations

import json

import pytest
import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from llmctl.config import ModelConfig
from llmctl.data import sft
from llmctl.errors import UsageError
from llmctl.model.transformer import Transformer
from llmctl.tokenizer import EOT_TOKEN, byte_to_unicode, load_tokenizer_file, render_chat
from llmctl.tokenizer_build import build_byte_tokenizer
from llmctl.workspace import Workspace

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris"},
    {"role": "user", "content": "And of Italy?"},
    {"role": "assistant", "content": "Rome"},
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    build_byte_tokenizer().save(str(path))
    return load_tokenizer_file(path, name="bytes")


@pytest.fixture(scope="module")
def plain_tokenizer(tmp_path_factory):
    """A byte-level tokenizer with an end-of-text token and none of the chat specials."""
    vocab = {EOT_TOKEN: 0, **{char: 1 + byte for byte, char in byte_to_unicode().items()}}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(EOT_TOKEN, special=True, normalized=False)])
    path = tmp_path_factory.mktemp("plain") / "tokenizer.json"
    tokenizer.save(str(path))
    return load_tokenizer_file(path, name="plain")


def runs(tokenizer, example: sft.Example) -> list[tuple[str, bool]]:
    """The example decoded as runs of trained / untrained tokens."""
    pieces, start = [], 0
    for end in range(1, len(example.ids) + 1):
        if end == len(example.ids) or example.trained[end] != example.trained[start]:
            pieces.append((tokenizer.decode(example.ids[start:end]), example.trained[start]))
            start = end
    return pieces


# ---------------------------------------------------------------- rendering and the label mask


def test_chat_example_trains_only_the_replies_with_their_end_tokens(tokenizer):
    example = sft.encode_example(CONVERSATION, tokenizer, "chat", max_tokens=500)
    assert tokenizer.decode(example.ids) == render_chat(CONVERSATION, add_generation_prompt=False) + EOT_TOKEN
    trained = [text for text, is_trained in runs(tokenizer, example) if is_trained]
    assert trained == ["Paris<|end|>\n", "Rome<|end|>\n" + EOT_TOKEN]
    untrained = "".join(text for text, is_trained in runs(tokenizer, example) if not is_trained)
    assert "Capital of France?" in untrained and "Paris" not in untrained and "Be brief." in untrained
    assert example.n_trained == len(tokenizer.encode("Paris<|end|>\nRome<|end|>\n")) + 1


@pytest.mark.parametrize(
    ("style", "header"), [("alpaca", "### Response:\n"), ("problem-solution", "### Solution:\n")]
)
def test_plain_styles_train_the_response_and_the_end_token(tokenizer, style, header):
    messages = [{"role": "user", "content": "Add 2 and 3."}, {"role": "assistant", "content": "5"}]
    example = sft.encode_example(messages, tokenizer, style, max_tokens=500)
    pieces = runs(tokenizer, example)
    assert pieces[-1] == ("5" + EOT_TOKEN, True) and [trained for _, trained in pieces] == [False, True]
    assert pieces[0][0].endswith(header) and "Add 2 and 3." in pieces[0][0]
    assert pieces[0][0].startswith(sft.ALPACA_PREAMBLE if style == "alpaca" else "### Problem:")


@pytest.mark.parametrize("style", sft.PROMPT_STYLES)
def test_the_inference_prompt_encodes_exactly_as_the_trained_prompt(tokenizer, style):
    example = sft.encode_example(CONVERSATION[:3], tokenizer, style, max_tokens=500)
    first_trained = example.trained.index(True)
    assert tokenizer.encode(sft.render_prompt(CONVERSATION[:2], style)) == example.ids[:first_trained]


def test_chat_style_needs_the_chat_tokens_and_says_to_use_alpaca(plain_tokenizer):
    with pytest.raises(UsageError, match=r"lacks the chat template's special tokens .*--prompt-style alpaca"):
        sft.check_prompt_style(plain_tokenizer, "chat")
    sft.check_prompt_style(plain_tokenizer, "alpaca")
    example = sft.encode_example(CONVERSATION[1:3], plain_tokenizer, "alpaca", max_tokens=500)
    assert example.ids[-1] == plain_tokenizer.eot_id and example.trained[-1]


def test_long_examples_are_cut_to_the_context_and_dropped_when_no_response_is_left(tokenizer):
    records = [
        {"prompt": "short", "response": "yes"},
        {"prompt": "x" * 200, "response": "no"},
        {"prompt": "q", "response": "y" * 200},
    ]
    split = sft.encode_split(records, tokenizer, "chat", context_length=32, what="data")
    assert len(split.examples) == 2 and split.dropped == 1 and split.truncated == 1
    assert all(len(example.ids) <= 33 for example in split.examples)


# ---------------------------------------------------------------- rows, packing and padding


def _examples(tokenizer, answers: list[str]) -> list[sft.Example]:
    return [
        sft.encode_example(
            [{"role": "user", "content": f"Q{i}"}, {"role": "assistant", "content": answer}],
            tokenizer,
            "chat",
            max_tokens=64,
        )
        for i, answer in enumerate(answers)
    ]


def test_packed_rows_shift_labels_within_each_example(tokenizer):
    first, second = _examples(tokenizer, ["alpha", "beta"])
    (row,) = sft.pack_rows([first, second], [0, 1], context_length=64)
    batch = sft.collate([row], 64, tokenizer.pad_id, packed=True, device=torch.device("cpu"))
    n1, n2 = len(first.ids) - 1, len(second.ids) - 1
    labels, doc_ids = batch["labels"][0], batch["doc_ids"][0]
    assert doc_ids[:n1].eq(0).all() and doc_ids[n1 : n1 + n2].eq(1).all() and doc_ids[n1 + n2 :].eq(-1).all()
    assert labels[n1 - 1] == tokenizer.eot_id  # the first example ends predicting its end token...
    assert batch["input_ids"][0, n1] == second.ids[0]  # ...and never its neighbour's first token
    assert (
        labels[n1 + n2 :].eq(sft.IGNORE_INDEX).all()
        and batch["input_ids"][0, n1 + n2 :].eq(tokenizer.pad_id).all()
    )
    trained = [int(t) for t in labels[:n1] if t != sft.IGNORE_INDEX]
    assert tokenizer.decode(trained) == "alpha<|end|>\n" + EOT_TOKEN


def test_packed_examples_do_not_attend_to_each_other(tokenizer):
    torch.manual_seed(0)
    model = Transformer(
        ModelConfig(n_layer=2, n_head=2, d_model=32, context_length=64, vocab_size=tokenizer.vocab_size)
    ).eval()
    device = torch.device("cpu")
    first, other_first, second = _examples(tokenizer, ["alpha", "a different answer", "beta"])

    def logits_of_second(leading: sft.Example | None) -> torch.Tensor:
        examples = [leading, second] if leading else [second]
        (row,) = sft.pack_rows(examples, range(len(examples)), context_length=64)
        batch = sft.collate([row], 64, tokenizer.pad_id, packed=True, device=device)
        start = len(leading.ids) - 1 if leading else 0
        logits = model(batch["input_ids"], doc_ids=batch["doc_ids"])
        return logits[0, start : start + len(second.ids) - 1]

    with torch.no_grad():
        after_first, after_other, alone = (
            logits_of_second(first),
            logits_of_second(other_first),
            logits_of_second(None),
        )
    assert torch.allclose(after_first, after_other, atol=1e-6)
    assert torch.allclose(after_first, alone, atol=1e-5)  # positions restart: as if it had the row to itself


def test_without_packing_each_example_is_padded_to_a_row_of_its_own(tokenizer):
    examples = _examples(tokenizer, ["alpha", "beta", "gamma"])
    rows = sft.single_rows(examples, [2, 0, 1])
    batch = sft.collate(rows, 64, tokenizer.pad_id, packed=False, device=torch.device("cpu"))
    assert "doc_ids" not in batch and batch["input_ids"].shape == (3, 64)
    assert batch["input_ids"][0, 0] == examples[2].ids[0]
    for row, example in zip(batch["labels"], [examples[2], examples[0], examples[1]], strict=True):
        assert row[len(example.ids) - 1 :].eq(sft.IGNORE_INDEX).all()


def test_the_batch_source_resumes_exactly_across_epochs(tokenizer):
    examples = _examples(tokenizer, [f"answer {i}" for i in range(7)])

    def source() -> sft.ShuffledBatches:
        return sft.ShuffledBatches(
            len(examples),
            lambda order: sft.pack_rows(examples, order, 64),
            lambda rows: sft.collate(rows, 64, tokenizer.pad_id, True, torch.device("cpu")),
            [],
            micro_batch_size=2,
            eval_batches=1,
            seed=3,
        )

    original = source()
    for _ in range(4):
        original.next_batch()
    state = original.state_dict()
    expected = [original.next_batch()["input_ids"] for _ in range(5)]
    resumed = source()
    resumed.load_state_dict(json.loads(json.dumps(state)))  # the state survives serialisation
    assert all(torch.equal(resumed.next_batch()["input_ids"], batch) for batch in expected)


# ---------------------------------------------------------------- data files


@pytest.mark.parametrize(
    "record",
    [
        {"instruction": "Say hi", "input": "", "output": "hi"},
        {"instruction": "Say hi", "context": "", "response": "hi"},
        {"messages": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}]},
        {"prompt": "Say hi", "response": "hi"},
    ],
)
def test_data_files_of_any_instruction_format_are_detected(tmp_path, record):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(record) + "\n")
    data = sft.open_data(Workspace(tmp_path / "ws"), str(path))
    messages = sft.messages_of(data.train[0], "record")
    assert messages[-2:] == [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}]
    assert data.val == data.train and "too few" in data.val_note


def test_a_large_file_holds_out_a_validation_slice(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([{"prompt": f"q{i}", "response": f"a{i}"} for i in range(100)]))
    data = sft.open_data(Workspace(tmp_path / "ws"), str(path))
    assert len(data.val) == 5 and len(data.train) == 95
    assert not {r["prompt"] for r in data.val} & {r["prompt"] for r in data.train}


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"question": "x", "answer": "y"}\n', r"no instruction fields \(fields found: question, answer\)"),
        ('{"prompt": "x"\n', "is not valid JSON at line 1"),
        ("", "holds no records"),
    ],
)
def test_bad_data_files_are_one_line_errors(tmp_path, content, message):
    path = tmp_path / "data.jsonl"
    path.write_text(content)
    with pytest.raises(UsageError, match=message):
        sft.open_data(Workspace(tmp_path / "ws"), str(path))


# ---------------------------------------------------------------- classification records


def test_classification_labels_come_from_the_data(tokenizer):
    records = [
        {"text": "win money now", "label": "spam"},
        {"input": "lunch at noon?", "label": "ham"},
        {"text": "free prize", "label": "spam"},
        {"text": "odd one", "label": "unknown"},
    ]
    labels = sft.label_set(records[:3], "data")
    assert labels == ["ham", "spam"]
    examples, skipped = sft.encode_classification(records, tokenizer, labels, context_length=8)
    assert skipped == 1 and [e.label for e in examples] == [1, 0, 1]
    assert all(len(e.ids) <= 8 and e.ids[-1] == tokenizer.eot_id for e in examples)
    batch = sft.collate_classification(examples, 8, tokenizer.pad_id, torch.device("cpu"))
    assert batch["class_positions"].tolist() == [len(e.ids) - 1 for e in examples]
    with pytest.raises(UsageError, match="needs a 'label' field and a text field"):
        sft.label_set([{"prompt": "x", "response": "y"}], "data")
    with pytest.raises(UsageError, match="1 distinct label"):
        sft.label_set([{"text": "a", "label": "x"}, {"text": "b", "label": "x"}], "data")
