"""Exports of a checkpoint to the formats other tools run: Hugging Face model directories, each
checked in the tool itself before it is renamed into place."""
