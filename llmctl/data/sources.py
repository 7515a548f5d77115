"""Where corpus documents come from: parsing `--source` specs and reading them.

A source yields `Item`s: a text document (a file's content), a record (a dict from a JSON, JSONL,
Parquet, CSV or TSV file or a `datasets` split), or a `Skip` saying why an input was not used.
Turning records into documents (a text field, an instruction format) is build.py's business.

Spec syntax, with an optional mixing weight:  SRC[*W]
    stdlib                       the running Python's standard library (.py files)
    PATH                         a file or a directory (walked recursively)
    GLOB                         'extra/**/*.md' (quote it so the shell leaves it alone)
    hf:NAME[:CONFIG][@SPLIT]     a dataset through `datasets` (a hub name or a local path)
"""

from __future__ import annotations

import csv
import glob
import itertools
import json
import math
import re
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmctl.errors import LlmctlError, UsageError

RECORD_SUFFIXES = {".json", ".jsonl", ".ndjson", ".parquet", ".csv", ".tsv"}
_WEIGHT = re.compile(r"^(?P<target>.+?)\*(?P<weight>\d+(?:\.\d*)?|\.\d+)$")
_GLOB_CHARS = re.compile(r"[*?\[]")
# Test suites and their data files are not the code people want a model to learn from.
_STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
_SNIFF_BYTES = 8192


@dataclass(frozen=True)
class SourceSpec:
    raw: str
    target: str  # the spec without its weight
    weight: float
    kind: str  # 'stdlib', 'hf', 'file', 'dir', 'glob'


@dataclass(frozen=True)
class Skip:
    reason: str  # 'binary', 'not_utf8', ...


@dataclass(frozen=True)
class Item:
    """One input: `text` for a text file, `record` for a row of a record file or dataset."""

    text: str | None = None
    record: dict[str, Any] | None = None
    path: str | None = None  # where a text document came from, relative to its source


def parse_source(raw: str) -> SourceSpec:
    """'extra/**/*.md*2' -> target 'extra/**/*.md', weight 2.0; checks that paths exist."""
    spec = raw.strip()
    weight = 1.0
    match = _WEIGHT.match(spec)
    if match:
        spec, weight = match["target"], float(match["weight"])
        if not math.isfinite(weight) or weight <= 0:
            raise UsageError(
                f"source '{raw}': the weight after '*' must be a number above 0 (for example *2 or *0.5)"
            )
    if not spec:
        raise UsageError("--source needs a value: stdlib, a path, a glob, or hf:NAME[:CONFIG][@SPLIT]")
    if spec == "stdlib":
        return SourceSpec(raw, spec, weight, "stdlib")
    if spec.startswith("hf:"):
        name = spec[3:].split("@")[0].split(":")[0]
        if not name:
            raise UsageError(f"source '{raw}': name the dataset, as in hf:NAME[:CONFIG][@SPLIT]")
        local = name.startswith(("/", "./", "../", "~")) or name in (".", "..")
        if local and not Path(name).expanduser().is_dir():
            raise UsageError(
                f"source '{raw}': the dataset directory '{name}' does not exist; give the path of a "
                "saved dataset (datasets' save_to_disk or a folder of data files)"
            )
        return SourceSpec(raw, spec, weight, "hf")
    path = Path(spec).expanduser()
    if _GLOB_CHARS.search(spec):
        return SourceSpec(raw, spec, weight, "glob")
    if path.is_dir():
        return SourceSpec(raw, spec, weight, "dir")
    if path.is_file():
        return SourceSpec(raw, spec, weight, "file")
    raise UsageError(
        f"source '{spec}' does not exist; give an existing file, directory or glob, 'stdlib', "
        f"or hf:NAME for a dataset"
    )


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def source_files(spec: SourceSpec) -> list[tuple[Path, str]]:
    """The files a path-like source reads, sorted so builds are reproducible, each with its label."""
    if spec.kind == "stdlib":
        root = stdlib_root()
        return [(path, str(path.relative_to(root))) for path in _walk(root, _STDLIB_SKIP_DIRS, suffix=".py")]
    if spec.kind == "dir":
        root = Path(spec.target).expanduser()
        return [(path, str(path.relative_to(root))) for path in _walk(root, {"__pycache__"})]
    if spec.kind == "file":
        path = Path(spec.target).expanduser()
        return [(path, path.name)]
    matches = sorted(glob.glob(str(Path(spec.target).expanduser()), recursive=True))
    if not matches:
        raise UsageError(
            f"no files match '{spec.target}'; check the pattern (quote it so the shell does not expand it)"
        )
    files: list[tuple[Path, str]] = []
    for match in map(Path, matches):
        if match.is_dir():
            files.extend((path, str(path)) for path in _walk(match, {"__pycache__"}))
        elif match.is_file():
            files.append((match, str(match)))
    return files


