"""`llmctl chat` driven through piped standard input, and the chat session library it runs on."""

from __future__ import annotations

import codecs
import fcntl
import io
import json
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest
from tiny_checkpoints import ADD_REPLY, GREETING, write_run_checkpoint

from llmctl.chat import DECLINE_MESSAGE, ChatSession, extract_code, is_code_request
from llmctl.config import GenerationConfig, ModelConfig
from llmctl.generate import load_engine
from llmctl.tokenizer import EOT_TOKEN, byte_to_unicode
from llmctl.workspace import Workspace

ADD_REQUEST = "write a function that adds two numbers"
ADD_CODE = "def add(a, b):\n    return a + b"


# tiny models decode fastest on one thread, and steadily on a busy machine (conftest.single_thread)
pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture
def run(workspace_dir: Path) -> str:
    write_run_checkpoint(workspace_dir, "tiny", step=100)
    return "tiny"


@pytest.fixture
def chat(cli, monkeypatch):
    """`llmctl chat ARGS` with `lines` piped to its standard input."""

    def invoke(lines: list[str], *args: object):
        monkeypatch.setattr(sys, "stdin", io.StringIO("".join(f"{line}\n" for line in lines)))
        return cli("chat", *args)

    return invoke


def session_for(workspace_dir: Path, ref: str = "tiny", **options) -> ChatSession:
    workspace = Workspace(workspace_dir)
    loaded = load_engine(workspace, ref, "cpu", "fp32")
    switch = lambda other: load_engine(workspace, other)  # noqa: E731
    return ChatSession(loaded, loaded.config.generation, switch, **options)


# ---------------------------------------------------------------- piped chat through the CLI


def test_piped_lines_are_user_turns_and_replies_print_plainly(chat, run):
    result = chat(["hi", "", ADD_REQUEST], "--model", run)
    assert result.exit_code == 0, result.stderr
    # the second turn sees the first in its context, so only the first reply is pinned exactly
    assert result.stdout.startswith(GREETING + "\n")
    assert result.stdout.endswith("\n") and len(result.stdout) > len(GREETING) + 2
    assert "chat model" in result.stderr


def test_commands_change_the_settings_replies_use(chat, run, tmp_path):
    saved = tmp_path / "chat.json"
    lines = ["/temp 0.7", "/top_p 0.9", "/top_k 5", "/max 3", "/seed 1", "hi", f"/save {saved}"]
    result = chat(lines, "-m", run)
    assert result.exit_code == 0
    assert "temperature 0.7 (was 0.0)" in result.stderr
    assert "top_p 0.9" in result.stderr and "top_k 5" in result.stderr and "max_new_tokens 3" in result.stderr
    assert "unknown command '/seed'" in result.stderr
    assert "reply cut at the max tokens" in result.stderr
    document = json.loads(saved.read_text(encoding="utf-8"))
    settings = document["generation"]
    assert (settings["temperature"], settings["top_p"], settings["top_k"], settings["max_new_tokens"]) == (
        0.7,
        0.9,
        5,
        3,
    )
    (user, assistant) = document["messages"]
    assert user == {"role": "user", "content": "hi"}
    assert len(assistant["content"].encode()) <= 3  # three byte-level tokens at most


def test_bad_command_values_are_reported_and_the_session_goes_on(chat, run):
    result = chat(["/temp -1", "/top_p 1.5", "/top_k x", "/max 0", "hi"], "-m", run)
    assert result.exit_code == 0
    assert "invalid /temp -1.0" in result.stderr
    assert "invalid /top_p 1.5" in result.stderr
    assert "/top_k needs an integer, got 'x'" in result.stderr
    assert "invalid /max 0" in result.stderr
    assert result.stdout == GREETING + "\n"


def test_clear_resets_the_history(chat, run, tmp_path):
    saved = tmp_path / "after-clear.json"
    result = chat(["hi", ADD_REQUEST, "/clear", ADD_REQUEST, f"/save {saved}"], "-m", run)
    assert "conversation cleared (4 messages forgotten)" in result.stderr
    # after /clear the request is the first turn again, so the model answers it as trained
    assert result.stdout.endswith(f"\n{ADD_REPLY}\n")
    messages = json.loads(saved.read_text(encoding="utf-8"))["messages"]
    assert messages == [{"role": "user", "content": ADD_REQUEST}, {"role": "assistant", "content": ADD_REPLY}]


