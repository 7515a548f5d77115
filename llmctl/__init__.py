"""llmctl: train, adapt, measure and talk to small GPT-style language models."""

__version__ = "0.1.0"
