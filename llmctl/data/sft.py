"""Supervised finetuning data: instruction records rendered to tokens with a mask of what is trained,
packed (or padded) into training rows; and labelled texts for classification.

An example is rendered as segments of text, each either prompt (no loss) or response (trained),
and every segment is encoded on its own, so the mask falls exactly on segment boundaries and a
prompt encodes as it will at inference time. The end token closes every example and is trained,
so the model learns to stop.

Packing puts several examples in one row with `doc_ids` saying which example each token belongs
to: the model then attends only within an example and restarts positions at each one. Labels are
shifted per example before packing, so no example is asked to predict the next one's first token.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmctl.data import IGNORE_INDEX, instruct
from llmctl.data.sources import Skip
from llmctl.data.store import CorpusStore
from llmctl.errors import UsageError
from llmctl.tokenizer import CHAT_ROLES, CHAT_SPECIAL_TOKENS, END_OF_TURN_TOKEN, LoadedTokenizer
from llmctl.workspace import Workspace

PROMPT_STYLES = ("chat", "alpaca", "problem-solution")
ALPACA_PREAMBLE = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request."
)
TEXT_FIELDS = ("input", "text", "sentence", "sms", "message", "content")
DATA_SUFFIXES = (".jsonl", ".json")
HOLDOUT_FRACTION = 0.05  # of a data file's examples kept for validation when it has no val split
MIN_HOLDOUT = 1

Messages = list[dict[str, str]]
Segments = list[tuple[str, bool]]  # (text, trained)


# ---------------------------------------------------------------- rendering


def check_prompt_style(tokenizer: LoadedTokenizer, style: str) -> None:
    """The chat style needs the tokenizer's chat special tokens; say how to do without them."""
    if style not in PROMPT_STYLES:
        raise UsageError(f"unknown prompt style '{style}'; use one of {', '.join(PROMPT_STYLES)}")
    if style == "chat" and tokenizer.chat_template is None:
        missing = [token for token in CHAT_SPECIAL_TOKENS if token not in tokenizer.special_ids]
        raise UsageError(
            f"tokenizer '{tokenizer.name}' lacks the chat template's special tokens ({', '.join(missing)}); "
            "use --prompt-style alpaca (plain-text headers), or a base trained with an llmctl tokenizer"
        )


def _turns(messages: Messages, style: str) -> Segments:
    if style == "chat":
        segments: Segments = []
        for message in messages:
            reply = message["role"] == "assistant"
            segments.append((f"<|{message['role']}|>\n", False))
            segments.append((f"{message['content']}{END_OF_TURN_TOKEN}\n", reply))
        return segments
    system = next((m["content"] for m in messages if m["role"] == "system"), "")
    if style == "alpaca":
        user_header, reply_header = "### Instruction:\n", "### Response:\n"
        preamble = system or ALPACA_PREAMBLE
    else:
        user_header, reply_header = "### Problem:\n", "### Solution:\n"
        preamble = system
    segments = [(f"{preamble}\n\n", False)] if preamble else []
    for message in messages:
        if message["role"] == "user":
            segments.append((f"{user_header}{message['content']}\n\n", False))
        elif message["role"] == "assistant":
            segments.append((reply_header, False))
            segments.append((message["content"], True))
            segments.append(("\n\n", False))
    return segments


def render_segments(messages: Messages, style: str) -> Segments:
    """The example as (text, trained) segments; the last reply ends the example (its end token follows)."""
    segments = _turns(messages, style)
    if style != "chat" and segments and segments[-1] == ("\n\n", False):
        segments.pop()  # nothing follows the last reply but the end token
    return segments


def render_prompt(messages: Messages, style: str) -> str:
    """The text a model finetuned with `style` continues: `messages` (ending with a user turn)
    rendered as in training, followed by the reply header."""
    text = "".join(segment for segment, _ in _turns(messages, style))
    return text + (
        "<|assistant|>\n"
        if style == "chat"
        else "### Response:\n"
        if style == "alpaca"
        else "### Solution:\n"
    )


@dataclass
class Example:
    """One rendered example: its tokens (the end token last) and which of them are trained."""

    ids: list[int]
    trained: list[bool]
    truncated: bool = False

    @property
    def n_trained(self) -> int:
        # the first token is never a label: nothing precedes it to predict it
        return sum(self.trained[1:])


