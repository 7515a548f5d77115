"""`llmctl sample`: continue a prompt with a trained model, streaming the text as it is generated."""

from __future__ import annotations

from pathlib import Path

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
    note,
    out,
    print_json,
    warn,
    workspace,
)


def sample(
    model: str = MODEL,
    prompt: str = typer.Option(None, "--prompt", "-p", help="Text to continue."),
    prompt_file: Path = typer.Option(
        None, "--prompt-file", "-f", help="Read the prompt from a file (- for stdin)."
    ),
    max_new_tokens: int = MAX_NEW_TOKENS,
    temperature: float = TEMPERATURE,
    top_k: int = TOP_K,
    top_p: float = TOP_P,
    min_p: float = MIN_P,
    repetition_penalty: float = REPETITION_PENALTY,
    seed: int = SEED,
    num_samples: int = typer.Option(1, "--num-samples", "-s", min=1, help="Samples to draw from the prompt."),
    stop: list[str] = typer.Option(
        [], "--stop", help="End a sample at this text (repeatable; \\n and \\t escapes)."
    ),
    device: str = DEVICE,
    dtype: str = DTYPE,
    as_json: bool = typer.Option(
        False, "--json", help="Print prompt, completions and speed as one JSON document."
    ),
) -> None:
    """Continue a prompt with a trained model, streaming the text as it is generated.

    Examples:

      llmctl sample --model code-base --prompt "def fibonacci(n):"

      llmctl sample -m code-base:step-500 -p "import " --temperature 0 --max-new-tokens 64

      llmctl sample -m code-base -f prompt.py --num-samples 3 --seed 1 --stop "\\n\\n" --json
    """
    from llmctl.config import GenerationConfig
    from llmctl.generate import in_row_order, load_engine, override_generation
    from llmctl.generate.sample import read_prompt, sample_document, unescape_stops

    text = read_prompt(prompt, prompt_file)
    flags = {
        "max_new_tokens": max_new_tokens,
        "temperature": temperature,
        "top_k": top_k,
        "top_p": top_p,
        "min_p": min_p,
        "repetition_penalty": repetition_penalty,
        "seed": seed,
        "stop": unescape_stops(stop) or None,
    }
    override_generation(GenerationConfig(), flags)  # bad flags fail before the model loads
    loaded = load_engine(workspace(), model, device, dtype)
    config = override_generation(loaded.config.generation, flags)
    generation = loaded.engine.stream([text], config, num_samples=num_samples)

    (prepared,) = generation.prompts
    if prepared.dropped_tokens:
        warn(
            f"the prompt is longer than the {loaded.engine.context_length}-token context window; "
            f"its first {prepared.dropped_tokens} tokens were dropped"
        )
    if as_json:
        print_json(sample_document(loaded, text, config, generation))
        return

    note(f"{loaded.path} · {loaded.engine.device} · temperature {config.temperature}")
    shown_prompt = loaded.engine.tokenizer.decode(prepared.ids) if prepared.dropped_tokens else text
    starting = True
    for chunk in in_row_order(generation):
        if starting:
            if num_samples > 1:
                err.rule(f"sample {chunk.row + 1} of {num_samples}", style="dim")
            out.print(shown_prompt, style="dim", end="", soft_wrap=True, markup=False, emoji=False)
            starting = False
        out.print(chunk.text, end="", soft_wrap=True, markup=False, emoji=False, highlight=False)
        out.file.flush()
        if chunk.completion is not None:
            out.print()
            done = chunk.completion
            endings = {
                "stop": f"stopped at {done.stop!r}",
                "length": "--max-new-tokens reached",
                "context": "context window full",
            }
            ending = endings[done.finish_reason]
            note(f"{len(done.token_ids)} tokens · {ending}")
            starting = True
    stats = generation.stats
    note(f"{stats.generated_tokens} tokens in {stats.seconds:.2f} s · {stats.tokens_per_second:.1f} tokens/s")
