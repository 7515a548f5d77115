"""Loss, perplexity and bits per byte of a model on text: a corpus's validation split or a file.

Every document is read after the end-of-text token, the boundary that precedes each document in
training (after BOS instead for tokenizers that prepend one, as Llama's do), and each of its tokens
is scored exactly once; that first token itself is context, never a target. A document longer
than the context window is read in overlapping windows: each window moves on by `stride` tokens
and scores only the tokens no earlier window scored, so every token after the first window keeps
at least `window - stride` tokens of left context.

Bits per byte divides the summed nats by the UTF-8 bytes of the scored text, so unlike loss per
token it does not depend on the tokenizer, and models with different vocabularies compare fairly.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from llmctl.data.store import CorpusStore
from llmctl.errors import UsageError
from llmctl.model.sizing import bits_per_byte
from llmctl.model.transformer import Transformer
from llmctl.tokenizer import LoadedTokenizer
from llmctl.workspace import Workspace

# Documents tokenized and windowed together; windows of a group are sorted by length so batches pad little.
DOCUMENTS_PER_GROUP = 256
# Scored positions whose logits are computed at once: bounds memory at rows x vocabulary floats.
LOGIT_ROWS = 2048


@dataclass(frozen=True)
class Span:
    """One window over a document's sequence (its start token, then the document's tokens):
    the model reads positions [start, end) and scores the targets at positions [first, end]."""

    start: int
    first: int
    end: int


def sliding_spans(n_tokens: int, window: int, stride: int) -> list[Span]:
    """Windows that score each of a document's `n_tokens` tokens (positions 1..n_tokens) once.

    The first window scores all it sees; each later one ends `stride` targets further on and
    scores only those, reading the `window - stride` tokens before them as context.
    """
    if not 1 <= stride <= window:
        raise UsageError(f"the stride must be between 1 and the window ({window} tokens), got {stride}")
    spans: list[Span] = []
    scored = 0  # targets at positions up to here are done; position 0 is the start token
    while scored < n_tokens:
        end = min(scored + stride if spans else window, n_tokens)
        spans.append(Span(max(0, end - window), scored + 1, end))
        scored = end
    return spans


@dataclass
class PerplexityResult:
    documents: int
    tokens: int
    bytes: int
    nats: float
    window: int
    stride: int
    seconds: float

    @property
    def loss(self) -> float:
        return self.nats / self.tokens

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss) if self.loss < 700 else math.inf

    @property
    def bits_per_byte(self) -> float:
        return bits_per_byte(self.nats, self.bytes)

    def as_dict(self) -> dict[str, Any]:
        return {
            "loss": self.loss,
            "perplexity": self.perplexity,
            "bits_per_byte": self.bits_per_byte,
            "documents": self.documents,
            "tokens": self.tokens,
            "bytes": self.bytes,
            "nats": self.nats,
            "window": self.window,
            "stride": self.stride,
            "seconds": round(self.seconds, 3),
            "tokens_per_second": round(self.tokens / self.seconds, 1) if self.seconds else None,
        }


@dataclass
class _Window:
    ids: list[int]  # the model's input
    targets: list[int]  # the token after each input position
    context: int  # leading targets already scored by an earlier window


def _windows(ids: list[int], start_id: int, window: int, stride: int) -> Iterator[_Window]:
    sequence = [start_id, *ids]
    for span in sliding_spans(len(ids), window, stride):
        yield _Window(
            sequence[span.start : span.end],
            sequence[span.start + 1 : span.end + 1],
            span.first - span.start - 1,
        )


@torch.inference_mode()
def _score(model: Transformer, windows: list[_Window], device: torch.device) -> tuple[float, int]:
    """Summed nats and the number of scored targets of windows read as one right-padded batch
    (causal attention keeps padding on the right out of every real position's view)."""
    width = max(len(w.ids) for w in windows)
    inputs = torch.zeros(len(windows), width, dtype=torch.long)
    targets = torch.zeros(len(windows), width, dtype=torch.long)
    scored = torch.zeros(len(windows), width, dtype=torch.bool)
    for row, w in enumerate(windows):
        inputs[row, : len(w.ids)] = torch.tensor(w.ids)
        targets[row, : len(w.targets)] = torch.tensor(w.targets)
        scored[row, w.context : len(w.targets)] = True
    inputs, targets, scored = inputs.to(device), targets.to(device), scored.to(device)
    hidden = model.hidden_states(inputs)[scored]
    wanted = targets[scored]
    nats = torch.zeros((), dtype=torch.float64, device=device)
    for rows, labels in zip(hidden.split(LOGIT_ROWS), wanted.split(LOGIT_ROWS), strict=True):
        nats += F.cross_entropy(model.logits(rows).float(), labels, reduction="sum").double()
    return nats.item(), int(wanted.numel())


def measure_perplexity(
    model: Transformer,
    tokenizer: LoadedTokenizer,
    texts: Iterable[str],
    *,
    stride: int | None = None,
    window: int | None = None,
    batch_size: int = 8,
    on_progress: Callable[[int, int], None] | None = None,
) -> PerplexityResult:
    """Score every token of every text once (empty texts are skipped).

    `window` defaults to the model's context length, `stride` to half the window. `tokens` in
    the result counts the targets scored, which is every token of every text.
    `on_progress(documents, tokens)` follows each group of documents.
    """
    context_length = model.cfg.context_length
    window = window or context_length
    stride = stride or max(1, window // 2)
    if window > context_length:
        raise UsageError(
            f"the window ({window} tokens) exceeds the model's context ({context_length} tokens)"
        )
    sliding_spans(0, window, stride)  # a bad stride fails before any work
    device = model.embed_tokens.weight.device
    documents = tokens = n_bytes = 0
    nats = 0.0
    started = time.perf_counter()
    texts = iter(texts)
    while group := list(islice(texts, DOCUMENTS_PER_GROUP)):
        group = [text for text in group if text]
        windows = []
        for text, ids in zip(group, tokenizer.encode_documents(group), strict=True):
            windows.extend(_windows(ids, tokenizer.document_start_id, window, stride))
            documents, n_bytes = documents + 1, n_bytes + len(text.encode("utf-8"))
        windows.sort(key=lambda w: len(w.ids), reverse=True)
        for batch in _batches(windows, batch_size):
            batch_nats, batch_tokens = _score(model, batch, device)
            nats, tokens = nats + batch_nats, tokens + batch_tokens
        if on_progress is not None:
            on_progress(documents, tokens)
    if tokens == 0:
        raise UsageError("there is no text to score (no document has any content)")
    return PerplexityResult(documents, tokens, n_bytes, nats, window, stride, time.perf_counter() - started)


def _batches(items: Sequence[_Window], size: int) -> Iterator[list[_Window]]:
    for begin in range(0, len(items), size):
        yield list(items[begin : begin + size])


def text_source(
    workspace: Workspace, corpus: str | None, file: Path | None
) -> tuple[dict[str, str], Iterable[str]]:
    """What to score, named for the summary, and its documents: a corpus's validation split
    (one document per record) or a UTF-8 text file (one document). Checked before a model loads."""
    if corpus is not None and file is not None:
        raise UsageError("give --corpus or --file, not both")
    if corpus is None and file is None:
        raise UsageError("say what to score: --corpus NAME (its validation split) or --file PATH")
    if corpus is not None:
        store = CorpusStore.open(workspace, corpus)
        return {"corpus": corpus, "split": "val"}, _Reread(lambda: store.texts("val"))
    if not file.is_file():
        raise UsageError(f"text file '{file}' does not exist or is not a file; check the path")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"'{file}' is not UTF-8 text (byte {exc.start} cannot be decoded)") from None
    return {"file": str(file.resolve())}, [text]


def name_source(source: dict[str, str]) -> str:
    """'code/val' for a corpus split, the file's name for a file."""
    return f"{source['corpus']}/{source['split']}" if "corpus" in source else Path(source["file"]).name


class _Reread:
    """An iterable that reads its documents again each time it is iterated (a split may be large)."""

    def __init__(self, open_texts: Callable[[], Iterator[str]]):
        self._open_texts = open_texts

    def __iter__(self) -> Iterator[str]:
        return self._open_texts()