def encode_example(messages: Messages, tokenizer: LoadedTokenizer, style: str, max_tokens: int) -> Example:
    ids: list[int] = []
    trained: list[bool] = []
    for text, is_reply in render_segments(messages, style):
        piece = tokenizer.encode(text)
        ids += piece
        trained += [is_reply] * len(piece)
    ids.append(tokenizer.eot_id)
    trained.append(True)
    truncated = len(ids) > max_tokens
    return Example(ids[:max_tokens], trained[:max_tokens], truncated)


# ---------------------------------------------------------------- records


def read_records(path: Path) -> list[dict[str, Any]]:
    if path.suffix not in DATA_SUFFIXES:
        raise UsageError(f"data file '{path}' must be .jsonl (one JSON object per line) or .json (a list)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"data file '{path}' is not UTF-8 text") from exc
    try:
        if path.suffix == ".json":
            records = json.loads(text)
            if not isinstance(records, list):
                raise UsageError(f"data file '{path}' must hold a JSON list of records")
        else:
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as exc:
        raise UsageError(f"data file '{path}' is not valid JSON at line {exc.lineno}: {exc.msg}") from exc
    if not records:
        raise UsageError(f"data file '{path}' holds no records")
    if not all(isinstance(record, dict) for record in records):
        raise UsageError(f"data file '{path}' must hold JSON objects (records with named fields)")
    return records


def _normalize_file_records(records: list[dict[str, Any]], where: str) -> Iterator[dict[str, Any]]:
    """Records of any instruction format -> the corpus schema (prompt/response or messages)."""
    first = records[0]
    if "prompt" in first and "response" in first:
        yield from (
            {
                "system": r.get("system", ""),
                "prompt": r.get("prompt"),
                "response": r.get("response"),
                **{k: v for k, v in r.items() if k in ("label", "input")},
            }
            for r in records
        )
        return
    fmt = instruct.detect_format(first)
    if fmt == "preference":
        raise UsageError(f"{where} holds preference pairs (chosen, rejected); train on them with llmctl dpo")
    if fmt is None:
        raise UsageError(
            f"{where} has no instruction fields (fields found: {', '.join(map(str, first)) or 'none'}); "
            "finetune needs prompt+response, instruction+output (alpaca), instruction+response (dolly), "
            "messages (chat) or description+solutions (code contests)"
        )
    for record in records:
        for normalized in instruct.normalize(record, fmt, max_solutions=1):
            if not isinstance(normalized, Skip):
                yield normalized


@dataclass
class DataSource:
    """Where examples come from: a built corpus (train and val splits) or one file (val held out)."""

    name: str  # the corpus name or the file's path, as given
    train: list[dict[str, Any]]
    val: list[dict[str, Any]]
    val_note: str  # where validation examples come from, for the plan
    corpus: str | None = None  # the registered corpus they come from; None for a file


def open_data(workspace: Workspace, data: str) -> DataSource:
    path = Path(data).expanduser()
    if path.is_file() or path.suffix in DATA_SUFFIXES:
        if not path.is_file():
            raise UsageError(f"data file '{data}' does not exist")
        records = list(_normalize_file_records(read_records(path), f"data file '{data}'"))
        return DataSource(data, *hold_out(records))
    store = CorpusStore.open(workspace, data)
    if store.meta.get("kind") != "instruct":
        raise UsageError(
            f"corpus '{data}' holds {store.meta.get('kind')} data; finetuning needs instruction data "
            f"(llmctl corpus build NAME --source FILE --format auto) or a .jsonl file"
        )
    return DataSource(
        data, list(store.records("train")), list(store.records("val")), "the corpus's val split", corpus=data
    )


Records = list[dict[str, Any]]


def hold_out(records: Records, noun: str = "examples") -> tuple[Records, Records, str]:
    """A data file's training and validation records, and where the validation ones come from."""
    holdout = int(len(records) * HOLDOUT_FRACTION)
    if holdout < MIN_HOLDOUT:
        return records, records, f"the training {noun} (too few to hold some out)"
    # a fixed, spread-out holdout: every k-th record, so the split does not depend on file order runs
    every = len(records) // holdout
    val = records[every - 1 :: every][:holdout]
    held = {id(record) for record in val}
    return [r for r in records if id(r) not in held], val, f"{len(val)} {noun} held out of the file"


def messages_of(record: Mapping[str, Any], where: str) -> Messages:
    try:
        messages = instruct.as_messages(dict(record))
    except KeyError as exc:
        raise UsageError(f"{where} lacks the {exc} field an instruction example needs") from exc
    unknown = next((m["role"] for m in messages if m.get("role") not in CHAT_ROLES), None)
    if unknown is not None:
        raise UsageError(
            f"{where} has a message with role {unknown!r}; the roles an example may have are "
            f"{', '.join(CHAT_ROLES)}"
        )
    if not any(m["role"] == "assistant" and m["content"] for m in messages):
        raise UsageError(f"{where} has no response to train on")
    return messages


# ---------------------------------------------------------------- SFT examples and rows


@dataclass
class EncodedSplit:
    examples: list[Example]
    dropped: int = 0  # examples whose response was cut away entirely by truncation
    truncated: int = 0

    @property
    def tokens(self) -> int:
        return sum(len(example.ids) for example in self.examples)

    @property
    def trained_tokens(self) -> int:
        return sum(example.n_trained for example in self.examples)


def encode_split(
    records: Sequence[Mapping[str, Any]],
    tokenizer: LoadedTokenizer,
    style: str,
    context_length: int,
    what: str,
) -> EncodedSplit:
    """Render and encode every record; an example keeps at most context_length + 1 tokens
    (inputs and labels are the same tokens shifted by one)."""
    split = EncodedSplit([])
    for index, record in enumerate(records):
        example = encode_example(
            messages_of(record, f"{what} record {index + 1}"), tokenizer, style, context_length + 1
        )
        if example.n_trained == 0:
            split.dropped += 1
            continue
        split.truncated += example.truncated
        split.examples.append(example)
    return split


@dataclass
class Row:
    """One training row of context_length positions."""

    input_ids: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    doc_ids: list[int] = field(default_factory=list)
    n_examples: int = 0

    def add(self, example: Example) -> None:
        ids = example.ids
        self.input_ids += ids[:-1]
        self.labels += [
            token if trained else IGNORE_INDEX
            for token, trained in zip(ids[1:], example.trained[1:], strict=True)
        ]
        self.doc_ids += [self.n_examples] * (len(ids) - 1)
        self.n_examples += 1


def pack_rows(examples: Sequence[Example], order: Sequence[int], context_length: int) -> list[Row]:
    """Examples in `order`, each appended to the current row while it fits, else opening a new one."""
    rows: list[Row] = []
    row = Row()
    for index in order:
        example = examples[index]
        if len(row.input_ids) + len(example.ids) - 1 > context_length:
            rows.append(row)
            row = Row()
        row.add(example)
    if row.n_examples:
        rows.append(row)
    return rows


def single_rows(examples: Sequence[Example], order: Sequence[int]) -> list[Row]:
    rows = []
    for index in order:
        row = Row()
        row.add(examples[index])
        rows.append(row)
    return rows


def collate(
    rows: Sequence[Row], context_length: int, pad_id: int, packed: bool, device: torch.device
) -> dict[str, torch.Tensor]:
    """Rows padded at the end to context_length: padding is never a label, and in packed rows it is
    a document of its own (doc id -1), so no example attends to it. Unpacked rows need no mask:
    padding follows the example, and causal attention never looks ahead."""
    shape = (len(rows), context_length)
    input_ids = np.full(shape, pad_id, dtype=np.int64)
    labels = np.full(shape, IGNORE_INDEX, dtype=np.int64)
    doc_ids = np.full(shape, -1, dtype=np.int64)
    for i, row in enumerate(rows):
        n = len(row.input_ids)
        input_ids[i, :n], labels[i, :n], doc_ids[i, :n] = row.input_ids, row.labels, row.doc_ids
    batch = {"input_ids": torch.from_numpy(input_ids), "labels": torch.from_numpy(labels)}
    if packed:
        batch["doc_ids"] = torch.from_numpy(doc_ids)
    return {name: tensor.to(device) for name, tensor in batch.items()}


# ---------------------------------------------------------------- classification examples


@dataclass
class ClassExample:
    ids: list[int]  # the text's tokens then the end token, whose hidden state is classified
    label: int


def _text_of(record: Mapping[str, Any]) -> str | None:
    for name in TEXT_FIELDS:
        value = record.get(name)
        if isinstance(value, str) and value.strip():
            return value
    return None


def label_set(records: Sequence[Mapping[str, Any]], where: str) -> list[str]:
    """The sorted distinct labels of the training records (the classifier's classes)."""
    labels = set()
    for index, record in enumerate(records):
        if "label" not in record or _text_of(record) is None:
            raise UsageError(
                f"{where} record {index + 1} needs a 'label' field and a text field "
                f"({', '.join(TEXT_FIELDS)}) for --task classify "
                f"(fields found: {', '.join(map(str, record))})"
            )
        labels.add(str(record["label"]))
    if len(labels) < 2:
        raise UsageError(f"{where} has {len(labels)} distinct label(s); a classifier needs at least two")
    return sorted(labels)


def encode_classification(
    records: Sequence[Mapping[str, Any]],
    tokenizer: LoadedTokenizer,
    labels: Sequence[str],
    context_length: int,
) -> tuple[list[ClassExample], int]:
    """Examples whose label is in `labels`, each text cut to fit with its end token; and how many
    records were skipped."""
    index = {label: i for i, label in enumerate(labels)}
    examples, skipped = [], 0
    for record in records:
        text = _text_of(record)
        label = index.get(str(record.get("label")))
        if text is None or label is None:
            skipped += 1
            continue
        ids = tokenizer.encode(text)[: context_length - 1] + [tokenizer.eot_id]
        examples.append(ClassExample(ids, label))
    return examples, skipped


def collate_classification(
    examples: Sequence[ClassExample], context_length: int, pad_id: int, device: torch.device
) -> dict[str, torch.Tensor]:
    input_ids = np.full((len(examples), context_length), pad_id, dtype=np.int64)
    for i, example in enumerate(examples):
        input_ids[i, : len(example.ids)] = example.ids
    batch = {
        "input_ids": torch.from_numpy(input_ids),
        "class_positions": torch.tensor([len(example.ids) - 1 for example in examples]),
        "class_labels": torch.tensor([example.label for example in examples]),
    }
    return {name: tensor.to(device) for name, tensor in batch.items()}


# ---------------------------------------------------------------- the batch source


class ShuffledBatches:
    """The trainer's BatchSource for finetuning: epochs of shuffled rows, exact to resume.

    Each epoch draws a permutation of the examples from one seeded generator and builds its rows
    from it (packing depends on the order). The state is the generator's state at the epoch's
    start, the epoch and the row reached, so a resumed run rebuilds the same epoch and goes on.
    Every rank builds the same rows and keeps its slice of each global batch.
    """

    def __init__(
        self,
        n_train: int,
        build_rows: Callable[[Sequence[int]], list[Any]],
        collate_rows: Callable[[Sequence[Any]], dict[str, torch.Tensor]],
        eval_rows: list[Any],
        *,
        micro_batch_size: int,
        eval_batches: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ):
        if n_train == 0:
            raise UsageError("no training examples are left to train on")
        self.n_train = n_train
        self.build_rows, self.collate_rows = build_rows, collate_rows
        self.eval_rows = eval_rows
        self.micro_batch_size, self.n_eval_batches = micro_batch_size, eval_batches
        self.rank, self.world_size = rank, world_size
        self._rng = np.random.default_rng(seed)
        self.epoch = -1
        self._rows: list[Any] = []
        self._cursor = 0
        self._epoch_rng_state: dict | None = None

    @property
    def bytes_per_token(self) -> float | None:
        return None

    def _new_epoch(self) -> None:
        self._epoch_rng_state = self._rng.bit_generator.state
        self._rows = self.build_rows(self._rng.permutation(self.n_train))
        self.epoch += 1
        self._cursor = 0

    def next_batch(self) -> dict[str, torch.Tensor]:
        rows = []
        for _ in range(self.micro_batch_size * self.world_size):
            if self._cursor >= len(self._rows):
                self._new_epoch()
            rows.append(self._rows[self._cursor])
            self._cursor += 1
        mine = rows[self.rank * self.micro_batch_size : (self.rank + 1) * self.micro_batch_size]
        return self.collate_rows(mine)

    def eval_batches(self) -> Iterator[dict[str, torch.Tensor]]:
        per_batch = self.micro_batch_size * self.world_size
        n_batches = max(1, min(self.n_eval_batches, -(-len(self.eval_rows) // per_batch)))
        for start in range(0, n_batches * per_batch, per_batch):
            batch_rows = self.eval_rows[start : start + per_batch]
            # every rank takes part in every evaluation batch; a short last batch is split as far as it goes
            mine = batch_rows[self.rank * self.micro_batch_size : (self.rank + 1) * self.micro_batch_size]
            if mine:
                yield self.collate_rows(mine)

    def state_dict(self) -> dict:
        return {
            "epoch_rng": self._epoch_rng_state,
            "epoch": self.epoch,
            "cursor": self._cursor,
            "rng": self._rng.bit_generator.state,
        }

    def load_state_dict(self, state: dict) -> None:
        if state["epoch_rng"] is not None:
            self._rng.bit_generator.state = state["epoch_rng"]
            self._new_epoch()
        self.epoch, self._cursor = state["epoch"], state["cursor"]
        self._rng.bit_generator.state = state["rng"]
