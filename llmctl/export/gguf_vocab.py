"""A tokenizer as GGUF carries it: tokens, merges, token types, the pre-tokenizer's name, special ids.

llama.cpp does not read tokenizer.json: it re-implements byte-level BPE and knows each model
family's pre-tokenizer (the regex that splits text before merging) by a name. A tokenizer goes
into the file only when one of those names splits text exactly as its own pre-tokenizer does:

    ByteLevel (GPT-2's regex), no prefix space        -> `gpt-2`      (every llmctl tokenizer)
    Split on Llama 3's regex, then ByteLevel, with    -> `llama-bpe`  (imported Llama 3 style)
    the BPE model's ignore_merges

Anything else (SentencePiece-style byte fallback, normalizers, other regexes) is refused by name;
the export's check then proves on real strings that llama.cpp's token ids equal llmctl's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from llmctl.config import ModelConfig
from llmctl.errors import UsageError
from llmctl.tokenizer import CHAT_TEMPLATE, END_OF_TURN_TOKEN, LoadedTokenizer

# llama.cpp's token types (gguf.TokenType)
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5

LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@dataclass
class GGUFVocab:
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    pre: str  # llama.cpp's name for the pre-tokenizer
    bos_id: int
    eos_id: int
    pad_id: int
    unk_id: int | None
    eot_id: int | None  # end of a chat turn
    add_bos: bool
    chat_template: str | None


def gguf_vocab(tokenizer: LoadedTokenizer, cfg: ModelConfig) -> GGUFVocab:
    """The tokenizer's GGUF form, or a UsageError naming what llama.cpp cannot represent."""
    spec = json.loads(tokenizer.tokenizer.to_str())
    pre = pre_tokenizer_name(spec)
    size = tokenizer.tokenizer.get_vocab_size(with_added_tokens=True)
    if size > cfg.vocab_size:
        raise UsageError(
            f"the tokenizer has {size} tokens but the model only {cfg.vocab_size} vocabulary rows; "
            "llama.cpp needs a row for every token"
        )
    added = tokenizer.tokenizer.get_added_tokens_decoder()
    refuse_stripping(added.values())
    tokens, types = [], []
    for token_id in range(size):
        token = tokenizer.tokenizer.id_to_token(token_id)
        if token is None:
            raise UsageError(
                f"the tokenizer has no token with id {token_id}; llama.cpp needs ids without gaps"
            )
        tokens.append(token)
        types.append(_token_type(added.get(token_id)))
    # rows the model has beyond the tokenizer: llama.cpp needs a token per row, marked unused
    tokens += [f"[PAD{token_id}]" for token_id in range(size, cfg.vocab_size)]
    types += [UNUSED] * (cfg.vocab_size - size)
    if len(set(tokens)) != len(tokens):
        raise UsageError("the tokenizer spells two tokens the same; llama.cpp needs each token text once")

    bos = tokenizer.meta.get("bos_token")
    eot = None
    if tokenizer.chat_template == CHAT_TEMPLATE and END_OF_TURN_TOKEN in tokenizer.special_ids:
        eot = tokenizer.special_ids[END_OF_TURN_TOKEN]
    return GGUFVocab(
        tokens=tokens,
        token_types=types,
        merges=[merge if isinstance(merge, str) else " ".join(merge) for merge in spec["model"]["merges"]],
        pre=pre,
        # documents follow the end-of-text token in training: it serves as bos where none is named
        bos_id=tokenizer.special_ids.get(bos, tokenizer.eot_id) if bos else tokenizer.eot_id,
        eos_id=tokenizer.eot_id,
        pad_id=tokenizer.pad_id,
        unk_id=tokenizer.special_ids.get("<unk>"),
        eot_id=eot,
        add_bos=tokenizer.add_bos,
        chat_template=tokenizer.chat_template,
    )


def pre_tokenizer_name(spec: dict[str, Any]) -> str:
    """llama.cpp's name for the tokenizer.json `spec`'s splitting, or a UsageError saying why none fits."""
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise _refuse(f"its model is {model.get('type')}, not byte-level BPE")
    if model.get("byte_fallback"):
        raise _refuse("it is SentencePiece-style BPE with byte fallback (Llama 2, TinyLlama)")
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix") or model.get("dropout"):
        raise _refuse("its BPE model uses a subword prefix, word suffix or dropout")
    if spec.get("normalizer") is not None:
        raise _refuse(f"it normalizes text first ({spec['normalizer'].get('type')})")
    if not _is_byte_level(spec.get("decoder")):
        raise _refuse("its decoder is not ByteLevel")
    pre = spec.get("pre_tokenizer") or {}
    ignore_merges = bool(model.get("ignore_merges"))
    if _byte_level(pre, use_regex=True) and not ignore_merges:
        return "gpt-2"
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else None
    if steps and len(steps) == 2 and _byte_level(steps[1], use_regex=False) and ignore_merges:
        split = steps[0]
        pattern = (split.get("pattern") or {}).get("Regex")
        isolated = split.get("behavior") == "Isolated" and not split.get("invert")
        if split.get("type") == "Split" and pattern == LLAMA3_REGEX and isolated:
            return "llama-bpe"
    raise _refuse(f"its pre-tokenizer ({_describe(pre)}) matches none llama.cpp knows: gpt-2 or llama-bpe")


def refuse_stripping(added_tokens) -> None:
    """HF's added tokens may swallow the spaces around them; llama.cpp keeps that for a few named
    tokens only, so such a tokenizer would split differently there."""
    for token in added_tokens:
        if token.lstrip or token.rstrip or token.single_word:
            raise _refuse(f"its added token {token.content!r} strips spaces or matches whole words only")


def _token_type(added) -> int:
    if added is None:
        return NORMAL
    return CONTROL if added.special else USER_DEFINED


def _byte_level(step: dict[str, Any], use_regex: bool) -> bool:
    return (
        step.get("type") == "ByteLevel"
        and bool(step.get("use_regex", True)) == use_regex
        and not step.get("add_prefix_space")
    )


def _is_byte_level(decoder: dict[str, Any] | None) -> bool:
    if decoder is None:
        return False
    if decoder.get("type") == "Sequence":
        return all(_is_byte_level(step) for step in decoder.get("decoders", []))
    return decoder.get("type") == "ByteLevel"


def _describe(pre: dict[str, Any]) -> str:
    if pre.get("type") == "Sequence":
        return " + ".join(step.get("type", "?") for step in pre.get("pretokenizers", []))
    return pre.get("type") or "none"


def _refuse(reason: str) -> UsageError:
    return UsageError(f"llama.cpp cannot represent this tokenizer: {reason}; GGUF export is not possible")
