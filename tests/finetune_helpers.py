"""Helpers for the finetune, qlora and merge tests: the tiny base's shape, an instruction task it
cannot do, and greedy decoding. The fixtures that train the base live in finetune_fixtures."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from llmctl.data.sft import render_prompt
from llmctl.tokenizer import END_OF_TURN_TOKEN, LoadedTokenizer

TINY_MODEL = [
    "--set",
    "model.n_layer=2",
    "--set",
    "model.n_head=4",
    "--set",
    "model.d_model=64",
    "--set",
    "model.context_length=64",
    "--set",
    "model.tie_embeddings=false",
]
PRETRAIN = [
    "--set",
    "train.micro_batch_size=8",
    "--set",
    "train.lr=3e-3",
    "--set",
    "train.warmup_steps=5",
    "--set",
    "train.eval_batches=2",
    "--set",
    "train.precision=fp32",
]
# finetuning settings small enough that a run takes seconds on one core
QUICK = [
    "--set",
    "train.micro_batch_size=4",
    "--set",
    "train.eval_batches=2",
    "--set",
    "train.warmup_steps=5",
    "--set",
    "train.log_every=10",
    "--set",
    "train.precision=fp32",
    "--set",
    "train.eval_every=1000",
    "--set",
    "train.save_every=1000",
]

# An instruction task a base trained on code cannot do: each question has a one-word answer.
TASK = [
    ("Name a red fruit.", "apple"),
    ("What color is the sky?", "blue"),
    ("Opposite of hot?", "cold"),
    ("How many legs has a cat?", "four"),
    ("What do bees make?", "honey"),
    ("Capital of France?", "Paris"),
    ("Largest planet?", "Jupiter"),
    ("Frozen water is called?", "ice"),
]


def task_records() -> list[dict[str, str]]:
    return [{"instruction": prompt, "output": answer} for prompt, answer in TASK]


def plain_tokenizer_base(directory: Path) -> Path:
    """A checkpoint whose byte tokenizer has no chat template (only an end token), random weights."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    from llmctl.checkpoint.files import FullModelIO, write_checkpoint
    from llmctl.config import ModelConfig, RunConfig
    from llmctl.model.transformer import Transformer
    from llmctl.tokenizer import EOT_TOKEN, byte_to_unicode

    vocab = {EOT_TOKEN: 0, **{char: 1 + byte for byte, char in byte_to_unicode().items()}}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(EOT_TOKEN, special=True, normalized=False)])
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    config = RunConfig(model=ModelConfig(n_layer=1, n_head=2, d_model=32, context_length=256, vocab_size=257))
    return write_checkpoint(
        directory / "plain" / "step-00000001",
        model=Transformer(config.model),
        model_io=FullModelIO(),
        config=config,
        trainer_state={},
        meta={"step": 1},
        tokenizer_file=directory / "tokenizer.json",
    )


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


# ---------------------------------------------------------------- decoding and accuracy


@torch.no_grad()
def greedy_answer(
    model: torch.nn.Module,
    tokenizer: LoadedTokenizer,
    prompt: str,
    style: str = "chat",
    max_new_tokens: int = 12,
) -> str:
    """The model's argmax continuation of `prompt` rendered in `style`, up to its end token."""
    model.eval()
    stops = {tokenizer.eot_id, tokenizer.special_ids.get(END_OF_TURN_TOKEN)}
    ids = tokenizer.encode(render_prompt([{"role": "user", "content": prompt}], style))
    answer: list[int] = []
    for _ in range(max_new_tokens):
        logits = model(torch.tensor([ids + answer]))
        token = int(logits[0, -1].argmax())
        if token in stops:
            break
        answer.append(token)
    return tokenizer.decode(answer)


def exact_match(model: torch.nn.Module, tokenizer: LoadedTokenizer, style: str = "chat") -> float:
    hits = sum(greedy_answer(model, tokenizer, prompt, style) == answer for prompt, answer in TASK)
    return hits / len(TASK)
