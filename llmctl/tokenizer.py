"""Tokenizers: training byte-level BPE, importing existing ones, loading them for other modules.

    tokenizers/<name>/tokenizer.json   Hugging Face `tokenizers` format, readable by transformers
    tokenizers/<name>/meta.json        kind, special tokens and ids, chat template, training corpus,
                                       validation figures, sha256 of tokenizer.json

Building one (training, the byte tokenizer, importing) is llmctl.tokenizer_build's; this module
is what every reader of a tokenizer needs and imports nothing from llmctl.data.

Trained tokenizers put their special tokens first, so ids 0..5 are the same in every llmctl
tokenizer (`<|endoftext|>` is 0, `<|pad|>` is 1). Nothing is normalised, so decode(encode(x)) == x
for any text; training checks this on every validation document before anything is registered.

Other modules use `load_tokenizer(workspace, name)` or `load_tokenizer_file(path)` and get a
`LoadedTokenizer`. `encode` adds no special tokens: callers place `<|endoftext|>` themselves.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from llmctl.errors import LlmctlError, UsageError
from llmctl.workspace import Workspace

if TYPE_CHECKING:
    from tokenizers import Tokenizer

EOT_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
CHAT_ROLES = ("system", "user", "assistant")
END_OF_TURN_TOKEN = "<|end|>"
CHAT_SPECIAL_TOKENS = tuple(f"<|{role}|>" for role in CHAT_ROLES) + (END_OF_TURN_TOKEN,)
SPECIAL_TOKENS = (EOT_TOKEN, PAD_TOKEN, *CHAT_SPECIAL_TOKENS)
BYTE_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)
MIN_VOCAB_SIZE = BYTE_VOCAB_SIZE

# Imported tokenizers name their end-of-text token in many ways; the first one present wins.
EOT_CANDIDATES = (
    EOT_TOKEN,
    "<|end_of_text|>",
    "</s>",
    "<eos>",
    "<|eos|>",
    "[EOS]",
    "<|eot_id|>",
    "<｜end▁of▁sentence｜>",
)
PAD_CANDIDATES = (PAD_TOKEN, "<pad>", "<|padding|>", "[PAD]")

# The Hugging Face `chat_template` form of `render_chat`, stored with every tokenizer so an export
# to transformers formats chats exactly as training did. It renders identically with or without
# transformers' trim_blocks/lstrip_blocks, because it has no literal text outside its tags.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown chat role ' + message['role'] + ': use system, user or assistant') }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

TOKENIZER_FILE = "tokenizer.json"
META_FILE = "meta.json"
# What transformers saves beside a tokenizer.json: special tokens and the chat template (newer
# versions put the template in a file of its own).
HF_TOKENIZER_CONFIG = "tokenizer_config.json"
HF_CHAT_TEMPLATE_FILE = "chat_template.jinja"

Kind = Literal["bpe", "byte"]


def render_chat(messages: Iterable[Mapping[str, str]], add_generation_prompt: bool = True) -> str:
    """What CHAT_TEMPLATE renders, without jinja2:

        <|system|>\\n...<|end|>\\n<|user|>\\n...<|end|>\\n<|assistant|>\\n...<|end|>\\n

    and, with add_generation_prompt, a trailing `<|assistant|>\\n` for the model to continue.
    """
    parts = []
    for message in messages:
        role = message["role"]
        if role not in CHAT_ROLES:
            raise UsageError(f"unknown chat role {role}: use system, user or assistant")
        parts.append(f"<|{role}|>\n{message['content']}{END_OF_TURN_TOKEN}\n")
    if add_generation_prompt:
        parts.append("<|assistant|>\n")
    return "".join(parts)


def text_only_encoder(tokenizer: Tokenizer) -> Tokenizer:
    """A copy of `tokenizer` that reads the text of a special token (`<|endoftext|>` quoted in a
    document) as ordinary bytes. Documents are encoded with it, so the only special ids in their
    token stream are the ones the caller places; `tokenizer` itself keeps reading that text as the
    special token, which rendered chat templates rely on."""
    from tokenizers import Tokenizer

    encoder = Tokenizer.from_str(tokenizer.to_str())
    encoder.encode_special_tokens = True
    return encoder


@dataclass
class LoadedTokenizer:
    tokenizer: Tokenizer
    name: str
    path: Path
    sha256: str
    vocab_size: int
    eot_id: int
    pad_id: int
    special_ids: dict[str, int]
    chat_template: str | None
    meta: dict[str, Any] = field(default_factory=dict)
    # Whether the model was trained on texts that open with the BOS token (Llama-family tokenizers):
    # then a prompt or a scored document reads it first. llmctl's own tokenizers never set it:
    # their documents follow the end-of-text token instead.
    add_bos: bool = False

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    @property
    def document_start_id(self) -> int:
        """The token a document is read after: BOS where the tokenizer prepends one, else the
        end-of-text token that precedes every document in llmctl's training."""
        if self.add_bos:
            return self.tokenizer.token_to_id(self.meta["bos_token"])
        return self.eot_id

    def encode_prompt(self, text: str) -> list[int]:
        """A text as the model reads it from its start (a prompt, a document): after the BOS token
        where the tokenizer prepends one, as transformers' tokenizer does; plain `encode` otherwise."""
        ids = self.encode(text)
        return [self.document_start_id, *ids] if self.add_bos else ids

    def encode_documents(self, texts: Sequence[str]) -> list[list[int]]:
        """Documents as text: a special token's text inside one is encoded as ordinary bytes."""
        encodings = self._document_encoder.encode_batch(list(texts), add_special_tokens=False)
        return [encoding.ids for encoding in encodings]

    @functools.cached_property
    def _document_encoder(self) -> Tokenizer:
        return text_only_encoder(self.tokenizer)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def token_bytes(self, token_id: int) -> bytes:
        """The exact bytes one token stands for; a piece of a UTF-8 character is not decodable alone."""
        from tokenizers import decoders

        added = self.tokenizer.get_added_tokens_decoder().get(token_id)
        if added is not None:
            return added.content.encode("utf-8")
        if isinstance(self.tokenizer.decoder, decoders.ByteLevel):
            unicode_to_byte = _unicode_to_byte()
            return bytes(unicode_to_byte[char] for char in self.tokenizer.id_to_token(token_id))
        return self.decode([token_id]).encode("utf-8")

    def render_chat(self, messages: Iterable[Mapping[str, str]], add_generation_prompt: bool = True) -> str:
        if self.chat_template is None:
            missing = [token for token in CHAT_SPECIAL_TOKENS if token not in self.special_ids]
            raise LlmctlError(
                f"tokenizer '{self.name}' has no chat template: its vocabulary lacks {', '.join(missing)}; "
                f"train one with: llmctl tokenizer train NAME --corpus CORPUS --vocab-size 8192"
            )
        if self.chat_template != CHAT_TEMPLATE:  # a Hugging Face model's own template
            return _render_jinja_chat(self.chat_template, list(messages), add_generation_prompt, self.meta)
        return render_chat(messages, add_generation_prompt)


