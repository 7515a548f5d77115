"""`llmctl tokenizer` through the real CLI, and the library other modules load tokenizers with."""

from __future__ import annotations

import hashlib
import json
import sysconfig
from pathlib import Path

import pytest

from llmctl.errors import LlmctlError
from llmctl.tokenizer import CHAT_TEMPLATE, SPECIAL_TOKENS, load_tokenizer, load_tokenizer_file, render_chat
from llmctl.tokenizer_build import measure
from llmctl.workspace import Workspace

CORPUS_BYTES = 400_000
VOCAB = 512
UNICODE_DOC = "# naïve café — 日本語 コード\nprint('héllo 🤖🦀', \"\\t\")\r\n  \u00a0trailing  \n\n"

CONVERSATIONS = [
    [{"role": "user", "content": "Write a function that adds two numbers."}],
    [
        {"role": "system", "content": "You are a careful Python tutor."},
        {"role": "user", "content": "def f(x):\n    return x  # what does this do?"},
        {"role": "assistant", "content": "It returns its argument unchanged. 🙂"},
        {"role": "user", "content": "And with {{ braces }} and {% tags %}?"},
    ],
    [],
]


def _stdlib_documents() -> list[str]:
    """Real code: the first stdlib modules, in name order, up to CORPUS_BYTES."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    documents, total = [], 0
    for path in sorted(stdlib.glob("*.py")):
        text = path.read_text(encoding="utf-8")
        documents.append(text)
        total += len(text.encode("utf-8"))
        if total >= CORPUS_BYTES:
            break
    return documents


@pytest.fixture
def code_corpus(cli, tmp_path: Path, workspace_dir: Path) -> Path:
    """A corpus built by `llmctl corpus build` from stdlib modules and one non-ASCII file."""
    sources = tmp_path / "sources"
    sources.mkdir()
    for index, text in enumerate(_stdlib_documents()):
        (sources / f"module_{index:03d}.py").write_text(text, encoding="utf-8")
    (sources / "unicode.txt").write_text(UNICODE_DOC, encoding="utf-8")
    built = cli("corpus", "build", "code", "--source", sources, "--val-fraction", 0.3)
    assert built.exit_code == 0, built.stderr
    return Workspace(workspace_dir).corpus_dir("code")


def _val_texts(corpus_dir: Path) -> list[str]:
    with open(corpus_dir / "val.jsonl", encoding="utf-8") as handle:
        return [json.loads(line)["text"] for line in handle]


def _left_over(workspace_dir: Path) -> list[str]:
    tokenizers = workspace_dir / "tokenizers"
    return sorted(p.name for p in tokenizers.iterdir()) if tokenizers.exists() else []


def test_train_registers_a_tokenizer_that_round_trips_every_val_document(cli, workspace_dir, code_corpus):
    result = cli("tokenizer", "train", "code-512", "--corpus", "code", "--vocab-size", VOCAB)
    assert result.exit_code == 0, result.stderr
    assert "round trip exact" in result.stderr

    shown = cli("tokenizer", "show", "code-512", "--json").json()
    tokenizer_json = Path(shown["path"])
    assert tokenizer_json.name == "tokenizer.json" and tokenizer_json.is_file()
    assert shown["sha256"] == hashlib.sha256(tokenizer_json.read_bytes()).hexdigest()
    assert shown["vocab_size"] == VOCAB
    assert shown["corpus"] == "code"
    assert shown["corpus_sha256"] == json.loads((code_corpus / "meta.json").read_text())["content_sha256"]
    figures = shown["figures"]
    assert figures["documents"] == len(_val_texts(code_corpus)) >= 3
    assert figures["round_trip_ok"] is True
    # BPE on code merges: well over one byte per token, and bytes >= chars for UTF-8 text.
    assert figures["chars_per_token"] > 1.5
    assert figures["bytes_per_token"] >= figures["chars_per_token"]
    assert shown["special_tokens"] == {token: index for index, token in enumerate(SPECIAL_TOKENS)}
    assert (shown["eot_id"], shown["pad_id"]) == (0, 1)
    assert shown["chat_template"] == CHAT_TEMPLATE

    workspace = Workspace(workspace_dir)
    loaded = load_tokenizer(workspace, "code-512")
    assert (loaded.vocab_size, loaded.eot_id, loaded.pad_id, loaded.sha256) == (VOCAB, 0, 1, shown["sha256"])
    for text in _val_texts(code_corpus):
        assert loaded.decode(loaded.encode(text)) == text
    row = workspace.registry(create=False).tokenizer("code-512")
    assert row["corpus"] == "code" and row["vocab_size"] == VOCAB and row["sha256"] == shown["sha256"]

    # The token cache and the trainer read the file directly too (e.g. from a checkpoint).
    by_file = load_tokenizer_file(tokenizer_json)
    assert by_file.sha256 == loaded.sha256 and by_file.special_ids == loaded.special_ids
    # llmctl's documents follow <|endoftext|>: nothing is prepended to a prompt
    assert not loaded.add_bos and not by_file.add_bos and loaded.document_start_id == loaded.eot_id
    assert loaded.encode_prompt("def f():") == loaded.encode("def f():")


def test_special_tokens_encode_as_single_ids_and_decode_back(cli, workspace_dir, code_corpus):
    assert cli("tokenizer", "train", "tok", "--corpus", "code", "--vocab-size", VOCAB).exit_code == 0
    loaded = load_tokenizer(Workspace(workspace_dir), "tok")
    chat = loaded.render_chat(CONVERSATIONS[1], add_generation_prompt=True)
    ids = loaded.encode(chat)
    for token in ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"):
        assert loaded.special_ids[token] in ids
    assert loaded.decode(ids) == chat
    assert loaded.encode("<|endoftext|>") == [loaded.eot_id]

    # documents (scored by eval perplexity) read the same text as bytes: no special id appears
    document = "SEP = '<|endoftext|>'\nprint('<|user|>', '<|pad|>')\n"
    [document_ids] = loaded.encode_documents([document])
    assert not set(document_ids) & set(loaded.special_ids.values())
    assert loaded.decode(document_ids) == document


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_render_chat_matches_the_jinja_template(add_generation_prompt):
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    # The environment transformers renders chat templates with.
    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    environment.globals["raise_exception"] = raise_exception
    template = environment.from_string(CHAT_TEMPLATE)
    for messages in CONVERSATIONS:
        expected = template.render(messages=messages, add_generation_prompt=add_generation_prompt)
        assert render_chat(messages, add_generation_prompt=add_generation_prompt) == expected
    assert render_chat(CONVERSATIONS[0], add_generation_prompt=add_generation_prompt).startswith("<|user|>\n")

    bad = [{"role": "robot", "content": "beep"}]
    with pytest.raises(TemplateError, match="unknown chat role robot"):
        template.render(messages=bad, add_generation_prompt=add_generation_prompt)
    with pytest.raises(LlmctlError, match="unknown chat role robot"):
        render_chat(bad, add_generation_prompt)


def test_transformers_renders_the_stored_template_like_render_chat(cli, workspace_dir, code_corpus):
    transformers = pytest.importorskip("transformers")
    assert cli("tokenizer", "train", "tok", "--corpus", "code", "--vocab-size", VOCAB).exit_code == 0
    loaded = load_tokenizer(Workspace(workspace_dir), "tok")
    exported = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(loaded.path),
        chat_template=loaded.chat_template,
        eos_token="<|endoftext|>",
        pad_token="<|pad|>",
    )
    for messages in CONVERSATIONS[:2]:
        rendered = exported.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert rendered == loaded.render_chat(messages)
        assert exported.encode(rendered, add_special_tokens=False) == loaded.encode(rendered)


def test_byte_kind_round_trips_any_unicode(cli, workspace_dir, code_corpus):
    result = cli("tokenizer", "train", "bytes", "--corpus", "code", "--kind", "byte")
    assert result.exit_code == 0, result.stderr
    shown = cli("tokenizer", "show", "bytes", "--json").json()
    assert shown["kind"] == "byte" and shown["vocab_size"] == 256 + len(SPECIAL_TOKENS)
    assert shown["figures"]["bytes_per_token"] == 1.0

    loaded = load_tokenizer(Workspace(workspace_dir), "bytes")
    text = UNICODE_DOC + "emoji 👩‍👩‍👧 flags 🇳🇴 \x00\x7f\U0010ffff combining é"
    ids = loaded.encode(text)
    assert ids == [len(SPECIAL_TOKENS) + byte for byte in text.encode("utf-8")]
    assert loaded.decode(ids) == text


def test_vocab_size_below_bytes_and_specials_is_refused(cli, workspace_dir, code_corpus):
    result = cli("tokenizer", "train", "tiny", "--corpus", "code", "--vocab-size", 261)
    assert result.exit_code == 2
    assert "--vocab-size 261 is too small" in result.stderr and "262" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert _left_over(workspace_dir) == []
    assert Workspace(workspace_dir).registry(create=False).tokenizers() == []


def test_missing_corpus_is_a_one_line_error_and_writes_nothing(cli, workspace_dir):
    result = cli("tokenizer", "train", "t", "--corpus", "nope", "--vocab-size", VOCAB)
    assert result.exit_code == 2
    assert "corpus 'nope' does not exist" in result.stderr and "llmctl corpus build nope" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not workspace_dir.exists()


def test_existing_name_needs_overwrite(cli, workspace_dir, code_corpus):
    assert cli("tokenizer", "train", "t", "--corpus", "code", "--vocab-size", VOCAB).exit_code == 0
    before = cli("tokenizer", "show", "t", "--json").json()

    refused = cli("tokenizer", "train", "t", "--corpus", "code", "--vocab-size", 600)
    assert refused.exit_code == 2
    assert "tokenizer 't' already exists" in refused.stderr and "--overwrite" in refused.stderr
    assert cli("tokenizer", "show", "t", "--json").json()["sha256"] == before["sha256"]

    replaced = cli("tokenizer", "train", "t", "--corpus", "code", "--vocab-size", 600, "--overwrite")
    assert replaced.exit_code == 0, replaced.stderr
    after = cli("tokenizer", "show", "t", "--json").json()
    assert after["vocab_size"] == 600 and after["sha256"] != before["sha256"]
    assert _left_over(workspace_dir) == ["t"]


def _gpt2_like_tokenizer_json(path: Path, end_token: str, *extra_specials: str) -> Path:
    """A byte-level BPE with only an end-of-text special, saved the way GPT-2's tokenizer.json is."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=[end_token, *extra_specials],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(_stdlib_documents()[:5], trainer=trainer)
    path.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(path))
    return path


