"""Writing the workspace safely: whole directories or none, one writer at a time, and disk errors
a user can act on.

- `atomic_dir` builds a directory under a staging name (`.tmp-NAME-PID-XXXX`) and renames it into
  place only if the block succeeds. A staging directory whose writer is gone (a SIGKILL) is
  removed when the next writer of that parent starts, with a warning.
- `writer_lock` is an OS file lock (flock) on `<workspace>/locks/KIND-NAME.lock`, held while a
  process writes a run, a corpus or a tokenizer. The kernel releases it when the process dies,
  so a killed writer never leaves a stale lock; a second writer is told the holder's pid.
- `disk_errors` turns a full or read-only disk into one line naming where and what is intact.

Warnings go to the `llmctl` logger; the command line prints them as `warning: ...`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llmctl.errors import LlmctlError, UsageError

log = logging.getLogger("llmctl")

STAGING_PREFIXES = (".tmp-", ".old-", ".del-")
LOCKS_DIRNAME = "locks"


# ---------------------------------------------------------------- staging names


def staging_name(prefix: str, name: str) -> str:
    """A sibling name for `name` that says which process made it (see `remove_stale_staging`)."""
    return f"{prefix}{name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _writer_pid(path: Path) -> int | None:
    parts = path.name.rsplit("-", 2)
    return int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_staging(parent: Path) -> list[Path]:
    """Remove the staging and retired directories in `parent` whose writing process is gone."""
    if not parent.is_dir():
        return []
    removed = []
    for path in parent.iterdir():
        if not (path.name.startswith(STAGING_PREFIXES) and path.is_dir()):
            continue
        pid = _writer_pid(path)
        if pid is not None and (pid == os.getpid() or _alive(pid)):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    if removed:
        names = ", ".join(path.name for path in removed[:3]) + (" ..." if len(removed) > 3 else "")
        log.warning(
            f"removed {len(removed)} unfinished staging directories in {parent} left by a killed writer "
            f"({names})"
        )
    return removed


# ---------------------------------------------------------------- whole or nothing


@contextlib.contextmanager
def atomic_dir(
    final: Path, overwrite: bool = False, intact: str = "nothing under that name was changed"
) -> Iterator[Path]:
    """Build a directory beside `final` and rename it into place only if the block succeeds.

    A crash or an error leaves no half-written directory under the final name; a full disk is
    reported saying what is `intact`.
    """
    with disk_errors(final, intact):
        final.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_staging(final.parent)
        staging = final.parent / staging_name(".tmp-", final.name)
        staging.mkdir()
        try:
            yield staging
            if final.exists():
                if not overwrite:
                    raise LlmctlError(f"'{final}' already exists")
                retired = final.parent / staging_name(".old-", final.name)
                final.rename(retired)
                staging.rename(final)
                shutil.rmtree(retired, ignore_errors=True)
            else:
                staging.rename(final)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


FULL_BELOW_BYTES = 4 << 20  # a device with less free space than this is full for any real write


@contextlib.contextmanager
def disk_errors(where: Path, intact: str) -> Iterator[None]:
    """A full or read-only disk while writing `where` becomes one line saying so, where, and what
    is still intact. Some writers report a full disk in their own way (torch.save's zip writer
    raises a RuntimeError about file positions), so any failure on a device left without free space
    counts as a full disk."""
    try:
        yield
    except (OSError, RuntimeError) as exc:
        code = getattr(exc, "errno", None)
        if code == errno.EROFS:
            raise LlmctlError(
                f"'{where}' is on a read-only filesystem; point --workspace (or LLMCTL_HOME) at a writable "
                "directory"
            ) from exc
        if code == errno.ENOSPC or _free_bytes(where) < FULL_BELOW_BYTES:
            raise LlmctlError(
                f"the disk is full: no space left to write '{where}'; {intact}. Free some space and run "
                "the command again"
            ) from exc
        raise


def _free_bytes(path: Path) -> int:
    existing = next((p for p in [path, *path.parents] if p.exists()), None)
    try:
        return shutil.disk_usage(existing).free if existing else 1 << 62
    except OSError:
        return 1 << 62


# ---------------------------------------------------------------- one writer at a time


class WriterBusy(UsageError):
    """Another process is writing the same run, corpus or tokenizer."""


def lock_path(root: Path, kind: str, name: str) -> Path:
    return root / LOCKS_DIRNAME / f"{kind}-{name}.lock"


def lock_holder(root: Path, kind: str, name: str) -> int | None:
    """The pid of the process writing `kind` `name` now, or None."""
    path = lock_path(root, kind, name)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _read_pid(fd)
    finally:
        os.close(fd)  # closing drops the shared lock just taken, if it was
    return None


def _read_pid(fd: int) -> int | None:
    text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    return int(text) if text.isdigit() else None


@contextlib.contextmanager
def writer_lock(root: Path, kind: str, name: str) -> Iterator[None]:
    """Hold the lock of `kind` `name` (run, corpus, tokenizer) in workspace `root` for the block."""
    path = lock_path(root, kind, name)
    with disk_errors(path, "nothing was changed"):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            raise WriterBusy(
                f"{kind} '{name}' is being written by process {holder or '?'}; wait for it to end or stop it "
                f"(kill {holder or 'PID'}) before writing it again"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock; the file stays, empty of meaning, for the next writer


def refuse_if_busy(root: Path, kind: str, name: str, doing: str) -> None:
    """Refuse `doing` (overwriting, say) a run, corpus or tokenizer another process is writing."""
    holder = lock_holder(root, kind, name)
    if holder is not None:
        raise WriterBusy(
            f"{kind} '{name}' is being written by process {holder}; {doing} it now would destroy that work "
            f"(wait for it to end, or stop it with: kill {holder})"
        )


# ---------------------------------------------------------------- replacing what llmctl wrote


def check_replaceable_dir(path: Path, overwrite: bool, marker: str, what: str, workspace_root: Path) -> None:
    """An output directory `path` may be replaced only with --overwrite, only if llmctl wrote it
    (the `marker` file it leaves there), and never if it is or holds the workspace."""
    if not path.exists():
        return
    if not overwrite:
        raise UsageError(f"'{path}' already exists; pass --overwrite to replace it")
    root = workspace_root.resolve()
    if path == root or path in root.parents:
        raise UsageError(
            f"'{path}' holds the workspace {root}; --overwrite would delete it: choose another --out"
        )
    if not path.is_dir():
        raise UsageError(
            f"'{path}' is a file; --overwrite replaces only {what} llmctl wrote, choose another --out"
        )
    if not (path / marker).is_file():
        raise UsageError(
            f"'{path}' holds files llmctl did not write (no {marker}); --overwrite replaces only {what} "
            "llmctl wrote: choose another --out"
        )
