"""The chat session behind `llmctl chat`, and its two front ends.

A `ChatSession` holds the conversation (the transcript, never trimmed) and builds each prompt with
the tokenizer's chat template, leaving out the oldest turns when the conversation outgrows the
context window. It runs the slash commands, saves transcripts, and in code mode keeps replies to
code. `run_terminal` is the interactive REPL (readline, Rich); `run_piped` reads one user turn per
line from a pipe and prints replies plainly, so chat can be scripted.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, TextIO

from llmctl.config import GenerationConfig
from llmctl.errors import LlmctlError
from llmctl.generate import Completion, Generation, LoadedEngine, override_generation
from llmctl.tokenizer import CHAT_SPECIAL_TOKENS

if TYPE_CHECKING:
    from rich.console import Console, RenderableType

Mode = Literal["chat", "code"]
MODES: tuple[Mode, ...] = ("chat", "code")

CODE_SYSTEM_PROMPT = "You are a coding assistant. Answer with code only, in one fenced code block."
DECLINE_MESSAGE = "In code mode I only help with programming: ask me to write, fix, explain or test code."

# The code-mode classifier is a keyword heuristic, on purpose: a request is about code when it uses
# a programming word or contains code-like syntax. Everyday words that are also programming words
# ("list", "test", "sort", "import") are left out, so "list the planets" is declined.
CODE_WORDS = frozenset(
    (
        "code",
        "coding",
        "coder",
        "program",
        "programming",
        "programmer",
        "script",
        "scripts",
        "function",
        "functions",
        "class",
        "classes",
        "bug",
        "bugs",
        "debug",
        "debugging",
        "error",
        "errors",
        "exception",
        "traceback",
        "stacktrace",
        "compile",
        "compiler",
        "syntax",
        "refactor",
        "implement",
        "implementation",
        "algorithm",
        "algorithms",
        "recursion",
        "recursive",
        "loop",
        "loops",
        "variable",
        "variables",
        "array",
        "arrays",
        "dict",
        "dictionary",
        "tuple",
        "tuples",
        "string",
        "strings",
        "integer",
        "integers",
        "boolean",
        "regex",
        "regexp",
        "sql",
        "database",
        "api",
        "endpoint",
        "json",
        "yaml",
        "xml",
        "csv",
        "html",
        "css",
        "parse",
        "parser",
        "parsing",
        "unittest",
        "pytest",
        "def",
        "lambda",
        "async",
        "await",
        "python",
        "javascript",
        "typescript",
        "java",
        "rust",
        "golang",
        "cpp",
        "bash",
        "shell",
        "powershell",
        "ruby",
        "php",
        "kotlin",
        "swift",
        "haskell",
        "numpy",
        "pandas",
        "pytorch",
        "torch",
        "react",
        "django",
        "flask",
        "git",
        "docker",
        "linux",
        "cli",
        "stdout",
        "stdin",
        "segfault",
        "null",
        "nullptr",
        "pointer",
        "pointers",
        "iterator",
        "generator",
        "decorator",
    )
)
CODE_SYNTAX = re.compile(
    r"```|`[^`\n]+`"  # markdown code
    r"|\b[A-Za-z_]\w*\("  # a call: print(
    r"|[{};]|==|!=|<=|>=|=>|->|::|\+=|&&|\|\|"  # operators and braces
    r"|\b\w+\.(?:py|js|ts|rs|go|c|cpp|h|java|rb|sh|sql|json|yaml|yml|toml|ipynb)\b"  # file names
)
FENCE = re.compile(r"```[ \t]*([\w+#.-]*)[^\n]*\n(.*?)(?:\n?```|\Z)", re.S)
TRANSCRIPT_SUFFIXES = (".md", ".json")


def is_code_request(text: str) -> bool:
    """Whether code mode answers `text`: it names a programming word (CODE_WORDS) or has code syntax."""
    words = set(re.findall(r"[a-z][a-z+#]*", text.lower()))
    return bool(words & CODE_WORDS) or bool(CODE_SYNTAX.search(text))


def extract_code(reply: str) -> tuple[str, str | None]:
    """(code, language) of a reply: its first fenced block (an unclosed fence runs to the end),
    else the whole reply, taken to be bare code."""
    match = FENCE.search(reply)
    if match is None:
        return reply.strip("\n"), None
    return match.group(2).rstrip("\n"), match.group(1) or None


@dataclass
class CommandResult:
    message: str
    ok: bool = True
    exit: bool = False


HELP = """\
/help            this list
/clear           forget the conversation (settings stay)
/system TEXT     set the system prompt (no TEXT: remove it)
/temp X          temperature (0 = greedy)
/top_p X         nucleus sampling share, in (0, 1]
/top_k N         sample among the N likeliest tokens (0: no limit)
/max N           tokens per reply at most
/model REF       switch to another checkpoint; the conversation stays
/save FILE       write the transcript as Markdown (.md) or JSON (.json)
/exit            leave (Ctrl-D too); Ctrl-C stops a reply being generated"""

# command -> (GenerationConfig field, value type)
SETTINGS = {
    "/temp": ("temperature", float),
    "/top_p": ("top_p", float),
    "/top_k": ("top_k", int),
    "/max": ("max_new_tokens", int),
}
SETTING_NAMES = {field: command for command, (field, _) in SETTINGS.items()}


class ChatSession:
    """A conversation with one model at a time.

    `messages` is the whole transcript (user and assistant turns, oldest first); `load` turns a
    model reference into a LoadedEngine for /model.
    """

    def __init__(
        self,
        loaded: LoadedEngine,
        config: GenerationConfig,
        load: Callable[[str], LoadedEngine],
        system: str | None = None,
        mode: Mode = "chat",
    ):
        self.loaded = loaded
        self.config = config
        self.mode = mode
        self.system = system if system is not None else (CODE_SYSTEM_PROMPT if mode == "code" else None)
        self.messages: list[dict[str, str]] = []
        self._load = load

    @property
    def is_chat_model(self) -> bool:
        return self.loaded.engine.tokenizer.chat_template is not None

    def describe(self) -> str:
        engine = self.loaded.engine
        kind = "chat model" if self.is_chat_model else "base model"
        return (
            f"{self.loaded.path} · {kind} · {engine.context_length}-token context · {engine.device} · "
            f"{self.mode} mode"
        )

    def base_model_note(self) -> str | None:
        if self.is_chat_model:
            return None
        return (
            "this is a base model (its tokenizer has no chat template): each line you type is continued "
            "as plain text, after the conversation so far"
        )

    # ------------------------------------------------------------ prompts and replies

    def render(self, messages: list[dict[str, str]], user_text: str) -> str:
        tokenizer = self.loaded.engine.tokenizer
        if self.is_chat_model:
            system = [{"role": "system", "content": self.system}] if self.system else []
            turn = [{"role": "user", "content": user_text}]
            return tokenizer.render_chat(system + messages + turn, add_generation_prompt=True)
        # a base model continues one plain document: each typed line, then what the model added to it
        parts: list[str] = []
        for message in [*messages, {"role": "user", "content": user_text}]:
            if message["role"] == "user" and parts:
                parts.append("\n")
            parts.append(message["content"])
        return "".join(parts)

    def build_prompt(self, user_text: str) -> tuple[list[int], int]:
        """The prompt's token ids and how many of the oldest turns were left out so the reply has
        room: min(max_new_tokens, context / 2) tokens, as the engine reserves. A message too long
        even alone is left to the engine, which keeps its end."""
        engine = self.loaded.engine
        budget = engine.context_length - min(self.config.max_new_tokens, engine.context_length // 2)
        turn_starts = [i for i, message in enumerate(self.messages) if message["role"] == "user"]
        for dropped, start in enumerate([*turn_starts, len(self.messages)]):
            ids = engine.tokenizer.encode(self.render(self.messages[start:], user_text))
            if len(ids) <= budget:
                return ids, dropped
        return ids, len(turn_starts)

    def stop_token_ids(self) -> set[int]:
        """End of text, and for chat models the end of a turn or the start of another one."""
        tokenizer = self.loaded.engine.tokenizer
        stops = {tokenizer.eot_id}
        if self.is_chat_model:
            specials = tokenizer.special_ids
            stops |= {specials[token] for token in CHAT_SPECIAL_TOKENS if token in specials}
        return stops

    def send(self, user_text: str) -> PendingReply:
        """Start the reply to `user_text`; it joins the transcript once it ends or is interrupted."""
        if self.mode == "code" and not is_code_request(user_text):
            return PendingReply(self, user_text, None)
        ids, dropped = self.build_prompt(user_text)
        generation = self.loaded.engine.stream([ids], self.config, stop_token_ids=self.stop_token_ids())
        return PendingReply(self, user_text, generation, dropped)

    # ------------------------------------------------------------ commands

    def command(self, line: str) -> CommandResult:
        name, _, argument = line.strip().partition(" ")
        argument = argument.strip()
        if name in SETTINGS:
            return self._setting(name, argument)
        handlers: dict[str, Callable[[str], CommandResult]] = {
            "/help": lambda _: CommandResult(HELP),
            "/clear": self._clear,
            "/system": self._system,
            "/model": self._model,
            "/save": self._save,
            "/exit": lambda _: CommandResult("bye", exit=True),
            "/quit": lambda _: CommandResult("bye", exit=True),
        }
        if name not in handlers:
            return CommandResult(f"unknown command '{name}'; /help lists the commands", ok=False)
        return handlers[name](argument)

    def _setting(self, name: str, argument: str) -> CommandResult:
        field, kind = SETTINGS[name]
        current = getattr(self.config, field)
        if not argument:
            return CommandResult(f"{field} is {current}")
        if name == "/top_k" and argument.lower() in ("0", "off", "none"):
            self.config = self.config.model_copy(update={"top_k": None})
            return CommandResult("top_k off (no limit)")
        try:
            value = kind(argument)
        except ValueError:
            wanted = "an integer" if kind is int else "a number"
            return CommandResult(f"{name} needs {wanted}, got '{argument}'", ok=False)
        try:
            self.config = override_generation(self.config, {field: value}, SETTING_NAMES)
        except LlmctlError as exc:
            return CommandResult(exc.message, ok=False)
        return CommandResult(f"{field} {value} (was {current})")

    def _clear(self, _: str) -> CommandResult:
        count, self.messages = len(self.messages), []
        return CommandResult(f"conversation cleared ({count} messages forgotten)")

    def _system(self, argument: str) -> CommandResult:
        self.system = argument or None
        ignored = "" if self.is_chat_model else " (kept for chat models: a base model has no system prompt)"
        return CommandResult(("system prompt set" if argument else "system prompt removed") + ignored)

    def _model(self, argument: str) -> CommandResult:
        if not argument:
            return CommandResult(f"model: {self.loaded.ref} ({self.loaded.path})")
        try:
            self.loaded = self._load(argument)
        except LlmctlError as exc:
            return CommandResult(f"{exc.message}; still using {self.loaded.ref}", ok=False)
        note = self.base_model_note()
        return CommandResult(f"switched to {self.describe()}" + (f"\n{note}" if note else ""))

    def _save(self, argument: str) -> CommandResult:
        if not argument:
            return CommandResult("/save needs a file name ending in .md or .json", ok=False)
        path = Path(argument).expanduser()
        if path.suffix.lower() not in TRANSCRIPT_SUFFIXES:
            return CommandResult(
                f"cannot save as '{path.suffix or path.name}': use a .md or .json file name", ok=False
            )
        try:
            path.write_text(self.transcript(path.suffix.lower()), encoding="utf-8")
        except OSError as exc:
            return CommandResult(f"cannot write '{path}': {exc.strerror or exc}", ok=False)
        return CommandResult(f"saved {len(self.messages)} messages to {path}")

    def transcript(self, suffix: str) -> str:
        if suffix == ".json":
            document = {
                "model": self.loaded.ref,
                "checkpoint": str(self.loaded.path),
                "mode": self.mode,
                "system": self.system,
                "generation": self.config.model_dump(mode="json"),
                "messages": self.messages,
            }
            return json.dumps(document, indent=2, ensure_ascii=False) + "\n"
        config = self.config
        settings = (
            f"temperature {config.temperature}, top_p {config.top_p}, top_k {config.top_k}, "
            f"max_new_tokens {config.max_new_tokens}"
        )
        lines = [
            f"# Chat with {self.loaded.ref}",
            "",
            f"- checkpoint: `{self.loaded.path}`",
            f"- mode: {self.mode}",
            f"- {settings}",
            "",
        ]
        if self.system:
            lines += ["## System", "", self.system, ""]
        for message in self.messages:
            lines += [f"## {message['role'].capitalize()}", "", message["content"], ""]
        return "\n".join(lines)


class PendingReply:
    """One reply: iterate for its text as it is generated. When it ends (or `interrupt()` stops it)
    the user turn and the reply join the transcript; in code mode the reply kept is its code block."""

    def __init__(
        self, session: ChatSession, user_text: str, generation: Generation | None, dropped_turns: int = 0
    ):
        self.session = session
        self.user_text = user_text
        self.generation = generation
        self.dropped_turns = dropped_turns
        self.dropped_prompt_tokens = generation.prompts[0].dropped_tokens if generation else 0
        self.declined = generation is None
        self.text = ""
        self.completion: Completion | None = None
        self.interrupted = False
        self._recorded = False

    def __iter__(self) -> Iterator[str]:
        if self.declined:
            self.text = DECLINE_MESSAGE
            yield self.text
        else:
            for chunk in self.generation:
                self.text += chunk.text
                self.completion = chunk.completion or self.completion
                if chunk.text:
                    yield chunk.text
        self._record()

    def interrupt(self) -> None:
        if self.generation is not None:
            self.generation.close()
        self.interrupted = True
        self._record()

    @property
    def code(self) -> tuple[str, str | None]:
        return extract_code(self.text)

    @property
    def kept(self) -> str:
        """What the transcript keeps: the reply, or in code mode its code block alone."""
        if self.session.mode != "code" or self.declined:
            return self.text
        code, language = self.code
        return f"```{language or ''}\n{code}\n```"

    def notes(self) -> list[str]:
        engine = self.session.loaded.engine
        notes = []
        if self.dropped_turns:
            turns = "turn" if self.dropped_turns == 1 else f"{self.dropped_turns} turns"
            notes.append(f"left out the oldest {turns} to fit the {engine.context_length}-token context")
        if self.dropped_prompt_tokens:
            notes.append(
                f"your message is longer than the context window: its first "
                f"{self.dropped_prompt_tokens} tokens were left out"
            )
        if self.completion is not None and self.completion.finish_reason != "stop":
            limit = "max tokens (/max)" if self.completion.finish_reason == "length" else "context window"
            notes.append(f"reply cut at the {limit}")
        return notes

    def _record(self) -> None:
        if not self._recorded:
            self._recorded = True
            self.session.messages += [
                {"role": "user", "content": self.user_text},
                {"role": "assistant", "content": self.kept},
            ]


# ---------------------------------------------------------------- front ends


def run_piped(session: ChatSession, lines: Iterable[str], out: TextIO, note: Callable[[str], None]) -> None:
    """One user turn per line; replies to `out` as plain text, one per turn, command output to `note`."""
    for raw in lines:
        line = raw.rstrip("\r\n")
        if not line.strip():
            continue
        if line.startswith("/"):
            result = session.command(line)
            note(result.message if result.ok else f"error: {result.message}")
            if result.exit:
                return
            continue
        pending = session.send(line)
        if session.mode == "code" and not pending.declined:
            for _ in pending:
                pass
            out.write(pending.code[0])
        else:
            for text in pending:
                out.write(text)
                out.flush()
        out.write("\n")
        out.flush()
        for message in pending.notes():
            note(message)


def run_terminal(session: ChatSession, console: Console, history_file: Path | None) -> None:
    """The interactive REPL: readline editing and history, replies streamed then rendered with Rich."""
    readline = _readline(history_file)
    console.print(f"[dim]{session.describe()}[/dim]")
    if note := session.base_model_note():
        console.print(f"[yellow]note:[/yellow] {note}")
    console.print("[dim]/help for commands · Ctrl-C stops a reply · Ctrl-D leaves[/dim]")
    try:
        while True:
            try:
                line = input("you› ")
            except EOFError:
                console.print()
                return
            except KeyboardInterrupt:
                console.print()
                continue
            if not line.strip():
                continue
            if line.startswith("/"):
                result = session.command(line)
                style = "dim" if result.ok else "red"
                console.print(result.message, style=style, markup=False, highlight=False)
                if result.exit:
                    return
                continue
            _show_reply(console, session, session.send(line))
    finally:
        if readline is not None and history_file is not None:
            with contextlib.suppress(OSError):
                history_file.parent.mkdir(parents=True, exist_ok=True)
                readline.write_history_file(str(history_file))


def _readline(history_file: Path | None):
    """GNU readline gives input() line editing and ↑ history; it is absent on some platforms."""
    try:
        import readline
    except ImportError:
        return None
    if history_file is not None and history_file.is_file():
        with contextlib.suppress(OSError):
            readline.read_history_file(str(history_file))
    readline.set_history_length(1000)
    return readline


def _show_reply(console: Console, session: ChatSession, pending: PendingReply) -> None:
    from rich.live import Live
    from rich.text import Text

    with Live(Text(""), console=console, vertical_overflow="visible", refresh_per_second=12) as live:
        try:
            for _ in pending:
                live.update(Text(pending.text))
        except KeyboardInterrupt:
            pending.interrupt()
        live.update(_rendered(session, pending))
    if pending.interrupted:
        console.print("[dim](stopped)[/dim]")
    for message in pending.notes():
        console.print(f"[dim]{message}[/dim]", highlight=False)


def _rendered(session: ChatSession, pending: PendingReply) -> RenderableType:
    """A finished reply: code mode shows the code block highlighted, a chat model's reply is
    Markdown (its fenced code highlighted too), a base model's continuation is plain text."""
    from rich.markdown import Markdown
    from rich.syntax import Syntax
    from rich.text import Text

    if session.mode == "code" and not pending.declined:
        code, language = pending.code
        return Syntax(code, language or "python", theme="ansi_dark", background_color="default")
    if session.is_chat_model:
        return Markdown(pending.text, code_theme="ansi_dark")
    return Text(pending.text)