def test_save_writes_the_transcript_as_markdown_or_json(chat, run, tmp_path):
    markdown, document = tmp_path / "t.md", tmp_path / "t.json"
    lines = [
        "/system Be brief.",
        "hi",
        f"/save {markdown}",
        f"/save {document}",
        f"/save {tmp_path}/t.txt",
        "/save /no/such/dir/t.md",
    ]
    result = chat(lines, "-m", run)
    assert result.exit_code == 0
    assert f"saved 2 messages to {markdown}" in result.stderr
    assert "use a .md or .json file name" in result.stderr
    assert "cannot write '/no/such/dir/t.md'" in result.stderr
    text = markdown.read_text(encoding="utf-8")
    assert "# Chat with tiny" in text
    assert f"## System\n\nBe brief.\n\n## User\n\nhi\n\n## Assistant\n\n{GREETING}\n" in text
    saved = json.loads(document.read_text(encoding="utf-8"))
    assert saved["system"] == "Be brief." and saved["mode"] == "chat" and saved["model"] == "tiny"
    assert saved["messages"][1] == {"role": "assistant", "content": GREETING}


def test_a_long_conversation_is_trimmed_rather_than_failing(chat, run, tmp_path):
    saved = tmp_path / "long.json"
    # 100 tokens kept for each reply leave 156 of the 256-token window for the conversation
    lines = ["hi"] * 10 + [f"/save {saved}", "/exit", "never read"]
    result = chat(lines, "-m", run, "--max-new-tokens", "100")
    assert result.exit_code == 0, result.stderr
    assert "left out the oldest turn to fit the 256-token context" in result.stderr
    assert len(json.loads(saved.read_text(encoding="utf-8"))["messages"]) == 20  # the transcript keeps all
    assert "never read" not in result.stdout + result.stderr


def test_model_switches_checkpoints_and_keeps_the_conversation(chat, run, workspace_dir, tmp_path):
    write_run_checkpoint(workspace_dir, "other", step=7)
    saved = tmp_path / "t.json"
    result = chat(["hi", "/model other:step-7", "/model missing", "hi", f"/save {saved}"], "-m", run)
    assert result.exit_code == 0
    assert "switched to" in result.stderr and "step-00000007" in result.stderr
    assert "no run or checkpoint directory named 'missing'" in result.stderr
    assert "still using other" in result.stderr
    document = json.loads(saved.read_text(encoding="utf-8"))
    assert document["model"] == "other:step-7" and len(document["messages"]) == 4


def test_code_mode_answers_with_the_code_block_and_declines_the_rest(chat, run, tmp_path):
    saved = tmp_path / "code.json"
    result = chat(
        [ADD_REQUEST, "/clear", "what is the capital of France?", f"/save {saved}"],
        "-m",
        run,
        "--mode",
        "code",
    )
    assert result.exit_code == 0, result.stderr
    assert result.stdout == f"{ADD_CODE}\n{DECLINE_MESSAGE}\n"
    messages = json.loads(saved.read_text(encoding="utf-8"))["messages"]
    assert messages[1]["content"] == DECLINE_MESSAGE


def test_a_base_model_continues_plain_text_with_a_note(chat, workspace_dir, tmp_path):
    write_run_checkpoint(workspace_dir, "base", tokenizer_file=base_tokenizer_file(tmp_path))
    result = chat(["def add(a", "/system hello"], "-m", "base", "--max-new-tokens", "12")
    assert result.exit_code == 0, result.stderr
    assert "base model" in result.stderr and "no chat template" in result.stderr
    assert "kept for chat models" in result.stderr
    assert len(result.stdout.strip("\n").encode()) <= 12


def base_tokenizer_file(directory: Path) -> Path:
    """The byte tokenizer's ids (bytes at 6 + b) with only an end-of-text special: no chat template."""
    from tokenizers import AddedToken

    from llmctl.tokenizer import SPECIAL_TOKENS
    from llmctl.tokenizer_build import _byte_level_tokenizer

    vocab = {EOT_TOKEN: 0, **{char: len(SPECIAL_TOKENS) + byte for byte, char in byte_to_unicode().items()}}
    tokenizer = _byte_level_tokenizer(vocab)
    tokenizer.add_special_tokens([AddedToken(EOT_TOKEN, special=True, normalized=False)])
    path = directory / "base-tokenizer" / "tokenizer.json"
    path.parent.mkdir()
    tokenizer.save(str(path))
    return path


