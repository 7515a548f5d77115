"""The work behind `llmctl sample`: the prompt, the sampling settings, the JSON document."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llmctl.config import GenerationConfig
from llmctl.errors import UsageError
from llmctl.generate.engine import Completion, Generation
from llmctl.generate.loading import LoadedEngine

# --stop is typed in a shell, where a newline is awkward to pass; these escapes stand for them
STOP_ESCAPES = {"\\n": "\n", "\\t": "\t", "\\r": "\r"}


def read_prompt(prompt: str | None, prompt_file: Path | None) -> str:
    """The prompt from --prompt or --prompt-file (`-` reads standard input), exactly one of them."""
    if (prompt is None) == (prompt_file is None):
        raise UsageError("give the prompt with --prompt TEXT or --prompt-file FILE (one of them)")
    if prompt is not None:
        return prompt
    if str(prompt_file) == "-":
        return sys.stdin.read()
    try:
        return Path(prompt_file).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"prompt file '{prompt_file}' does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read prompt file '{prompt_file}': {exc}") from None


def unescape_stops(stops: Sequence[str]) -> list[str]:
    unescaped = []
    for stop in stops:
        for escape, char in STOP_ESCAPES.items():
            stop = stop.replace(escape, char)
        unescaped.append(stop)
    return unescaped


def completion_record(completion: Completion) -> dict[str, Any]:
    return {
        "sample": completion.sample_index,
        "text": completion.text,
        "tokens": len(completion.token_ids),
        "finish_reason": completion.finish_reason,
        "stop": completion.stop,
    }


def sample_document(
    loaded: LoadedEngine, prompt: str, config: GenerationConfig, generation: Generation
) -> dict[str, Any]:
    """Everything `sample --json` reports, once `generation` has run to the end."""
    completions = generation.completions()
    (prepared,) = generation.prompts
    stats = generation.stats
    engine = loaded.engine
    return {
        "model": loaded.ref,
        "checkpoint": str(loaded.path),
        "device": str(engine.device),
        "dtype": engine.dtype,
        "prompt": prompt,
        "prompt_tokens": len(prepared.ids),
        "dropped_prompt_tokens": prepared.dropped_tokens,
        "generation": config.model_dump(mode="json"),
        "completions": [completion_record(c) for c in completions],
        "generated_tokens": stats.generated_tokens,
        "prefill_seconds": round(stats.prefill_seconds, 4),
        "seconds": round(stats.seconds, 4),
        "tokens_per_second": round(stats.tokens_per_second, 2),
    }
