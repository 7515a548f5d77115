"""`llmctl sample` through the real CLI, on checkpoints written by the trainer's checkpoint writer."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from tiny_checkpoints import ADD_REPLY, GREETING, write_run_checkpoint

from llmctl.tokenizer import LoadedTokenizer, load_tokenizer_file

CHAT_PROMPT = "<|user|>\nhi<|end|>\n<|assistant|>\n"


# tiny models decode fastest on one thread, and steadily on a busy machine (conftest.single_thread)
pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture
def run(workspace_dir: Path) -> str:
    write_run_checkpoint(workspace_dir, "tiny", step=100)
    return "tiny"


@pytest.fixture
def tokenizer(run, workspace_dir: Path) -> LoadedTokenizer:
    return load_tokenizer_file(workspace_dir / "runs" / run / "checkpoints" / "step-00000100")


def test_greedy_sample_streams_the_prompt_and_its_continuation(cli, run):
    result = cli("sample", "--model", run, "--prompt", CHAT_PROMPT, "--stop", "<|end|>")
    assert result.exit_code == 0, result.stderr
    assert result.stdout == CHAT_PROMPT + GREETING + "\n"
    assert "tokens/s" in result.stderr


def test_json_reports_prompt_completions_counts_and_speed(cli, run, tokenizer, workspace_dir):
    prompt = "<|user|>\nwrite a function that adds two numbers<|end|>\n<|assistant|>\n"
    result = cli("sample", "-m", f"{run}:step-100", "-p", prompt, "--stop", "<|end|>", "--json")
    assert result.exit_code == 0, result.stderr
    document = result.json()
    assert document["prompt"] == prompt
    assert document["prompt_tokens"] == len(tokenizer.encode(prompt))
    assert document["dropped_prompt_tokens"] == 0
    (completion,) = document["completions"]
    assert completion["text"] == ADD_REPLY
    assert completion["finish_reason"] == "stop" and completion["stop"] == "<|end|>"
    # one token per byte, then the <|end|> token: a stop string, not a stop token, so it is counted
    assert completion["tokens"] == len(ADD_REPLY.encode()) + 1
    assert document["generated_tokens"] == completion["tokens"]
    assert document["tokens_per_second"] > 0
    assert Path(document["checkpoint"]) == workspace_dir / "runs" / run / "checkpoints" / "step-00000100"


def test_defaults_come_from_the_checkpoint_and_flags_override_them(cli, run):
    document = cli("sample", "-m", run, "-p", "def", "--json").json()
    assert document["generation"]["max_new_tokens"] == 60  # the checkpoint's generation config
    assert document["generation"]["temperature"] == 0.0
    document = cli("sample", "-m", run, "-p", "def", "--max-new-tokens", "7", "--top-k", "3", "--json").json()
    assert document["generation"]["max_new_tokens"] == 7 and document["generation"]["top_k"] == 3
    assert document["completions"][0]["tokens"] == 7
    assert document["completions"][0]["finish_reason"] == "length"


def test_stop_strings_cut_exactly_and_accept_escapes(cli, run):
    cut = cli("sample", "-m", run, "-p", CHAT_PROMPT, "--stop", "code", "--json").json()["completions"][0]
    assert cut["text"] == GREETING[: GREETING.index("code")]
    assert cut["stop"] == "code"
    prompt = "<|user|>\nwrite a function that adds two numbers<|end|>\n<|assistant|>\n"
    cut = cli("sample", "-m", run, "-p", prompt, "--stop", "\\n", "--json").json()["completions"][0]
    assert cut["text"] == "Here you go:"


def test_samples_are_reproducible_with_a_seed_and_stream_in_order(cli, run):
    flags = (
        "-m",
        run,
        "-p",
        "<|user|>\n",
        "--temperature",
        "1.0",
        "--num-samples",
        "3",
        "--max-new-tokens",
        "20",
        "--seed",
        "11",
    )
    first = cli("sample", *flags, "--json").json()["completions"]
    again = cli("sample", *flags, "--json").json()["completions"]
    assert first == again
    assert len({c["text"] for c in first}) > 1
    other = cli("sample", *flags[:-1], "12", "--json").json()["completions"]
    assert other != first
    streamed = cli("sample", *flags)
    assert streamed.exit_code == 0
    assert streamed.stdout == "".join(f"<|user|>\n{c['text']}\n" for c in first)
    assert streamed.stderr.count("sample ") >= 3


def test_prompt_file_and_stdin(cli, run, tmp_path, monkeypatch):
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text(CHAT_PROMPT, encoding="utf-8")
    from_file = cli("sample", "-m", run, "-f", prompt_file, "--stop", "<|end|>", "--json").json()
    assert from_file["completions"][0]["text"] == GREETING
    import io
    import sys

    monkeypatch.setattr(sys, "stdin", io.StringIO(CHAT_PROMPT))
    from_stdin = cli("sample", "-m", run, "-f", "-", "--stop", "<|end|>", "--json").json()
    assert from_stdin["completions"][0]["text"] == GREETING


def test_a_prompt_longer_than_the_context_window_keeps_its_end_with_a_warning(cli, run, tokenizer):
    long_prompt = "x" * 600 + CHAT_PROMPT
    result = cli("sample", "-m", run, "-p", long_prompt, "--max-new-tokens", "30", "--json")
    assert result.exit_code == 0
    assert "context window" in result.stderr and "dropped" in result.stderr
    document = result.json()
    # context 256 keeps 256 - min(30, 128) tokens: the end of the prompt, chat turn included
    assert document["prompt_tokens"] == 226
    assert document["dropped_prompt_tokens"] == len(tokenizer.encode(long_prompt)) - 226
    streamed = cli("sample", "-m", run, "-p", long_prompt, "--max-new-tokens", "30")
    kept_x = 226 - len(tokenizer.encode(CHAT_PROMPT))
    assert streamed.stdout.startswith("x" * kept_x + CHAT_PROMPT)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("-m", "nope", "-p", "x"), "no run or checkpoint directory named 'nope'"),
        (("-m", "tiny:step-5", "-p", "x"), "has no checkpoint at step 5"),
        (("-m", "tiny", "-p", "x", "--temperature", "-1"), "invalid --temperature -1.0"),
        (("-m", "tiny", "-p", "x", "--top-p", "0"), "invalid --top-p 0.0"),
        (("-m", "tiny", "-p", "x", "--top-p", "1.5"), "invalid --top-p 1.5"),
        (("-m", "tiny"), "give the prompt with --prompt TEXT or --prompt-file FILE"),
        (("-m", "tiny", "-p", "x", "-f", "y"), "give the prompt with --prompt TEXT or --prompt-file FILE"),
        (("-m", "tiny", "-f", "missing.txt"), "prompt file 'missing.txt' does not exist"),
        (("-m", "tiny", "-p", "x", "--dtype", "fp8"), "unknown dtype 'fp8'"),
        (("-m", "tiny", "-p", "x", "--precision", "fp8"), "unknown dtype 'fp8'"),  # the older name
    ],
)
def test_bad_input_is_a_one_line_error(cli, run, flags, message):
    result = cli("sample", *flags)
    assert result.exit_code == 2, result.stderr
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert result.stdout == ""


def test_a_checkpoint_without_its_tokenizer_is_a_one_line_error(cli, run, workspace_dir):
    checkpoint = workspace_dir / "runs" / run / "checkpoints" / "step-00000100"
    (checkpoint / "tokenizer.json").unlink()
    result = cli("sample", "-m", run, "-p", "x")
    assert result.exit_code != 0
    assert "tokenizer.json" in result.stderr and "missing" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    # a copy of the checkpoint given by directory fails the same way
    copy = workspace_dir / "copy"
    shutil.copytree(checkpoint, copy)
    result = cli("sample", "-m", copy, "-p", "x")
    assert result.exit_code != 0 and "tokenizer.json" in result.stderr