@pytest.mark.parametrize(
    ("args", "message", "code"),
    [
        (("-m", "nope"), "no run or checkpoint directory named 'nope'", 2),
        (("-m", "tiny", "--temperature", "-0.5"), "invalid --temperature -0.5", 2),
        (("-m", "tiny", "--top-p", "0"), "invalid --top-p 0.0", 2),
        (("-m", "tiny", "--top-p", "1.01"), "invalid --top-p 1.01", 2),
        (("-m", "tiny", "--mode", "poetry"), "unknown --mode 'poetry': use chat or code", 2),
    ],
)
def test_bad_input_is_a_one_line_error(chat, run, args, message, code):
    result = chat(["hi"], *args)
    assert result.exit_code == code
    assert message in result.stderr
    assert result.stdout == ""


def test_a_checkpoint_without_its_tokenizer_is_a_one_line_error(chat, run, workspace_dir):
    (workspace_dir / "runs" / run / "checkpoints" / "step-00000100" / "tokenizer.json").unlink()
    result = chat(["hi"], "-m", run)
    assert result.exit_code != 0
    assert "tokenizer.json" in result.stderr and len(result.stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------- the session library


def test_prompts_use_the_chat_template_with_the_system_prompt(run, workspace_dir):
    session = session_for(workspace_dir, system="Be brief.")
    ids, dropped = session.build_prompt("hi")
    assert dropped == 0
    tokenizer = session.loaded.engine.tokenizer
    assert tokenizer.decode(ids) == "<|system|>\nBe brief.<|end|>\n<|user|>\nhi<|end|>\n<|assistant|>\n"
    reply = session.send("hi")
    assert "".join(reply) == GREETING
    assert reply.completion.stop == "<|end|>"


def test_trimming_drops_whole_turns_from_the_oldest_and_keeps_the_system_prompt(run, workspace_dir):
    session = session_for(workspace_dir, system="Be brief.")
    for index in range(12):
        session.messages += [
            {"role": "user", "content": f"question {index}"},
            {"role": "assistant", "content": f"answer {index}"},
        ]
    ids, dropped = session.build_prompt("last")
    engine = session.loaded.engine
    assert len(ids) <= engine.context_length - min(session.config.max_new_tokens, engine.context_length // 2)
    assert dropped > 0
    assert ids == engine.tokenizer.encode(session.render(session.messages[2 * dropped :], "last"))
    # one turn fewer would not fit
    assert len(engine.tokenizer.encode(session.render(session.messages[2 * dropped - 2 :], "last"))) > len(
        ids
    )
    assert engine.tokenizer.decode(ids).startswith("<|system|>\nBe brief.<|end|>\n<|user|>\nquestion")


def test_a_message_longer_than_the_window_is_cut_with_a_note(run, workspace_dir):
    session = session_for(workspace_dir)
    reply = session.send("x" * 400)
    assert reply.dropped_prompt_tokens > 0
    "".join(reply)
    assert any("longer than the context window" in note for note in reply.notes())


def test_an_interrupted_reply_keeps_what_was_shown_and_the_session_goes_on(run, workspace_dir):
    session = session_for(workspace_dir)
    reply = session.send("hi")
    first = next(iter(reply))
    reply.interrupt()
    assert reply.interrupted
    assert session.messages == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": first}]
    session.command("/clear")
    assert "".join(session.send("hi")) == GREETING


def test_the_code_request_heuristic():
    for request in [
        ADD_REQUEST,
        "How do I reverse a string in Python?",
        "fix this: print(x",
        "why does my loop never end",
        "x = [i for i in range(3)]; what is x?",
        "explain `git rebase`",
        "my main.rs does not compile",
    ]:
        assert is_code_request(request), request
    for request in [
        "what is the capital of France?",
        "tell me a joke",
        "list the planets",
        "how are you today",
        "write a poem about the sea",
    ]:
        assert not is_code_request(request), request


def test_extract_code_takes_the_first_block_or_the_bare_reply():
    assert extract_code(ADD_REPLY) == (ADD_CODE, "python")
    assert extract_code("a\n```\nx = 1\n```\nthen\n```js\ny\n```") == ("x = 1", None)
    assert extract_code("Sure:\n```rust\nfn main() {}\n") == ("fn main() {}", "rust")  # unclosed fence
    assert extract_code("def f():\n    pass\n") == ("def f():\n    pass", None)


# ---------------------------------------------------------------- the terminal REPL


class Terminal:
    """A child process on a pseudo-terminal that is its controlling terminal, so Ctrl-C (\\x03) is a
    SIGINT and Ctrl-D (\\x04) an end of file, as at a keyboard."""

    ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07|\r")

    def __init__(self, args: list[str], env: dict[str, str], cwd: Path):
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))

        def own_terminal() -> None:
            os.setsid()
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)

        self.process = subprocess.Popen(
            args,
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env=env,
            cwd=cwd,
            preexec_fn=own_terminal,
            close_fds=True,
        )
        os.close(slave)
        self.master = master
        self.seen = ""  # output since the last expect() matched, escapes removed
        self.utf8 = codecs.getincrementaldecoder("utf-8")("replace")  # a read may end inside a character

    def expect(self, text: str, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while text not in self.seen:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"{text!r} never appeared; output: {self.seen[-2000:]!r}"
            if select.select([self.master], [], [], remaining)[0]:
                try:
                    data = os.read(self.master, 65536)
                except OSError:  # the child closed the terminal
                    data = b""
                assert data, f"the chat ended before {text!r}; output: {self.seen[-2000:]!r}"
                self.seen += self.ANSI.sub("", self.utf8.decode(data))
        before, _, self.seen = self.seen.partition(text)
        return before

    def send(self, keys: str) -> None:
        os.write(self.master, keys.encode())

    def drain(self, seconds: float) -> None:
        """Read for `seconds` and forget everything seen."""
        deadline = time.monotonic() + seconds
        while (remaining := deadline - time.monotonic()) > 0:
            if select.select([self.master], [], [], remaining)[0]:
                self.utf8.decode(os.read(self.master, 65536))
        self.seen = ""


def test_the_terminal_repl_streams_renders_stops_on_ctrl_c_and_leaves_on_ctrl_d(run, workspace_dir, tmp_path):
    # A model that can only say "a": the final LayerNorm's zero weight leaves its bias, whatever the
    # input, and the head scores "a" d_model and every other token, stop tokens included, 0. Greedy,
    # it never stops before 4000 tokens, seconds on any CPU, so Ctrl-C always lands mid-reply.
    endless = ModelConfig(
        n_layer=4,
        n_head=4,
        d_model=256,
        context_length=4096,
        vocab_size=262,
        norm="layernorm",
        tie_embeddings=False,
    )
    letter = 6 + ord("a")  # the byte tokenizer's id for byte b is 6 + b

    def say_only_a(model) -> None:
        model.norm.weight.zero_()
        model.norm.bias.fill_(1.0)
        model.lm_head.weight.zero_()
        model.lm_head.weight[letter] = 1.0

    write_run_checkpoint(
        workspace_dir,
        "endless",
        model_config=endless,
        edit=say_only_a,
        generation=GenerationConfig(temperature=0.0, max_new_tokens=4000),
    )
    env = {**os.environ, "LLMCTL_HOME": str(workspace_dir), "TERM": "xterm-256color", "COLUMNS": "120"}
    terminal = Terminal([sys.executable, "-m", "llmctl", "chat", "-m", run], env, cwd=tmp_path)
    try:
        terminal.expect("/help for commands")
        terminal.expect("you› ")
        terminal.send("hi\r")
        assert GREETING in terminal.expect("you› ")
        terminal.send("/model endless\r")
        assert "switched to" in terminal.expect("you› ")
        terminal.send("/max 4000\r")  # the session keeps its settings (60 tokens) across /model
        assert "4000" in terminal.expect("you› ")
        terminal.send("go on\r")
        terminal.expect("go on")
        terminal.expect("a" * 16)  # the reply is streaming: interrupt it
        terminal.send("\x03")
        assert "(stopped)" in terminal.expect("you› ")
        # at the prompt Ctrl-C only clears the line; CPython's readline misses a SIGINT that lands
        # between drawing the prompt and waiting for keys, so press it as a person would, a moment
        # later, and again if a loaded machine made the moment too short (the two make one prompt)
        time.sleep(0.5)
        for attempt in range(5):
            terminal.send("\x03")
            try:
                terminal.expect("you› ", timeout=3)
                break
            except AssertionError:
                assert attempt < 4, "Ctrl-C at the prompt never gave a new prompt"
        if attempt:
            terminal.drain(1.0)  # a slow first Ctrl-C may have drawn a second prompt after all
        terminal.send("/temp 0.5\r")
        assert "temperature 0.5 (was 0.0)" in terminal.expect("you› ")
        terminal.send("/save transcript.json\r")
        assert "saved 4 messages" in terminal.expect("you› ")
        messages = json.loads((tmp_path / "transcript.json").read_text())["messages"]
        assert len(messages) == 4
        reply = messages[-1]["content"]  # what had streamed when Ctrl-C stopped it
        assert messages[-1]["role"] == "assistant" and set(reply) == {"a"} and len(reply) < 4000
        terminal.send("\x04")
        assert terminal.process.wait(timeout=30) == 0
    finally:
        if terminal.process.poll() is None:
            terminal.process.kill()
        os.close(terminal.master)
