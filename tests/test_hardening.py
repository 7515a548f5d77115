"""What a plain mistake must not destroy, and every failure a user can act on (issue 13).

Each case runs the real command and checks the refusal as a user sees it: one line naming the
problem and the fix, a non-zero exit, no traceback, and nothing new on disk. The second writer of
a run is a real second process holding the OS lock; the full and read-only disks are real tmpfs
and read-only bind mounts where this machine lets the tests make them (as root), else skipped.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_helpers import assert_refused, tree_snapshot
from pretrain_helpers import BASE, events_of
from tiny_checkpoints import write_run_checkpoint

from llmctl.storage import lock_holder, staging_name
from llmctl.workspace import Registry

pytestmark = pytest.mark.usefixtures("single_thread")

HOLD = """
import sys, time
from pathlib import Path
from llmctl.storage import writer_lock
with writer_lock(Path(sys.argv[1]), sys.argv[2], sys.argv[3]):
    print("held", flush=True)
    time.sleep(600)
"""


@contextlib.contextmanager
def another_writer(root: Path, kind: str, name: str):
    """A second process holding the writer lock of `kind` `name`, as a training run would."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(root), kind, name], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        yield holder
    finally:
        holder.kill()
        holder.wait()


@contextlib.contextmanager
def mounted(kind: str, target: Path, source: Path | None = None, size: int = 1 << 20):
    """A tmpfs of `size` bytes at `target` (kind 'full'), or `source` bound read-only there ('ro')."""
    target.mkdir(parents=True, exist_ok=True)
    if kind == "full":
        command = [["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(target)]]
    else:
        command = [
            ["mount", "--bind", str(source), str(target)],
            ["mount", "-o", "remount,bind,ro", str(target)],
        ]
    for step in command:
        if os.geteuid() != 0 or subprocess.run(step, capture_output=True).returncode != 0:
            subprocess.run(["umount", str(target)], capture_output=True)
            pytest.skip("mounting a filesystem for the test needs root and mount permission")
    try:
        yield target
    finally:
        subprocess.run(["umount", "-l", str(target)], capture_output=True)


# ---------------------------------------------------------------- one writer at a time


def test_a_live_run_cannot_be_resumed_or_overwritten_and_a_killed_holder_leaves_no_lock(cli, ws):
    assert cli(*BASE, "--run", "r", "--max-steps", "2").exit_code == 0
    before = tree_snapshot(ws / "runs" / "r")
    with another_writer(ws, "run", "r") as holder:
        assert lock_holder(ws, "run", "r") == holder.pid
        resumed = cli("pretrain", "--run", "r", "--resume", "--max-steps", "4")
        assert_refused(resumed, f"run 'r' is being written by process {holder.pid}", exit_code=2)
        replaced = cli(*BASE, "--run", "r", "--max-steps", "4", "--overwrite")
        assert_refused(
            replaced,
            f"overwriting it now would destroy that work (wait for it to end, or stop it "
            f"with: kill {holder.pid})",
            exit_code=2,
        )
        assert tree_snapshot(ws / "runs" / "r") == before
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert lock_holder(ws, "run", "r") is None  # the kernel dropped it with the process
    assert cli("pretrain", "--run", "r", "--resume", "--max-steps", "4").exit_code == 0
    assert [e["event"] for e in events_of(ws, "r")].count("start") == 2


def test_a_corpus_being_built_cannot_be_replaced(cli, workspace_dir, tmp_path):
    (tmp_path / "a.py").write_text("print('hi')\n" * 50)
    assert cli("corpus", "build", "c", "--source", tmp_path / "a.py").exit_code == 0
    with another_writer(workspace_dir, "corpus", "c") as holder:
        refused = cli("corpus", "build", "c", "--source", tmp_path / "a.py", "--overwrite")
        assert_refused(refused, f"corpus 'c' is being written by process {holder.pid}", exit_code=2)
    with another_writer(workspace_dir, "tokenizer", "t") as holder:
        refused = cli("tokenizer", "train", "t", "--corpus", "c", "--kind", "byte")
        assert_refused(refused, f"tokenizer 't' is being written by process {holder.pid}", exit_code=2)
        assert not (workspace_dir / "tokenizers" / "t").exists()


def test_staging_left_by_a_killed_writer_is_removed_by_the_next_one_with_a_warning(
    cli, workspace_dir, tmp_path
):
    (tmp_path / "a.py").write_text("print('hi')\n" * 50)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that no longer runs, as after a SIGKILL
    corpora = workspace_dir / "corpora"
    stale = corpora / f".tmp-c-{dead.pid}-0badc0de"
    (stale / "train").mkdir(parents=True)
    (stale / "train" / "part.txt").write_text("half written")
    live = corpora / staging_name(".tmp-", "other")  # this process's: a live writer's, kept
    live.mkdir()
    built = cli("corpus", "build", "c", "--source", tmp_path / "a.py")
    assert built.exit_code == 0, built.stderr
    assert not stale.exists() and live.is_dir()
    assert "removed 1 unfinished staging directories" in built.stderr and stale.name in built.stderr


# ---------------------------------------------------------------- work not lost


def test_humaneval_checks_its_outputs_before_running_any_program(cli, workspace_dir, tmp_path):
    from llmctl.eval.humaneval import load_problems

    problem = load_problems()[0]
    completions = tmp_path / "c.jsonl"
    completions.write_text(json.dumps({"task_id": problem.task_id, "completion": "    return 1\n"}) + "\n")
    a_file = tmp_path / "taken.txt"
    a_file.write_text("mine")
    result = cli("eval", "humaneval", "--completions", completions, "--limit", "1", "--out", a_file)
    assert_refused(result, "is a file; give a directory for the results", exit_code=2)
    assert "ran " not in result.stderr and a_file.read_text() == "mine"
    someone = tmp_path / "project"
    someone.mkdir()
    (someone / "summary.json").write_text("mine")
    result = cli("eval", "humaneval", "--completions", completions, "--limit", "1", "--out", someone)
    assert_refused(result, "holds other files that the results", exit_code=2)
    assert (someone / "summary.json").read_text() == "mine"
    first = cli("eval", "humaneval", "--completions", completions, "--limit", "1", "--out", tmp_path / "out")
    assert first.exit_code == 0, first.stderr
    again = cli("eval", "humaneval", "--completions", completions, "--limit", "1", "--out", tmp_path / "out")
    assert again.exit_code == 0, again.stderr  # an earlier eval's directory is reused


def test_a_read_only_workspace_reads_and_refuses_writes_in_one_line(
    cli, workspace_dir, tmp_path, monkeypatch
):
    (tmp_path / "a.py").write_text("print('hi')\n" * 50)
    assert cli("corpus", "build", "c", "--source", tmp_path / "a.py").exit_code == 0
    with mounted("ro", tmp_path / "ro", source=workspace_dir) as read_only:
        monkeypatch.setenv("LLMCTL_HOME", str(read_only))
        listed = cli("corpus", "list", "--json")
        assert listed.exit_code == 0 and [row["name"] for row in listed.json()] == ["c"]
        assert cli("status", "--json").exit_code == 0
        assert_refused(
            cli("corpus", "build", "d", "--source", tmp_path / "a.py"), "is read-only", exit_code=1
        )
        assert_refused(
            cli("eval", "humaneval", "--completions", tmp_path / "a.py", "--limit", "1"), "is not writable"
        )


def test_a_full_disk_is_named_and_leaves_no_partial_corpus_or_tokenizer(
    cli, workspace_dir, tmp_path, monkeypatch
):
    big = tmp_path / "big"
    big.mkdir()
    for index in range(8):
        (big / f"{index}.py").write_text(
            f"# file {index}\n" + "x = 'a line of code that fills the disk'\n" * 4000
        )
    with mounted("full", tmp_path / "small") as small:
        monkeypatch.setenv("LLMCTL_HOME", str(small / "ws"))
        result = cli("corpus", "build", "c", "--source", big)
        assert_refused(result, "the disk is full: no space left to write", exit_code=1)
        assert "nothing under that name was changed" in result.stderr
        assert sorted(p.name for p in (small / "ws" / "corpora").iterdir()) == []


def test_a_full_disk_during_a_checkpoint_write_says_the_earlier_ones_are_intact(cli, ws, tmp_path):
    assert cli(*BASE, "--run", "r", "--max-steps", "2").exit_code == 0
    checkpoints = ws / "runs" / "r" / "checkpoints"
    one = sum(path.stat().st_size for path in checkpoints.rglob("*") if path.is_file())
    # room for the checkpoint there is and half another: the next write runs out of space
    with mounted("full", tmp_path / "small", size=int(one * 1.5) + 64 * 1024) as small:
        moved = small / "checkpoints"
        subprocess.run(["cp", "-a", str(checkpoints), str(moved)], check=True)
        os.rename(checkpoints, ws / "runs" / "r" / "checkpoints.bak")
        os.symlink(moved, checkpoints)
        result = cli("pretrain", "--run", "r", "--resume", "--max-steps", "4")
        # the run had started (its announcement is the line before): the error is the one line after it
        announcement, error = result.stderr.strip().splitlines()
        assert result.exit_code == 1 and announcement.startswith("r · pretrain · resuming from step-00000002")
        assert error.startswith("error: the disk is full") and "earlier checkpoints are intact" in error
        assert sorted(p.name for p in moved.iterdir()) == ["step-00000002"]


# ---------------------------------------------------------------- one line instead of an internal error


def test_a_config_file_that_is_not_utf8(cli, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"train:\n  lr: 1e-4 \xff\n")
    assert_refused(cli("config", "show", "--config", bad), "is not UTF-8 text", exit_code=2)


@pytest.mark.parametrize("value", ["inf", ".inf", "-.inf", "nan"])
def test_non_finite_settings_are_refused(cli, value):
    assert_refused(
        cli("config", "show", "--set", f"train.lr={value}"), "invalid value for 'train.lr'", exit_code=2
    )


@pytest.mark.parametrize("damage", ["garbage", "directory", "empty-header"])
def test_a_broken_registry_is_named_and_rebuilt_from_the_files(cli, ws, damage):
    assert cli(*BASE, "--run", "r", "--max-steps", "2").exit_code == 0
    before = Registry(ws / "registry.db")
    created = {
        "corpus": before.corpora()[0]["created"],
        "tokenizer": before.tokenizers()[0]["created"],
        "run": before.run("r")["created"],
    }
    before.close()
    registry = ws / "registry.db"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{registry}{suffix}").unlink(missing_ok=True)
    if damage == "garbage":
        registry.write_bytes(os.urandom(8192))
    elif damage == "directory":
        registry.mkdir()
    else:
        registry.write_bytes(b"SQLite format 3\0" + b"\xff" * 100)
    result = cli("status")
    assert_refused(result, str(registry), exit_code=1)
    assert "llmctl registry rebuild" in result.stderr
    if damage == "directory":
        os.rmdir(registry)  # the message asks to move it away first
    rebuilt = cli("registry", "rebuild", "--json")
    assert rebuilt.exit_code == 0, rebuilt.stderr
    found = rebuilt.json()
    assert (found["corpora"], found["tokenizers"], found["runs"], found["checkpoints"]) == (1, 1, 1, 1)
    after = Registry(ws / "registry.db")
    rebuilt_created = {
        "corpus": after.corpora()[0]["created"],
        "tokenizer": after.tokenizers()[0]["created"],
        "run": after.run("r")["created"],
    }
    after.close()
    # the files' own times: a build's meta.json (written a moment before its row), a run's first
    # start event (written once its trainer is built, a few seconds after its row on a busy machine)
    first_start = next(event for event in events_of(ws, "r") if event["event"] == "start")
    assert rebuilt_created["run"] == first_start["ts"] == pytest.approx(created["run"], abs=30)
    assert rebuilt_created["corpus"] == pytest.approx(created["corpus"], abs=2.0)
    assert rebuilt_created["tokenizer"] == pytest.approx(created["tokenizer"], abs=2.0)
    status = cli("status", "--json").json()
    (run,) = status["runs"]
    assert run["name"] == "r" and run["stage"] == "pretrain"
    assert cli("pretrain", "--run", "r", "--resume", "--max-steps", "3").exit_code == 0


def test_completions_that_are_not_utf8_json_lines(cli, workspace_dir, tmp_path):
    binary = tmp_path / "c.jsonl"
    binary.write_bytes(bytes(range(256)) * 4)
    assert_refused(cli("eval", "humaneval", "--completions", binary), "is not UTF-8 JSON lines", exit_code=2)


def test_a_timeout_beyond_an_hour_is_a_usage_error(cli, tmp_path):
    result = cli("eval", "humaneval", "--completions", tmp_path / "c.jsonl", "--timeout", "1e300")
    assert result.exit_code == 2 and "--timeout" in result.stderr and "internal error" not in result.stderr


def test_a_checkpoint_whose_tokenizer_is_not_the_one_it_was_trained_with(cli, workspace_dir):
    checkpoint = write_run_checkpoint(workspace_dir, "chat")
    from llmctl.tokenizer import file_sha256

    tokenizer = checkpoint / "tokenizer.json"
    meta = json.loads((checkpoint / "meta.json").read_text())
    meta["tokenizer_sha256"] = file_sha256(tokenizer)
    (checkpoint / "meta.json").write_text(json.dumps(meta))
    text = tokenizer.read_text()
    tokenizer.write_text(text.replace('"<|user|>"', '"<|usex|>"', 1))  # same size, another vocabulary
    result = cli("sample", "--model", "chat", "--prompt", "hi", "--max-new-tokens", "2")
    assert_refused(result, "is not the tokenizer checkpoint", exit_code=1)


def test_weights_that_hold_nan_name_the_tensor(cli, workspace_dir):
    def poison(model) -> None:
        model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")

    write_run_checkpoint(workspace_dir, "nan", edit=poison)
    result = cli("sample", "--model", "nan", "--prompt", "hi", "--max-new-tokens", "2")
    assert_refused(
        result, "non-finite weights (NaN or infinity) in 'layers.1.mlp.down_proj.weight'", exit_code=1
    )


def test_a_missing_local_dataset_directory_is_named(cli, workspace_dir, tmp_path):
    result = cli("corpus", "build", "h", "--source", f"hf:{tmp_path / 'nope'}")
    assert_refused(result, f"the dataset directory '{tmp_path / 'nope'}' does not exist", exit_code=2)
    result = cli("corpus", "build", "h", "--source", "hf:./nope")
    assert_refused(result, "the dataset directory './nope' does not exist", exit_code=2)
    assert not workspace_dir.exists()


def test_an_unknown_chat_role_is_named(workspace_dir, tmp_path):
    from llmctl.data import sft
    from llmctl.errors import UsageError

    record = {
        "messages": [
            {"role": "user", "content": "hi"},
            {"role": "tool", "content": "x"},
            {"role": "assistant", "content": "hello"},
        ]
    }
    with pytest.raises(
        UsageError, match="has a message with role 'tool'; the roles an example may have are system"
    ):
        sft.messages_of(record, "data file 'x.jsonl' record 1")


def test_one_enormous_line_reaches_the_bpe_trainer_in_pieces_and_still_round_trips(workspace_dir):
    from llmctl.tokenizer_build import MAX_TRAINING_WORD_CHARS, _bounded_words, measure, train_bpe

    rng = torch.Generator().manual_seed(0)
    letters = "abcdefghijklmnopqrstuvwxyz"
    blob = "".join(letters[i] for i in torch.randint(0, 26, (100_000,), generator=rng).tolist())
    text = f"def f(x):\n    return x\n{blob} tail"
    (seen,) = list(_bounded_words([text]))
    # the trainer's cost grows far faster than a word's length: no run it sees is longer than the bound
    assert max(len(run) for run in seen.split()) == MAX_TRAINING_WORD_CHARS
    assert seen.replace("\n", "") == text.replace("\n", "")  # the same characters, only cut
    tokenizer = train_bpe(["def f(x):\n    return x\n" * 50, blob], vocab_size=600)
    assert measure(tokenizer, [blob, text])["round_trip_ok"]
