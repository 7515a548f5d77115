"""Preference pairs: records normalised to one schema, read from a corpus or a file, and rendered
to the tokens DPO scores.

Every pair in a preference corpus's train.jsonl/val.jsonl is

    {"messages": [...the prompt: system?, user, assistant, ..., user],
     "chosen": str, "rejected": str, "text": ..., "format": "preference", "source": ...}

from any of the shapes people have:

    prompt / chosen / rejected strings (optional system)            the plain shape
    prompt messages, chosen / rejected one-message lists            TRL's conversational shape
    chosen / rejected conversations sharing a prefix (prompt ignored) UltraFeedback binarized
    chosen / rejected "\\n\\nHuman: ... \\n\\nAssistant: ..." strings  HH-RLHF

the prompt being the messages both sides share. A pair whose sides are identical, or empty, is
dropped and counted. Each side renders exactly as finetune renders an example (llmctl.data.sft):
the prompt's tokens carry no loss, the reply's are scored.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmctl.data import IGNORE_INDEX, sft
from llmctl.data.clean import normalize_text
from llmctl.data.sources import Skip
from llmctl.data.store import CorpusStore
from llmctl.errors import UsageError
from llmctl.tokenizer import LoadedTokenizer
from llmctl.workspace import Workspace

FORMAT = "preference"
KIND = "preference"  # a corpus of pairs, as against 'text' and 'instruct'
NEEDED = "'chosen' and 'rejected' (with 'prompt', unless they are conversations that share it)"
_HH_TURN = re.compile(r"\n\n(Human|Assistant): ")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}
Messages = list[dict[str, str]]


# ---------------------------------------------------------------- records


def missing_fields(record: Mapping[str, Any], where: str) -> UsageError | None:
    """The error for a record without the fields of a pair, naming those found and those needed."""
    if "chosen" in record and "rejected" in record:
        return None
    found = ", ".join(map(str, record)) or "none"
    return UsageError(f"{where} has no preference fields (fields found: {found}); a pair needs {NEEDED}")


def normalize(record: Mapping[str, Any]) -> dict[str, Any] | Skip:
    """One raw record -> the corpus schema above, or a Skip naming why it was dropped."""
    chosen, rejected = _conversation(record, "chosen"), _conversation(record, "rejected")
    if chosen is None or rejected is None:
        return Skip("malformed")
    shared = 0
    while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
        shared += 1
    prompt = chosen[:shared] or _prompt(record)
    if prompt is None:
        return Skip("malformed")
    chosen_tail, rejected_tail = chosen[shared:], rejected[shared:]
    if len(chosen_tail) != 1 or len(rejected_tail) != 1:
        return Skip("malformed")  # the sides differ in more than their last reply
    if any(tail[0]["role"] != "assistant" for tail in (chosen_tail, rejected_tail)):
        return Skip("malformed")
    system = _text(record.get("system"))
    if system and not any(m["role"] == "system" for m in prompt):
        prompt = [{"role": "system", "content": system}, *prompt]
    chosen_text, rejected_text = chosen_tail[0]["content"], rejected_tail[0]["content"]
    if not chosen_text or not rejected_text or not any(m["content"] for m in prompt if m["role"] == "user"):
        return Skip("empty")
    if chosen_text == rejected_text:
        return Skip("identical")
    if prompt[-1]["role"] != "user":
        return Skip("malformed")
    pair = {"messages": prompt, "chosen": chosen_text, "rejected": rejected_text, "format": FORMAT}
    pair["text"] = render_text(pair)
    return pair


def render_text(pair: Mapping[str, Any]) -> str:
    """A plain rendering for tokenizers and deduplication: the prompt, then both replies."""
    turns = [f"{m['role'].capitalize()}:\n{m['content']}" for m in pair["messages"]]
    return "\n\n".join([*turns, f"Chosen:\n{pair['chosen']}", f"Rejected:\n{pair['rejected']}"])


def _text(value: Any) -> str:
    return normalize_text(value).strip() if isinstance(value, str) else ""


def _messages(turns: Any) -> Messages | None:
    if not isinstance(turns, list):
        return None
    messages = []
    for turn in turns:
        if not isinstance(turn, Mapping):
            return None
        role = {"human": "user", "gpt": "assistant"}.get(str(turn.get("role", turn.get("from", ""))).lower())
        role = role or str(turn.get("role", turn.get("from", ""))).lower()
        if role not in ("system", "user", "assistant"):
            return None
        messages.append({"role": role, "content": _text(turn.get("content", turn.get("value")))})
    return messages


def _conversation(record: Mapping[str, Any], side: str) -> Messages | None:
    """One side as messages: a list as given, an HH-RLHF transcript split into turns, or a reply."""
    value = record.get(side)
    if isinstance(value, list):
        return _messages(value)
    if not isinstance(value, str):
        return None
    if "prompt" not in record and _HH_TURN.search(value):
        parts = _HH_TURN.split(value)
        return [
            {"role": _HH_ROLES[role], "content": _text(content)}
            for role, content in zip(parts[1::2], parts[2::2], strict=True)
        ]
    return [{"role": "assistant", "content": _text(value)}]


def _prompt(record: Mapping[str, Any]) -> Messages | None:
    prompt = record.get("prompt")
    if isinstance(prompt, list):
        return _messages(prompt)
    if isinstance(prompt, str):
        return [{"role": "user", "content": _text(prompt)}]
    return None


# ---------------------------------------------------------------- where pairs come from


@dataclass
class PairSource:
    """Pairs from a built preference corpus (train and val splits) or one file (val held out)."""

    name: str
    train: list[dict[str, Any]]
    val: list[dict[str, Any]]
    val_note: str
    corpus: str | None = None  # the registered corpus; None for a file
    dropped: dict[str, int] | None = None  # a file's pairs dropped while reading, by reason


def open_pairs(workspace: Workspace, data: str) -> PairSource:
    path = Path(data).expanduser()
    if path.is_file() or path.suffix in sft.DATA_SUFFIXES:
        if not path.is_file():
            raise UsageError(f"data file '{data}' does not exist")
        records = sft.read_records(path)
        error = missing_fields(records[0], f"data file '{data}'")
        if error is not None:
            raise error
        pairs, dropped = [], {}
        for record in records:
            pair = normalize(record)
            if isinstance(pair, Skip):
                dropped[pair.reason] = dropped.get(pair.reason, 0) + 1
            else:
                pairs.append(pair)
        if not pairs:
            raise UsageError(f"data file '{data}' has no usable pair ({_counts(dropped)} dropped)")
        train, val, note = sft.hold_out(pairs, noun="pairs")
        return PairSource(data, train, val, note, dropped=dropped)
    store = CorpusStore.open(workspace, data)
    if store.meta.get("kind") != KIND:
        raise UsageError(
            f"corpus '{data}' holds {store.meta.get('kind')} data; dpo needs preference pairs "
            f"(llmctl corpus build NAME --source FILE --format preference) or a .jsonl file"
        )
    return PairSource(
        data, list(store.records("train")), list(store.records("val")), "the corpus's val split", corpus=data
    )


def _counts(dropped: Mapping[str, int]) -> str:
    return ", ".join(f"{count} {reason}" for reason, count in sorted(dropped.items())) or "none"


# ---------------------------------------------------------------- pairs as tokens


@dataclass
class Pair:
    """One pair rendered: both sides share the prompt's tokens; `index` finds its reference scores."""

    chosen: sft.Example
    rejected: sft.Example
    index: int

    @property
    def truncated(self) -> bool:
        return self.chosen.truncated or self.rejected.truncated


