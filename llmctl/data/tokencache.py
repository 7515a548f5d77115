"""Token caches: a text corpus tokenized once per tokenizer, read by the trainer as memory maps.

    corpora/<name>/cache/<tokenizer_sha256[:16]>/
        train.bin  val.bin     every document's token ids followed by the end-of-text id, flat,
                               uint16 when every id fits, else uint32
        meta.json              dtype, tokens and UTF-8 bytes per split (bytes give bits per byte),
                               the tokenizer's sha256 and end-of-text id, the corpus content sha256

A cache is current while the corpus content sha256, the tokenizer sha256 and the end-of-text id
it was built from all still match; otherwise `build_token_cache` builds it again. Building
happens in a staging directory renamed into place, so readers never see half a cache.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from llmctl.data.progress import Progress
from llmctl.data.store import SPLITS, CorpusStore
from llmctl.errors import UsageError
from llmctl.storage import atomic_dir, write_json_atomic
from llmctl.tokenizer import text_only_encoder

if TYPE_CHECKING:
    from tokenizers import Tokenizer

CACHE_DIRNAME = "cache"
FORMAT_VERSION = 2  # 2: a special token's text inside a document is encoded as text
# Batches of about this many characters keep every core busy in encode_batch while bounding memory.
DEFAULT_CHUNK_CHARS = 1 << 21


@dataclass
class TokenCache:
    path: Path
    meta: dict[str, Any]

    def __post_init__(self) -> None:
        self.dtype = np.dtype(self.meta["dtype"])
        self.n_tokens: dict[str, int] = dict(self.meta["n_tokens"])
        self.n_bytes: dict[str, int] = dict(self.meta["n_bytes"])
        self.splits = {split: self._open(split) for split in SPLITS}

    def _open(self, split: str) -> np.ndarray:
        if self.n_tokens[split] == 0:  # numpy cannot map an empty file
            return np.zeros(0, dtype=self.dtype)
        return np.memmap(
            self.path / f"{split}.bin", dtype=self.dtype, mode="r", shape=(self.n_tokens[split],)
        )

    @property
    def train(self) -> np.ndarray:
        return self.splits["train"]

    @property
    def val(self) -> np.ndarray:
        return self.splits["val"]

    @property
    def eot_id(self) -> int:
        return int(self.meta["eot_id"])


def cache_dir(store: CorpusStore, tokenizer_sha256: str) -> Path:
    return store.path / CACHE_DIRNAME / tokenizer_sha256[:16]


def load_token_cache(
    store: CorpusStore, tokenizer_sha256: str, eot_id: int | None = None
) -> TokenCache | None:
    """The current cache for this corpus and tokenizer, or None when absent or stale."""
    path = cache_dir(store, tokenizer_sha256)
    meta = _read_meta(path)
    if meta is None or not _is_current(meta, store, tokenizer_sha256, eot_id):
        return None
    itemsize = np.dtype(meta["dtype"]).itemsize
    for split in SPLITS:
        data = path / f"{split}.bin"
        if not data.is_file() or data.stat().st_size != meta["n_tokens"][split] * itemsize:
            return None
    return TokenCache(path, meta)


def build_token_cache(
    store: CorpusStore,
    tokenizer: Tokenizer,
    tokenizer_sha256: str,
    eot_id: int,
    *,
    rebuild: bool = False,
    chunk_chars: int = DEFAULT_CHUNK_CHARS,
    progress: Progress | None = None,
) -> TokenCache:
    """Tokenize both splits of a text corpus, or reuse the current cache (unless `rebuild`)."""
    corpus_meta = store.meta
    if corpus_meta["kind"] != "text":
        raise UsageError(
            f"corpus '{store.name}' is an instruction corpus; token caches cover text corpora for "
            f"pretraining (finetuning builds its own examples from the records)"
        )
    cached = None if rebuild else load_token_cache(store, tokenizer_sha256, eot_id)
    if cached is not None:
        return cached
    progress = progress or Progress()
    largest_id = max(tokenizer.get_vocab_size(with_added_tokens=True) - 1, eot_id)
    dtype = np.dtype(np.uint16 if largest_id < 2**16 else np.uint32)
    started = time.monotonic()
    final = cache_dir(store, tokenizer_sha256)
    encoder = text_only_encoder(tokenizer)
    with atomic_dir(final, overwrite=True) as staging:
        counts = {
            split: _tokenize_split(
                store,
                split,
                encoder,
                eot_id,
                dtype,
                staging / f"{split}.bin",
                chunk_chars,
                progress,
                corpus_meta["splits"][split]["bytes"],
            )
            for split in SPLITS
        }
        meta = {
            "format_version": FORMAT_VERSION,
            "corpus": store.name,
            "corpus_sha256": corpus_meta["content_sha256"],
            "tokenizer_sha256": tokenizer_sha256,
            "eot_id": eot_id,
            "vocab_size": tokenizer.get_vocab_size(with_added_tokens=True),
            "dtype": dtype.name,
            "n_tokens": {split: tokens for split, (tokens, _) in counts.items()},
            "n_bytes": {split: n_bytes for split, (_, n_bytes) in counts.items()},
            "n_documents": {split: corpus_meta["splits"][split]["documents"] for split in SPLITS},
            "build_seconds": round(time.monotonic() - started, 3),
            "created": time.time(),
        }
        write_json_atomic(staging / "meta.json", meta)
    return TokenCache(final, meta)


def list_token_caches(store: CorpusStore) -> list[dict[str, Any]]:
    """Every cache on disk for this corpus, current or stale, with its size."""
    caches = []
    root = store.path / CACHE_DIRNAME
    for path in sorted(root.iterdir()) if root.is_dir() else []:
        meta = None if path.name.startswith(".") else _read_meta(path)
        if meta is None:
            continue
        caches.append(
            {
                **meta,
                "path": str(path),
                "disk_bytes": sum(f.stat().st_size for f in path.iterdir() if f.is_file()),
                "current": _is_current(meta, store, meta["tokenizer_sha256"], None),
            }
        )
    return caches


def _read_meta(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads((path / "meta.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def _is_current(meta: dict[str, Any], store: CorpusStore, tokenizer_sha256: str, eot_id: int | None) -> bool:
    return (
        meta.get("format_version") == FORMAT_VERSION
        and meta.get("corpus_sha256") == store.meta["content_sha256"]
        and meta.get("tokenizer_sha256") == tokenizer_sha256
        and (eot_id is None or meta.get("eot_id") == eot_id)
    )


def _tokenize_split(
    store: CorpusStore,
    split: str,
    tokenizer: Tokenizer,
    eot_id: int,
    dtype: np.dtype,
    target: Path,
    chunk_chars: int,
    progress: Progress,
    expected_bytes: int,
) -> tuple[int, int]:
    """Write the split's token ids to `target`; returns (tokens, UTF-8 bytes of the documents)."""
    # encode_batch_fast (tokenizers >= 0.20) skips the character offsets we never read.
    encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
    n_tokens = n_bytes = 0
    with (
        open(target, "wb") as sink,
        progress.task(f"tokenizing {store.name}/{split}", expected_bytes, in_bytes=True) as advance,
    ):

        def flush(batch: list[str], batch_bytes: int) -> None:
            nonlocal n_tokens
            ids: list[int] = []
            for encoding in encode(batch, add_special_tokens=False):
                ids.extend(encoding.ids)
                ids.append(eot_id)
            np.asarray(ids, dtype=dtype).tofile(sink)
            n_tokens += len(ids)
            advance(batch_bytes)

        batch: list[str] = []
        batch_chars = batch_bytes = 0
        for text in store.texts(split):
            batch.append(text)
            batch_chars += len(text)
            batch_bytes += len(text.encode("utf-8"))
            if batch_chars >= chunk_chars:
                flush(batch, batch_bytes)
                n_bytes += batch_bytes
                batch, batch_chars, batch_bytes = [], 0, 0
        if batch:
            flush(batch, batch_bytes)
            n_bytes += batch_bytes
    return n_tokens, n_bytes
