"""Real checkpoints for the sample and chat tests: a byte-level model trained in a few seconds on a
handful of chats rendered with the tokenizer's chat template, saved by the trainer's own writer."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import torch

from llmctl.chat.code_mode import CODE_SYSTEM_PROMPT
from llmctl.checkpoint.files import FullModelIO, write_checkpoint
from llmctl.config import GenerationConfig, ModelConfig, RunConfig
from llmctl.model.transformer import Transformer
from llmctl.tokenizer import EOT_TOKEN, render_chat
from llmctl.tokenizer_build import build_byte_tokenizer
from llmctl.workspace import checkpoint_name

GREETING = "Hello! Ask me about code."
ADD_REPLY = "Here you go:\n```python\ndef add(a, b):\n    return a + b\n```"
CHATS = [
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": GREETING}],
    [
        {"role": "user", "content": "write a function that adds two numbers"},
        {"role": "assistant", "content": ADD_REPLY},
    ],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": GREETING},
    ],
    [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": GREETING},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": GREETING},
    ],
    [
        {"role": "system", "content": CODE_SYSTEM_PROMPT},
        {"role": "user", "content": "write a function that adds two numbers"},
        {"role": "assistant", "content": ADD_REPLY},
    ],
]
MODEL = ModelConfig(n_layer=2, n_head=4, d_model=64, context_length=256, vocab_size=262)
GENERATION = GenerationConfig(max_new_tokens=60, temperature=0.0)


def byte_tokenizer_file(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "tokenizer.json"
    build_byte_tokenizer().save(str(path))
    return path


@functools.cache
def chat_model_state(steps: int = 150) -> dict[str, torch.Tensor]:
    """Weights of a model that answers CHATS' user turns with their replies (trained once per session)."""
    tokenizer = build_byte_tokenizer()
    eot_id = tokenizer.token_to_id(EOT_TOKEN)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = Transformer(MODEL)
        sequences = [
            tokenizer.encode(render_chat(chat, add_generation_prompt=False)).ids + [eot_id] for chat in CHATS
        ]
        width = max(len(ids) for ids in sequences)
        batch = torch.tensor([ids + [eot_id] * (width - len(ids)) for ids in sequences])
        optimizer = torch.optim.AdamW(model.parameters(), lr=6e-3)
        for _ in range(steps):
            logits = model(batch[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def write_run_checkpoint(
    workspace: Path,
    run: str,
    step: int = 100,
    val_loss: float | None = None,
    tokenizer_file: Path | None = None,
    model_config: ModelConfig = MODEL,
    generation: GenerationConfig = GENERATION,
    edit: Callable[[Transformer], None] | None = None,
) -> Path:
    """runs/<run>/checkpoints/step-N written by the trainer's writer, with the chat model's weights
    (or random ones when `model_config` is another shape), changed by `edit` where given."""
    torch.manual_seed(0)
    model = Transformer(model_config)
    if model_config == MODEL:
        model.load_state_dict(chat_model_state())
    if edit is not None:
        with torch.no_grad():
            edit(model)
    if tokenizer_file is None:
        tokenizer_file = byte_tokenizer_file(workspace / "byte-tokenizer")
    config = RunConfig(model=model_config, generation=generation)
    final = workspace / "runs" / run / "checkpoints" / checkpoint_name(step)
    final.parent.mkdir(parents=True, exist_ok=True)
    meta = {"step": step, "val_loss": val_loss}
    return write_checkpoint(
        final,
        model=model,
        model_io=FullModelIO(),
        config=config,
        trainer_state={},
        meta=meta,
        tokenizer_file=tokenizer_file,
    )