def _render_jinja_chat(
    template: str, messages: list[Mapping[str, str]], add_generation_prompt: bool, meta: Mapping[str, Any]
) -> str:
    """A chat template rendered as transformers renders it (sandboxed, trim_blocks, lstrip_blocks)."""
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise UsageError(f"the chat template refused the conversation: {message}")

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    environment.globals["raise_exception"] = raise_exception
    try:
        return environment.from_string(template).render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=meta.get("bos_token") or "",
            eos_token=meta.get("eot_token") or "",
        )
    except TemplateError as exc:
        raise LlmctlError(f"the tokenizer's chat template failed: {exc}") from exc


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters, the alphabet of ByteLevel."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    mapping = {byte: chr(byte) for byte in printable}
    shifted = 0
    for byte in range(256):
        if byte not in mapping:
            mapping[byte] = chr(256 + shifted)
            shifted += 1
    return mapping


@functools.cache
def _unicode_to_byte() -> dict[str, int]:
    return {char: byte for byte, char in byte_to_unicode().items()}


# --- the workspace side -----------------------------------------------------------------------


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _special_ids(tokenizer: Tokenizer) -> dict[str, int]:
    """Added tokens marked special, plus added ones llmctl knows by name.

    Only added tokens count: a plain vocabulary entry spelled `<|user|>` is never produced by
    encoding that text (the pre-tokenizer splits it first), so it cannot serve the chat template.
    """
    known = {*SPECIAL_TOKENS, *EOT_CANDIDATES, *PAD_CANDIDATES}
    return {
        added.content: token_id
        for token_id, added in sorted(tokenizer.get_added_tokens_decoder().items())
        if added.special or added.content in known
    }


