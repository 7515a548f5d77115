"""Text generation with a KV cache: `Engine` for prompts in, completions or streamed text out.

    engine = Engine(model, tokenizer)
    completions = engine.generate(["def add(a, b):"], GenerationConfig(temperature=0), num_samples=1)
    for chunk in engine.stream(["Once upon"], config):
        print(chunk.text, end="")

docs/sample.md describes the samplers, stop handling and the context window.
"""

from llmctl.generate.engine import (
    Chunk,
    Completion,
    Engine,
    Generation,
    GenerationStats,
    Prompt,
    resolve_device,
    resolve_dtype,
)
from llmctl.generate.sampling import choose_tokens, filter_logits
from llmctl.generate.text import IncrementalDecoder, StopMatcher

__all__ = [
    "Chunk",
    "Completion",
    "Engine",
    "Generation",
    "GenerationStats",
    "IncrementalDecoder",
    "Prompt",
    "StopMatcher",
    "choose_tokens",
    "filter_logits",
    "resolve_device",
    "resolve_dtype",
]
