"""The two front ends of `llmctl chat`: `run_terminal`, the interactive REPL (readline, Rich), and
`run_piped`, which reads one user turn per line from a pipe and prints replies plainly, so chat can
be scripted."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from llmctl.chat.session import ChatSession, PendingReply

if TYPE_CHECKING:
    from rich.console import Console, RenderableType


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
            try:
                _show_reply(console, session, session.send(line))
            except KeyboardInterrupt:
                # Ctrl-C a moment after the reply ended (while its notes print) stops nothing: the
                # reply is already in the transcript, and the chat goes on
                console.print()
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
