"""`llmctl corpus build/list/show` on real files: the standard library, files written here, datasets."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from llmctl.data.build import BuildOptions, build_corpus
from llmctl.data.store import CorpusStore
from llmctl.workspace import Workspace


def lines(workspace_dir: Path, name: str, split: str) -> list[dict]:
    path = workspace_dir / "corpora" / name / f"{split}.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def texts(workspace_dir: Path, name: str, split: str) -> list[str]:
    return [record["text"] for record in lines(workspace_dir, name, split)]


def write_docs(folder: Path, count: int, prefix: str = "doc", suffix: str = ".txt") -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    docs = [f"{prefix} {i}: the quick brown fox {i * 7} jumps over the lazy dog\n" for i in range(count)]
    for i, doc in enumerate(docs):
        (folder / f"{prefix}{i:03d}{suffix}").write_text(doc, encoding="utf-8")
    return docs


def assert_nothing_left(workspace_dir: Path, name: str) -> None:
    corpora = workspace_dir / "corpora"
    assert not (corpora / name).exists()
    assert not corpora.exists() or not list(corpora.glob(".tmp-*"))
    assert Workspace(workspace_dir).registry(create=False).corpus(name) is None


# ---------------------------------------------------------------- the standard library


def test_stdlib_corpus_builds_lists_and_shows(cli, workspace_dir):
    result = cli("corpus", "build", "code", "--source", "stdlib")
    assert result.exit_code == 0, result.stderr
    assert "sources of 'code'" in result.stdout and "stdlib" in result.stdout
    assert "corpus 'code'" in result.stderr

    meta = json.loads((workspace_dir / "corpora" / "code" / "meta.json").read_text())
    assert meta["kind"] == "text" and meta["documents"] > 500 and meta["bytes"] > 5_000_000
    train, val = texts(workspace_dir, "code", "train"), texts(workspace_dir, "code", "val")
    assert len(train) + len(val) == meta["documents"] and val
    assert any("def " in text for text in train)
    paths = [record["path"] for record in lines(workspace_dir, "code", "train")]
    assert not any(part in ("test", "tests", "site-packages") for p in paths for part in Path(p).parts)

    listed = cli("corpus", "list", "--json")
    assert listed.exit_code == 0
    (row,) = listed.json()
    assert row["name"] == "code" and row["kind"] == "text" and row["sources"] == ["stdlib"]
    assert row["splits"]["val"]["documents"] == len(val)

    shown = cli("corpus", "show", "code", "--json")
    document = shown.json()
    assert document["content_sha256"] == meta["content_sha256"] and document["caches"] == []
    assert document["sources"][0]["documents"] == meta["documents"]
    assert "stdlib" in cli("corpus", "list").stdout
    assert "content sha256" in cli("corpus", "show", "code").stdout


def test_limit_caps_each_source(cli, workspace_dir):
    assert cli("corpus", "build", "small", "--source", "stdlib", "--limit", "25").exit_code == 0
    meta = CorpusStore.open(Workspace(workspace_dir), "small").meta
    assert meta["sources"][0]["read"] == 25
    assert meta["splits"]["train"]["documents"] >= 1 and meta["splits"]["val"]["documents"] >= 1


def test_list_in_an_empty_directory_makes_no_workspace(cli, workspace_dir):
    result = cli("corpus", "list", "--json")
    assert result.exit_code == 0 and result.json() == []
    assert not workspace_dir.exists()


def test_corpus_list_loads_no_heavy_libraries(workspace_dir):
    probe = (
        "import sys; from llmctl.cli.main import main; code = main(['corpus', 'list', '--json']);"
        "heavy = [m for m in ('torch', 'datasets', 'tokenizers', 'pyarrow', 'pandas') if m in sys.modules];"
        "print(heavy, file=sys.stderr); sys.exit(code or bool(heavy))"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------- files, cleaning, splitting


def test_directory_skips_binary_and_non_utf8_files_and_counts_them(cli, workspace_dir, tmp_path):
    docs = write_docs(tmp_path / "texts", 6)
    (tmp_path / "texts" / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00" + bytes(range(256)))
    (tmp_path / "texts" / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    (tmp_path / "texts" / ".git").mkdir()
    (tmp_path / "texts" / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (tmp_path / "texts" / "nested").mkdir()
    (tmp_path / "texts" / "nested" / "deep.md").write_text("# a nested markdown file\n")

    result = cli("corpus", "build", "books", "--source", tmp_path / "texts")
    assert result.exit_code == 0, result.stderr
    source = cli("corpus", "show", "books", "--json").json()["sources"][0]
    assert source["read"] == 7 and source["documents"] == 7
    assert source["dropped"] == {"binary": 1, "not_utf8": 1}
    assert "binary 1" in result.stdout
    everything = texts(workspace_dir, "books", "train") + texts(workspace_dir, "books", "val")
    assert sorted(everything) == sorted([*docs, "# a nested markdown file\n"])


def test_cleaning_normalizes_newlines_and_drops_empty_and_duplicate_documents(cli, workspace_dir, tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "a.txt").write_bytes(b"line one\r\nline two\r\n")
    (folder / "b.txt").write_bytes(b"line one\nline two\n")  # the same document once newlines agree
    (folder / "c.txt").write_bytes(b"\xef\xbb\xbfline one\rline two\r")  # BOM and old Mac newlines
    (folder / "d.txt").write_text("   \n\n")
    (folder / "e.txt").write_text("something else entirely\n")
    (folder / "f.txt").write_text("x" * 500)

    result = cli("corpus", "build", "clean", "--source", folder, "--max-doc-chars", "100")
    assert result.exit_code == 0, result.stderr
    source = cli("corpus", "show", "clean", "--json").json()["sources"][0]
    assert source["dropped"] == {"duplicate": 2, "empty": 1, "too_long": 1}
    kept = texts(workspace_dir, "clean", "train") + texts(workspace_dir, "clean", "val")
    assert sorted(kept) == ["line one\nline two\n", "something else entirely\n"]


def test_split_is_deterministic_by_content_and_both_splits_are_filled(tmp_path):
    docs = write_docs(tmp_path / "a", 120, prefix="alpha") + write_docs(tmp_path / "b", 80, prefix="beta")
    first, second = Workspace(tmp_path / "ws1"), Workspace(tmp_path / "ws2")
    options = BuildOptions(val_fraction=0.1)
    build_corpus(first, "c", [str(tmp_path / "a"), str(tmp_path / "b")], options)
    build_corpus(second, "c", [str(tmp_path / "b"), str(tmp_path / "a")], options)  # sources swapped
    val_first = set(CorpusStore(first, "c").texts("val"))
    val_second = set(CorpusStore(second, "c").texts("val"))
    assert val_first == val_second and 5 <= len(val_first) <= 40
    assert val_first | set(CorpusStore(first, "c").texts("train")) == set(docs)

    for count in (2, 3):
        folder = tmp_path / f"tiny{count}"
        write_docs(folder, count)
        meta = build_corpus(first, f"tiny{count}", [str(folder)], BuildOptions(val_fraction=0.001))
        assert meta["splits"]["val"]["documents"] == 1
        assert meta["splits"]["train"]["documents"] == count - 1
    single = build_corpus(first, "single", [str(tmp_path / "tiny2" / "doc000.txt")])
    assert single["splits"]["train"]["documents"] + single["splits"]["val"]["documents"] == 1


def test_weights_repeat_and_subsample_train_documents_only(cli, workspace_dir, tmp_path):
    base = write_docs(tmp_path / "base", 40, prefix="base")
    write_docs(tmp_path / "extra" / "deep", 30, prefix="extra", suffix=".md")
    write_docs(tmp_path / "half", 200, prefix="half")
    result = cli(
        "corpus", "build", "mix", "--val-fraction", "0.1",
        "--source", tmp_path / "base",
        "--source", f"{tmp_path}/extra/**/*.md*2",
        "--source", f"{tmp_path / 'half'}*0.5",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    base_stats, extra_stats, half_stats = cli("corpus", "show", "mix", "--json").json()["sources"]
    assert extra_stats["weight"] == 2 and extra_stats["target"] == f"{tmp_path}/extra/**/*.md"
    extra_train = [t for t in texts(workspace_dir, "mix", "train") if t.startswith("extra")]
    assert len(extra_train) == extra_stats["train_documents"] == 2 * len(set(extra_train))
    assert extra_stats["val_documents"] == 30 - len(set(extra_train))  # val keeps one copy
    assert base_stats["train_documents"] + base_stats["val_documents"] == len(base)

    kept = half_stats["train_documents"]
    assert (
        60 <= kept <= 120
        and half_stats["dropped"]["weight_subsampled"] + kept + half_stats["val_documents"] == 200
    )
    again = cli("corpus", "build", "mix2", "--val-fraction", "0.1", "--source", f"{tmp_path / 'half'}*0.5")
    assert again.exit_code == 0
    assert cli("corpus", "show", "mix2", "--json").json()["sources"][0]["train_documents"] == kept


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".parquet", ".csv"])
def test_record_files_with_a_text_field(cli, workspace_dir, tmp_path, suffix):
    rows = [{"id": i, "body": f"record {i} has some text in it"} for i in range(30)]
    path = tmp_path / f"rows{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(rows))
    elif suffix == ".jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    elif suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        with open(path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["id", "body"])
            writer.writeheader()
            writer.writerows(rows)

    missing = cli("corpus", "build", "rows", "--source", path)
    assert missing.exit_code == 2
    assert "no field 'text'" in missing.stderr and "fields found: id, body" in missing.stderr
    assert "--text-field" in missing.stderr
    assert_nothing_left(workspace_dir, "rows")

    result = cli("corpus", "build", "rows", "--source", path, "--text-field", "body")
    assert result.exit_code == 0, result.stderr
    kept = texts(workspace_dir, "rows", "train") + texts(workspace_dir, "rows", "val")
    assert sorted(kept) == sorted(row["body"] for row in rows)


def test_hf_source_reads_a_local_dataset_through_datasets(cli, workspace_dir, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "local-dataset" / "data"
    folder.mkdir(parents=True)
    rows = [{"content": f"dataset row {i}: " + "words " * (i % 7 + 1)} for i in range(50)]
    pq.write_table(pa.Table.from_pylist(rows[:25]), folder / "train-00000.parquet")
    pq.write_table(pa.Table.from_pylist(rows[25:]), folder / "train-00001.parquet")

    dataset = f"hf:{tmp_path / 'local-dataset'}"
    result = cli("corpus", "build", "hf", "--source", dataset, "--text-field", "content", "--limit", "30")
    assert result.exit_code == 0, result.stderr
    source = cli("corpus", "show", "hf", "--json").json()["sources"][0]
    assert source["kind"] == "hf" and source["read"] == 30 and source["documents"] == 30

    bad_split = cli("corpus", "build", "hf2", "--source", f"{dataset}@nosuch", "--text-field", "content")
    assert bad_split.exit_code == 2 and "nosuch" in bad_split.stderr
    assert_nothing_left(workspace_dir, "hf2")


# ---------------------------------------------------------------- bad input


def test_missing_path_is_a_one_line_error(cli, workspace_dir, tmp_path):
    result = cli("corpus", "build", "x", "--source", tmp_path / "nowhere")
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and "does not exist" in result.stderr
    assert "Traceback" not in result.stderr
    assert_nothing_left(workspace_dir, "x")


def test_directory_without_text_files(cli, workspace_dir, tmp_path):
    folder = tmp_path / "binaries"
    folder.mkdir()
    (folder / "a.bin").write_bytes(b"\x00\x01\x02" * 10)
    result = cli("corpus", "build", "x", "--source", folder)
    assert result.exit_code == 2
    assert "has no text files (1 binary skipped)" in result.stderr
    assert_nothing_left(workspace_dir, "x")


def test_glob_matching_nothing(cli, workspace_dir, tmp_path):
    result = cli("corpus", "build", "x", "--source", f"{tmp_path}/*.nothing")
    assert result.exit_code == 2 and "no files match" in result.stderr
    assert_nothing_left(workspace_dir, "x")


def test_existing_name_needs_overwrite(cli, workspace_dir, tmp_path):
    write_docs(tmp_path / "one", 5, prefix="one")
    write_docs(tmp_path / "two", 5, prefix="two")
    assert cli("corpus", "build", "c", "--source", tmp_path / "one").exit_code == 0
    again = cli("corpus", "build", "c", "--source", tmp_path / "two")
    assert again.exit_code == 2 and "already exists" in again.stderr and "--overwrite" in again.stderr
    assert all(t.startswith("one") for t in texts(workspace_dir, "c", "train"))

    replaced = cli("corpus", "build", "c", "--source", tmp_path / "two", "--overwrite")
    assert replaced.exit_code == 0
    assert all(
        t.startswith("two") for t in texts(workspace_dir, "c", "train") + texts(workspace_dir, "c", "val")
    )
    assert cli("corpus", "show", "c", "--json").json()["sources"][0]["target"] == str(tmp_path / "two")
    assert not list((workspace_dir / "corpora").glob(".*"))


def test_empty_after_cleaning(cli, workspace_dir, tmp_path):
    folder = tmp_path / "blank"
    folder.mkdir()
    (folder / "a.txt").write_text("\n\n")
    (folder / "b.txt").write_text("   ")
    result = cli("corpus", "build", "x", "--source", folder)
    assert result.exit_code == 1
    assert "empty after cleaning" in result.stderr and "2 empty" in result.stderr
    assert_nothing_left(workspace_dir, "x")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--source", "stdlib", "--val-fraction", "1.5"], "--val-fraction"),
        (["--source", "stdlib*0"], "above 0"),
        (["--source", "stdlib", "--format", "alpaca"], "without --format"),
        (["--source", "stdlib", "--format", "yaml"], "unknown --format"),
    ],
)
def test_bad_flags(cli, workspace_dir, args, message):
    result = cli("corpus", "build", "x", *args)
    assert result.exit_code == 2 and message in result.stderr
    assert_nothing_left(workspace_dir, "x")


def test_show_unknown_corpus(cli, workspace_dir):
    result = cli("corpus", "show", "nope")
    assert result.exit_code == 2 and "llmctl corpus build nope" in result.stderr


def test_failed_overwrite_keeps_the_old_corpus(cli, workspace_dir, tmp_path):
    write_docs(tmp_path / "one", 5, prefix="one")
    assert cli("corpus", "build", "c", "--source", tmp_path / "one").exit_code == 0
    before = cli("corpus", "show", "c", "--json").json()
    (tmp_path / "broken.jsonl").write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    result = cli("corpus", "build", "c", "--source", tmp_path / "broken.jsonl", "--overwrite")
    assert result.exit_code == 2 and "is not UTF-8" in result.stderr
    assert cli("corpus", "show", "c", "--json").json()["content_sha256"] == before["content_sha256"]
    assert sorted(p.name for p in (workspace_dir / "corpora").iterdir()) == ["c"]
