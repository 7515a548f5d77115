"""Preference accuracy of a model on held-out pairs: how often it prefers the chosen reply.

Each pair is read and rendered exactly as `llmctl dpo` read it (llmctl.data.preference), in the
model's prompt style, and both sides are scored by the model and by a reference:

    reward     β (log π(reply) - log π_ref(reply))     DPO's implicit reward
    accuracy   the share of pairs whose chosen reward is the higher (a tie counts half, so a policy
               that is still its reference scores 0.5)
    margin     the mean chosen reward minus the rejected one
    logp accuracy  the share of pairs with log π(chosen) > log π(rejected), no reference involved

The reference defaults to the base a DPO checkpoint was trained from (its meta.json names it; a
QLoRA run's, as it trained: the base's 4-bit round trip);
a model with none (an SFT checkpoint, say) is measured without one: logp accuracy only, unless
--reference names one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llmctl.checkpoint.files import read_config, read_meta
from llmctl.checkpoint.load import load_weights
from llmctl.checkpoint.refs import resolve_model_ref
from llmctl.data import preference
from llmctl.errors import UsageError
from llmctl.eval.results import describe_checkpoint
from llmctl.model import quantize
from llmctl.tokenizer import LoadedTokenizer, load_tokenizer_file
from llmctl.train.preference_loss import score
from llmctl.workspace import Workspace

SPLITS = ("val", "train", "all")


@dataclass
class PairScores:
    """Both sides' log-probabilities under the model and, if there is one, the reference."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    ref_chosen: torch.Tensor | None = None
    ref_rejected: torch.Tensor | None = None


def preference_figures(scores: PairScores, beta: float) -> dict[str, float]:
    figures = {"logp_accuracy": (scores.chosen > scores.rejected).double().mean().item()}
    if scores.ref_chosen is not None:
        chosen = beta * (scores.chosen - scores.ref_chosen).double()
        rejected = beta * (scores.rejected - scores.ref_rejected).double()
        wins = (chosen > rejected).double() + 0.5 * (chosen == rejected).double()
        figures.update(
            accuracy=wins.mean().item(),
            reward_margin=(chosen - rejected).mean().item(),
            rewards_chosen=chosen.mean().item(),
            rewards_rejected=rejected.mean().item(),
        )
    return figures


@torch.no_grad()
def score_all(
    model: nn.Module,
    pairs: list[preference.Pair],
    context_length: int,
    pad_id: int,
    batch_size: int,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    chosen, rejected = [], []
    for begin in range(0, len(pairs), batch_size):
        batch = preference.collate_pairs(pairs[begin : begin + batch_size], context_length, pad_id, device)
        group_chosen, group_rejected = score(model, batch)
        chosen.append(group_chosen.double().cpu())
        rejected.append(group_rejected.double().cpu())
    return torch.cat(chosen), torch.cat(rejected)


def evaluate_preference(
    workspace: Workspace,
    ref: str,
    data: str,
    split: str = "val",
    *,
    reference: str | None = None,
    beta: float | None = None,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """The summary of the model `ref` names on `data`'s `split` (val, train or all)."""
    if split not in SPLITS:
        raise UsageError(f"unknown --split '{split}'; use {', '.join(SPLITS)}")
    if beta is not None and not 0 < beta <= 10:
        raise UsageError(f"--beta must be in (0, 10], got {beta}")
    device = torch.device(device)
    path = resolve_model_ref(workspace, ref)
    meta, config = read_meta(path), read_config(path)
    tokenizer = load_tokenizer_file(path / "tokenizer.json")
    reference_path = _reference_path(workspace, reference, meta)
    if reference_path is not None:
        _check_reference(reference_path, tokenizer, config.model.context_length)
    source = preference.open_pairs(workspace, data)
    records = {"val": source.val, "train": source.train, "all": source.train + source.val}[split]
    style, context = config.data.prompt_style, config.model.context_length
    encoded = preference.encode_pairs(records, tokenizer, style, context, f"data '{data}'")
    if not encoded.pairs:
        raise UsageError(f"no pair of data '{data}' ({split}) fits the model's context of {context} tokens")

    started = time.perf_counter()
    model = load_weights(path, meta, config=config, device=device)
    scores = PairScores(*score_all(model, encoded.pairs, context, tokenizer.pad_id, batch_size, device))
    del model
    if reference_path is not None:
        reference_model = load_weights(reference_path, device=device)
        if reference is None and config.adapter.quantize == "nf4":
            quantize.fake_quantize(reference_model)  # QLoRA's reference was the 4-bit base
        scores.ref_chosen, scores.ref_rejected = score_all(
            reference_model, encoded.pairs, context, tokenizer.pad_id, batch_size, device
        )
    beta = beta if beta is not None else config.dpo.beta
    return {
        "kind": "preference",
        **describe_checkpoint(workspace, ref, path),
        "data": data,
        "split": split,
        "split_note": source.val_note if split == "val" else None,
        "reference": str(reference_path) if reference_path else None,
        "beta": beta,
        "prompt_style": style,
        "pairs": len(encoded.pairs),
        "dropped": encoded.dropped,
        "truncated": encoded.truncated,
        **preference_figures(scores, beta),
        "seconds": round(time.perf_counter() - started, 3),
    }


def _reference_path(workspace: Workspace, reference: str | None, meta: dict[str, Any]) -> Path | None:
    if reference is not None:
        return resolve_model_ref(workspace, reference)
    if meta.get("task") == "preference" and meta.get("base_checkpoint"):
        base = Path(meta.get("reference_checkpoint") or meta["base_checkpoint"])
        if not base.exists():
            raise UsageError(
                f"the reference this model was trained against is gone ({base}); "
                "name one with --reference REF"
            )
        return base
    return None


def _check_reference(path: Path, tokenizer: LoadedTokenizer, context_length: int) -> None:
    reference_tokenizer = load_tokenizer_file(path / "tokenizer.json")
    if reference_tokenizer.sha256 != tokenizer.sha256:
        raise UsageError(
            f"reference '{path}' uses another tokenizer than the model's; a reference must score the "
            "same tokens: give a checkpoint trained with the model's tokenizer"
        )
    if read_config(path).model.context_length < context_length:
        raise UsageError(f"reference '{path}' has a shorter context than the model's {context_length} tokens")
