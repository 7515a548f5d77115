"""One decoding step's logits [rows, vocab] -> the next token of each row.

Order, as in Hugging Face's and vLLM's samplers: penalties, then greedy (temperature 0) or
temperature, top-k, top-p, min-p and a draw from a seeded `torch.Generator`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from llmctl.config import GenerationConfig


class Penalties:
    """What the penalties need to remember about each row.

    The repetition penalty (CTRL, as Hugging Face applies it) looks at every token the row holds,
    prompt included; presence and frequency penalties (OpenAI's definitions) count generated
    tokens only, so a long prompt does not push the model off its own subject.
    """

    def __init__(
        self,
        config: GenerationConfig,
        prompts: Sequence[Sequence[int]],
        vocab_size: int,
        device: torch.device,
    ):
        self.repetition = config.repetition_penalty
        self.presence = config.presence_penalty
        self.frequency = config.frequency_penalty
        rows = len(prompts)
        self.seen = self.counts = None
        if self.repetition != 1.0:
            self.seen = torch.zeros(rows, vocab_size, dtype=torch.bool, device=device)
            for row, ids in enumerate(prompts):
                self.seen[row, torch.tensor(list(ids), dtype=torch.long, device=device)] = True
        if self.presence or self.frequency:
            self.counts = torch.zeros(rows, vocab_size, dtype=torch.float32, device=device)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if self.seen is not None:
            shrunk = torch.where(logits > 0, logits / self.repetition, logits * self.repetition)
            logits = torch.where(self.seen, shrunk, logits)
        if self.counts is not None:
            logits = logits - self.frequency * self.counts - self.presence * (self.counts > 0).float()
        return logits

    def record(self, tokens: torch.Tensor) -> None:
        rows = torch.arange(tokens.shape[0], device=tokens.device)
        if self.seen is not None:
            self.seen[rows, tokens] = True
        if self.counts is not None:
            self.counts[rows, tokens] += 1

    def keep(self, rows: torch.Tensor) -> None:
        if self.seen is not None:
            self.seen = self.seen[rows]
        if self.counts is not None:
            self.counts = self.counts[rows]


def filter_logits(logits: torch.Tensor, top_k: int | None, top_p: float, min_p: float) -> torch.Tensor:
    """Set to -inf every token outside the top k, outside the smallest set holding top_p of the
    probability, or below min_p times the likeliest token's probability. One token always stays."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth_best = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth_best, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(dim=-1)
        # drop a token when the tokens ranked above it already hold top_p; the first never is
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        drop_sorted = mass_before >= top_p
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    if min_p > 0.0:
        probs = logits.softmax(dim=-1)
        logits = logits.masked_fill(probs < min_p * probs.max(dim=-1, keepdim=True).values, float("-inf"))
    return logits


def choose_tokens(logits: torch.Tensor, config: GenerationConfig, generator: torch.Generator) -> torch.Tensor:
    """[rows] next token ids from fp32 logits that penalties were already applied to."""
    if config.temperature == 0:
        return logits.argmax(dim=-1)
    logits = filter_logits(logits / config.temperature, config.top_k, config.top_p, config.min_p)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


def make_generator(seed: int | None, device: torch.device) -> torch.Generator:
    """A generator of its own, so sampling neither reads nor disturbs the global RNG."""
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator
