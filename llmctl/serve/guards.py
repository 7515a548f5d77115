"""What stands between a client and the models: the API key, the body's size and deadline, and
a watch on the client while its answer is prepared."""

from __future__ import annotations

import asyncio
import hmac
import threading
from collections.abc import Awaitable
from typing import TypeVar

import anyio
from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llmctl.serve.openai_schema import ErrorBody, ErrorResponse

PROTECTED_PREFIXES = ("/v1/", "/api/")
T = TypeVar("T")


def error_response(
    status: int,
    message: str,
    kind: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = ErrorResponse(error=ErrorBody(message=message, type=kind, param=param, code=code))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


class ApiKeyGuard:
    """Bearer-token check on the API and JSON routes (the page itself is public: it asks for the
    key). Outermost, so a client without the key costs no body buffering or model work."""

    def __init__(self, app: ASGIApp, api_key: str):
        self.app = app
        self.api_key = api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(PROTECTED_PREFIXES):
            scheme, _, token = Headers(scope=scope).get("authorization", "").partition(" ")
            # compare_digest takes as long for a near miss as for a wild guess
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key):
                response = error_response(
                    401,
                    "missing or wrong API key: send 'Authorization: Bearer KEY'",
                    code="invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"},
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class BodyLimit:
    """Refuse request bodies over `max_bytes` with a 413, and bodies that take longer than
    `timeout_s` to arrive with a 408, before any route parses them. The body is read here (it is
    small by then) and handed on whole."""

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float):
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = error_response(
            413,
            f"the request body is over this server's limit of {self.max_bytes} bytes "
            "(llmctl serve --max-body-bytes)",
            code="body_too_large",
        )
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await too_large(scope, receive, send)
            return
        body, more = bytearray(), True
        with anyio.move_on_after(self.timeout_s) as deadline:
            while more:
                message = await receive()
                if message["type"] != "http.request":
                    return  # the client left
                body += message.get("body", b"")
                more = message.get("more_body", False)
                if len(body) > self.max_bytes:
                    await too_large(scope, receive, send)
                    return
        if deadline.cancelled_caught:
            too_slow = error_response(
                408,
                f"the request body did not arrive within {self.timeout_s:g} s (llmctl serve --body-timeout)",
                code="body_timeout",
                headers={"Connection": "close"},
            )
            await too_slow(scope, receive, send)
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()  # after the body: wait for the disconnect, as the server would
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        await self.app(scope, replay, send)


class ClientGone(Exception):
    """The client of a request disconnected before its answer was ready."""


class ClientWatch:
    """Notices a client disconnecting while its request is still being prepared or generated
    (a streamed response notices it by itself). `check` is called from worker threads."""

    def __init__(self, request: Request):
        self._receive = request.receive
        self._gone = threading.Event()
        self._task: asyncio.Task | None = None

    async def __aenter__(self) -> ClientWatch:
        self._task = asyncio.create_task(self._listen())
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._task.cancel()

    async def _listen(self) -> None:
        while (await self._receive())["type"] != "http.disconnect":
            pass
        self._gone.set()

    def check(self) -> None:
        if self._gone.is_set():
            raise ClientGone

    async def until_gone(self, work: Awaitable[T]) -> T:
        """`work`'s result, or ClientGone (and `work` cancelled) if the client leaves first."""
        task = asyncio.ensure_future(work)
        done, _ = await asyncio.wait({task, self._task}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        task.cancel()
        raise ClientGone
