"""Small Hugging Face model directories made on the spot (no hub): a byte-level BPE tokenizer
trained by the tokenizers library, and randomly initialised transformers models saved beside it."""

from __future__ import annotations

from pathlib import Path

import torch

TOKENIZER_TEXT = [
    "def add(a, b):\n    return a + b\n",
    "for item in items:\n    print(item)\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n",
    "import os\nimport sys\n\nprint(os.getcwd(), sys.argv)\n",
] * 20
PROMPTS = ["def add(a, b):", "for item in", "class Point:\n    def"]


def save_tokenizer(directory: Path, add_bos: bool = True) -> None:
    """tokenizer.json and tokenizer_config.json as transformers saves a Llama-style fast tokenizer:
    with add_bos, encoding prepends <s> (transformers 5 writes that into tokenizer.json's
    post-processor, as Llama 3's tokenizer.json has it)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(TOKENIZER_TEXT, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        add_bos_token=add_bos,
    )
    fast.save_pretrained(directory)


def llama_model(vocab_size: int, tie: bool = False, seed: int = 0):
    """A 2-layer LlamaForCausalLM with grouped-query attention (4 query heads, 2 key/value heads)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rope_theta=10000.0,
        tie_word_embeddings=tie,
        bos_token_id=1,
        eos_token_id=2,
        initializer_range=0.2,  # wide weights give peaked, varied logits: greedy paths worth comparing
    )
    return LlamaForCausalLM(config).eval()


def save_llama_dir(
    directory: Path,
    *,
    dtype: torch.dtype = torch.float32,
    max_shard_size: str | None = None,
    tie: bool = False,
    add_bos: bool = True,
):
    """A Hugging Face Llama directory; returns the model as transformers holds it."""
    from tokenizers import Tokenizer

    save_tokenizer(directory, add_bos=add_bos)
    vocab_size = Tokenizer.from_file(str(directory / "tokenizer.json")).get_vocab_size()
    model = llama_model(vocab_size, tie=tie).to(dtype)
    options = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(directory, **options)
    return model


def hf_greedy(model, ids: list[int], max_new_tokens: int, eos_id: int | None) -> list[int]:
    """transformers' greedy generate; the tokens after the prompt, without a final end-of-text."""
    with torch.no_grad():
        output = model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            eos_token_id=eos_id,
            pad_token_id=eos_id if eos_id is not None else 0,
        )
    tokens = output[0, len(ids) :].tolist()
    return tokens[:-1] if tokens and tokens[-1] == eos_id else tokens
