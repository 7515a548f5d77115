"""A built corpus on disk, as every other module reads it.

corpora/<name>/train.jsonl    one document per line: {"text": ..., "source": ...}
corpora/<name>/val.jsonl      (instruction corpora add the record's fields, see instruct.py;
                               their "text" is a plain rendering so tokenizers train on them)
corpora/<name>/meta.json      kind, sources and their statistics, sha256 of the content
corpora/<name>/cache/<tokenizer-sha>/  token caches (see tokencache.py)
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llmctl.errors import UsageError
from llmctl.workspace import Workspace

SPLITS = ("train", "val")


class CorpusStore:
    def __init__(self, workspace: Workspace, name: str):
        self.workspace = workspace
        self.name = name
        self.path = workspace.corpus_dir(name)

    @classmethod
    def open(cls, workspace: Workspace, name: str) -> CorpusStore:
        """The registered corpus `name`, or a one-line error saying how to build it."""
        row = workspace.registry(create=False).corpus(name)
        store = cls(workspace, name)
        if row is None or not (store.path / "meta.json").is_file():
            known = [r["name"] for r in workspace.registry(create=False).corpora()]
            listing = f" (known: {', '.join(known)})" if known else ""
            raise UsageError(
                f"corpus '{name}' does not exist in {workspace.root}{listing}; "
                f"build it with: llmctl corpus build {name} --source stdlib"
            )
        return store

    @property
    def meta(self) -> dict[str, Any]:
        return json.loads((self.path / "meta.json").read_text(encoding="utf-8"))

    def split_path(self, split: str) -> Path:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}")
        return self.path / f"{split}.jsonl"

    def records(self, split: str) -> Iterator[dict[str, Any]]:
        with open(self.split_path(split), encoding="utf-8") as handle:
            for line in handle:
                yield json.loads(line)

    def texts(self, split: str) -> Iterator[str]:
        for record in self.records(split):
            yield record["text"]
