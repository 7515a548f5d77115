"""Completions from a model for the evals: prompts batched through the generation engine, several
samples each, every completion cut at the stop sequences the scorer uses.

Each prompt is read after the end-of-text token, the boundary that precedes every training
document, so a prompt starts the way files started in training.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmctl.config import GenerationConfig
from llmctl.eval.humaneval import truncate_completion
from llmctl.generate import Engine


@dataclass
class GeneratedCompletions:
    texts: list[list[str]]  # per prompt, its samples in order, cut at the stop sequences
    finish_reasons: list[list[str]]
    generated_tokens: int = 0
    seconds: float = 0.0
    calls: int = 0

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.seconds if self.seconds else 0.0


@dataclass(frozen=True)
class _Call:
    prompts: list[int]  # indices into the prompt list
    num_samples: int
    first_sample: int  # where these samples go among each prompt's samples


def _plan(n_prompts: int, n_samples: int, batch_size: int) -> Iterator[_Call]:
    """Engine calls of at most `batch_size` rows: whole prompts with all their samples when they
    fit, else one prompt's samples spread over several calls."""
    if n_samples <= batch_size:
        per_call = batch_size // n_samples
        for begin in range(0, n_prompts, per_call):
            yield _Call(list(range(begin, min(begin + per_call, n_prompts))), n_samples, 0)
        return
    for prompt in range(n_prompts):
        for first in range(0, n_samples, batch_size):
            yield _Call([prompt], min(batch_size, n_samples - first), first)


def generate_completions(
    engine: Engine,
    prompts: Sequence[str],
    config: GenerationConfig,
    *,
    n_samples: int = 1,
    batch_size: int = 8,
    stop_sequences: Sequence[str] = (),
    on_progress: Callable[[int, int], None] | None = None,
) -> GeneratedCompletions:
    """`n_samples` completions for each prompt, `batch_size` rows at a time.

    Generation stops early at `stop_sequences` (added to config.stop) and every completion is cut
    with `truncate_completion` at them, as scoring expects. With a seed, sample j of a prompt draws
    with seed + j (the engine's rule), also when a prompt's samples are spread over several calls.
    `on_progress(rows done, rows)` follows each call.
    """
    config = config.model_copy(update={"stop": list(dict.fromkeys([*config.stop, *stop_sequences]))})
    # read after the token training documents follow (end-of-text; BOS for Llama-family tokenizers)
    start = engine.tokenizer.document_start_id
    ids = [[start, *engine.tokenizer.encode(prompt)] for prompt in prompts]
    result = GeneratedCompletions([[""] * n_samples for _ in prompts], [[""] * n_samples for _ in prompts])
    rows_done, rows = 0, len(prompts) * n_samples
    for call in _plan(len(prompts), n_samples, batch_size):
        seed = None if config.seed is None else config.seed + call.first_sample
        seeded = config.model_copy(update={"seed": seed})
        generation = engine.stream([ids[p] for p in call.prompts], seeded, num_samples=call.num_samples)
        for completion in generation.completions():
            prompt = call.prompts[completion.prompt_index]
            sample = call.first_sample + completion.sample_index
            result.texts[prompt][sample] = truncate_completion(completion.text, stop_sequences)
            result.finish_reasons[prompt][sample] = completion.finish_reason
        result.generated_tokens += generation.stats.generated_tokens
        result.seconds += generation.stats.seconds
        result.calls += 1
        rows_done += len(call.prompts) * call.num_samples
        if on_progress is not None:
            on_progress(rows_done, rows)
    return result


def write_completions(path: Path, task_ids: Sequence[str], generated: GeneratedCompletions) -> Path:
    """One {task_id, completion, finish_reason} line per sample, as `eval humaneval --completions` reads."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as sink:
        for task_id, texts, reasons in zip(task_ids, generated.texts, generated.finish_reasons, strict=True):
            for text, reason in zip(texts, reasons, strict=True):
                record = {"task_id": task_id, "completion": text, "finish_reason": reason}
                sink.write(json.dumps(record) + "\n")
    return path


def sampling_summary(
    config: GenerationConfig, n_samples: int, batch_size: int, generated: GeneratedCompletions
) -> dict[str, Any]:
    """How the completions were made, for an eval's summary."""
    return {
        "n_samples": n_samples,
        **config.model_dump(include={"temperature", "top_p", "max_new_tokens", "seed", "stop"}),
        "batch_size": batch_size,
        "generated_tokens": generated.generated_tokens,
        "seconds": round(generated.seconds, 3),
        "tokens_per_second": round(generated.tokens_per_second, 1),
    }