@pytest.mark.parametrize("end_token", ["<|endoftext|>", "</s>"])
def test_import_detects_end_of_text_and_notes_missing_chat_tokens(cli, workspace_dir, tmp_path, end_token):
    source = _gpt2_like_tokenizer_json(tmp_path / "gpt2" / "tokenizer.json", end_token)
    result = cli("tokenizer", "import", "gpt2", source)
    assert result.exit_code == 0, result.stderr
    assert "no chat template" in result.stderr

    shown = cli("tokenizer", "show", "gpt2", "--json").json()
    assert shown["kind"] == "imported" and shown["corpus"] is None
    assert shown["eot_token"] == end_token and shown["eot_id"] == 0
    assert shown["special_tokens"] == {end_token: 0}
    assert shown["missing_chat_tokens"] == ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
    assert shown["chat_template"] is None
    assert shown["sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()

    loaded = load_tokenizer(Workspace(workspace_dir), "gpt2")
    assert loaded.eot_id == loaded.pad_id == 0 and loaded.vocab_size == 400
    assert loaded.decode(loaded.encode(UNICODE_DOC)) == UNICODE_DOC
    with pytest.raises(LlmctlError, match="no chat template"):
        loaded.render_chat(CONVERSATIONS[0])


def test_import_with_chat_specials_gets_the_chat_template(cli, workspace_dir, tmp_path):
    chat_tokens = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
    source = _gpt2_like_tokenizer_json(tmp_path / "chatty" / "tokenizer.json", "</s>", "<pad>", *chat_tokens)
    result = cli("tokenizer", "import", "chatty", source.parent)
    assert result.exit_code == 0, result.stderr
    assert "no chat template" not in result.stderr

    loaded = load_tokenizer(Workspace(workspace_dir), "chatty")
    assert (loaded.eot_id, loaded.pad_id) == (0, 1)
    assert loaded.chat_template == CHAT_TEMPLATE and loaded.meta["missing_chat_tokens"] == []
    ids = loaded.encode(loaded.render_chat(CONVERSATIONS[1]))
    assert all(loaded.special_ids[token] in ids for token in chat_tokens)


def test_import_refuses_missing_and_foreign_files(cli, workspace_dir, tmp_path):
    missing = cli("tokenizer", "import", "x", tmp_path / "absent.json")
    assert missing.exit_code == 2 and "does not exist" in missing.stderr

    not_a_tokenizer = tmp_path / "config.json"
    not_a_tokenizer.write_text('{"model_type": "llama"}', encoding="utf-8")
    foreign = cli("tokenizer", "import", "x", not_a_tokenizer)
    assert foreign.exit_code == 2 and "is not a tokenizer.json" in foreign.stderr
    assert len(foreign.stderr.strip().splitlines()) == 1

    no_end = _gpt2_like_tokenizer_json(tmp_path / "odd" / "tokenizer.json", "<mystery>")
    unnamed = cli("tokenizer", "import", "x", no_end)
    assert unnamed.exit_code == 2 and "--eot-token" in unnamed.stderr
    assert cli("tokenizer", "import", "x", no_end, "--eot-token", "<mystery>").exit_code == 0
    assert load_tokenizer(Workspace(workspace_dir), "x").eot_id == 0


def test_encode_shows_ids_and_pieces(cli, code_corpus):
    assert cli("tokenizer", "train", "tok", "--corpus", "code", "--vocab-size", VOCAB).exit_code == 0
    encoded = cli("tokenizer", "encode", "tok", "def f(x):\n    return x", "--json").json()
    assert encoded["count"] == len(encoded["ids"]) == len(encoded["tokens"])
    assert "".join(token["text"] for token in encoded["tokens"]) == "def f(x):\n    return x"
    assert [token["id"] for token in encoded["tokens"]] == encoded["ids"]

    # Tokens holding part of a UTF-8 character still add up to the text's exact bytes.
    emoji = cli("tokenizer", "encode", "tok", "é🤖 ok", "--json").json()
    assert b"".join(bytes.fromhex(token["bytes"]) for token in emoji["tokens"]) == "é🤖 ok".encode()

    shown = cli("tokenizer", "encode", "tok", "def f(x):")
    assert shown.exit_code == 0
    assert "def" in shown.stdout and "tokens" in shown.stdout

    unknown = cli("tokenizer", "encode", "nope", "x")
    assert unknown.exit_code == 2 and "tokenizer 'nope' does not exist" in unknown.stderr


def test_list_and_show_render_tables(cli, code_corpus):
    assert cli("tokenizer", "list", "--json").json() == []
    assert cli("tokenizer", "train", "a", "--corpus", "code", "--vocab-size", VOCAB).exit_code == 0
    assert cli("tokenizer", "train", "b", "--corpus", "code", "--kind", "byte").exit_code == 0
    rows = cli("tokenizer", "list", "--json").json()
    listed = [(row["name"], row["kind"], row["vocab_size"]) for row in rows]
    assert listed == [("a", "bpe", VOCAB), ("b", "byte", 262)]
    assert all(Path(row["path"]).is_file() and row["corpus"] == "code" for row in rows)

    table = cli("tokenizer", "list")
    assert table.exit_code == 0 and "a" in table.stdout and "byte" in table.stdout
    shown = cli("tokenizer", "show", "a")
    assert shown.exit_code == 0
    assert "chars / token" in shown.stdout and "tokenizer.json" in shown.stdout and "<|end|>" in shown.stdout


def test_round_trip_check_fails_loudly_for_a_lossy_tokenizer():
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    lossy = Tokenizer(models.WordLevel({"hello": 0, "[UNK]": 1}, unk_token="[UNK]"))
    lossy.normalizer = normalizers.Lowercase()
    lossy.pre_tokenizer = pre_tokenizers.Whitespace()
    with pytest.raises(LlmctlError, match="round trip failed on validation document 1"):
        measure(lossy, ["hello", "Hello"])


def test_a_corpus_too_small_for_the_vocabulary_is_reported(cli, code_corpus):
    result = cli("tokenizer", "train", "big", "--corpus", "code", "--vocab-size", 60_000)
    assert result.exit_code == 0, result.stderr
    real_size = cli("tokenizer", "show", "big", "--json").json()["vocab_size"]
    assert real_size < 60_000
    assert f"the corpus allowed only {real_size:,} tokens of the 60,000 requested" in result.stderr


@pytest.mark.parametrize(
    ("config", "add_bos"),
    [
        ({"tokenizer_class": "LlamaTokenizerFast"}, True),  # Llama's default
        ({"tokenizer_class": "LlamaTokenizerFast", "add_bos_token": False}, False),
        ({"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": True}, True),
        ({"tokenizer_class": "GPT2TokenizerFast"}, False),
        ({"tokenizer_class": "LlamaTokenizerFast", "bos_token": None}, False),  # no BOS to add
    ],
)
def test_tokenizer_config_says_whether_prompts_open_with_bos(tmp_path, config, add_bos):
    """tokenizer_config.json's add_bos_token, else the Llama classes' default, as transformers reads it
    (this tokenizer.json's post-processor prepends nothing, so only the config decides)."""
    pytest.importorskip("transformers")
    from hf_helpers import save_tokenizer

    save_tokenizer(tmp_path, add_bos=False)
    path = tmp_path / "tokenizer_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
    loaded = load_tokenizer_file(tmp_path)
    bos = loaded.tokenizer.token_to_id("<s>")
    assert loaded.add_bos is add_bos
    ids = loaded.encode("def add")
    assert loaded.encode_prompt("def add") == ([bos, *ids] if add_bos else ids)
    assert loaded.document_start_id == (bos if add_bos else loaded.eot_id)
