"""`llmctl chat`: talk to a trained model, in a terminal or through a pipe."""

from __future__ import annotations

import sys

import typer

from llmctl.cli.common import (
    DEVICE,
    DTYPE,
    MAX_NEW_TOKENS,
    MIN_P,
    MODEL,
    REPETITION_PENALTY,
    SEED,
    TEMPERATURE,
    TOP_K,
    TOP_P,
    err,
    out,
    workspace,
)


def chat(
    model: str = MODEL,
    system: str = typer.Option(None, "--system", help="System prompt for the conversation."),
    mode: str = typer.Option(
        "chat",
        "--mode",
        help="chat, or code: answers programming requests with code only, declines others.",
    ),
    max_new_tokens: int = MAX_NEW_TOKENS,
    temperature: float = TEMPERATURE,
    top_k: int = TOP_K,
    top_p: float = TOP_P,
    min_p: float = MIN_P,
    repetition_penalty: float = REPETITION_PENALTY,
    seed: int = SEED,
    device: str = DEVICE,
    dtype: str = DTYPE,
) -> None:
    """Chat with a trained model: streamed replies, the checkpoint's chat template, /help for commands.

    With standard input from a pipe, each line is one user turn (or a /command) and replies are
    printed plainly, one per turn.

    Examples:

      llmctl chat --model code-chat

      llmctl chat -m code-chat --mode code --temperature 0.2

      printf 'hi\\n/temp 0\\nwrite a function that adds two numbers\\n' | llmctl chat -m code-chat
    """
    from llmctl.chat import MODES, ChatSession, run_piped, run_terminal
    from llmctl.config import GenerationConfig
    from llmctl.errors import UsageError
    from llmctl.generate import LoadedEngine, load_engine, override_generation

    if mode not in MODES:
        raise UsageError(f"unknown --mode '{mode}': use {' or '.join(MODES)}")

    flags = {
        "max_new_tokens": max_new_tokens,
        "temperature": temperature,
        "top_k": top_k,
        "top_p": top_p,
        "min_p": min_p,
        "repetition_penalty": repetition_penalty,
        "seed": seed,
    }
    override_generation(GenerationConfig(), flags)  # bad flags fail before the model loads
    ws = workspace()
    loaded = load_engine(ws, model, device, dtype)
    config = override_generation(loaded.config.generation, flags)

    def switch_model(ref: str) -> LoadedEngine:  # for /model
        return load_engine(ws, ref, device, dtype)

    session = ChatSession(loaded, config, switch_model, system, mode)

    if sys.stdin.isatty():
        run_terminal(session, out, history_file=ws.root / "chat_history")
        return

    def plain_note(message: str) -> None:
        err.print(message, style="dim", soft_wrap=True, markup=False, highlight=False)

    plain_note(session.describe())
    if base_note := session.base_model_note():
        plain_note(f"note: {base_note}")
    run_piped(session, sys.stdin, sys.stdout, plain_note)
