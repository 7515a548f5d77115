"""Instruction corpora: every --format on a small file written here, normalised to one schema."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmctl.data.instruct import as_messages
from llmctl.workspace import Workspace

ALPACA = [
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
    {"instruction": "Name a primary colour.", "input": "", "output": "Red."},
    {"instruction": "Say hello.", "input": "", "output": ""},  # no response: dropped
    {"instruction": "Name a primary colour.", "input": "", "output": "Red."},  # duplicate
]
DOLLY = [
    {"instruction": "Who wrote Hamlet?", "context": "", "response": "Shakespeare.", "category": "open_qa"},
    {
        "instruction": "Summarise.",
        "context": "Cats sleep a lot.",
        "response": "Cats nap.",
        "category": "summ",
    },
]
CHAT = [
    {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Bye"},
            {"role": "assistant", "content": "Goodbye."},
        ]
    },
    {"conversations": [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}]},
    {"messages": [{"role": "user", "content": "no answer"}]},  # incomplete
    {"messages": [{"role": "narrator", "content": "?"}, {"role": "assistant", "content": "x"}]},  # bad role
]
CODE_CONTESTS = [
    {
        "name": "1A. Theatre Square",
        "description": "Cover an n by m square with a by a flagstones.",
        # the hub's layout: parallel lists, languages numbered (1 Python 2, 2 C++, 3 Python 3, 4 Java)
        "solutions": {
            "language": [2, 3, 3, 4, 1, 3, 3],
            "solution": [
                "int main(){}",
                "print(1)\n",
                "print(2)\n",
                "class A{}",
                "print 3\n",
                "print(1)\n",
                "print(5)\n",
            ],
        },
    },
    {
        "name": "2B. Only C++",
        "description": "A problem solved only in C++.",
        "solutions": [{"language": "CPP", "solution": "int main(){return 0;}"}],
    },
    {
        "name": "3C. Named languages",
        "description": "Print the answer.",
        "solutions": [
            {"language": "Python 3", "solution": "print(42)"},
            {"language": "JAVA", "solution": "x"},
        ],
    },
]
SMS = (
    "ham\tGo until jurong point, crazy.. Available only in bugis\nspam\tWINNER!! Claim your prize now\n"
    "ham\tOk lar... Joking wif u oni...\nnot a labelled line\n"
)


def records(workspace_dir: Path, name: str) -> list[dict]:
    found = []
    for split in ("train", "val"):
        path = workspace_dir / "corpora" / name / f"{split}.jsonl"
        found += [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    return found


def write(path: Path, rows, jsonl: bool = False) -> Path:
    text = "".join(json.dumps(row) + "\n" for row in rows) if jsonl else json.dumps(rows)
    path.write_text(text, encoding="utf-8")
    return path


def build(cli, name, *args):
    result = cli("corpus", "build", name, *args)
    assert result.exit_code == 0, result.stderr
    return cli("corpus", "show", name, "--json").json()


def test_alpaca_json(cli, workspace_dir, tmp_path):
    shown = build(
        cli, "sft", "--source", write(tmp_path / "instruction-data.json", ALPACA), "--format", "alpaca"
    )
    assert shown["kind"] == "instruct"
    assert Workspace(workspace_dir).registry().corpus("sft")["kind"] == "instruct"
    assert shown["sources"][0]["dropped"] == {"duplicate": 1, "incomplete": 1}
    by_prompt = {r["prompt"]: r for r in records(workspace_dir, "sft")}
    assert set(by_prompt) == {"Add the numbers.\n\n2 and 3", "Name a primary colour."}
    record = by_prompt["Add the numbers.\n\n2 and 3"]
    assert record["response"] == "5" and record["system"] == "" and record["format"] == "alpaca"
    assert record["text"] == "User:\nAdd the numbers.\n\n2 and 3\n\nAssistant:\n5"


def test_dolly_jsonl(cli, workspace_dir, tmp_path):
    build(cli, "dolly", "--source", write(tmp_path / "dolly.jsonl", DOLLY, jsonl=True), "--format", "dolly")
    prompts = sorted(r["prompt"] for r in records(workspace_dir, "dolly"))
    assert prompts == ["Summarise.\n\nCats sleep a lot.", "Who wrote Hamlet?"]


def test_chat_jsonl_keeps_the_messages(cli, workspace_dir, tmp_path):
    shown = build(
        cli, "chat", "--source", write(tmp_path / "chat.jsonl", CHAT, jsonl=True), "--format", "chat"
    )
    assert shown["sources"][0]["dropped"] == {"incomplete": 1, "malformed": 1}
    chats = sorted(records(workspace_dir, "chat"), key=lambda r: len(r["messages"]))
    assert chats[0]["messages"] == [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
    ]
    assert [m["role"] for m in chats[1]["messages"]] == ["system", "user", "assistant", "user", "assistant"]
    assert chats[1]["text"].startswith("System:\nBe brief.\n\nUser:\nHi\n\nAssistant:\nHello!")


def test_code_contests_keeps_python_solutions_up_to_the_cap(cli, workspace_dir, tmp_path):
    source = write(tmp_path / "code_contests.json", CODE_CONTESTS)
    shown = build(cli, "contests", "--source", source, "--format", "code-contests", "--max-solutions", "2")
    dropped = shown["sources"][0]["dropped"]
    assert dropped == {"not_python": 4, "duplicate": 1, "over_max_solutions": 2}
    by_response = {r["response"]: r for r in records(workspace_dir, "contests")}
    assert set(by_response) == {"print(1)", "print(2)", "print(42)"}
    assert by_response["print(1)"]["prompt"].startswith("1A. Theatre Square\n\nCover an n by m square")
    assert as_messages(by_response["print(42)"])[0]["role"] == "system"


def test_sms_spam_tsv_becomes_classification_records(cli, workspace_dir, tmp_path):
    (tmp_path / "SMSSpamCollection").write_text(SMS, encoding="utf-8")
    shown = build(cli, "spam", "--source", tmp_path / "SMSSpamCollection", "--format", "sms-spam")
    assert shown["sources"][0]["dropped"] == {"malformed": 1}
    found = {r["input"]: r for r in records(workspace_dir, "spam")}
    assert found["WINNER!! Claim your prize now"]["label"] == "spam"
    assert found["WINNER!! Claim your prize now"]["response"] == "spam"
    assert found["Ok lar... Joking wif u oni..."]["label"] == "ham"
    assert "Ok lar..." in found["Ok lar... Joking wif u oni..."]["prompt"]


def test_sms_spam_records_with_class_indices(cli, workspace_dir, tmp_path):
    rows = [{"sms": "Free entry in a weekly comp!", "label": 1}, {"sms": "See you at lunch", "label": 0}]
    build(cli, "spam", "--source", write(tmp_path / "sms.jsonl", rows, jsonl=True), "--format", "auto")
    assert {r["input"]: r["label"] for r in records(workspace_dir, "spam")} == {
        "Free entry in a weekly comp!": "spam", "See you at lunch": "ham"
    }  # fmt: skip


def test_auto_detects_each_source_and_says_which(cli, workspace_dir, tmp_path):
    (tmp_path / "SMSSpamCollection").write_text(SMS, encoding="utf-8")
    sources = [
        write(tmp_path / "alpaca.json", ALPACA),
        write(tmp_path / "dolly.jsonl", DOLLY, jsonl=True),
        write(tmp_path / "chat.jsonl", CHAT, jsonl=True),
        write(tmp_path / "cc.json", CODE_CONTESTS),
        tmp_path / "SMSSpamCollection",
    ]
    result = cli("corpus", "build", "mixed", "--format", "auto", *[f"--source={s}" for s in sources])
    assert result.exit_code == 0, result.stderr
    formats = [s["format"] for s in cli("corpus", "show", "mixed", "--json").json()["sources"]]
    assert formats == ["alpaca", "dolly", "chat", "code-contests", "sms-spam"]
    assert "detected format 'alpaca'" in result.stderr and "detected format 'sms-spam'" in result.stderr


def test_auto_detection_failure_names_the_fields(cli, workspace_dir, tmp_path):
    source = write(tmp_path / "odd.json", [{"question": "q", "answer": "a"}])
    result = cli("corpus", "build", "odd", "--source", source, "--format", "auto")
    assert result.exit_code == 2
    assert "could not detect" in result.stderr and "question, answer" in result.stderr
    assert not (workspace_dir / "corpora" / "odd").exists()


@pytest.mark.parametrize(
    ("fmt", "hint"), [("dolly", "it looks like --format alpaca"), ("chat", "'messages'")]
)
def test_wrong_format_names_the_fields_found(cli, workspace_dir, tmp_path, fmt, hint):
    source = write(tmp_path / "instruction-data.json", ALPACA)
    result = cli("corpus", "build", "sft", "--source", source, "--format", fmt)
    assert result.exit_code == 2
    assert "fields found: instruction, input, output" in result.stderr and hint in result.stderr
    assert result.stderr.count("\n") == 1
    assert Workspace(workspace_dir).registry(create=False).corpus("sft") is None


def test_text_corpus_from_instruction_json_suggests_the_format(cli, workspace_dir, tmp_path):
    result = cli("corpus", "build", "sft", "--source", write(tmp_path / "data.json", ALPACA))
    assert result.exit_code == 2 and "--format alpaca" in result.stderr


def test_instruction_format_on_a_plain_text_file(cli, workspace_dir, tmp_path):
    (tmp_path / "notes.txt").write_text("just prose\n")
    result = cli("corpus", "build", "x", "--source", tmp_path / "notes.txt", "--format", "alpaca")
    assert result.exit_code == 2 and "drop --format" in result.stderr
