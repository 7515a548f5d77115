"""The chat session behind `llmctl chat`.

A `ChatSession` holds the conversation (the transcript, never trimmed) and builds each prompt
through `ChatPrompt` (the tokenizer's chat template, the oldest turns left out when the
conversation outgrows the context window). It runs the slash commands, saves transcripts, and in
code mode keeps replies to code.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from llmctl.chat.code_mode import CODE_SYSTEM_PROMPT, DECLINE_MESSAGE, extract_code, is_code_request
from llmctl.config import GenerationConfig
from llmctl.errors import LlmctlError
from llmctl.generate import Completion, Generation, LoadedEngine, override_generation
from llmctl.generate.chat_prompt import ChatPrompt

if TYPE_CHECKING:
    pass

Mode = Literal["chat", "code"]
MODES: tuple[Mode, ...] = ("chat", "code")

TRANSCRIPT_SUFFIXES = (".md", ".json")


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
        return self._prompt().is_chat_model

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
        return self._prompt().render(messages, user_text)

    def build_prompt(self, user_text: str) -> tuple[list[int], int]:
        """The prompt's token ids and how many of the oldest turns were left out (ChatPrompt.build)."""
        return self._prompt().build(self.messages, user_text, self.config.max_new_tokens)

    def stop_token_ids(self) -> set[int]:
        return self._prompt().stop_token_ids()

    def _prompt(self) -> ChatPrompt:
        return ChatPrompt(self.loaded.engine, self.system)

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