def _walk(root: Path, skip_dirs: set[str], suffix: str | None = None) -> list[Path]:
    """Every file under `root`, leaving out hidden files and folders (.git, .venv, ...)."""
    found = []
    for path in root.rglob(f"*{suffix or ''}"):
        parts = path.relative_to(root).parts
        if any(part.startswith(".") for part in parts) or skip_dirs.intersection(parts[:-1]):
            continue
        if path.is_file():
            found.append(path)
    return sorted(found)


def is_record_file(path: Path) -> bool:
    return path.suffix.lower() in RECORD_SUFFIXES


def read_text_file(path: Path) -> str | Skip:
    data = path.read_bytes()
    if b"\x00" in data[:_SNIFF_BYTES]:
        return Skip("binary")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return Skip("not_utf8")


def open_source(
    spec: SourceSpec, instruct_format: str | None, limit: int | None
) -> tuple[int | None, Iterator[Item | Skip]]:
    """(how many items to expect, when known; the items). `limit` caps the items taken from this source."""
    if spec.kind == "hf":
        return None, (Item(record=row) for row in read_hf(spec.target, limit))
    files = source_files(spec)
    as_records = [
        instruct_format is not None or (spec.kind != "dir" and is_record_file(path)) for path, _ in files
    ]
    total = None if any(as_records) else len(files)
    if limit is not None and total is not None:
        total = min(total, limit)
    return total, _limited(_file_items(files, as_records, instruct_format), limit)


def _file_items(
    files: list[tuple[Path, str]], as_records: list[bool], instruct_format: str | None
) -> Iterator[Item | Skip]:
    for (path, label), records in zip(files, as_records, strict=True):
        if not records:
            content = read_text_file(path)
            yield content if isinstance(content, Skip) else Item(text=content, path=label)
            continue
        headerless = _holds_label_lines(path, instruct_format)
        for row in read_records(path, headerless_labels=headerless):
            yield Item(record=row, path=label)


def _holds_label_lines(path: Path, instruct_format: str | None) -> bool:
    """SMS Spam Collection files come without an extension (or as .tsv) and without a header."""
    if instruct_format not in ("sms-spam", "auto"):
        return False
    if path.suffix.lower() == ".tsv":
        return looks_like_label_lines(path)
    if is_record_file(path):
        return False
    return instruct_format == "sms-spam" or looks_like_label_lines(path)


def _limited(items: Iterator[Item | Skip], limit: int | None) -> Iterator[Item | Skip]:
    """Skipped inputs do not count against the limit: it caps what a source contributes."""
    taken = 0
    for item in items:
        if limit is not None and taken >= limit:
            return
        yield item
        taken += isinstance(item, Item)


# ---------------------------------------------------------------- record files


def read_records(path: Path, headerless_labels: bool = False) -> Iterator[dict[str, Any]]:
    """Rows of a JSON (a list of objects), JSONL, Parquet, CSV or TSV file as dicts.

    With headerless_labels a TSV (or extensionless) file is read as 'label<TAB>text' lines,
    the layout of the SMS Spam Collection.
    """
    suffix = path.suffix.lower()
    if headerless_labels:
        rows = _read_label_lines(path)
    elif suffix == ".json":
        rows = _read_json(path)
    elif suffix in (".jsonl", ".ndjson"):
        rows = _read_jsonl(path)
    elif suffix == ".parquet":
        rows = _read_parquet(path)
    elif suffix in (".csv", ".tsv"):
        rows = _read_csv(path, "\t" if suffix == ".tsv" else ",")
    else:
        raise UsageError(
            f"'{path}' is not a JSON, JSONL, Parquet, CSV or TSV file; instruction formats read records "
            f"(drop --format to use it as plain text)"
        )
    try:
        yield from rows
    except UnicodeDecodeError as exc:
        raise UsageError(
            f"'{path}' is not UTF-8 text ({exc.reason} at byte {exc.start}); convert it to UTF-8"
        ) from exc


