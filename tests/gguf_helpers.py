"""For the GGUF export tests: reading a file's metadata back with gguf's reader, Hugging Face
directories with the tokenizers llama.cpp can and cannot represent, and Ollama's template language
(Go's text/template) run by the Go toolchain where one is installed."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

from hf_helpers import TOKENIZER_TEXT, llama_model

from llmctl.export.gguf_vocab import LLAMA3_REGEX

# a reply the tiny chat model never saw (its training reply names the arguments a and b), after
# the request it answers: held out for perplexity
HELD_OUT_REQUEST = "<|user|>\nwrite a function that adds two numbers<|end|>\n<|assistant|>\n"
HELD_OUT_REPLY = (
    "Here you go:\n```python\ndef add(x, y):\n    return x + y\n```\nand to add three: add(add(x, y), z)"
)


def gguf_fields(path: Path) -> dict[str, Any]:
    from gguf import GGUFReader

    return {name: field.contents() for name, field in GGUFReader(path).fields.items()}


def gguf_tensor_types(path: Path) -> dict[str, str]:
    from gguf import GGUFReader

    return {tensor.name: tensor.tensor_type.name for tensor in GGUFReader(path).tensors}


def save_llama3_style_dir(directory: Path) -> None:
    """A Llama directory whose tokenizer splits text as Llama 3's does (its regex, then byte-level
    BPE with ignore_merges), which llama.cpp knows as `llama-bpe`."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(ignore_merges=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<|begin_of_text|>", "<|end_of_text|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator([*TOKENIZER_TEXT, "IT'S THE CAT'S 12345 toys"], trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>"
    )
    fast.save_pretrained(directory)
    llama_model(tokenizer.get_vocab_size()).save_pretrained(directory)


def replace_with_sentencepiece_style_tokenizer(directory: Path) -> None:
    """Llama 2 / TinyLlama's kind of tokenizer.json (Metaspace, BPE with byte fallback), which
    llama.cpp reads only from a SentencePiece model with scores, not from merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"])
    tokenizer.train_from_iterator(TOKENIZER_TEXT, trainer)
    tokenizer.save(str(directory / "tokenizer.json"))


def go_render(template: str, messages: list[dict[str, str]], workdir: Path) -> str | None:
    """`template` rendered over `messages` by Go's text/template, Ollama's template engine; None
    without a Go toolchain."""
    go = shutil.which("go")
    if go is None:
        return None
    program = workdir / "render.go"
    program.write_text(
        "package main\n"
        'import ("encoding/json"; "os"; "text/template")\n'
        'type Message struct { Role string `json:"role"`; Content string `json:"content"` }\n'
        "func main() {\n"
        "  var messages []Message\n"
        "  json.Unmarshal([]byte(os.Args[2]), &messages)\n"
        "  source, _ := os.ReadFile(os.Args[1])\n"
        '  t := template.Must(template.New("m").Parse(string(source)))\n'
        '  if err := t.Execute(os.Stdout, map[string]any{"Messages": messages}); err != nil { panic(err) }\n'
        "}\n"
    )
    (workdir / "template.txt").write_text(template)
    env = {"GOCACHE": str(workdir / "gocache"), "HOME": str(workdir), "GOPATH": str(workdir / "gopath")}
    env |= {"PATH": str(Path(go).parent), "GOFLAGS": "-mod=mod", "GO111MODULE": "off"}
    done = subprocess.run(
        [go, "run", str(program), str(workdir / "template.txt"), json.dumps(messages)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=True,
    )
    return done.stdout
