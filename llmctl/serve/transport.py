"""The connection-level limits of `llmctl serve`, so a slow or silent client cannot hold the server.

uvicorn gives the cap on connections (`limit_concurrency`: past it a request is answered 503) and
the idle keep-alive timeout. It has no timeout for a request's headers, so a client that opens a
connection and sends a header line a minute ("slowloris") would keep it forever: the protocol
class below closes a connection whose headers are not complete in time. The body has its own
deadline in the app (`BodyLimit`), where a 408 can still be answered.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol


@dataclass(frozen=True)
class ConnectionLimits:
    max_connections: int = 64
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    keep_alive_s: int = 5


class TimedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for each request's headers, from its first byte (or
    the connection's opening) to the end of its header block."""

    header_timeout_s = 10.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_deadline: asyncio.TimerHandle | None = None
        self._timed_cycle: Any = None
        self._start_header_deadline()

    def data_received(self, data: bytes) -> None:
        if self._header_deadline is None and (self.cycle is None or self.cycle.response_complete):
            self._start_header_deadline()  # the next request on a kept-alive connection begins
        super().data_received(data)
        if self.cycle is not None and self.cycle is not self._timed_cycle:
            self._cancel_header_deadline()  # its headers are in: the app has the request now

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_deadline()
        super().connection_lost(exc)

    def _start_header_deadline(self) -> None:
        self._timed_cycle = self.cycle
        self._header_deadline = self.loop.call_later(self.header_timeout_s, self._headers_too_slow)

    def _cancel_header_deadline(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _headers_too_slow(self) -> None:
        self._header_deadline = None
        if not self.transport.is_closing():
            self.logger.warning("closed a connection: its headers took over %ss", self.header_timeout_s)
            self.transport.close()


def server_config(app: Any, limits: ConnectionLimits) -> uvicorn.Config:
    """uvicorn's config for `app` under `limits`."""
    protocol = type("TimedH11Protocol", (TimedH11Protocol,), {"header_timeout_s": limits.header_timeout_s})
    return uvicorn.Config(
        app,
        http=protocol,
        log_level="warning",
        access_log=False,
        # uvicorn counts the connection asking among the open ones
        limit_concurrency=limits.max_connections + 1,
        timeout_keep_alive=limits.keep_alive_s,
        timeout_graceful_shutdown=5,
    )
