"""The workspace on disk and the SQLite registry of everything llmctl makes.

    <workspace>/registry.db     corpora, tokenizers, runs, checkpoints, evals, studies (WAL mode)
    <workspace>/studies.db      hyperparameter studies: Optuna's own storage (llmctl tune)
    <workspace>/corpora/<name>/
    <workspace>/tokenizers/<name>/
    <workspace>/runs/<run>/

Writing it safely (whole directories, writer locks, disk errors) is llmctl.storage's.

Every row carries a JSON `meta` column for figures that differ by kind, and a parent link
(a tokenizer's corpus, a run's corpus/tokenizer/base checkpoint, a checkpoint's run, an eval's
checkpoint) so lineage can be shown. Each process opens its own connection; WAL plus a busy
timeout make concurrent llmctl processes on one workspace safe.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llmctl.errors import LlmctlError, UsageError
from llmctl.storage import disk_errors

DEFAULT_DIRNAME = "llmctl-workspace"
SCHEMA_VERSION = 1
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS corpora (
    name     TEXT PRIMARY KEY,
    kind     TEXT NOT NULL,             -- 'text', 'instruct' or 'preference'
    path     TEXT NOT NULL,
    created  REAL NOT NULL,
    meta     TEXT NOT NULL DEFAULT '{}'
);
CREATE TABLE IF NOT EXISTS tokenizers (
    name       TEXT PRIMARY KEY,
    path       TEXT NOT NULL,
    corpus     TEXT,                    -- parent corpus; NULL for an imported tokenizer
    sha256     TEXT NOT NULL,
    vocab_size INTEGER NOT NULL,
    created    REAL NOT NULL,
    meta       TEXT NOT NULL DEFAULT '{}'
);
CREATE TABLE IF NOT EXISTS runs (
    name            TEXT PRIMARY KEY,
    stage           TEXT NOT NULL,      -- 'pretrain', 'finetune', 'qlora', 'dpo', 'merge'
    path            TEXT NOT NULL,
    corpus          TEXT,
    tokenizer       TEXT,
    base_checkpoint INTEGER REFERENCES checkpoints(id),
    created         REAL NOT NULL,
    meta            TEXT NOT NULL DEFAULT '{}'
);
CREATE TABLE IF NOT EXISTS checkpoints (
    id       INTEGER PRIMARY KEY AUTOINCREMENT,
    run      TEXT NOT NULL REFERENCES runs(name),
    step     INTEGER NOT NULL,
    kind     TEXT NOT NULL,             -- 'full' or 'adapter'
    path     TEXT NOT NULL UNIQUE,
    created  REAL NOT NULL,
    meta     TEXT NOT NULL DEFAULT '{}', -- val_loss, val_ppl, val_bpb, ...
    UNIQUE (run, step)
);
CREATE TABLE IF NOT EXISTS evals (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    checkpoint_id INTEGER REFERENCES checkpoints(id),
    kind          TEXT NOT NULL,        -- 'perplexity', 'humaneval', 'probes', 'classify', 'preference'
    created       REAL NOT NULL,
    meta          TEXT NOT NULL DEFAULT '{}'
);
CREATE TABLE IF NOT EXISTS studies (
    name     TEXT PRIMARY KEY,          -- a trial's run names it in its meta: {"study", "trial"}
    stage    TEXT NOT NULL,
    storage  TEXT,                      -- Optuna's storage URL, password hidden; NULL: studies.db
    created  REAL NOT NULL,
    meta     TEXT NOT NULL DEFAULT '{}' -- objective, direction, search space, sampler, pruner
);
"""


class RegistryError(LlmctlError):
    """registry.db cannot be read; `llmctl registry rebuild` makes it again from the files."""


def _connect(target: str, uri: bool = False) -> sqlite3.Connection:
    conn = sqlite3.connect(target, timeout=60, isolation_level=None, check_same_thread=False, uri=uri)
    conn.row_factory = _row
    conn.execute("PRAGMA busy_timeout = 60000")
    conn.execute("PRAGMA foreign_keys = ON")
    return conn


