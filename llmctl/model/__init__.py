"""The transformer and its sizing. Importing this package does not import torch."""
