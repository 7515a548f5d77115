"""Classification checkpoints measured on labelled data: accuracy, per-class precision, recall and
F1, and the confusion matrix.

A classifier (`finetune --task classify`) keeps its label set in meta.json; its examples are read
and encoded exactly as finetuning read them (llmctl.data.sft), so `--data` takes the same data
file or instruction corpus, and `val` is the split finetuning held out.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch

from llmctl.checkpoint.files import read_config, read_meta
from llmctl.checkpoint.load import load_weights as load_checkpoint_model
from llmctl.checkpoint.refs import resolve_model_ref
from llmctl.data import sft
from llmctl.errors import UsageError
from llmctl.eval.results import describe_checkpoint
from llmctl.model.classifier import TASK, predict
from llmctl.tokenizer import load_tokenizer_file
from llmctl.workspace import Workspace

SPLITS = ("val", "train", "all")


def classification_metrics(
    labels: Sequence[str], truth: Sequence[int], predicted: Sequence[int]
) -> dict[str, Any]:
    """Accuracy, per-class and macro-averaged precision / recall / F1, and the confusion matrix
    (`confusion[i][j]`: examples of class i predicted as class j).

    As scikit-learn reports them (zero_division=0): a class never predicted has precision 0, one
    never present recall 0, and the macro mean is over the classes that occur among the true or
    the predicted labels, so a class absent from a small split does not count as a failure."""
    confusion = [[0] * len(labels) for _ in labels]
    for true, guess in zip(truth, predicted, strict=True):
        confusion[true][guess] += 1
    per_class = {}
    occurring = []
    for index, label in enumerate(labels):
        hits = confusion[index][index]
        predicted_as = sum(row[index] for row in confusion)
        present = sum(confusion[index])
        precision = hits / predicted_as if predicted_as else 0.0
        recall = hits / present if present else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[label] = {"precision": precision, "recall": recall, "f1": f1, "support": present}
        if present or predicted_as:
            occurring.append(per_class[label])
    return {
        "accuracy": sum(confusion[i][i] for i in range(len(labels))) / len(truth),
        "macro": {
            name: sum(figures[name] for figures in occurring) / len(occurring)
            for name in ("precision", "recall", "f1")
        },
        "per_class": per_class,
        "confusion": confusion,
    }


def evaluate_classifier(
    workspace: Workspace,
    ref: str,
    data: str,
    split: str = "val",
    *,
    batch_size: int = 32,
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """The summary of the classifier `ref` names on `data`'s `split` (val, train or all): what was
    measured, the metrics and the counts."""
    if split not in SPLITS:
        raise UsageError(f"unknown --split '{split}'; use {', '.join(SPLITS)}")
    path = resolve_model_ref(workspace, ref)
    meta = read_meta(path)
    if meta.get("task") != TASK:
        raise UsageError(
            f"'{ref}' is a language model, not a classifier; "
            f"make one with: llmctl finetune --model {ref} --data DATA --task classify"
        )
    source = sft.open_data(workspace, data)
    records = {"val": source.val, "train": source.train, "all": source.train + source.val}[split]
    labels = list(meta["labels"])
    tokenizer = load_tokenizer_file(path / "tokenizer.json")
    context_length = read_config(path).model.context_length
    examples, skipped = sft.encode_classification(records, tokenizer, labels, context_length)
    if not examples:
        raise UsageError(
            f"no example of data '{data}' ({split}) has one of the classifier's labels ({', '.join(labels)})"
        )

    model = load_checkpoint_model(path, meta).to(device).eval()
    started = time.perf_counter()
    predicted: list[int] = []
    for begin in range(0, len(examples), batch_size):
        batch = sft.collate_classification(
            examples[begin : begin + batch_size], context_length, tokenizer.pad_id, torch.device(device)
        )
        predicted += predict(model, batch).tolist()
    return {
        "kind": "classify",
        **describe_checkpoint(workspace, ref, path),
        "data": data,
        "split": split,
        "split_note": source.val_note if split == "val" else None,
        "labels": labels,
        "examples": len(examples),
        "skipped": skipped,
        **classification_metrics(labels, [example.label for example in examples], predicted),
        "seconds": round(time.perf_counter() - started, 3),
    }
