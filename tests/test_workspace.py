"""The registry on real SQLite: rows, lineage links, concurrency, atomic directories."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import pytest

from llmctl.errors import UsageError
from llmctl.storage import atomic_dir
from llmctl.workspace import Registry, Workspace, check_name


def test_rows_and_lineage(tmp_path: Path):
    registry = Workspace(tmp_path).registry()
    registry.add_corpus("code", "text", tmp_path / "corpora/code", {"documents": 3})
    registry.add_tokenizer("code-8k", tmp_path / "tokenizers/code-8k", "code", "ab" * 32, 8192, {})
    registry.add_run("base", "pretrain", tmp_path / "runs/base", corpus="code", tokenizer="code-8k")
    first = registry.add_checkpoint("base", 100, "full", tmp_path / "runs/base/c100", {"val_loss": 3.0})
    registry.add_checkpoint("base", 200, "full", tmp_path / "runs/base/c200", {"val_loss": 2.5})
    registry.add_run("sft", "finetune", tmp_path / "runs/sft", base_checkpoint=first)
    registry.add_eval(first, "perplexity", {"bpb": 1.2})

    assert registry.corpus("code")["meta"] == {"documents": 3}
    assert registry.tokenizer("code-8k")["corpus"] == "code"
    assert [c["step"] for c in registry.checkpoints("base")] == [100, 200]
    sft = registry.run("sft")
    assert registry.checkpoint(sft["base_checkpoint"])["run"] == "base"
    assert registry.evals(first)[0]["meta"] == {"bpb": 1.2}

    registry.update_run_meta("base", state="finished")
    assert registry.run("base")["meta"]["state"] == "finished"

    registry.remove_run("base")
    assert registry.run("base") is None and registry.checkpoints("base") == []
    assert registry.evals(first) == []
    assert registry.run("sft")["base_checkpoint"] is None


def test_reading_a_missing_workspace_creates_nothing(tmp_path: Path):
    workspace = Workspace(tmp_path / "absent")
    assert workspace.registry(create=False).corpora() == []
    assert not (tmp_path / "absent").exists()
    workspace.registry().add_corpus("c", "text", tmp_path, {})
    assert (tmp_path / "absent" / "registry.db").exists()


def test_wal_mode(tmp_path: Path):
    registry = Registry(tmp_path / "registry.db")
    assert registry._conn.execute("PRAGMA journal_mode").fetchone()["journal_mode"] == "wal"


def _writer(db: str, prefix: str, count: int) -> None:
    registry = Registry(Path(db))
    registry.add_run(prefix, "pretrain", Path(db).parent)
    for step in range(count):
        registry.add_checkpoint(prefix, step, "full", Path(db).parent / f"{prefix}-{step}", {"step": step})


def test_two_processes_write_one_workspace(tmp_path: Path):
    db = tmp_path / "registry.db"
    Registry(db).close()
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(db), name, 150)) for name in ("a", "b")]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(60)
        assert proc.exitcode == 0
    registry = Registry(db)
    assert len(registry.checkpoints("a")) == 150 and len(registry.checkpoints("b")) == 150


def test_atomic_dir_leaves_nothing_on_failure(tmp_path: Path):
    final = tmp_path / "thing"
    with pytest.raises(RuntimeError), atomic_dir(final) as staging:
        (staging / "half.bin").write_bytes(b"x")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []

    with atomic_dir(final) as staging:
        (staging / "whole.bin").write_bytes(b"1")
    assert (final / "whole.bin").read_bytes() == b"1"

    with atomic_dir(final, overwrite=True) as staging:
        (staging / "new.bin").write_bytes(b"2")
    assert sorted(p.name for p in final.iterdir()) == ["new.bin"]
    assert [p.name for p in tmp_path.iterdir()] == ["thing"]


@pytest.mark.parametrize("bad", ["", "../x", ".hidden", "a b", "x/y"])
def test_names_are_checked(bad: str):
    with pytest.raises(UsageError):
        check_name(bad, "run")
