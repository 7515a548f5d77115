"""A trained model for the eval tests: the pretrain tests' small stdlib workspace (code corpus,
512-token BPE tokenizer), a 150-step pretrain run `base` with checkpoints at 50, 100 and 150, and
an untrained checkpoint of the same shape. Each test module declares its own fixture over
`trained_workspace` (fixtures imported across modules would be collected twice)."""

from __future__ import annotations

from pathlib import Path

import torch
from pretrain_helpers import build_template, one_thread

from llmctl.checkpoint.files import FullModelIO, read_config, write_checkpoint
from llmctl.cli.main import main
from llmctl.model.transformer import Transformer
from llmctl.workspace import checkpoint_name

RUN = "base"
STEPS = 150
TRAIN = [
    "pretrain",
    "--corpus",
    "code",
    "--tokenizer",
    "tok",
    "--preset",
    "cpu-debug",
    "--run",
    RUN,
    "--max-steps",
    str(STEPS),
    "--set",
    "model.n_layer=2",
    "--set",
    "model.n_head=2",
    "--set",
    "model.d_model=64",
    "--set",
    "model.context_length=64",
    "--set",
    "train.micro_batch_size=8",
    "--set",
    "train.lr=3e-3",
    "--set",
    "train.warmup_steps=5",
    "--set",
    "train.eval_batches=2",
    "--set",
    "train.eval_every=50",
    "--set",
    "train.save_every=50",
    "--set",
    "train.keep_last=5",
    "--set",
    "train.log_every=50",
]


def trained_workspace(root: Path) -> Path:
    """A workspace holding run `base` (trained) and runs/untrained/checkpoints/step-00000000 (random
    weights, on disk only: refer to it by its directory)."""
    build_template(root)
    with one_thread():
        assert main(["--workspace", str(root), *TRAIN]) == 0
    write_untrained_checkpoint(root, root / "runs" / RUN / "checkpoints" / checkpoint_name(STEPS))
    return root


def untrained_checkpoint(root: Path) -> Path:
    return root / "runs" / "untrained" / "checkpoints" / checkpoint_name(0)


def write_untrained_checkpoint(root: Path, like: Path) -> Path:
    config = read_config(like)
    torch.manual_seed(0)
    return write_checkpoint(
        untrained_checkpoint(root),
        model=Transformer(config.model),
        model_io=FullModelIO(),
        config=config,
        trainer_state={},
        meta={"step": 0},
        tokenizer_file=like / "tokenizer.json",
    )
