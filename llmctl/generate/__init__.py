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
    in_row_order,
    resolve_dtype,
)
from llmctl.generate.loading import LoadedEngine, load_engine, override_generation
from llmctl.generate.sampling import choose_tokens, filter_logits
from llmctl.generate.text import IncrementalDecoder, StopMatcher
from llmctl.model.device import resolve_device

__all__ = [
    "Chunk",
    "Completion",
    "Engine",
    "Generation",
    "GenerationStats",
    "IncrementalDecoder",
    "LoadedEngine",
    "Prompt",
    "StopMatcher",
    "choose_tokens",
    "filter_logits",
    "in_row_order",
    "load_engine",
    "override_generation",
    "resolve_device",
    "resolve_dtype",
]