def check_name(name: str, what: str) -> str:
    if not _NAME.match(name):
        raise UsageError(
            f"invalid {what} name '{name}': use letters, digits, '.', '_' and '-' "
            "(up to 100, not starting with '.')"
        )
    return name


def _row(cursor: sqlite3.Cursor, values: tuple) -> dict[str, Any]:
    row = {column[0]: value for column, value in zip(cursor.description, values, strict=True)}
    if "meta" in row:
        row["meta"] = json.loads(row["meta"])
    return row


class Registry:
    """Rows for corpora, tokenizers, runs, checkpoints and evals.

    With create=False and no database on disk, reads see an empty registry and nothing is
    written, so `corpus list` in a fresh directory does not make a workspace.
    """

    def __init__(self, path: Path, create: bool = True):
        self.path = path
        if path.is_dir():
            raise RegistryError(
                f"'{path}' is a directory, not llmctl's registry; move it away, then run: "
                "llmctl registry rebuild"
            )
        on_disk = path.exists()
        # a workspace on read-only media still reads (status, corpus list); writing it is refused
        read_only = on_disk and not os.access(path.parent, os.W_OK)
        if create:
            if read_only or (path.parent.exists() and not os.access(path.parent, os.W_OK)):
                raise LlmctlError(
                    f"the workspace {path.parent} is read-only; point --workspace (or LLMCTL_HOME) at a "
                    "writable directory to change it"
                )
            with disk_errors(path.parent, "nothing was written"):
                path.parent.mkdir(parents=True, exist_ok=True)
        self._in_memory = not (create or on_disk)
        try:
            if self._in_memory:
                self._conn = _connect(":memory:")
            elif read_only:  # immutable: no -shm or -wal file is needed or made
                self._conn = _connect(f"file:{path}?mode=ro&immutable=1", uri=True)
            else:
                self._conn = _connect(str(path))
                self._conn.execute("PRAGMA journal_mode = WAL")
            if not read_only:
                self._conn.executescript(_SCHEMA)
                self._conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            self._conn.execute("SELECT count(*) FROM runs").fetchone()
        except sqlite3.DatabaseError as exc:
            raise RegistryError(
                f"'{path}' is not a readable llmctl registry ({exc}); everything it records is also in "
                "the workspace's files: rebuild it with: llmctl registry rebuild"
            ) from exc

    @property
    def in_memory(self) -> bool:
        return self._in_memory

    def close(self) -> None:
        self._conn.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE takes the write lock up front, so concurrent writers queue, not fail."""
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield self._conn
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")

    def _one(self, sql: str, *args: Any) -> dict[str, Any] | None:
        return self._conn.execute(sql, args).fetchone()

    def _all(self, sql: str, *args: Any) -> list[dict[str, Any]]:
        return self._conn.execute(sql, args).fetchall()

    # corpora
    def add_corpus(self, name: str, kind: str, path: Path, meta: dict[str, Any]) -> None:
        with self.transaction() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO corpora (name, kind, path, created, meta) VALUES (?, ?, ?, ?, ?)",
                (name, kind, str(path), time.time(), json.dumps(meta)),
            )

    def corpus(self, name: str) -> dict[str, Any] | None:
        return self._one("SELECT * FROM corpora WHERE name = ?", name)

    def corpora(self) -> list[dict[str, Any]]:
        return self._all("SELECT * FROM corpora ORDER BY created")

    def remove_corpus(self, name: str) -> None:
        with self.transaction() as conn:
            conn.execute("DELETE FROM corpora WHERE name = ?", (name,))

    # tokenizers
    def add_tokenizer(
        self, name: str, path: Path, corpus: str | None, sha256: str, vocab_size: int, meta: dict[str, Any]
    ) -> None:
        with self.transaction() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO tokenizers (name, path, corpus, sha256, vocab_size, created, meta)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (name, str(path), corpus, sha256, vocab_size, time.time(), json.dumps(meta)),
            )

    def tokenizer(self, name: str) -> dict[str, Any] | None:
        return self._one("SELECT * FROM tokenizers WHERE name = ?", name)

    def tokenizers(self) -> list[dict[str, Any]]:
        return self._all("SELECT * FROM tokenizers ORDER BY created")

    def remove_tokenizer(self, name: str) -> None:
        with self.transaction() as conn:
            conn.execute("DELETE FROM tokenizers WHERE name = ?", (name,))

    # runs
    def add_run(
        self,
        name: str,
        stage: str,
        path: Path,
        corpus: str | None = None,
        tokenizer: str | None = None,
        base_checkpoint: int | None = None,
        meta: dict[str, Any] | None = None,
    ) -> None:
        with self.transaction() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO runs"
                " (name, stage, path, corpus, tokenizer, base_checkpoint, created, meta)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    name,
                    stage,
                    str(path),
                    corpus,
                    tokenizer,
                    base_checkpoint,
                    time.time(),
                    json.dumps(meta or {}),
                ),
            )

    def run(self, name: str) -> dict[str, Any] | None:
        return self._one("SELECT * FROM runs WHERE name = ?", name)

    def runs(self) -> list[dict[str, Any]]:
        return self._all("SELECT * FROM runs ORDER BY created")

    def update_run_meta(self, name: str, **fields: Any) -> None:
        with self.transaction() as conn:
            row = conn.execute("SELECT meta FROM runs WHERE name = ?", (name,)).fetchone()
            if row is None:
                raise LlmctlError(f"run '{name}' is not registered")
            merged = json.dumps({**row["meta"], **fields})
            conn.execute("UPDATE runs SET meta = ? WHERE name = ?", (merged, name))

    def remove_run(self, name: str) -> None:
        """Drop a run with its checkpoints and their evals (for --overwrite)."""
        with self.transaction() as conn:
            conn.execute(
                "DELETE FROM evals WHERE checkpoint_id IN (SELECT id FROM checkpoints WHERE run = ?)", (name,)
            )
            conn.execute(
                "UPDATE runs SET base_checkpoint = NULL WHERE base_checkpoint IN"
                " (SELECT id FROM checkpoints WHERE run = ?)",
                (name,),
            )
            conn.execute("DELETE FROM checkpoints WHERE run = ?", (name,))
            conn.execute("DELETE FROM runs WHERE name = ?", (name,))

    # checkpoints
    def add_checkpoint(self, run: str, step: int, kind: str, path: Path, meta: dict[str, Any]) -> int:
        with self.transaction() as conn:
            conn.execute("DELETE FROM checkpoints WHERE run = ? AND step = ?", (run, step))
            cursor = conn.execute(
                "INSERT INTO checkpoints (run, step, kind, path, created, meta) VALUES (?, ?, ?, ?, ?, ?)",
                (run, step, kind, str(path), time.time(), json.dumps(meta)),
            )
            return int(cursor.lastrowid)

    def checkpoint(self, checkpoint_id: int) -> dict[str, Any] | None:
        return self._one("SELECT * FROM checkpoints WHERE id = ?", checkpoint_id)

    def checkpoint_at(self, run: str, step: int) -> dict[str, Any] | None:
        return self._one("SELECT * FROM checkpoints WHERE run = ? AND step = ?", run, step)

    def checkpoint_by_path(self, path: Path) -> dict[str, Any] | None:
        return self._one("SELECT * FROM checkpoints WHERE path = ?", str(path))

    def checkpoints(self, run: str) -> list[dict[str, Any]]:
        return self._all("SELECT * FROM checkpoints WHERE run = ? ORDER BY step", run)

    def remove_checkpoint(self, checkpoint_id: int) -> None:
        with self.transaction() as conn:
            conn.execute("DELETE FROM evals WHERE checkpoint_id = ?", (checkpoint_id,))
            conn.execute("DELETE FROM checkpoints WHERE id = ?", (checkpoint_id,))

    # evals
    def add_eval(self, checkpoint_id: int | None, kind: str, meta: dict[str, Any]) -> int:
        with self.transaction() as conn:
            cursor = conn.execute(
                "INSERT INTO evals (checkpoint_id, kind, created, meta) VALUES (?, ?, ?, ?)",
                (checkpoint_id, kind, time.time(), json.dumps(meta)),
            )
            return int(cursor.lastrowid)

    # studies
    def add_study(self, name: str, stage: str, storage: str | None, meta: dict[str, Any]) -> None:
        """Record a study; one already recorded (another process or machine joined it) keeps its row."""
        with self.transaction() as conn:
            conn.execute(
                "INSERT OR IGNORE INTO studies (name, stage, storage, created, meta) VALUES (?, ?, ?, ?, ?)",
                (name, stage, storage, time.time(), json.dumps(meta)),
            )

    def study(self, name: str) -> dict[str, Any] | None:
        return self._one("SELECT * FROM studies WHERE name = ?", name)

    def studies(self) -> list[dict[str, Any]]:
        return self._all("SELECT * FROM studies ORDER BY created")

    def trial_runs(self, study: str) -> list[dict[str, Any]]:
        return self._all("SELECT * FROM runs WHERE json_extract(meta, '$.study') = ? ORDER BY created", study)

    def evals(self, checkpoint_id: int | None = None) -> list[dict[str, Any]]:
        if checkpoint_id is None:
            return self._all("SELECT * FROM evals ORDER BY created")
        return self._all("SELECT * FROM evals WHERE checkpoint_id = ? ORDER BY created", checkpoint_id)


class Workspace:
    def __init__(self, root: Path | str | None = None):
        if root is None:
            root = os.environ.get("LLMCTL_HOME") or Path.cwd() / DEFAULT_DIRNAME
        self.root = Path(root).expanduser().resolve()
        self._registry: Registry | None = None

    @property
    def exists(self) -> bool:
        return (self.root / "registry.db").exists()

    def registry(self, create: bool = True) -> Registry:
        """The registry; with create=False a missing workspace reads as empty and stays missing."""
        stale = self._registry is not None and create and self._registry.in_memory
        if self._registry is None or stale:
            self._registry = Registry(self.root / "registry.db", create=create)
        return self._registry

    def corpus_dir(self, name: str) -> Path:
        return self.root / "corpora" / name

    def tokenizer_dir(self, name: str) -> Path:
        return self.root / "tokenizers" / name

    @property
    def studies_db(self) -> Path:
        return self.root / "studies.db"

    @property
    def runs_dir(self) -> Path:
        return self.root / "runs"

    def run_dir(self, name: str) -> Path:
        return self.runs_dir / name


# ---------------------------------------------------------------- a run's layout
#
#   runs/<run>/config.yaml                      the resolved RunConfig
#   runs/<run>/events.jsonl                     the event stream
#   runs/<run>/checkpoints/step-00001000/       one checkpoint per step
#   runs/<run>/reference_logps.safetensors      dpo --precompute-reference: the reference's scores
#
# Spelled here only: the trainer writes it, and monitor, serve, eval and merge read it.

RUN_CONFIG = "config.yaml"
EVENTS_FILE = "events.jsonl"
REFERENCE_LOGPS = "reference_logps.safetensors"
CHECKPOINTS_DIRNAME = "checkpoints"
_STEP_PREFIX = "step-"


def checkpoint_name(step: int) -> str:
    return f"{_STEP_PREFIX}{step:08d}"


def checkpoint_step(path: Path) -> int | None:
    """The step a checkpoint directory's name holds; None for any other name (staging ones too)."""
    digits = path.name.removeprefix(_STEP_PREFIX)
    return int(digits) if path.name.startswith(_STEP_PREFIX) and digits.isdigit() else None


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / CHECKPOINTS_DIRNAME / checkpoint_name(step)


def list_checkpoints(run_dir: Path) -> list[Path]:
    """A run's checkpoint directories, oldest first. Staging directories (dot names) are skipped:
    a directory under a step name was renamed into place whole."""
    root = run_dir / CHECKPOINTS_DIRNAME
    if not root.is_dir():
        return []
    found = [path for path in root.iterdir() if path.is_dir() and checkpoint_step(path) is not None]
    return sorted(found, key=checkpoint_step)


def run_dir_of(checkpoint: Path) -> Path | None:
    """The run directory holding `checkpoint`, or None for a checkpoint copied elsewhere."""
    return checkpoint.parent.parent if checkpoint.parent.name == CHECKPOINTS_DIRNAME else None
