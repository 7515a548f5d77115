"""Hyperparameter search with Optuna (`llmctl tune`): the space, the study and its storage, one
trial as a real run of a stage, and the reports. Only `trial` and `sweep` import torch."""
