"""A finetune's examples: both splits rendered to tokens, the rows they pack into, the trainer's
batch source over them, and `--inspect`'s view of what the model is trained on.

SFT examples carry a mask of trained tokens (the replies); classification examples a label.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from llmctl.config import RunConfig
from llmctl.data import sft
from llmctl.errors import UsageError
from llmctl.model.classifier import TASK
from llmctl.tokenizer import LoadedTokenizer


@dataclass(frozen=True)
class EncodedData:
    """Both splits rendered to tokens: SFT Examples, or ClassExamples for classification."""

    train: list[Any]
    val: list[Any]
    train_rows: int
    notes: list[str]
    inspected: sft.EncodedSplit | None = None  # the SFT training split with its figures


def encode_data(
    config: RunConfig,
    tokenizer: LoadedTokenizer,
    data: sft.DataSource,
    task: str,
    labels: list[str] | None,
) -> EncodedData:
    """Render and encode the data at data.max_length tokens a row; fails, naming the fix, when
    nothing is left to train on."""
    context = config.sequence_length
    where = f"data '{data.name}'"
    if task == TASK:
        train, skipped = sft.encode_classification(data.train, tokenizer, labels, context)
        val, val_skipped = sft.encode_classification(data.val, tokenizer, labels, context)
        notes = [f"{skipped + val_skipped} examples skipped (no text, or a label not in training)"] * bool(
            skipped + val_skipped
        )
        return EncodedData(train, val, len(train), notes)
    style = config.data.prompt_style
    train = sft.encode_split(data.train, tokenizer, style, context, where)
    val = sft.encode_split(data.val, tokenizer, style, context, where)
    if not train.examples:
        raise UsageError(
            f"no example of {where} fits: every response starts beyond the maximum length of {context} "
            f"tokens with --prompt-style {style}; raise --max-length (at most the base's context of "
            f"{config.model.context_length}) or use shorter prompts"
        )
    notes = []
    if train.truncated:
        notes.append(f"{train.truncated} training examples cut to the maximum length of {context} tokens")
    if train.dropped:
        notes.append(
            f"{train.dropped} training examples dropped: their response starts beyond {context} tokens"
        )
    rows = _rows(config, train.examples, range(len(train.examples)))
    return EncodedData(train.examples, val.examples or train.examples, len(rows), notes, train)


def _rows(config: RunConfig, examples: list[sft.Example], order) -> list[sft.Row]:
    if config.data.packing:
        return sft.pack_rows(examples, order, config.sequence_length)
    return sft.single_rows(examples, order)


def make_batches(
    config: RunConfig,
    encoded: EncodedData,
    task: str,
    pad_id: int,
    device: torch.device,
    rank: int = 0,
    world_size: int = 1,
) -> sft.ShuffledBatches:
    """The trainer's batch source over the encoded data."""
    context = config.sequence_length
    common = {
        "micro_batch_size": config.train.micro_batch_size,
        "eval_batches": config.train.eval_batches,
        "seed": config.train.seed,
        "rank": rank,
        "world_size": world_size,
    }
    train = encoded.train
    if task == TASK:
        collate = partial(sft.collate_classification, context_length=context, pad_id=pad_id, device=device)
        return sft.ShuffledBatches(
            len(train), lambda order: [train[i] for i in order], collate, encoded.val, **common
        )
    collate = partial(
        sft.collate, context_length=context, pad_id=pad_id, packed=config.data.packing, device=device
    )
    eval_rows = _rows(config, encoded.val, range(len(encoded.val)))
    return sft.ShuffledBatches(len(train), partial(_rows, config, train), collate, eval_rows, **common)


# ---------------------------------------------------------------- --inspect


@dataclass
class InspectedExample:
    pieces: list[tuple[str, bool]]  # decoded runs of tokens, and whether they are trained
    tokens: int
    trained: int
    truncated: bool = False


def inspect_examples(
    config: RunConfig,
    encoded: EncodedData,
    tokenizer: LoadedTokenizer,
    labels: list[str] | None,
    count: int,
) -> tuple[list[InspectedExample], dict[str, Any]]:
    """The first `count` training examples as the model sees them, and figures over all of them."""
    if labels is not None:
        shown = [
            InspectedExample(
                [(tokenizer.decode(e.ids), False), (f"  → {labels[e.label]}", True)], len(e.ids), 0
            )
            for e in encoded.train[:count]
        ]
        return shown, {"examples": len(encoded.train), "labels": labels}
    shown = []
    for example in encoded.train[:count]:
        pieces: list[tuple[str, bool]] = []
        start = 0
        for end in range(1, len(example.ids) + 1):
            if end == len(example.ids) or example.trained[end] != example.trained[start]:
                pieces.append((tokenizer.decode(example.ids[start:end]), example.trained[start]))
                start = end
        shown.append(InspectedExample(pieces, len(example.ids), example.n_trained, example.truncated))
    split = encoded.inspected
    positions = split.tokens - len(split.examples)  # an example of n tokens fills n - 1 positions
    figures = {
        "examples": len(split.examples),
        "tokens": split.tokens,
        "trained_tokens": split.trained_tokens,
        "trained_fraction": round(split.trained_tokens / max(split.tokens, 1), 4),
        "truncated": split.truncated,
        "dropped": split.dropped,
        "rows": encoded.train_rows,
        "row_fill": round(positions / (encoded.train_rows * config.sequence_length), 4),
        "prompt_style": config.data.prompt_style,
    }
    return shown, figures
