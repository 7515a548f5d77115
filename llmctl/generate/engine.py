"""The generation engine: prompts in, completions out, streamed as they are decoded.

One call takes a batch of prompts of any lengths and any number of samples per prompt. Rows are
left-padded to a common width (`attn_mask` hides the padding, `position_ids` restart each row at
0), prefilled in one forward into a preallocated KV cache, then decoded one token per forward.
A row that finishes leaves the batch and the cache, so short answers stop costing compute.
"""

from __future__ import annotations

import time
from collections import defaultdict, deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from llmctl.config import GenerationConfig
from llmctl.errors import UsageError
from llmctl.generate.sampling import Penalties, choose_tokens, make_generator
from llmctl.generate.text import IncrementalDecoder, StopMatcher
from llmctl.model.transformer import KVCache, Transformer
from llmctl.tokenizer import LoadedTokenizer

FinishReason = Literal["stop", "length", "context"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Prompt:
    """A prompt as the model sees it: `dropped_tokens` were cut from its start to fit the window."""

    index: int
    ids: list[int]
    dropped_tokens: int = 0


@dataclass
class Completion:
    """One sample for one prompt.

    `token_ids` are the sampled tokens, without a stop token that ended the sample (so a stop
    string may sit inside their decoding while `text` ends before it). `finish_reason` is
    `stop` (a stop token or string: `stop` says which), `length` (max_new_tokens) or `context`
    (the context window is full).
    """

    prompt_index: int
    sample_index: int
    text: str
    token_ids: list[int]
    prompt_tokens: int
    dropped_prompt_tokens: int
    finish_reason: FinishReason
    stop: str | None = None


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
    """auto: bf16 on a GPU that has it (fp16 on older ones); fp32 on CPU, where small models decode
    fastest in fp32."""
    if name == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if name not in DTYPES:
        raise UsageError(f"unknown precision '{name}': use auto, fp32, bf16 or fp16")
    return DTYPES[name]


class Engine:
    """Generates with one model and its tokenizer.

    stop_token_ids end a sample without appearing in its text; the default is the tokenizer's
    end-of-text token. `device` and `dtype` move and cast the model once, here.
    """

    def __init__(
        self,
        model: Transformer,
        tokenizer: LoadedTokenizer,
        *,
        stop_token_ids: Iterable[int] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        self.model = model.to(device=device, dtype=dtype).eval()
        self.tokenizer = tokenizer
        self.stop_token_ids = set(stop_token_ids) if stop_token_ids is not None else {tokenizer.eot_id}

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

    def _decode(
        self,
        prompts: list[Prompt],
        config: GenerationConfig,
        num_samples: int,
        stop_token_ids: set[int],
        use_cache: bool,
        stats: GenerationStats,
    ) -> Iterator[Chunk]:
        rows = [
            _Row(prompt.index * num_samples + sample, prompt, sample, config, self, stop_token_ids)
            for prompt in prompts
            for sample in range(num_samples)
        ]
        row_prompts = [row.prompt.ids for row in rows]
        batch = _Batch(self.model, row_prompts, [row.budget for row in rows], use_cache)
        penalties = Penalties(config, row_prompts, self.model.cfg.vocab_size, self.device)
        generator = make_generator(config.seed, self.device)

        started = time.perf_counter()
        logits = batch.prefill()
        stats.prefill_seconds = time.perf_counter() - started
        while True:
            tokens = _sample(logits, penalties, config, generator).tolist()
            stats.generated_tokens += len(tokens)
            stats.step_seconds.append(time.perf_counter() - started)

            keep = []
            for slot, (row, token) in enumerate(zip(rows, tokens, strict=True)):
                text, completion = row.add(token)
                if text or completion is not None:
                    yield Chunk(row.index, text, completion)
                if completion is None:
                    keep.append(slot)
            if not keep:
                return

            started = time.perf_counter()
            if len(keep) < len(rows):
                rows = [rows[slot] for slot in keep]
                kept = torch.tensor(keep, device=self.device)
                penalties.keep(kept)
                batch.keep(kept, tokens=[tokens[slot] for slot in keep])
            else:
                batch.append(tokens)
            logits = batch.step()


@torch.inference_mode()
def _sample(
    logits: torch.Tensor, penalties: Penalties, config: GenerationConfig, generator: torch.Generator
) -> torch.Tensor:
    tokens = choose_tokens(penalties.apply(logits), config, generator)
    penalties.record(tokens)
    return tokens


class _Row:
    """One sample of one prompt: its text so far and when it ends."""

    def __init__(
        self,
        index: int,
        prompt: Prompt,
        sample: int,
        config: GenerationConfig,
        engine: Engine,
        stop_token_ids: set[int],
    ):
        self.index = index
        self.prompt = prompt
        self.sample = sample
        self.max_new_tokens = config.max_new_tokens
        self.budget = min(config.max_new_tokens, engine.context_length - len(prompt.ids))
        self.tokenizer = engine.tokenizer
        self.stop_token_ids = stop_token_ids
        self.decoder = IncrementalDecoder(engine.tokenizer, prompt.ids)
        self.matcher = StopMatcher(config.stop)
        self.token_ids: list[int] = []
        self.text: list[str] = []

    def add(self, token: int) -> tuple[str, Completion | None]:
        """Take the next sampled token: the text it makes final, and the Completion if it ends the row."""
        if token in self.stop_token_ids:
            released = self._release_rest()
            return released, self._finish("stop", self.matcher.matched or self.tokenizer.decode([token]))
        self.token_ids.append(token)
        released = self.matcher.feed(self.decoder.push(token))
        self.text.append(released)
        if self.matcher.matched is not None:
            return released, self._finish("stop", self.matcher.matched)
        if len(self.token_ids) < self.budget:
            return released, None
        released += self._release_rest()
        if self.matcher.matched is not None:
            return released, self._finish("stop", self.matcher.matched)
        return released, self._finish("length" if self.budget == self.max_new_tokens else "context")

    def _release_rest(self) -> str:
        released = self.matcher.feed(self.decoder.flush()) + self.matcher.flush()
        self.text.append(released)
        return released

    def _finish(self, reason: FinishReason, stop: str | None = None) -> Completion:
        return Completion(
            prompt_index=self.prompt.index,
            sample_index=self.sample,
            text="".join(self.text),
            token_ids=self.token_ids,
            prompt_tokens=len(self.prompt.ids),
            dropped_prompt_tokens=self.prompt.dropped_tokens,
            finish_reason=reason,
            stop=stop,
        )


class _Batch:
    """The token matrix, padding, positions and KV cache of the rows still running.

    Row r's prompt sits right-aligned in columns [width - len_r, width); generated tokens follow
    in columns width, width + 1, ... for every row alike.
    """

    def __init__(self, model: Transformer, prompts: list[list[int]], budgets: list[int], use_cache: bool):
        self.model = model
        device = model.embed_tokens.weight.device
        lengths = torch.tensor([len(ids) for ids in prompts], device=device)
        width = int(lengths.max())
        # the last sampled token is never fed back, hence the - 1
        columns = width + max(budgets) - 1
        self.tokens = torch.zeros(len(prompts), columns, dtype=torch.long, device=device)
        for row, ids in enumerate(prompts):
            self.tokens[row, width - len(ids) : width] = torch.tensor(ids, device=device)
        self.real = torch.arange(columns, device=device)[None] >= (width - lengths)[:, None]
        self.positions = (self.real.cumsum(dim=-1) - 1).clamp(min=0)
        self.padded = bool((lengths != width).any())
        self.end = width
        self.cache = model.new_kv_cache(len(prompts), columns) if use_cache else None

    def prefill(self) -> torch.Tensor:
        return self._forward(0)

    def append(self, tokens: list[int]) -> None:
        self.tokens[:, self.end] = torch.tensor(tokens, device=self.tokens.device)
        self.end += 1

    def keep(self, rows: torch.Tensor, tokens: list[int]) -> None:
        """Drop the finished rows, then append the next tokens of those left."""
        self.tokens, self.real, self.positions = self.tokens[rows], self.real[rows], self.positions[rows]
        self.padded = not bool(self.real[:, : self.end].all())
        if self.cache is not None:
            self.cache = KVCache(
                keys=[keys[rows] for keys in self.cache.keys],
                values=[values[rows] for values in self.cache.values],
            )
        self.append(tokens)

    def step(self) -> torch.Tensor:
        """Logits for the token just appended (with the cache, only that token is computed)."""
        return self._forward(self.end - 1 if self.cache is not None else 0)

    @torch.inference_mode()
    def _forward(self, start: int) -> torch.Tensor:
        """fp32 logits [rows, vocab] after the tokens in columns [start, end)."""
        mask = self.real[:, None, None, : self.end] if self.padded else None
        hidden = self.model.hidden_states(
            self.tokens[:, start : self.end],
            position_ids=self.positions[:, start : self.end],
            attn_mask=mask,
            kv_cache=self.cache,
            cache_position=start,
        )
        return self.model.logits(hidden[:, -1]).float()
