"""The generation engine: prompts in, completions out, streamed as they are decoded.

One call takes a batch of prompts of any lengths and any number of samples per prompt. Each row
(one sample of one prompt) is prefilled into a KV-cache slot of its own (the samples of a prompt
share one prefill), then every row advances one token per forward, each at its own position
(llmctl.generate.batch). A row that finishes leaves the batch and the cache, so short answers stop
costing compute; the server's continuous batching lets rows join between steps as well.
"""

from __future__ import annotations

import time
from collections import defaultdict, deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from llmctl.config import GenerationConfig
from llmctl.errors import UsageError
from llmctl.generate.batch import Completion, DecodeBatch, Row
from llmctl.model.decode_dtype import compute_dtype, convert_for_decoding, dtype_name, resolve_decode_dtype
from llmctl.model.transformer import Transformer
from llmctl.tokenizer import LoadedTokenizer

__all__ = ["Chunk", "Completion", "Engine", "Generation", "GenerationStats", "Prompt", "in_row_order"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Prompt:
    """A prompt as the model sees it: `dropped_tokens` were cut from its start to fit the window."""

    index: int
    ids: list[int]
    dropped_tokens: int = 0


@dataclass
class Chunk:
    """New text for one row (row = prompt_index * num_samples + sample_index); the row's last
    chunk carries its Completion."""

    row: int
    text: str
    completion: Completion | None = None


@dataclass
class GenerationStats:
    """Counts and compute time; time the consumer spends between chunks is not counted.

    `step_seconds[i]` is what the i-th new token of the batch cost: the prefill and the first draw
    for i = 0, then one forward and one draw each (flat with the KV cache, growing without it).
    """

    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_seconds: float = 0.0
    step_seconds: list[float] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return sum(self.step_seconds)

    @property
    def decode_seconds(self) -> float:
        return self.seconds - self.prefill_seconds

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.seconds if self.seconds else 0.0


@dataclass
class Generation:
    """A running generation: iterate for chunks; `prompts` is known before the first one."""

    prompts: list[Prompt]
    num_samples: int
    stats: GenerationStats
    chunks: Iterator[Chunk]
    completed: list[Completion] = field(default_factory=list)

    def __iter__(self) -> Iterator[Chunk]:
        for chunk in self.chunks:
            if chunk.completion is not None:
                self.completed.append(chunk.completion)
            yield chunk

    def completions(self) -> list[Completion]:
        """Run to the end; completions in row order (prompt by prompt, then sample by sample)."""
        for _ in self:
            pass
        return sorted(self.completed, key=lambda c: (c.prompt_index, c.sample_index))

    def close(self) -> None:
        """Stop generating (the rows still running are abandoned)."""
        self.chunks.close()


def in_row_order(chunks: Iterable[Chunk]) -> Iterator[Chunk]:
    """A batched generation's chunks regrouped so rows come whole, one after another: row 0
    streams live, and each later row is held until every row before it has finished."""
    held: dict[int, deque[Chunk]] = defaultdict(deque)
    current = 0
    for chunk in chunks:
        held[chunk.row].append(chunk)
        while held[current]:
            chunk = held[current].popleft()
            yield chunk
            if chunk.completion is not None:
                del held[current]
                current += 1


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The floating-point dtype for `name` on `device` (auto: bf16 on a GPU that has it, fp16 on
    older ones, fp32 on CPU); int8 models compute in what `compute_dtype` says."""
    if name == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if name == "int8":
        return compute_dtype("int8", device)
    if name not in DTYPES:
        raise UsageError(f"unknown dtype '{name}' (--dtype): use auto, fp32, bf16, fp16 or int8")
    return DTYPES[name]


class Engine:
    """Generates with one model and its tokenizer.

    stop_token_ids end a sample without appearing in its text; the default is the tokenizer's
    end-of-text token. `device` and `dtype` move and convert the model once, here: a torch dtype
    casts it, a decode dtype name (`fp32`, `bf16`, `int8`, `auto`) converts it as
    llmctl.model.decode_dtype does (int8: weight-only linear layers).
    """

    def __init__(
        self,
        model: Transformer,
        tokenizer: LoadedTokenizer,
        *,
        stop_token_ids: Iterable[int] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
    ):
        if isinstance(dtype, str):
            target = torch.device(device) if device is not None else model.embed_tokens.weight.device
            self.model = convert_for_decoding(model, resolve_decode_dtype(dtype, target), target)
        else:
            self.model = model.to(device=device, dtype=dtype).eval()
        self.tokenizer = tokenizer
        self.stop_token_ids = set(stop_token_ids) if stop_token_ids is not None else {tokenizer.eot_id}
        self.dtype = dtype_name(self.model)

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def context_length(self) -> int:
        return self.model.cfg.context_length

    def prepare(self, prompts: Sequence[str | Sequence[int]], max_new_tokens: int) -> list[Prompt]:
        """Token ids for each prompt, cut to fit the context window.

        A prompt that fills the window keeps its end, leaving room for min(max_new_tokens,
        context / 2) new tokens. A text prompt opens with BOS where the tokenizer prepends one
        (Llama-family); an empty one starts from the end-of-text token, the boundary every
        training document follows.
        """
        prepared = []
        room = min(max_new_tokens, self.context_length // 2)
        for index, prompt in enumerate(prompts):
            ids = self.tokenizer.encode_prompt(prompt) if isinstance(prompt, str) else [*map(int, prompt)]
            ids = ids or [self.tokenizer.eot_id]
            dropped = 0
            if len(ids) >= self.context_length:
                keep = self.context_length - room
                dropped, ids = len(ids) - keep, ids[-keep:]
            prepared.append(Prompt(index, ids, dropped))
        return prepared

    def stream(
        self,
        prompts: Sequence[str | Sequence[int]],
        config: GenerationConfig | None = None,
        *,
        num_samples: int = 1,
        stop_token_ids: Iterable[int] | None = None,
        use_cache: bool = True,
    ) -> Generation:
        """Start generating; iterate the result for chunks of text as they become final.

        use_cache=False recomputes the whole sequence for every token: the reference the cache is
        tested and benchmarked against, never faster.
        """
        config = config or GenerationConfig()
        if num_samples < 1:
            raise UsageError(f"the number of samples must be at least 1, got {num_samples}")
        if not prompts:
            raise UsageError("no prompt to generate from")
        prepared = self.prepare(prompts, config.max_new_tokens)
        stats = GenerationStats(prompt_tokens=sum(len(p.ids) for p in prepared))
        stops = self.stop_token_ids if stop_token_ids is None else set(stop_token_ids)
        chunks = self._decode(prepared, config, num_samples, stops, use_cache, stats)
        return Generation(prepared, num_samples, stats, chunks)

    def generate(
        self,
        prompts: Sequence[str | Sequence[int]],
        config: GenerationConfig | None = None,
        *,
        num_samples: int = 1,
        stop_token_ids: Iterable[int] | None = None,
        use_cache: bool = True,
    ) -> list[Completion]:
        """Every completion, prompt by prompt and sample by sample."""
        return self.stream(
            prompts, config, num_samples=num_samples, stop_token_ids=stop_token_ids, use_cache=use_cache
        ).completions()

    # ------------------------------------------------------------ the decoding loop

    def rows(
        self,
        prompts: list[Prompt],
        config: GenerationConfig,
        num_samples: int,
        stop_token_ids: set[int],
        owner: object = None,
    ) -> list[Row]:
        """One Row per sample of each prompt, in row order (prompt by prompt, then sample)."""
        return [
            Row(
                prompt.index * num_samples + sample,
                prompt.ids,
                config,
                self.tokenizer,
                self.context_length,
                stop_token_ids,
                prompt_index=prompt.index,
                sample=sample,
                dropped_prompt_tokens=prompt.dropped_tokens,
                owner=owner,
                prefill_key=(id(owner), prompt.index),
            )
            for prompt in prompts
            for sample in range(num_samples)
        ]

    def _decode(
        self,
        prompts: list[Prompt],
        config: GenerationConfig,
        num_samples: int,
        stop_token_ids: set[int],
        use_cache: bool,
        stats: GenerationStats,
    ) -> Iterator[Chunk]:
        batch = DecodeBatch(self.model, use_cache)
        started = time.perf_counter()
        batch.join(self.rows(prompts, config, num_samples, stop_token_ids))
        stats.prefill_seconds = time.perf_counter() - started
        while True:
            stats.generated_tokens += len(batch)  # one token drawn for every row
            said = batch.draw()
            stats.step_seconds.append(time.perf_counter() - started)
            for row, text, completion in said:
                yield Chunk(row.index, text, completion)
            if not batch:
                return
            started = time.perf_counter()
            batch.advance()
