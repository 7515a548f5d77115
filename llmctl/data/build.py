"""`corpus build` as a library call: read the sources, clean, split, write, register.

The corpus is written into a staging directory and renamed into place only when complete, and
registered only after that, so a failure at any point leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmctl import __version__
from llmctl.data import instruct
from llmctl.data.clean import normalize_text, place
from llmctl.data.progress import Progress
from llmctl.data.sources import Item, Skip, SourceSpec, open_source, parse_source
from llmctl.data.store import SPLITS
from llmctl.errors import LlmctlError, UsageError
from llmctl.storage import atomic_dir, refuse_if_busy, write_json_atomic, writer_lock
from llmctl.workspace import Workspace, check_name


@dataclass
class BuildOptions:
    format: str | None = None  # an instruction format (or 'auto'); None builds a plain text corpus
    text_field: str = "text"
    limit: int | None = None  # records or files taken from each source
    val_fraction: float = 0.01
    max_doc_chars: int | None = None
    max_solutions: int = 3
    overwrite: bool = False

    def check(self) -> None:
        if not 0 < self.val_fraction < 1:
            raise UsageError(f"--val-fraction must be between 0 and 1 (exclusive), got {self.val_fraction}")
        if self.format is not None and self.format not in instruct.FORMAT_CHOICES:
            raise UsageError(
                f"unknown --format '{self.format}'; choose one of {', '.join(instruct.FORMAT_CHOICES)}"
            )
        for flag, value in (
            ("--limit", self.limit),
            ("--max-doc-chars", self.max_doc_chars),
            ("--max-solutions", self.max_solutions),
        ):
            if value is not None and value < 1:
                raise UsageError(f"{flag} must be at least 1, got {value}")


@dataclass
class SourceStats:
    spec: SourceSpec
    format: str | None = None
    read: int = 0  # files or records taken from the source
    documents: int = 0  # distinct documents kept, in either split
    bytes: int = 0  # their UTF-8 size, once each
    train_documents: int = 0  # lines in train.jsonl, weighted copies included
    train_bytes: int = 0
    val_documents: int = 0
    val_bytes: int = 0
    dropped: Counter[str] = field(default_factory=Counter)

    def as_dict(self) -> dict[str, Any]:
        return {
            "source": self.spec.raw,
            "target": self.spec.target,
            "kind": self.spec.kind,
            "weight": self.spec.weight,
            "format": self.format,
            "read": self.read,
            "documents": self.documents,
            "bytes": self.bytes,
            "train_documents": self.train_documents,
            "train_bytes": self.train_bytes,
            "val_documents": self.val_documents,
            "val_bytes": self.val_bytes,
            "dropped": dict(sorted(self.dropped.items())),
        }


def build_corpus(
    workspace: Workspace,
    name: str,
    sources: Sequence[str],
    options: BuildOptions | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Build and register corpus `name`; returns its meta (what meta.json holds)."""
    options = options or BuildOptions()
    progress = progress or Progress()
    check_name(name, "corpus")
    options.check()
    if not sources:
        raise UsageError("give at least one --source: stdlib, a path, a glob, or hf:NAME")
    specs = [parse_source(source) for source in sources]
    if options.format is not None and any(spec.kind == "stdlib" for spec in specs):
        raise UsageError("the stdlib source is plain code, not instruction data; build it without --format")
    registry = workspace.registry()
    final = workspace.corpus_dir(name)
    refuse_if_busy(workspace.root, "corpus", name, "replacing")
    if (registry.corpus(name) is not None or final.exists()) and not options.overwrite:
        raise UsageError(
            f"corpus '{name}' already exists in {workspace.root}; pass --overwrite to replace it, "
            f"or choose another name"
        )

    with writer_lock(workspace.root, "corpus", name):
        started = time.monotonic()
        with atomic_dir(final, overwrite=True) as staging:
            writer = _SplitWriter(staging, options)
            try:
                stats = [_ingest(spec, options, writer, progress) for spec in specs]
            finally:
                writer.close()
            writer.ensure_both_splits(stats)
            kind = _kind(options, stats)
            if writer.documents == 0:
                raise LlmctlError(
                    f"corpus '{name}' is empty after cleaning ({_drop_summary(stats)}); "
                    f"check the sources and --max-doc-chars"
                )
            meta = {
                "name": name,
                "kind": kind,
                "sources": [s.as_dict() for s in stats],
                "documents": writer.documents,
                "bytes": sum(s.bytes for s in stats),
                "splits": {
                    split: {
                        "documents": sum(getattr(s, f"{split}_documents") for s in stats),
                        "bytes": sum(getattr(s, f"{split}_bytes") for s in stats),
                    }
                    for split in SPLITS
                },
                "options": {
                    "format": options.format,
                    "text_field": options.text_field,
                    "limit": options.limit,
                    "val_fraction": options.val_fraction,
                    "max_doc_chars": options.max_doc_chars,
                    "max_solutions": options.max_solutions,
                },
                "content_sha256": _content_sha256(staging),
                "build_seconds": round(time.monotonic() - started, 3),
                "created": time.time(),
                "llmctl_version": __version__,
            }
            write_json_atomic(staging / "meta.json", meta)
        registry.add_corpus(name, kind, final, meta)
        return meta