def _first_present(candidates: Sequence[str], special_ids: Mapping[str, int]) -> str | None:
    return next((token for token in candidates if token in special_ids), None)


def describe_tokenizer(tokenizer: Tokenizer, eot_token: str | None = None) -> dict[str, Any]:
    """Special tokens, end-of-text and padding choices, and chat support of a tokenizer."""
    special_ids = _special_ids(tokenizer)
    if eot_token is not None:
        if tokenizer.token_to_id(eot_token) is None:
            raise UsageError(f"end-of-text token {eot_token!r} is not in the tokenizer's vocabulary")
        special_ids.setdefault(eot_token, tokenizer.token_to_id(eot_token))
    eot_token = eot_token or _first_present(EOT_CANDIDATES, special_ids)
    if eot_token is None:
        raise UsageError(
            f"no end-of-text token found (looked for {', '.join(EOT_CANDIDATES)}); "
            "name it with --eot-token TOKEN"
        )
    # Without a padding token, the end-of-text token pads: padded positions are masked anyway.
    pad_token = _first_present(PAD_CANDIDATES, special_ids) or eot_token
    missing_chat = [token for token in CHAT_SPECIAL_TOKENS if token not in special_ids]
    return {
        "vocab_size": tokenizer.get_vocab_size(with_added_tokens=True),
        "special_tokens": special_ids,
        "eot_token": eot_token,
        "eot_id": special_ids[eot_token],
        "pad_token": pad_token,
        "pad_id": special_ids[pad_token],
        "chat_template": None if missing_chat else CHAT_TEMPLATE,
        "missing_chat_tokens": missing_chat,
    }


def read_tokenizer_file(path: Path) -> Tokenizer:
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises bare Exceptions for malformed files
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UsageError(
            f"'{path}' is not a tokenizer.json ({reason}); "
            "pass the tokenizer.json of a Hugging Face tokenizer"
        ) from exc


def resolve_tokenizer_file(path: Path) -> Path:
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / TOKENIZER_FILE
    if not path.is_file():
        raise UsageError(f"'{path}' does not exist; pass the path of a tokenizer.json (or of its directory)")
    return path


def tokenizer_meta(workspace: Workspace, name: str) -> dict[str, Any]:
    """The stored meta.json of a registered tokenizer, with `path` (its tokenizer.json) added."""
    row = workspace.registry(create=False).tokenizer(name)
    if row is None:
        known = [r["name"] for r in workspace.registry(create=False).tokenizers()]
        listing = f" (known: {', '.join(known)})" if known else ""
        raise UsageError(
            f"tokenizer '{name}' does not exist in {workspace.root}{listing}; "
            f"train it with: llmctl tokenizer train {name} --corpus CORPUS --vocab-size 8192"
        )
    directory = Path(row["path"])
    meta_path = directory / META_FILE
    if not meta_path.is_file():
        raise LlmctlError(
            f"tokenizer '{name}' is registered but {meta_path} is missing; "
            f"recreate it with --overwrite (llmctl tokenizer train {name} ... --overwrite)"
        )
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    return {**meta, "path": str(directory / TOKENIZER_FILE)}


