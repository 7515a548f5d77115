"""Token caches built with a tiny byte-level BPE trained here, on corpora built from real files."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from llmctl.data.build import BuildOptions, build_corpus
from llmctl.data.store import CorpusStore
from llmctl.data.tokencache import build_token_cache, list_token_caches, load_token_cache
from llmctl.errors import UsageError
from llmctl.workspace import Workspace

EOT = "<|endoftext|>"


def tiny_tokenizer(texts: list[str], vocab_size: int) -> tuple[Tokenizer, str, int]:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOT], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )  # fmt: skip
    tokenizer.train_from_iterator(texts, trainer)
    sha256 = hashlib.sha256(tokenizer.to_str().encode("utf-8")).hexdigest()
    return tokenizer, sha256, tokenizer.token_to_id(EOT)


@pytest.fixture
def corpus(tmp_path: Path) -> CorpusStore:
    folder = tmp_path / "texts"
    folder.mkdir()
    for i in range(60):
        body = f"def f{i}(x):\n    return x * {i}  # café ✓\n" * (i % 5 + 1)
        (folder / f"m{i:02d}.py").write_text(body, encoding="utf-8")
    workspace = Workspace(tmp_path / "ws")
    build_corpus(workspace, "code", [str(folder)], BuildOptions(val_fraction=0.1))
    return CorpusStore.open(workspace, "code")


def test_cache_round_trips_to_the_documents_joined_by_eot(corpus):
    tokenizer, sha256, eot_id = tiny_tokenizer(list(corpus.texts("train")), 320)
    cache = build_token_cache(corpus, tokenizer, sha256, eot_id, chunk_chars=500)  # several batches
    assert cache.dtype == np.uint16 and isinstance(cache.train, np.memmap)
    assert cache.path == corpus.path / "cache" / sha256[:16]
    for split, tokens in (("train", cache.train), ("val", cache.val)):
        documents = list(corpus.texts(split))
        assert documents and len(tokens) == cache.n_tokens[split]
        assert int((tokens == eot_id).sum()) == len(documents) and tokens[-1] == eot_id
        assert tokenizer.decode(tokens.tolist(), skip_special_tokens=False) == "".join(
            d + EOT for d in documents
        )
        assert cache.n_bytes[split] == sum(len(d.encode("utf-8")) for d in documents)
    assert cache.n_bytes["train"] == corpus.meta["splits"]["train"]["bytes"]


def test_cache_is_reused_when_nothing_changed_and_rebuilt_for_a_new_tokenizer(corpus):
    texts = list(corpus.texts("train"))
    tokenizer, sha256, eot_id = tiny_tokenizer(texts, 300)
    first = build_token_cache(corpus, tokenizer, sha256, eot_id)
    again = build_token_cache(corpus, tokenizer, sha256, eot_id)
    assert again.meta["created"] == first.meta["created"]
    assert load_token_cache(corpus, sha256).meta == first.meta

    bigger, bigger_sha256, bigger_eot = tiny_tokenizer(texts, 400)
    assert load_token_cache(corpus, bigger_sha256) is None
    other = build_token_cache(corpus, bigger, bigger_sha256, bigger_eot)
    assert other.path != first.path and other.n_tokens["train"] < first.n_tokens["train"]
    assert {c["tokenizer_sha256"] for c in list_token_caches(corpus)} == {sha256, bigger_sha256}

    forced = build_token_cache(corpus, tokenizer, sha256, eot_id, rebuild=True)
    assert forced.meta["created"] > first.meta["created"]
    assert np.array_equal(np.asarray(forced.train), np.asarray(first.train))


def test_cache_goes_stale_when_the_corpus_content_changes(corpus, tmp_path):
    tokenizer, sha256, eot_id = tiny_tokenizer(list(corpus.texts("train")), 300)
    build_token_cache(corpus, tokenizer, sha256, eot_id)
    meta_path = corpus.path / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["content_sha256"] = "0" * 64  # what a rebuilt corpus with other documents would record
    meta_path.write_text(json.dumps(meta))
    assert load_token_cache(corpus, sha256) is None
    assert [c["current"] for c in list_token_caches(corpus)] == [False]
    rebuilt = build_token_cache(corpus, tokenizer, sha256, eot_id)
    assert rebuilt.meta["corpus_sha256"] == "0" * 64
    assert [c["current"] for c in list_token_caches(corpus)] == [True]


def test_ids_beyond_uint16_use_uint32(corpus):
    tokenizer, sha256, _ = tiny_tokenizer(list(corpus.texts("train")), 300)
    cache = build_token_cache(corpus, tokenizer, sha256, eot_id=70_000)
    assert cache.dtype == np.uint32 and cache.train[-1] == 70_000
    assert (corpus.path / "cache" / sha256[:16] / "train.bin").stat().st_size == 4 * cache.n_tokens["train"]


def test_damaged_cache_is_not_loaded(corpus):
    tokenizer, sha256, eot_id = tiny_tokenizer(list(corpus.texts("train")), 300)
    cache = build_token_cache(corpus, tokenizer, sha256, eot_id)
    with open(cache.path / "train.bin", "r+b") as handle:
        handle.truncate(10)
    assert load_token_cache(corpus, sha256) is None
    assert build_token_cache(corpus, tokenizer, sha256, eot_id).n_tokens == cache.n_tokens


def test_instruction_corpora_are_refused(tmp_path):
    rows = [{"instruction": f"Say {i}.", "input": "", "output": str(i)} for i in range(5)]
    (tmp_path / "sft.json").write_text(json.dumps(rows))
    workspace = Workspace(tmp_path / "ws")
    build_corpus(workspace, "sft", [str(tmp_path / "sft.json")], BuildOptions(format="alpaca"))
    store = CorpusStore.open(workspace, "sft")
    tokenizer, sha256, eot_id = tiny_tokenizer(list(store.texts("train")), 280)
    with pytest.raises(UsageError, match="instruction corpus"):
        build_token_cache(store, tokenizer, sha256, eot_id)


def test_corpus_show_lists_caches_with_the_tokenizer_name(cli, workspace_dir, tmp_path):
    write_to = tmp_path / "docs"
    write_to.mkdir()
    for i in range(20):
        (write_to / f"{i}.txt").write_text(f"document {i} " * 20)
    assert cli("corpus", "build", "docs", "--source", write_to).exit_code == 0
    workspace = Workspace(workspace_dir)
    store = CorpusStore.open(workspace, "docs")
    tokenizer, sha256, eot_id = tiny_tokenizer(list(store.texts("train")), 300)
    workspace.registry().add_tokenizer("tiny", tmp_path / "tok", "docs", sha256, 300, {})
    build_token_cache(store, tokenizer, sha256, eot_id)

    (cache,) = cli("corpus", "show", "docs", "--json").json()["caches"]
    assert cache["tokenizer"] == "tiny" and cache["current"] and cache["dtype"] == "uint16"
    assert cache["n_tokens"]["train"] > 0 and cache["disk_bytes"] > 2 * cache["n_tokens"]["train"]
    assert "token caches" in cli("corpus", "show", "docs").stdout


def test_special_token_text_inside_a_document_stays_text(tmp_path: Path):
    """A document that mentions `<|endoftext|>` (code about tokenizers does) must not gain a
    document boundary there: the cache holds exactly one end-of-text id per document."""
    folder = tmp_path / "texts"
    folder.mkdir()
    for i in range(20):
        source = f"SEP = '{EOT}'  # {i}\nparts = text.split(SEP)\n"
        (folder / f"t{i:02d}.py").write_text(source, encoding="utf-8")
    workspace = Workspace(tmp_path / "ws")
    build_corpus(workspace, "tok-code", [str(folder)], BuildOptions(val_fraction=0.1))
    store = CorpusStore.open(workspace, "tok-code")
    tokenizer, sha256, eot_id = tiny_tokenizer(list(store.texts("train")), 300)
    assert tokenizer.encode(EOT).ids == [eot_id]  # plain encoding reads the text as the special token

    cache = build_token_cache(store, tokenizer, sha256, eot_id)
    for split, tokens in (("train", cache.train), ("val", cache.val)):
        documents = list(store.texts(split))
        assert int((tokens == eot_id).sum()) == len(documents)
        decoded = tokenizer.decode(tokens.tolist(), skip_special_tokens=False)
        assert decoded == "".join(d + EOT for d in documents)
    assert tokenizer.encode(EOT).ids == [eot_id]  # the caller's tokenizer is left as it was
