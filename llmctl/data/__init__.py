"""Corpora: sources, cleaning, splits, instruction records, token caches, batches."""

IGNORE_INDEX = -100  # a label that carries no loss (prompt tokens, padding): torch's cross-entropy default
