"""Which models the server offers, and the loaded ones: an LRU cache of models in use.

A model id is what a request's `model` field says: a run name (its best checkpoint), `run:best`,
`run:latest` or `run:step-N`, or with `--model` exactly one of the references given there. Each
request resolves its id to a checkpoint directory, so a run that is still training is served at
its newest best checkpoint; two ids naming one checkpoint share one loaded model.

A request holds a lease on its model from building its prompt to its last token, so a model in
use is never unloaded; many requests hold one model at once (their rows share its batch, see
llmctl.serve.batching). A model loads once, whoever asks first; the others wait for that load
without holding a thread.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio

from llmctl.checkpoint.files import read_meta
from llmctl.checkpoint.refs import resolve_model_ref, resolve_run_ref
from llmctl.errors import LlmctlError, UsageError
from llmctl.monitor.runs import known_runs
from llmctl.workspace import Workspace, check_name, checkpoint_step, list_checkpoints


class ModelNotFound(UsageError):
    """A request named a model this server does not offer; the message says what it does offer."""


@dataclass
class ModelEntry:
    id: str
    path: Path  # the checkpoint directory the id names now
    run: str | None
    step: int | None
    val_loss: float | None
    created: float


def describe(model_id: str, path: Path) -> ModelEntry:
    """The entry for `model_id`, which names checkpoint `path`."""
    meta = read_meta(path)
    val_loss = meta.get("val_loss")
    run = path.parent.parent.name if path.parent.name == "checkpoints" else None
    return ModelEntry(
        model_id,
        path,
        run,
        checkpoint_step(path),
        float(val_loss) if isinstance(val_loss, (int, float)) else None,
        path.stat().st_mtime,
    )


@dataclass
class _Slot:
    """One checkpoint's place in the cache: the requests holding it, and what it loaded to."""

    loading: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0
    loaded: Any = None


class Lease:
    """A loaded model held by one request; `release` gives it back (a second call does nothing)."""

    def __init__(self, slot: _Slot):
        self._slot = slot
        self.loaded = slot.loaded
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._slot.users -= 1


class ModelPool:
    """Resolves model ids and keeps at most `max_loaded` models in memory, least recently used out.

    `load` turns a checkpoint directory into what requests use (the app's: an engine and its
    batch), `unload` lets it go when it leaves the cache. A model in use is never evicted: while
    every loaded model is busy, one more may stay loaded until its requests end.
    """

    def __init__(
        self,
        workspace_root: Path,
        load: Callable[[Path], Any],
        max_loaded: int = 2,
        refs: Sequence[str] = (),
        unload: Callable[[Any], None] = lambda loaded: None,
    ):
        self.workspace_root = workspace_root
        self.refs = list(refs)  # with --model: the only ids served
        self.max_loaded = max_loaded
        self._load = load
        self._unload = unload
        self._slots: OrderedDict[Path, _Slot] = OrderedDict()

    # ------------------------------------------------------------ ids

    def resolve(self, model_id: str) -> Path:
        """The checkpoint directory `model_id` names now, or ModelNotFound."""
        workspace = Workspace(self.workspace_root)
        if self.refs:
            if model_id not in self.refs:
                raise ModelNotFound(f"model '{model_id}' is not served here; served: {', '.join(self.refs)}")
            resolve = resolve_model_ref
        else:
            run = model_id.partition(":")[0]
            try:
                check_name(run, "run")
            except LlmctlError:
                run = ""
            if not run or not workspace.run_dir(run).is_dir():
                raise ModelNotFound(f"model '{model_id}' does not exist; GET /v1/models lists them")
            # a run reference only, never a path: no directory on disk (the server's working
            # directory included) is reachable through a request
            resolve = resolve_run_ref
        try:
            return resolve(workspace, model_id)
        except LlmctlError as exc:
            raise ModelNotFound(exc.message) from None

    def entries(self) -> list[ModelEntry]:
        """What GET /v1/models lists: the --model references, or every run with a checkpoint (as
        RUN, its best) and each of its checkpoints (as RUN:step-N)."""
        if self.refs:
            return [describe(ref, self.resolve(ref)) for ref in self.refs]
        workspace = Workspace(self.workspace_root)
        found = []
        for run in known_runs(workspace):
            run_dir = workspace.run_dir(run)
            checkpoints = [path for path in list_checkpoints(run_dir) if (path / "meta.json").is_file()]
            if not checkpoints:
                continue
            try:
                found.append(describe(run, resolve_run_ref(workspace, run)))
                found += [describe(f"{run}:step-{checkpoint_step(path)}", path) for path in checkpoints]
            except LlmctlError:
                continue  # a checkpoint removed or damaged while listing: left out, not an error
        return found

    # ------------------------------------------------------------ loading and using

    def preload(self) -> list[Path]:
        """Load the first `max_loaded` --model references now (before the server starts), so a
        bad reference fails at once and the first request does not wait."""
        paths = [self.resolve(ref) for ref in self.refs]  # every reference checked, the first ones loaded
        loaded = []
        for path in paths:
            if len(loaded) < self.max_loaded and path not in self._slots:
                self._slots[path] = _Slot(loaded=self._load(path))
                loaded.append(path)
        return loaded

    async def acquire(self, path: Path) -> Lease:
        """The model for checkpoint `path`, loaded if need be, held until the lease is released.

        Releasing never awaits, so a streamed response can release in a `finally` that a cancelled
        request reaches without being interrupted there.
        """
        slot = self._slots.get(path)
        if slot is None:
            slot = self._slots[path] = _Slot()
        self._slots.move_to_end(path)
        slot.users += 1
        try:
            if slot.loaded is None:
                async with slot.loading:  # one load, whoever asks first; the others wait for it
                    if slot.loaded is None:
                        slot.loaded = await anyio.to_thread.run_sync(self._load, path)
                        self._evict()
        except BaseException:
            slot.users -= 1
            raise
        return Lease(slot)

    def _evict(self) -> None:
        loaded = [(path, slot) for path, slot in self._slots.items() if slot.loaded is not None]
        excess = len(loaded) - self.max_loaded
        for path, slot in loaded:  # least recently used first
            if excess <= 0:
                break
            if slot.users == 0:
                del self._slots[path]
                self._unload(slot.loaded)
                excess -= 1

    def loaded_paths(self) -> list[Path]:
        # a snapshot first: the page's JSON endpoints call this from worker threads
        return [path for path, slot in list(self._slots.items()) if slot.loaded is not None]

    def loaded(self, path: Path) -> Any:
        """What `path` is loaded as, or None."""
        slot = self._slots.get(path)
        return None if slot is None else slot.loaded

    def close(self) -> None:
        """Unload every model (the server is stopping)."""
        for slot in list(self._slots.values()):
            if slot.loaded is not None:
                self._unload(slot.loaded)
