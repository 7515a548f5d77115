"""Sequences decoded together, each in a KV-cache slot of its own: the engine's decoding loop.

Every sequence (a "row": one sample of one prompt) owns one slot of a preallocated cache and sits
at its own position in it, so rows may join and leave between any two decoding steps (continuous
batching): a joining row is prefilled alone into a free slot, a finished one leaves and the last
row moves into its slot, and one forward advances every row by one token. The samples of one
prompt share their prefill (its keys and values are copied into each sample's slot).

Each row samples with its own settings and its own seeded generator, so a row's tokens do not
depend on what else is in the batch: greedy rows give what they give alone, and a seeded row
repeats its samples whatever runs beside it.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from llmctl.config import GenerationConfig
from llmctl.generate.sampling import Penalties, choose_tokens, make_generator
from llmctl.generate.text import IncrementalDecoder, StopMatcher
from llmctl.model.transformer import KVCache, Transformer
from llmctl.tokenizer import LoadedTokenizer

FinishReason = Literal["stop", "length", "context"]
LENGTH_STEP = 256  # cache positions are allocated in steps of this many


def sample_seed(seed: int | None, sample: int) -> int | None:
    """Sample j of a prompt draws from a generator seeded with seed + j (wrapping past 2^64 - 1, the
    largest seed torch takes), whatever else is in the batch."""
    if seed is None:
        return None
    seed += sample
    return seed - 2**64 if seed >= 2**64 else seed


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


class Row:
    """One sample of one prompt: its sampling, its text so far and when it ends.

    `index` numbers it within its generation (prompt_index * num_samples + sample); `owner` is
    whatever the caller needs to route its output; rows with equal `prefill_key` hold the same
    prompt and share one prefill when they join together.
    """

    def __init__(
        self,
        index: int,
        prompt_ids: list[int],
        config: GenerationConfig,
        tokenizer: LoadedTokenizer,
        context_length: int,
        stop_token_ids: set[int],
        *,
        prompt_index: int = 0,
        sample: int = 0,
        dropped_prompt_tokens: int = 0,
        owner: Any = None,
        prefill_key: Hashable | None = None,
    ):
        self.index = index
        self.prompt_ids = prompt_ids
        self.config = config
        self.prompt_index = prompt_index
        self.sample = sample
        self.dropped_prompt_tokens = dropped_prompt_tokens
        self.owner = owner
        self.prefill_key = prefill_key if prefill_key is not None else id(self)
        self.budget = min(config.max_new_tokens, context_length - len(prompt_ids))
        self.tokenizer = tokenizer
        self.stop_token_ids = stop_token_ids
        self.decoder = IncrementalDecoder(tokenizer, prompt_ids)
        self.matcher = StopMatcher(config.stop)
        self.token_ids: list[int] = []
        self.text: list[str] = []
        self.greedy = config.temperature == 0 and not _penalised(config)
        self.generator: torch.Generator | None = None
        self.penalties: Penalties | None = None

    def start_sampling(self, vocab_size: int, device: torch.device) -> None:
        if not self.greedy:
            self.generator = make_generator(sample_seed(self.config.seed, self.sample), device)
            self.penalties = Penalties(self.config, [self.prompt_ids], vocab_size, device)

    @property
    def length(self) -> int:
        """Positions this row needs in the cache (its last token is never fed back)."""
        return len(self.prompt_ids) + max(self.budget, 1) - 1

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
        return released, self._finish("length" if self.budget == self.config.max_new_tokens else "context")

    def _release_rest(self) -> str:
        released = self.matcher.feed(self.decoder.flush()) + self.matcher.flush()
        self.text.append(released)
        return released

    def _finish(self, reason: FinishReason, stop: str | None = None) -> Completion:
        return Completion(
            prompt_index=self.prompt_index,
            sample_index=self.sample,
            text="".join(self.text),
            token_ids=self.token_ids,
            prompt_tokens=len(self.prompt_ids),
            dropped_prompt_tokens=self.dropped_prompt_tokens,
            finish_reason=reason,
            stop=stop,
        )


def _penalised(config: GenerationConfig) -> bool:
    return config.repetition_penalty != 1.0 or bool(config.presence_penalty) or bool(config.frequency_penalty)


class SlotCache:
    """Keys and values for up to `rows` sequences of up to `length` positions, grown on demand
    (rows doubled, positions in steps of LENGTH_STEP, at most the context window)."""

    def __init__(self, model: Transformer):
        self.model = model
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.rows = self.length = 0

    def reserve(self, rows: int, length: int, used: int, used_length: int) -> None:
        """Room for `rows` rows of `length` positions, keeping the first `used` rows' first
        `used_length` positions."""
        if rows <= self.rows and length <= self.length:
            return
        context = self.model.cfg.context_length
        new_rows = max(rows, min(2 * self.rows, rows + 16)) if rows > self.rows else self.rows
        new_length = self.length
        if length > self.length:
            new_length = min(max(context, length), -(-length // LENGTH_STEP) * LENGTH_STEP)
        grown = self.model.new_kv_cache(new_rows, new_length)
        if self.keys:  # nothing to keep before the first rows
            for old, new in zip(self.keys + self.values, grown.keys + grown.values, strict=True):
                new[:used, :, :used_length] = old[:used, :, :used_length]
        self.keys, self.values = grown.keys, grown.values
        self.rows, self.length = new_rows, new_length

    def view(self, first: int, stop: int) -> KVCache:
        return KVCache(keys=[k[first:stop] for k in self.keys], values=[v[first:stop] for v in self.values])

    def copy(self, source: int, target: int, length: int) -> None:
        for tensor in self.keys + self.values:
            tensor[target, :, :length] = tensor[source, :, :length]


class DecodeBatch:
    """The rows decoding now, in slots 0..n-1, each holding the logits of its next token.

    `join` prefills rows into free slots, `draw` samples one token for every row (rows that end
    leave), `advance` runs the forward that gives every remaining row its next logits. Rows can
    also be dropped at any time between steps (`drop`), a cancelled request's for instance.
    """

    def __init__(self, model: Transformer, use_cache: bool = True):
        self.model = model
        self.use_cache = use_cache
        self.device = model.embed_tokens.weight.device
        self.vocab_size = model.cfg.vocab_size
        self.rows: list[Row] = []
        self.positions: list[int] = []  # tokens each row holds in the cache
        self.logits: torch.Tensor | None = None  # [rows, vocab], fp32
        self.cache = SlotCache(model) if use_cache else None
        self._tokens: list[int] = []  # the last token drawn for each row, fed by `advance`

    def __len__(self) -> int:
        return len(self.rows)

    # ------------------------------------------------------------ joining

    @torch.inference_mode()
    def join(self, rows: Sequence[Row]) -> None:
        """Prefill `rows` (one forward per distinct prompt) and give each its first logits."""
        if not rows:
            return
        first = len(self.rows)
        if self.cache is not None:
            longest = max([*self.positions, *(row.length for row in rows)])
            used = max(self.positions, default=0)
            self.cache.reserve(first + len(rows), longest, first, used)
        shared: dict[Hashable, tuple[int, torch.Tensor]] = {}
        new_logits = []
        for slot, row in enumerate(rows, start=first):
            row.start_sampling(self.vocab_size, self.device)
            if row.prefill_key in shared:
                source, logits = shared[row.prefill_key]
                if self.cache is not None:
                    self.cache.copy(source, slot, len(row.prompt_ids))
            else:
                logits = self._prefill(row.prompt_ids, slot)
                shared[row.prefill_key] = (slot, logits)
            new_logits.append(logits)
            self.rows.append(row)
            self.positions.append(len(row.prompt_ids))
        stacked = torch.stack(new_logits)
        self.logits = stacked if self.logits is None else torch.cat([self.logits, stacked])
        self._tokens += [0] * len(rows)

    def _prefill(self, ids: list[int], slot: int) -> torch.Tensor:
        tokens = torch.tensor([ids], device=self.device)
        cache = self.cache.view(slot, slot + 1) if self.cache is not None else None
        hidden = self.model.hidden_states(tokens, kv_cache=cache, cache_position=0)
        return self.model.logits(hidden[0, -1]).float()

    # ------------------------------------------------------------ one step

    @torch.inference_mode()
    def draw(self) -> list[tuple[Row, str, Completion | None]]:
        """Sample every row's next token: (row, text made final, its Completion if it ended) for
        each row with something to say. Finished rows leave the batch."""
        if not self.rows:
            return []
        tokens = self._choose()
        said, ended = [], []
        for slot, (row, token) in enumerate(zip(self.rows, tokens, strict=True)):
            text, completion = row.add(token)
            if text or completion is not None:
                said.append((row, text, completion))
            if completion is not None:
                ended.append(slot)
        self._tokens = tokens
        self._remove(ended)
        return said

    def _choose(self) -> list[int]:
        logits = self.logits
        if all(row.greedy for row in self.rows):
            return logits.argmax(dim=-1).tolist()
        tokens = logits.argmax(dim=-1).tolist()
        for slot, row in enumerate(self.rows):
            if not row.greedy:
                row_logits = row.penalties.apply(logits[slot : slot + 1])
                token = choose_tokens(row_logits, row.config, row.generator)
                row.penalties.record(token)
                tokens[slot] = int(token)
        return tokens

    @torch.inference_mode()
    def advance(self) -> None:
        """One forward: each row's last drawn token in, its next logits out."""
        if not self.rows:
            return
        if self.cache is None:
            self.logits = torch.stack([self._recompute(row) for row in self.rows])
            return
        rows = len(self.rows)
        tokens = torch.tensor(self._tokens, device=self.device)[:, None]
        if len(set(self.positions)) == 1:
            # every row at one position (one row alone, say): the cache's plain, unmasked path
            position: int | torch.Tensor = self.positions[0]
        else:
            position = torch.tensor(self.positions, device=self.device)
        hidden = self.model.hidden_states(tokens, kv_cache=self.cache.view(0, rows), cache_position=position)
        self.logits = self.model.logits(hidden[:, -1]).float()
        self.positions = [p + 1 for p in self.positions]

    def _recompute(self, row: Row) -> torch.Tensor:
        """Without a cache: the whole sequence again (the reference the cache is tested against)."""
        tokens = torch.tensor([[*row.prompt_ids, *row.token_ids]], device=self.device)
        return self.model.logits(self.model.hidden_states(tokens)[0, -1]).float()

    # ------------------------------------------------------------ leaving

    def drop(self, rows: Iterable[Row]) -> None:
        """Take `rows` out of the batch (a cancelled request's): their slots are free at once."""
        leaving = {id(row) for row in rows}
        self._remove([slot for slot, row in enumerate(self.rows) if id(row) in leaving])

    def _remove(self, slots: list[int]) -> None:
        """Free `slots`: the last rows move into the holes, so the rows stay in slots 0..n-1 and
        only the moved rows' keys and values are copied."""
        if not slots:
            return
        removed = set(slots)
        remaining = len(self.rows) - len(removed)
        holes = [slot for slot in range(remaining) if slot in removed]
        movers = [slot for slot in range(remaining, len(self.rows)) if slot not in removed]
        order = list(range(remaining))
        for hole, mover in zip(holes, movers, strict=True):
            order[hole] = mover
            if self.cache is not None:
                self.cache.copy(mover, hole, self.positions[mover])
        self.rows = [self.rows[slot] for slot in order]
        self.positions = [self.positions[slot] for slot in order]
        self._tokens = [self._tokens[slot] for slot in order]
        self.logits = self.logits[order] if remaining else None
