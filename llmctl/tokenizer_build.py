"""Building tokenizers: byte-level BPE trained on a corpus, the byte tokenizer, and importing an
existing tokenizer.json; each checked, stored and registered (llmctl.tokenizer describes the files).
"""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmctl import __version__
from llmctl.data.store import CorpusStore
from llmctl.errors import LlmctlError, UsageError
from llmctl.storage import atomic_dir, refuse_if_busy, write_json_atomic, writer_lock
from llmctl.tokenizer import (
    BYTE_VOCAB_SIZE,
    META_FILE,
    MIN_VOCAB_SIZE,
    SPECIAL_TOKENS,
    TOKENIZER_FILE,
    Kind,
    byte_to_unicode,
    describe_tokenizer,
    file_sha256,
    read_tokenizer_file,
    resolve_tokenizer_file,
    text_only_encoder,
)
from llmctl.workspace import Workspace, check_name

if TYPE_CHECKING:
    from tokenizers import Tokenizer

_TRAIN_BATCH_DOCS = 1000
_MEASURE_BATCH_DOCS = 256


def _byte_level_tokenizer(vocab: dict[str, int] | None = None) -> Tokenizer:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    model = models.BPE(vocab=vocab, merges=[]) if vocab is not None else models.BPE()
    tokenizer = Tokenizer(model)
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def build_byte_tokenizer() -> Tokenizer:
    """The specials at 0..5, then byte b at id 6 + b: every text encodes, nothing is merged."""
    from tokenizers import AddedToken

    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS)}
    for byte, char in byte_to_unicode().items():
        vocab[char] = len(SPECIAL_TOKENS) + byte
    tokenizer = _byte_level_tokenizer(vocab)
    tokenizer.add_special_tokens(
        [AddedToken(token, special=True, normalized=False) for token in SPECIAL_TOKENS]
    )
    return tokenizer