@dataclass
class EncodedPairs:
    pairs: list[Pair]
    dropped: int = 0  # pairs a side of which kept no reply token within the context
    truncated: int = 0


def encode_pairs(
    records: Sequence[Mapping[str, Any]],
    tokenizer: LoadedTokenizer,
    style: str,
    context_length: int,
    what: str,
    first_index: int = 0,
) -> EncodedPairs:
    """Render and encode every pair as finetune renders an example. A long side is cut at the
    same length as the other (context_length + 1 tokens, inputs and labels being the same tokens
    shifted), which keeps the shared prompt whole on both; a pair one side of which then keeps no
    reply token is dropped."""
    encoded = EncodedPairs([])
    for number, record in enumerate(records, 1):
        prompt = record.get("messages")
        if not isinstance(prompt, list) or not {"chosen", "rejected"} <= set(record):
            raise missing_fields(record, f"{what} record {number}") or UsageError(
                f"{what} record {number} has no prompt messages; rebuild it with --format preference"
            )
        sides = [
            sft.encode_example(
                [*prompt, {"role": "assistant", "content": record[side]}],
                tokenizer,
                style,
                context_length + 1,
            )
            for side in ("chosen", "rejected")
        ]
        if any(side.n_trained == 0 for side in sides):
            encoded.dropped += 1
            continue
        pair = Pair(*sides, index=first_index + len(encoded.pairs))
        encoded.truncated += pair.truncated
        encoded.pairs.append(pair)
    return encoded


def collate_pairs(
    pairs: Sequence[Pair],
    context_length: int,
    pad_id: int,
    device: torch.device,
    reference: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Chosen sides then rejected sides as one batch of 2B rows padded to context_length (one
    forward scores both); labels are the reply tokens, -100 elsewhere. With precomputed reference
    log-probabilities, `ref_chosen` and `ref_rejected` come along, looked up by pair index."""
    examples = [pair.chosen for pair in pairs] + [pair.rejected for pair in pairs]
    shape = (len(examples), context_length)
    input_ids = np.full(shape, pad_id, dtype=np.int64)
    labels = np.full(shape, IGNORE_INDEX, dtype=np.int64)
    for i, example in enumerate(examples):
        ids = example.ids
        input_ids[i, : len(ids) - 1] = ids[:-1]
        labels[i, : len(ids) - 1] = [
            token if trained else IGNORE_INDEX
            for token, trained in zip(ids[1:], example.trained[1:], strict=True)
        ]
    batch = {"input_ids": torch.from_numpy(input_ids), "labels": torch.from_numpy(labels)}
    if reference is not None:
        index = torch.tensor([pair.index for pair in pairs])
        batch["ref_chosen"], batch["ref_rejected"] = reference["chosen"][index], reference["rejected"][index]
    return {name: tensor.to(device) for name, tensor in batch.items()}