def _kind(options: BuildOptions, stats: list[SourceStats]) -> str:
    """text, instruct, or preference (pairs for dpo); one corpus holds one kind."""
    if options.format is None:
        return "text"
    pairs = {s.format == "preference" for s in stats}
    if len(pairs) > 1:
        raise UsageError(
            "the sources mix preference pairs with instruction records; build a corpus of each "
            "(dpo trains on the pairs, finetune on the instructions)"
        )
    return "preference" if pairs == {True} else "instruct"


def _ingest(spec: SourceSpec, options: BuildOptions, writer: _SplitWriter, progress: Progress) -> SourceStats:
    stats = SourceStats(spec, format=options.format)
    total, items = open_source(spec, options.format, options.limit)
    with progress.task(spec.target, total) as advance:
        for item in items:
            advance()
            if isinstance(item, Skip):
                stats.dropped[item.reason] += 1
                continue
            stats.read += 1
            for document in _documents(item, spec, options, stats):
                if isinstance(document, Skip):
                    stats.dropped[document.reason] += 1
                else:
                    writer.add(document, spec, stats)
    if stats.read == 0:
        raise UsageError(_nothing_read(spec, stats))
    return stats


def _documents(
    item: Item, spec: SourceSpec, options: BuildOptions, stats: SourceStats
) -> Iterator[dict[str, Any] | Skip]:
    if item.record is None:
        yield {"text": item.text, "path": item.path}
        return
    record = item.record
    first = stats.read == 1
    where = f"'{spec.target}'" + (f" ({item.path})" if spec.kind in ("dir", "glob") else "")
    if options.format is None:
        if first and options.text_field not in record:
            detected = instruct.detect_format(record)
            also = f", or --format {detected} for instruction data" if detected else ""
            fields = ", ".join(map(str, record)) or "none"
            raise UsageError(
                f"{where} has no field '{options.text_field}' (fields found: {fields}); "
                f"pass --text-field FIELD{also}"
            )
        text = record.get(options.text_field)
        yield {"text": text} if isinstance(text, str) else Skip("missing_field")
        return
    if first:
        if options.format == "auto":
            stats.format = instruct.detect_format(record)
            if stats.format is None:
                raise instruct.undetected(record, where)
        else:
            instruct.check_format(record, options.format, where)
    yield from instruct.normalize(record, stats.format or options.format, options.max_solutions)


def _nothing_read(spec: SourceSpec, stats: SourceStats) -> str:
    skipped = ", ".join(
        f"{count} {reason.replace('_', '-')}" for reason, count in sorted(stats.dropped.items())
    )
    if spec.kind == "hf":
        return f"dataset '{spec.target}' gave no rows; check the split and --limit"
    what = "text files" if spec.kind in ("dir", "glob", "stdlib") else "readable text or records"
    return (
        f"source '{spec.target}' has no {what}"
        + (f" ({skipped} skipped)" if skipped else "")
        + "; point --source at UTF-8 text, code, JSON, JSONL, Parquet or CSV files"
    )


def _drop_summary(stats: list[SourceStats]) -> str:
    dropped = sum((s.dropped for s in stats), Counter())
    read = sum(s.read for s in stats)
    reasons = ", ".join(f"{count} {reason.replace('_', ' ')}" for reason, count in sorted(dropped.items()))
    return f"{read} read" + (f"; dropped: {reasons}" if reasons else "")


@dataclass
class _Candidate:
    """A document that could be moved to the other split if one ends up empty."""

    draw: float
    line: str
    text_bytes: int
    stats: SourceStats
    weight: float


