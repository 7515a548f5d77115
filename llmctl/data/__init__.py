"""Corpora: sources, cleaning, splits, instruction records, token caches, batches."""