def load_tokenizer_file(
    path: Path | str, name: str | None = None, eot_token: str | None = None
) -> LoadedTokenizer:
    """A tokenizer.json anywhere (a checkpoint, a Hugging Face model directory, or the file itself).
    A tokenizer_config.json beside it names the end-of-text token and the chat template."""
    path = resolve_tokenizer_file(Path(path))
    tokenizer = read_tokenizer_file(path)
    settings = hf_tokenizer_settings(path.parent)
    description = describe_tokenizer(tokenizer, eot_token or settings.get("eos_token"))
    description["bos_token"] = settings.get("bos_token")
    description["chat_template"] = settings.get("chat_template") or description["chat_template"]
    return LoadedTokenizer(
        tokenizer=tokenizer,
        name=name or path.parent.name,
        path=path,
        sha256=file_sha256(path),
        vocab_size=description["vocab_size"],
        eot_id=description["eot_id"],
        pad_id=description["pad_id"],
        special_ids=description["special_tokens"],
        chat_template=description["chat_template"],
        meta=description,
        add_bos=_wants_bos(tokenizer, settings),
    )


# Tokenizer classes whose transformers implementation prepends BOS unless told not to.
_BOS_BY_DEFAULT_CLASSES = (
    "LlamaTokenizer",
    "LlamaTokenizerFast",
    "CodeLlamaTokenizer",
    "CodeLlamaTokenizerFast",
)


def _wants_bos(tokenizer: Tokenizer, settings: Mapping[str, Any]) -> bool:
    """Whether transformers' tokenizer for these files prepends the BOS token: tokenizer_config.json's
    `add_bos_token` where it says; else whether tokenizer.json's post-processor prepends it (Llama 3,
    and every save by transformers 5); else true for Llama-family tokenizer classes. Never without a
    BOS token in the vocabulary, so llmctl's own tokenizers (no tokenizer_config.json) and GPT-2's
    (no such post-processor) stay false."""
    bos = settings.get("bos_token")
    bos_id = tokenizer.token_to_id(bos) if bos else None
    if bos_id is None:
        return False
    if isinstance(settings.get("add_bos_token"), bool):
        return settings["add_bos_token"]
    if tokenizer.encode("a", add_special_tokens=True).ids[:1] == [bos_id]:
        return True
    return settings.get("tokenizer_class") in _BOS_BY_DEFAULT_CLASSES


def hf_tokenizer_settings(directory: Path) -> dict[str, Any]:
    """bos_token, eos_token, chat_template, add_bos_token and tokenizer_class as transformers saved
    them in `directory`; {} when it saved nothing there. Unreadable files count as absent: the
    tokenizer.json alone still works."""
    try:
        config = json.loads((directory / HF_TOKENIZER_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        config = {}
    settings = {}
    for key in ("bos_token", "eos_token"):
        token = config.get(key)
        token = token.get("content") if isinstance(token, dict) else token  # AddedToken's saved form
        if isinstance(token, str) and token:
            settings[key] = token
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: the default one serves chat
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    template_file = directory / HF_CHAT_TEMPLATE_FILE
    if not template and template_file.is_file():
        template = template_file.read_text(encoding="utf-8")
    if isinstance(template, str) and template:
        settings["chat_template"] = template
    if isinstance(config.get("add_bos_token"), bool):
        settings["add_bos_token"] = config["add_bos_token"]
    if isinstance(config.get("tokenizer_class"), str):
        settings["tokenizer_class"] = config["tokenizer_class"]
    return settings


def load_tokenizer(workspace: Workspace, name: str) -> LoadedTokenizer:
    meta = tokenizer_meta(workspace, name)
    loaded = load_tokenizer_file(meta["path"], name=name, eot_token=meta.get("eot_token"))
    loaded.meta = meta
    return loaded


def list_tokenizers(workspace: Workspace) -> list[dict[str, Any]]:
    rows = []
    for row in workspace.registry(create=False).tokenizers():
        figures = row["meta"].get("figures") or {}
        rows.append(
            {
                "name": row["name"],
                "kind": row["meta"].get("kind"),
                "vocab_size": row["vocab_size"],
                "corpus": row["corpus"],
                "chars_per_token": figures.get("chars_per_token"),
                "bytes_per_token": figures.get("bytes_per_token"),
                "sha256": row["sha256"],
                "path": str(Path(row["path"]) / TOKENIZER_FILE),
                "created": row["created"],
            }
        )
    return rows
