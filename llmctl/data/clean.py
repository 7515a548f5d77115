"""Cleaning and the deterministic split: everything decided from a document's own content.

A document's sha256 decides three things, so none depends on the order of the sources or on
what else is in the corpus: whether it duplicates one already kept, whether it falls in the
validation split, and, for a fractional mixing weight, whether its extra copy is kept.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

_TWO_64 = float(2**64)


def normalize_text(text: str) -> str:
    """One newline convention and no byte-order mark; the text itself is left alone."""
    return text.removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n")


@dataclass(frozen=True)
class Placement:
    """Where a cleaned document goes: its content hash, split, and copies in the train split."""

    digest: bytes
    split: str
    train_copies: int
    split_draw: float  # the uniform number in [0, 1) that decided the split

    @property
    def key(self) -> bytes:
        return self.digest[:16]


def place(text: str, val_fraction: float, weight: float) -> Placement:
    """Split by hash: the first 8 bytes decide the split, the next 8 a fractional weight's extra copy.

    A weight W gives floor(W) copies in the train split plus one more for a (W - floor(W)) share of
    documents. The validation split keeps one copy of each document, so it measures the unweighted mix.
    """
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    split_draw = int.from_bytes(digest[:8], "big") / _TWO_64
    if split_draw < val_fraction:
        return Placement(digest, "val", 0, split_draw)
    copy_draw = int.from_bytes(digest[8:16], "big") / _TWO_64
    whole = math.floor(weight)
    return Placement(digest, "train", whole + (copy_draw < weight - whole), split_draw)
