"""A DPO run's pairs: both splits rendered to tokens, the reference's precomputed scores of them,
and the trainer's batch source over them.

Training pairs are numbered 0..n-1 and validation pairs n..n+m-1, so one table of reference
log-probabilities (`--precompute-reference`) serves both splits.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from llmctl.config import RunConfig
from llmctl.data import preference, sft
from llmctl.data.preference import Pair, PairSource
from llmctl.errors import LlmctlError, UsageError
from llmctl.tokenizer import LoadedTokenizer
from llmctl.train.batches import Batch
from llmctl.train.precision import Precision
from llmctl.workspace import REFERENCE_LOGPS

ScoreFn = Callable[[Batch], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class EncodedPreference:
    train: list[Pair]
    val: list[Pair]
    notes: list[str]

    @property
    def pairs(self) -> list[Pair]:
        """Every pair once, in index order (validation may be the training pairs themselves)."""
        return self.train + [pair for pair in self.val if pair.index >= len(self.train)]

    def fingerprint(self) -> str:
        """What the reference scored: every pair's tokens and trained masks, in index order."""
        digest = hashlib.sha256()
        for pair in self.pairs:
            for side in (pair.chosen, pair.rejected):
                digest.update(repr((side.ids, side.trained)).encode())
        return digest.hexdigest()


def encode_preference(config: RunConfig, tokenizer: LoadedTokenizer, source: PairSource) -> EncodedPreference:
    """Render and encode both splits; fails, naming the fix, when no pair is left to train on."""
    context, style = config.sequence_length, config.data.prompt_style
    where = f"data '{source.name}'"
    train = preference.encode_pairs(source.train, tokenizer, style, context, where)
    if not train.pairs:
        raise UsageError(
            f"no pair of {where} fits: every reply starts beyond the maximum length of {context} tokens "
            f"with --prompt-style {style}; raise --max-length (at most the base's context of "
            f"{config.model.context_length}) or use shorter prompts"
        )
    val = preference.encode_pairs(source.val, tokenizer, style, context, where, first_index=len(train.pairs))
    notes = []
    if source.dropped:
        counts = ", ".join(f"{count} {reason}" for reason, count in sorted(source.dropped.items()))
        notes.append(f"pairs dropped while reading the file: {counts}")
    if train.truncated:
        notes.append(f"{train.truncated} training pairs cut to {context} tokens (both sides alike)")
    if train.dropped:
        notes.append(f"{train.dropped} training pairs dropped: a reply starts beyond the context")
    return EncodedPreference(train.pairs, val.pairs or train.pairs, notes)


def make_batches(
    config: RunConfig,
    encoded: EncodedPreference,
    pad_id: int,
    device: torch.device,
    reference: dict[str, torch.Tensor] | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> sft.ShuffledBatches:
    """Shuffled epochs of pairs, exact to resume (finetune's batch source, one pair a row)."""
    collate = partial(
        preference.collate_pairs,
        context_length=config.sequence_length,
        pad_id=pad_id,
        device=device,
        reference=reference,
    )
    train = encoded.train
    return sft.ShuffledBatches(
        len(train),
        lambda order: [train[i] for i in order],
        collate,
        encoded.val,
        micro_batch_size=config.train.micro_batch_size,
        eval_batches=config.train.eval_batches,
        seed=config.train.seed,
        rank=rank,
        world_size=world_size,
    )


# ---------------------------------------------------------------- the precomputed reference


@torch.no_grad()
def score_pairs(
    score: ScoreFn,
    pairs: list[Pair],
    config: RunConfig,
    pad_id: int,
    device: torch.device,
    precision: Precision,
) -> dict[str, torch.Tensor]:
    """The reference's log-probabilities of every pair, indexed by pair: {'chosen', 'rejected'}."""
    chosen = torch.zeros(len(pairs), dtype=torch.float32)
    rejected = torch.zeros(len(pairs), dtype=torch.float32)
    size = config.train.micro_batch_size
    for start in range(0, len(pairs), size):
        group = pairs[start : start + size]
        batch = preference.collate_pairs(group, config.sequence_length, pad_id, device)
        with precision.autocast():
            group_chosen, group_rejected = score(batch)
        index = torch.tensor([pair.index for pair in group])
        chosen[index], rejected[index] = group_chosen.float().cpu(), group_rejected.float().cpu()
    return {"chosen": chosen, "rejected": rejected}


def load_or_score(
    run_dir: Path,
    encoded: EncodedPreference,
    compute: Callable[[], dict[str, torch.Tensor]],
    write: bool,
) -> dict[str, torch.Tensor]:
    """The run's stored reference scores, or `compute`d and stored (where `write`, rank 0) under a
    temporary name renamed into place. A resumed run finds them and scores nothing."""
    path = run_dir / REFERENCE_LOGPS
    fingerprint = encoded.fingerprint()
    if path.is_file():
        try:
            stored = load_file(str(path))
            with safe_open(str(path), framework="pt") as handle:
                scored = (handle.metadata() or {}).get("pairs_sha256")
        except (SafetensorError, OSError) as exc:
            raise LlmctlError(
                f"reference scores '{path}' are unreadable ({exc}); delete the file to score the pairs again"
            ) from exc
        if scored != fingerprint:
            raise LlmctlError(
                f"reference scores '{path}' were computed for other pairs than the run's; "
                "start the run over with --overwrite"
            )
        return stored
    scores = compute()
    if write:
        staged = path.with_name(f".{path.name}.tmp")
        save_file(scores, str(staged), metadata={"pairs_sha256": fingerprint})
        staged.replace(path)
    return scores