def looks_like_label_lines(path: Path) -> bool:
    """True when the first line reads 'ham<TAB>...' or 'spam<TAB>...' (the SMS Spam Collection)."""
    with open(path, encoding="utf-8", errors="replace") as handle:
        first = handle.readline()
    label, tab, _ = first.partition("\t")
    return bool(tab) and label.strip().lower() in ("ham", "spam")


def _read_label_lines(path: Path) -> Iterator[dict[str, Any]]:
    with open(path, encoding="utf-8", errors="replace", newline="") as handle:
        for line in handle:
            label, tab, text = line.rstrip("\r\n").partition("\t")
            if tab:
                yield {"label": label.strip(), "text": text}
            elif line.strip():
                yield {"label": None, "text": line}


def _read_json(path: Path) -> Iterator[dict[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(
            f"'{path}' is not valid JSON ({exc}); fix the file, or name it .jsonl if it holds one "
            f"object per line"
        ) from exc
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise UsageError(f"'{path}' must hold a list of objects (or one object), not {type(data).__name__}")
    for row in data:
        yield row if isinstance(row, dict) else {"value": row}


def _read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UsageError(
                    f"'{path}' line {number} is not valid JSON ({exc.msg}); fix or remove that line"
                ) from exc
            yield row if isinstance(row, dict) else {"value": row}


def _read_parquet(path: Path) -> Iterator[dict[str, Any]]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises its own ArrowInvalid for a damaged file
        raise UsageError(f"'{path}' is not a readable Parquet file ({_first_line(exc)})") from exc
    for batch in parquet.iter_batches(batch_size=1024):
        yield from batch.to_pylist()


def _read_csv(path: Path, delimiter: str) -> Iterator[dict[str, Any]]:
    # Long documents in one cell exceed csv's default 128 KiB field limit.
    csv.field_size_limit(2**31 - 1)
    with open(path, encoding="utf-8", newline="") as handle:
        yield from csv.DictReader(handle, delimiter=delimiter)


# ---------------------------------------------------------------- Hugging Face datasets


def parse_hf(target: str) -> tuple[str, str | None, str]:
    """'hf:NAME[:CONFIG][@SPLIT]' -> (name, config, split); the split defaults to 'train'."""
    body = target.removeprefix("hf:")
    body, _, split = body.partition("@")
    name, _, config = body.partition(":")
    return name, config or None, split or "train"


def read_hf(target: str, limit: int | None) -> Iterator[dict[str, Any]]:
    """Rows of a dataset split, streamed where the dataset allows it so `--limit` reads only that many."""
    import datasets

    name, config, split = parse_hf(target)
    try:
        try:
            rows = datasets.load_dataset(name, config, split=split, streaming=True)
        except NotImplementedError:  # a few loading scripts cannot stream
            rows = datasets.load_dataset(name, config, split=split)
        yield from itertools.islice(rows, limit)
    except (FileNotFoundError, datasets.exceptions.DatasetNotFoundError) as exc:
        raise UsageError(
            f"dataset '{name}' was not found ({_first_line(exc)}); check the name, or the path of a "
            f"local dataset"
        ) from exc
    except ValueError as exc:
        # an unknown split or config arrives as a ValueError naming the valid ones
        raise UsageError(f"dataset '{name}': {_first_line(exc)} (pick them as hf:NAME:CONFIG@SPLIT)") from exc
    except ConnectionError as exc:
        raise LlmctlError(
            f"could not reach the Hugging Face hub for '{name}' ({_first_line(exc)}); check the "
            f"network, or download the dataset and give its local path"
        ) from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
