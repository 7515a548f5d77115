"""Where studies live: Optuna's relational storage, SQLite in the workspace by default (`studies.db`
beside registry.db) or a database URL (PostgreSQL, MySQL) that processes on several machines share,
which is Optuna's own distributed mode. No torch here: `tune show` and `tune best` read it."""

from __future__ import annotations

import contextlib
import fcntl
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

from llmctl.errors import LlmctlError, UsageError
from llmctl.workspace import Workspace

ENV = "LLMCTL_TUNE_STORAGE"  # --storage's environment variable
HEARTBEAT_S = 30  # a trial's process records that it lives this often
GRACE_S = 600  # silence after which any process of the study fails the trial and queues a retry
CREATE_ATTEMPTS = 3  # two processes creating one database's tables at once: one of them retries


def quiet_optuna() -> None:
    """Optuna's log lines and experimental-feature warnings are ours to word: tune reports each trial.
    Optuna is an extra: without it, one line says how to install it."""
    try:
        import optuna
    except ImportError:
        raise LlmctlError("llmctl tune needs Optuna: pip install 'llmctl[tune]'") from None
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", module=r"optuna(\.|$)")


def storage_url(workspace: Workspace, given: str | None) -> str:
    return given or f"sqlite:///{workspace.studies_db}"


def shown(url: str) -> str:
    """The URL as it may be printed and recorded: its password hidden."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url


def sqlite_path(url: str) -> Path | None:
    if not url.startswith("sqlite:///"):
        return None
    database = url.removeprefix("sqlite:///")
    return None if database in ("", ":memory:") else Path(database)


@contextlib.contextmanager
def _creation_lock(url: str) -> Iterator[None]:
    """Processes on one machine open a new SQLite study database one at a time: creating its tables
    at once, the second would fail on the first's rows."""
    path = sqlite_path(url)
    if path is None or not path.parent.is_dir():
        yield
        return
    with open(path.with_name(f".{path.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def open_storage(url: str, *, live: bool = False):
    """Optuna's storage at `url`. `live`: the storage of a process running trials, which records
    heartbeats and fails (then retries once) the trials of processes that went silent."""
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    quiet_optuna()
    kwargs: dict = {}
    if sqlite_path(url) is not None:
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 60}}  # wait for another process's write
    if live:
        kwargs.update(
            heartbeat_interval=HEARTBEAT_S,
            grace_period=GRACE_S,
            heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=1),
        )
    for attempt in range(CREATE_ATTEMPTS):
        try:
            with _creation_lock(url):
                return RDBStorage(url, **kwargs)
        except ImportError:
            raise LlmctlError(
                f"cannot open the study storage '{shown(url)}': its database driver is not installed "
                "(PostgreSQL: pip install psycopg2-binary; MySQL: pip install pymysql)"
            ) from None
        except Exception as exc:
            integrity = type(exc).__name__ == "IntegrityError"
            if integrity and attempt + 1 < CREATE_ATTEMPTS:
                time.sleep(0.5)
                continue
            raise LlmctlError(
                f"cannot open the study storage '{shown(url)}': {_reason(exc)}; check --storage "
                "(sqlite:///PATH, postgresql://USER@HOST/DB or mysql+pymysql://USER@HOST/DB)"
            ) from None
    raise AssertionError("unreachable")  # pragma: no cover


def _reason(exc: Exception) -> str:
    original = getattr(exc, "orig", None)
    text = str(original if original is not None else exc).split("\n")[0]
    return text.split(" (Background on this error")[0].strip() or type(exc).__name__


def open_existing(workspace: Workspace, given: str | None):
    """The storage to read studies from, without creating one where there is none."""
    url = storage_url(workspace, given)
    path = sqlite_path(url)
    if path is not None and not path.is_file():
        where = "this workspace" if given is None else f"'{path}'"
        raise UsageError(
            f"no studies in {where} yet ({path} does not exist); start one with "
            "llmctl tune --study NAME --param KEY=KIND:RANGE ... (or give --storage URL)"
        )
    return open_storage(url)


def load_study(storage, name: str):
    import optuna

    try:
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        names = [summary.study_name for summary in optuna.get_all_study_summaries(storage, False)]
        import difflib

        close = difflib.get_close_matches(name, names, n=1)
        hint = f"did you mean '{close[0]}'?" if close else f"its studies: {', '.join(names) or 'none'}"
        raise UsageError(f"no study '{name}' in the storage — {hint} (llmctl tune show lists them)") from None