class _SplitWriter:
    """Cleans, deduplicates and places documents, appending them to train.jsonl and val.jsonl."""

    def __init__(self, directory: Path, options: BuildOptions):
        self.directory = directory
        self.options = options
        # Open for the whole build; build_corpus closes them in a finally block.
        self.handles = {
            split: open(directory / f"{split}.jsonl", "w", encoding="utf-8")  # noqa: SIM115
            for split in SPLITS
        }
        self.seen: set[bytes] = set()
        self.distinct = dict.fromkeys(SPLITS, 0)
        self.closest_to_val: _Candidate | None = None  # the train document with the lowest split draw
        self.closest_to_train: _Candidate | None = None  # the val document with the highest

    @property
    def documents(self) -> int:
        return sum(self.distinct.values())

    def add(self, document: dict[str, Any], spec: SourceSpec, stats: SourceStats) -> None:
        text = normalize_text(document["text"])
        if not text.strip():
            stats.dropped["empty"] += 1
            return
        if self.options.max_doc_chars and len(text) > self.options.max_doc_chars:
            stats.dropped["too_long"] += 1
            return
        placement = place(text, self.options.val_fraction, spec.weight)
        if placement.key in self.seen:
            stats.dropped["duplicate"] += 1
            return
        if placement.split == "train" and placement.train_copies == 0:
            stats.dropped["weight_subsampled"] += 1
            return
        self.seen.add(placement.key)
        line = json.dumps({**document, "text": text, "source": spec.target}, ensure_ascii=False) + "\n"
        size = len(text.encode("utf-8"))
        copies = placement.train_copies if placement.split == "train" else 1
        self.handles[placement.split].write(line * copies)
        self.distinct[placement.split] += 1
        stats.documents += 1
        stats.bytes += size
        _count(stats, placement.split, copies, size)
        candidate = _Candidate(placement.split_draw, line, size, stats, spec.weight)
        if placement.split == "train":
            if self.closest_to_val is None or candidate.draw < self.closest_to_val.draw:
                self.closest_to_val = candidate
        elif self.closest_to_train is None or candidate.draw > self.closest_to_train.draw:
            self.closest_to_train = candidate

    def close(self) -> None:
        for handle in self.handles.values():
            handle.close()

    def ensure_both_splits(self, stats: list[SourceStats]) -> None:
        """With two or more documents, move the one nearest the split boundary into an empty split."""
        if self.documents < 2:
            return
        if self.distinct["val"] == 0 and self.closest_to_val is not None:
            moved = self.closest_to_val
            copies = self._remove(moved.line, "train")
            self._append(moved.line, "val", 1)
            _count(moved.stats, "train", -copies, moved.text_bytes)
            _count(moved.stats, "val", 1, moved.text_bytes)
        elif self.distinct["train"] == 0 and self.closest_to_train is not None:
            moved = self.closest_to_train
            copies = max(1, place(json.loads(moved.line)["text"], 0.0, moved.weight).train_copies)
            self._remove(moved.line, "val")
            self._append(moved.line, "train", copies)
            _count(moved.stats, "val", -1, moved.text_bytes)
            _count(moved.stats, "train", copies, moved.text_bytes)

    def _remove(self, line: str, split: str) -> int:
        path = self.directory / f"{split}.jsonl"
        kept_path = path.with_suffix(".jsonl.tmp")
        removed = 0
        with open(path, encoding="utf-8") as source, open(kept_path, "w", encoding="utf-8") as kept:
            for existing in source:
                if existing == line:
                    removed += 1
                else:
                    kept.write(existing)
        os.replace(kept_path, path)
        self.distinct[split] -= 1
        return removed

    def _append(self, line: str, split: str, copies: int) -> None:
        with open(self.directory / f"{split}.jsonl", "a", encoding="utf-8") as handle:
            handle.write(line * copies)
        self.distinct[split] += 1


def _count(stats: SourceStats, split: str, copies: int, size: int) -> None:
    if split == "train":
        stats.train_documents += copies
        stats.train_bytes += copies * size
    else:
        stats.val_documents += copies
        stats.val_bytes += copies * size


def _content_sha256(directory: Path) -> str:
    digest = hashlib.sha256()
    for split in SPLITS:
        with open(directory / f"{split}.jsonl", "rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
        digest.update(b"\0")
    return digest.hexdigest()
