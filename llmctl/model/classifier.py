"""Sequence classification: a linear head on the hidden state of each text's final (end) token.

The classifier is the Transformer plus one `score` matrix, so a full checkpoint holds the base's
weight names unchanged and `score.weight` beside them; the label set lives in the checkpoint's
meta.json (`labels`, in class-index order) and `task: classify` says which model to build.
"""

from __future__ import annotations

import torch
from torch import nn

from llmctl.config import ModelConfig
from llmctl.model.transformer import Transformer

TASK = "classify"
HEAD = "score"


class TransformerClassifier(Transformer):
    def __init__(self, cfg: ModelConfig, n_labels: int):
        super().__init__(cfg)
        self.score = nn.Linear(cfg.d_model, n_labels, bias=False)
        nn.init.normal_(self.score.weight, std=cfg.init_std)

    def forward(self, input_ids: torch.Tensor, *, class_positions: torch.Tensor, **inputs) -> torch.Tensor:
        """Class logits [B, n_labels] from the hidden state at each row's class position."""
        hidden = self.hidden_states(input_ids, **inputs)
        final = hidden[torch.arange(hidden.shape[0], device=hidden.device), class_positions]
        return self.score(final)


def classifier_from(base: Transformer, n_labels: int) -> TransformerClassifier:
    """A classifier holding `base`'s weights and a fresh head (drawn from the current RNG)."""
    classifier = TransformerClassifier(base.cfg, n_labels)
    classifier.load_state_dict(base.state_dict(), strict=False)
    return classifier


@torch.no_grad()
def predict(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Class indices [B] for a batch from `llmctl.data.sft.collate_classification`."""
    return model(batch["input_ids"], class_positions=batch["class_positions"]).argmax(dim=-1)