def _batches(texts: Iterable[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for text in texts:
        batch.append(text)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def train_bpe(
    texts: Iterable[str], vocab_size: int, min_frequency: int = 2, show_progress: bool = False
) -> Tokenizer:
    """Byte-level BPE from a stream of documents; the trainer holds word counts, never the corpus."""
    from tokenizers import pre_tokenizers, trainers

    check_vocab_size(vocab_size)
    tokenizer = _byte_level_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    tokenizer.train_from_iterator(_batches(_bounded_words(texts), _TRAIN_BATCH_DOCS), trainer=trainer)
    return tokenizer


# The BPE trainer's time grows far faster than a word's length: one 2-million-character run without
# a space (a minified file, a base64 blob) ran for over ten minutes; cut into 256-character pieces
# it trains in about 6 s. Runs that long teach no useful merge, so training sees them in pieces;
# encoding them later is linear and unaffected.
MAX_TRAINING_WORD_CHARS = 256
_LONG_WORD = re.compile(rf"\S{{{MAX_TRAINING_WORD_CHARS + 1},}}")


def _bounded_words(texts: Iterable[str]) -> Iterator[str]:
    def cut(match: re.Match) -> str:
        run = match.group(0)
        return "\n".join(
            run[i : i + MAX_TRAINING_WORD_CHARS] for i in range(0, len(run), MAX_TRAINING_WORD_CHARS)
        )

    for text in texts:
        yield _LONG_WORD.sub(cut, text)


def check_vocab_size(vocab_size: int) -> None:
    if vocab_size < MIN_VOCAB_SIZE:
        raise UsageError(
            f"--vocab-size {vocab_size} is too small: a byte-level tokenizer needs at least {MIN_VOCAB_SIZE} "
            f"(256 bytes + {len(SPECIAL_TOKENS)} special tokens); try --vocab-size 8192"
        )


def measure(tokenizer: Tokenizer, texts: Iterable[str]) -> dict[str, Any]:
    """Characters and bytes per token over `texts`, and the exact round trip of every document.

    Raises LlmctlError at the first document that does not decode back to itself.
    """
    documents = chars = utf8_bytes = tokens = 0
    encoder = text_only_encoder(tokenizer)  # documents, as the token cache encodes them
    for batch in _batches(texts, _MEASURE_BATCH_DOCS):
        encodings = encoder.encode_batch(batch, add_special_tokens=False)
        decoded = encoder.decode_batch([encoding.ids for encoding in encodings], skip_special_tokens=False)
        for offset, (text, back) in enumerate(zip(batch, decoded, strict=True)):
            if text != back:
                at = next(
                    (i for i, (a, b) in enumerate(zip(text, back, strict=False)) if a != b),
                    min(len(text), len(back)),
                )
                raise LlmctlError(
                    f"round trip failed on validation document {documents + offset}: "
                    f"decode(encode(x)) differs from x at character {at} "
                    f"({text[at : at + 20]!r} became {back[at : at + 20]!r}); "
                    "nothing was registered — report this with the corpus that caused it"
                )
        documents += len(batch)
        chars += sum(len(text) for text in batch)
        utf8_bytes += sum(len(text.encode("utf-8")) for text in batch)
        tokens += sum(len(encoding.ids) for encoding in encodings)
    return {
        "documents": documents,
        "chars": chars,
        "bytes": utf8_bytes,
        "tokens": tokens,
        "chars_per_token": round(chars / tokens, 4) if tokens else None,
        "bytes_per_token": round(utf8_bytes / tokens, 4) if tokens else None,
        "round_trip_ok": True,
    }


# ---------------------------------------------------------------- the workspace side


def _check_free(workspace: Workspace, name: str, overwrite: bool) -> None:
    check_name(name, "tokenizer")
    refuse_if_busy(workspace.root, "tokenizer", name, "replacing")
    registered = workspace.registry(create=False).tokenizer(name) is not None
    if (registered or workspace.tokenizer_dir(name).exists()) and not overwrite:
        raise UsageError(
            f"tokenizer '{name}' already exists in {workspace.root}; pass --overwrite to replace it"
        )


def _register(workspace: Workspace, name: str, tokenizer_json: Path, meta: dict[str, Any]) -> None:
    workspace.registry().add_tokenizer(
        name,
        tokenizer_json.parent,
        meta.get("corpus"),
        meta["sha256"],
        meta["vocab_size"],
        {key: value for key, value in meta.items() if key != "chat_template"},
    )


def train_tokenizer(
    workspace: Workspace,
    name: str,
    corpus: str,
    vocab_size: int | None,
    min_frequency: int = 2,
    kind: Kind = "bpe",
    overwrite: bool = False,
    show_progress: bool = False,
    report: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Train (or, for kind 'byte', build), check on the validation split, store and register.

    `report` hears each phase once the request is known to be valid. Returns the stored meta.
    On any error nothing is left under tokenizers/<name> or in the registry.
    """
    report = report or (lambda message: None)

    check_name(name, "tokenizer")
    if kind == "bpe":
        if vocab_size is None:
            raise UsageError("--vocab-size is required for --kind bpe; try --vocab-size 8192")
        check_vocab_size(vocab_size)
    elif kind == "byte":
        if vocab_size not in (None, BYTE_VOCAB_SIZE):
            raise UsageError(
                f"--kind byte always has {BYTE_VOCAB_SIZE} tokens "
                f"(256 bytes + {len(SPECIAL_TOKENS)} specials); leave out --vocab-size or use --kind bpe"
            )
    else:
        raise UsageError(f"unknown tokenizer kind '{kind}': use bpe or byte")
    if min_frequency < 1:
        raise UsageError(f"--min-frequency {min_frequency} must be at least 1")
    store = CorpusStore.open(workspace, name=corpus)
    _check_free(workspace, name, overwrite)

    with writer_lock(workspace.root, "tokenizer", name):
        started = time.perf_counter()
        report(f"{'training' if kind == 'bpe' else 'building'} tokenizer '{name}' on corpus '{corpus}'")
        if kind == "bpe":
            tokenizer = train_bpe(store.texts("train"), vocab_size, min_frequency, show_progress)
        else:
            tokenizer = build_byte_tokenizer()
        train_seconds = time.perf_counter() - started
        report("measuring and checking decode(encode(x)) == x on every validation document")
        figures = measure(tokenizer, store.texts("val"))
        figures["train_seconds"] = round(train_seconds, 3)

        final = workspace.tokenizer_dir(name)
        with atomic_dir(final, overwrite=overwrite) as staging:
            tokenizer.save(str(staging / TOKENIZER_FILE))
            meta = {
                "name": name,
                "kind": kind,
                **describe_tokenizer(tokenizer),
                "requested_vocab_size": vocab_size,
                "min_frequency": min_frequency if kind == "bpe" else None,
                "corpus": corpus,
                "corpus_sha256": store.meta.get("content_sha256"),
                "figures": figures,
                "sha256": file_sha256(staging / TOKENIZER_FILE),
                "created": time.time(),
                "llmctl_version": __version__,
            }
            write_json_atomic(staging / META_FILE, meta)
        _register(workspace, name, final / TOKENIZER_FILE, meta)
        return meta


def import_tokenizer(
    workspace: Workspace, name: str, source: Path, eot_token: str | None = None, overwrite: bool = False
) -> dict[str, Any]:
    """Register a copy of an existing tokenizer.json, keeping its own specials."""
    check_name(name, "tokenizer")
    source = resolve_tokenizer_file(source)
    tokenizer = read_tokenizer_file(source)
    description = describe_tokenizer(tokenizer, eot_token)
    _check_free(workspace, name, overwrite)

    with writer_lock(workspace.root, "tokenizer", name):
        final = workspace.tokenizer_dir(name)
        with atomic_dir(final, overwrite=overwrite) as staging:
            # A byte-for-byte copy keeps the source's sha256, so caches keyed by it match the original.
            shutil.copyfile(source, staging / TOKENIZER_FILE)
            meta = {
                "name": name,
                "kind": "imported",
                **description,
                "source": str(source.resolve()),
                "corpus": None,
                "figures": {},
                "sha256": file_sha256(staging / TOKENIZER_FILE),
                "created": time.time(),
                "llmctl_version": __version__,
            }
            write_json_atomic(staging / META_FILE, meta)
        _register(workspace, name, final / TOKENIZER_FILE, meta)
        return meta
