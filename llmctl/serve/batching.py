"""Continuous batching for one served model: every request's rows decode in the same forwards.

A request's rows (one per prompt and sample) join the running batch at the next decoding step,
prefilled as they join, and leave it when they finish or their request is cancelled (the client
left): their KV-cache slots are free at the next step. One worker thread per loaded model runs
the steps while there is work, and sleeps otherwise.

Bounded: at most `max_batch` rows decode at once and `max_queue` more wait for a slot, first come
first served row by row (a request is never passed over by a later one); a request that would
wait past the queue is refused at once (`QueueFull`, a 429 for the client).

Each row keeps its own sampling settings, seed, stop strings and `max_tokens` (llmctl.generate.
batch), so what a request gets does not depend on what runs beside it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from llmctl.config import GenerationConfig
from llmctl.generate import Chunk, Completion, Engine, Prompt
from llmctl.generate.batch import DecodeBatch, Row

log = logging.getLogger("llmctl.serve")
_END = object()  # after a ticket's last chunk


class QueueFull(Exception):
    """More rows than the batch and its queue hold."""

    def __init__(self, message: str, retry_after_s: int = 1):
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s


class BatcherClosed(Exception):
    """The model was unloaded (or the server is stopping) while the request waited."""


@dataclass
class Ticket:
    """One request in the batch: its rows, and their chunks as they are decoded.

    The worker thread hands chunks to the request's event loop; `chunks()` yields them there.
    """

    prompts: list[Prompt]
    num_samples: int
    rows: list[Row]
    loop: asyncio.AbstractEventLoop
    generated_tokens: int = 0  # tokens drawn for its rows (a stop token counted, as OpenAI does)
    submitted: float = field(default_factory=time.perf_counter)
    first_token: float | None = None  # perf_counter time of the first token drawn for it
    completed: list[Completion] = field(default_factory=list)
    cancelled: bool = False
    _queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    _open_rows: int = 0

    @property
    def prompt_tokens(self) -> int:
        return sum(len(prompt.ids) for prompt in self.prompts)

    def _put(self, item: object) -> None:  # from the worker thread
        self.loop.call_soon_threadsafe(self._queue.put_nowait, item)

    async def chunks(self) -> AsyncIterator[Chunk]:
        """Each row's chunks as they are decoded; the row's last carries its Completion."""
        while True:
            item = await self._queue.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            if item.completion is not None:
                self.completed.append(item.completion)
            yield item

    async def completions(self) -> list[Completion]:
        """Run to the end; completions in row order (prompt by prompt, then sample by sample)."""
        async for _ in self.chunks():
            pass
        return sorted(self.completed, key=lambda c: (c.prompt_index, c.sample_index))


class Batcher:
    """The decoding loop of one loaded engine, shared by every request for it."""

    def __init__(self, engine: Engine, max_batch: int = 16, max_queue: int = 64):
        self.engine = engine
        self.max_batch = max_batch
        self.max_queue = max_queue
        self._batch = DecodeBatch(engine.model)
        self._waiting: deque[Row] = deque()
        # rows taken from the queue that the worker is prefilling into the batch: they hold a slot
        # while in neither, so a request arriving meanwhile is measured against them too
        self._joining = 0
        self._cancelled: dict[int, Ticket] = {}  # tickets whose rows must leave, by id()
        self._lock = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        self.steps = 0  # decoding steps run (for tests and the page)

    # ------------------------------------------------------------ the request side

    def submit(
        self,
        prompts: Sequence[str | Sequence[int]],
        config: GenerationConfig,
        num_samples: int,
        stop_token_ids: set[int] | None,
        loop: asyncio.AbstractEventLoop,
    ) -> Ticket:
        """Queue one request's rows; QueueFull if the batch and the queue cannot take them all."""
        stops = self.engine.stop_token_ids if stop_token_ids is None else set(stop_token_ids)
        prepared = self.engine.prepare(prompts, config.max_new_tokens)
        ticket = Ticket(prepared, num_samples, [], loop)
        ticket.rows = self.engine.rows(prepared, config, num_samples, stops, owner=ticket)
        ticket._open_rows = len(ticket.rows)
        with self._lock:
            if self._closed:
                raise BatcherClosed("this model was unloaded; send the request again")
            in_flight = len(self._batch) + self._joining + len(self._waiting)
            room = self.max_batch + self.max_queue - in_flight
            if len(ticket.rows) > room:
                raise QueueFull(
                    f"this model is busy: {in_flight} sequences are decoding or waiting, at most "
                    f"{self.max_batch} decode at once and {self.max_queue} more wait "
                    "(llmctl serve --max-batch, --max-queue); try again shortly"
                )
            self._waiting.extend(ticket.rows)
            self._start()
            self._lock.notify()
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        """The request is gone: its rows leave the batch (or the queue) before the next step."""
        with self._lock:
            if ticket.cancelled or ticket._open_rows == 0:
                return
            ticket.cancelled = True
            # its waiting rows give their places back now; rows decoding leave at the next step
            self._waiting = deque(row for row in self._waiting if row.owner is not ticket)
            self._cancelled[id(ticket)] = ticket
            self._lock.notify()

    def load(self) -> dict[str, int]:
        """What the batch holds now: rows decoding, rows waiting, and the limits."""
        with self._lock:
            return {
                "active": len(self._batch) + self._joining,
                "waiting": len(self._waiting),
                "max_batch": self.max_batch,
                "max_queue": self.max_queue,
                "steps": self.steps,
            }

    def close(self, wait: bool = True) -> None:
        """Stop the worker after its current step; requests still in it end with BatcherClosed."""
        with self._lock:
            self._closed = True
            self._lock.notify()
        if wait and self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)

    # ------------------------------------------------------------ the worker

    def _start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="llmctl-batcher", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._closed and not self._waiting and not len(self._batch) and not self._cancelled:
                    self._lock.wait()
                if self._closed:
                    break
                leaving = self._take_cancelled()
                joining = []
                while self._waiting and len(self._batch) + len(joining) < self.max_batch:
                    joining.append(self._waiting.popleft())
                self._joining = len(joining)
            try:
                self._step(leaving, joining)
            except Exception as exc:  # a bug or out of memory: the requests decoding fail, none hangs
                log.exception("decoding step failed")
                self._fail([*self._batch.rows, *joining], exc)
                self._batch = DecodeBatch(self.engine.model)
            finally:
                with self._lock:
                    self._joining = 0
        with self._lock:
            rows = [*self._batch.rows, *self._waiting]
            self._waiting.clear()
        self._fail(rows, BatcherClosed("this model was unloaded; send the request again"))

    def _take_cancelled(self) -> list[Row]:
        """Rows of cancelled tickets, out of the queue and (returned) to leave the batch; each such
        ticket's chunks end."""
        if not self._cancelled:
            return []
        gone, self._cancelled = self._cancelled, {}
        self._waiting = deque(row for row in self._waiting if id(row.owner) not in gone)
        for ticket in gone.values():
            ticket._open_rows = 0
            ticket._put(_END)
        return [row for row in self._batch.rows if id(row.owner) in gone]

    def _step(self, leaving: list[Row], joining: list[Row]) -> None:
        batch = self._batch
        batch.drop(leaving)
        batch.join([row for row in joining if not row.owner.cancelled])
        for row in batch.rows:
            ticket = row.owner
            ticket.generated_tokens += 1
            if ticket.first_token is None:
                ticket.first_token = time.perf_counter()
        for row, text, completion in batch.draw():
            ticket = row.owner
            ticket._put(Chunk(row.index, text, completion))
            if completion is not None:
                ticket._open_rows -= 1
                if ticket._open_rows == 0:
                    ticket._put(_END)
        batch.advance()
        self.steps += 1

    @staticmethod
    def _fail(rows: list[Row], exc: BaseException) -> None:
        for ticket in {id(row.owner): row.owner for row in rows}.values():
            if ticket._open_rows:
                ticket._open_rows = 0
                ticket._put(exc)
