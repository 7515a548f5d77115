"""The FastAPI app behind `llmctl serve`: the OpenAI-compatible API, the page's JSON, the page.

    GET  /                        the page (static/index.html, app.css, app.js)
    GET  /v1/models               OpenAI: the models served
    GET  /v1/models/{id}
    POST /v1/completions          OpenAI: continue prompts (stream: true for server-sent events)
    POST /v1/chat/completions     OpenAI: answer a conversation
    GET  /api/models/{id}         a model's checkpoint, shape, chat template and sampling defaults
    GET  /api/runs                the workspace: runs with state and best evaluation, corpora, tokenizers
    GET  /api/runs/{name}         one run: config, lineage, checkpoints, evaluations, alerts
    GET  /api/runs/{name}/curves  its loss and learning-rate curves, read incrementally while it trains

Every error is JSON in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, with a
4xx status for what the client can fix; an unexpected failure is a 500 whose traceback goes to the
server's log, never into the response.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import socket
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.responses import StreamingResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llmctl.errors import LlmctlError
from llmctl.generate import Generation, LoadedEngine, load_engine
from llmctl.serve.completions import (
    ApiError,
    Limits,
    Plan,
    chat_response,
    chat_stream,
    completion_response,
    completion_stream,
    plan_chat,
    plan_completion,
    start,
)
from llmctl.serve.models import Lease, ModelEntry, ModelNotFound, ModelPool, describe
from llmctl.serve.openai_schema import (
    ChatCompletionRequest,
    CompletionRequest,
    ErrorBody,
    ErrorResponse,
    ModelCard,
    ModelList,
)
from llmctl.serve.runs import RunsView
from llmctl.serve.transport import ConnectionLimits
from llmctl.workspace import Workspace

STATIC = Path(__file__).parent / "static"
PROTECTED_PREFIXES = ("/v1/", "/api/")
# the page loads only its own files and talks only to this server
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; base-uri 'none'; "
    "form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
ROUTING_ERRORS = {404: "no endpoint {path}", 405: "{path} does not take {method}"}
log = logging.getLogger("llmctl.serve")


@dataclass
class ServeSettings:
    workspace_root: Path
    refs: list[str] = field(default_factory=list)  # --model: serve only these
    max_loaded: int = 2
    device: str = "auto"
    precision: str = "auto"
    api_key: str | None = None
    limits: Limits = field(default_factory=Limits)
    connections: ConnectionLimits = field(default_factory=ConnectionLimits)


def _error(
    status: int,
    message: str,
    kind: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = ErrorResponse(error=ErrorBody(message=message, type=kind, param=param, code=code))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


# ---------------------------------------------------------------- middleware


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
                response = _error(
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
        too_large = _error(
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
            too_slow = _error(
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


class EventStream(StreamingResponse):
    """Server-sent events that, however the response ends (finished, client gone, server stopping),
    stop the generation and give the model back: its lock must never outlive the request."""

    def __init__(self, body: AsyncIterator[str], generation: Generation, lease: Lease):
        super().__init__(
            body,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self.generation = generation
        self.lease = lease

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            try:
                self.generation.close()
            finally:
                self.lease.release()


# ---------------------------------------------------------------- errors


def _describe_validation(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """One readable message for pydantic's errors, and the request field they are about."""
    first = errors[0]
    if first["type"] == "json_invalid":
        return "the request body is not valid JSON", None
    if len(first["loc"]) == 1:  # the body as a whole: FastAPI parses JSON only when it is labelled so
        return "the request body must be a JSON object, sent with 'Content-Type: application/json'", None
    # drop "body" and the union members pydantic names in the location ("str", "list[str]")
    loc = [
        str(part)
        for part in first["loc"][1:]
        if str(part) not in ("str", "int", "float", "bool") and "[" not in str(part)
    ]
    param = ".".join(loc) or None
    if first["type"] == "extra_forbidden":
        return f"unrecognized request argument '{param}' (llmctl serve does not support it)", param
    if first["type"] == "missing":
        return f"'{param}' is required", param
    # of a union's errors, one that is not "wrong type" says what the value got wrong
    same_field = [error for error in errors if error["loc"][:2] == first["loc"][:2]]
    telling = [error for error in same_field if not error["type"].endswith("_type")]
    if not telling and len(same_field) > 1:
        return f"'{param}' has the wrong type", param
    chosen = (telling or same_field)[0]
    message = chosen["msg"].removeprefix("Value error, ")
    return f"invalid '{param}': {message[:1].lower()}{message[1:]}", param


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body.model_dump(), status_code=exc.status)

    @app.exception_handler(ClientGone)
    async def client_gone(_: Request, exc: ClientGone) -> Response:
        return Response(status_code=499)  # nobody reads it: nginx's code for "client closed request"

    @app.exception_handler(ModelNotFound)
    async def model_not_found(_: Request, exc: ModelNotFound) -> JSONResponse:
        return _error(404, exc.message, param="model", code="model_not_found")

    @app.exception_handler(LlmctlError)
    async def llmctl_error(_: Request, exc: LlmctlError) -> JSONResponse:
        # a checkpoint that cannot be read or loaded: the server's data, not the request, is wrong
        return _error(500, exc.message, kind="server_error", code="model_unavailable")

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _describe_validation(list(exc.errors()))
        return _error(400, message, param=param)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        message = str(exc.detail)
        # Starlette's routing errors say only "Not Found": name what was asked for
        if exc.status_code in ROUTING_ERRORS and message == HTTPStatus(exc.status_code).phrase:
            message = ROUTING_ERRORS[exc.status_code].format(path=request.url.path, method=request.method)
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return _error(exc.status_code, message, kind=kind)

    @app.exception_handler(Exception)
    async def internal_error(_: Request, exc: Exception) -> JSONResponse:
        log.error("internal error", exc_info=exc)
        return _error(500, "internal error (the server's log has the details)", kind="server_error")


# ---------------------------------------------------------------- the app


def _card(entry: ModelEntry) -> ModelCard:
    return ModelCard(
        id=entry.id, created=int(entry.created), run=entry.run, step=entry.step, val_loss=entry.val_loss
    )


def create_app(settings: ServeSettings, pool: ModelPool | None = None) -> FastAPI:
    """The app; `pool` is passed when the caller preloaded models into it (llmctl serve --model)."""
    if pool is None:
        pool = make_pool(settings)
    runs = RunsView(settings.workspace_root)
    limits = settings.limits
    app = FastAPI(title="llmctl", docs_url=None, redoc_url=None, openapi_url=None)
    _install_error_handlers(app)
    body_timeout = settings.connections.body_timeout_s
    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes, timeout_s=body_timeout)
    if settings.api_key:
        app.add_middleware(ApiKeyGuard, api_key=settings.api_key)

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers=PAGE_HEADERS)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    # ------------------------------------------------------------ OpenAI

    @app.get("/v1/models")
    def list_models() -> ModelList:
        return ModelList(data=[_card(entry) for entry in pool.entries()])

    @app.get("/v1/models/{model_id:path}")
    def get_model(model_id: str) -> ModelCard:
        return _card(describe(model_id, pool.resolve(model_id)))

    async def generate(
        request: ChatCompletionRequest | CompletionRequest,
        plan_request: Callable[..., Plan],
        watch: ClientWatch,
    ) -> tuple[Lease, Plan, Generation]:
        """The request's model, held for this request, and its generation started."""
        path = await anyio.to_thread.run_sync(pool.resolve, request.model)
        lease = await pool.acquire(path)
        try:
            plan = await anyio.to_thread.run_sync(plan_request, lease.loaded, request, limits, watch.check)
            return lease, plan, start(lease.loaded, plan)
        except BaseException:
            lease.release()
            raise

    async def whole(lease: Lease, respond: Callable[..., Any], *args: Any) -> Any:
        try:
            return await anyio.to_thread.run_sync(respond, *args)
        finally:
            lease.release()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: ChatCompletionRequest, http: Request) -> Any:
        async with ClientWatch(http) as watch:
            lease, _, generation = await generate(request, plan_chat, watch)
            if request.stream:
                body = chat_stream(request.model, generation, request.include_usage())
                return EventStream(body, generation, lease)
            return await whole(lease, chat_response, request.model, generation, watch.check)

    @app.post("/v1/completions")
    async def completions(request: CompletionRequest, http: Request) -> Any:
        async with ClientWatch(http) as watch:
            lease, plan, generation = await generate(request, plan_completion, watch)
            if request.stream:
                body = completion_stream(request.model, generation, request.include_usage(), plan.echo)
                return EventStream(body, generation, lease)
            return await whole(lease, completion_response, request.model, generation, plan.echo, watch.check)

    # ------------------------------------------------------------ the page's JSON

    @app.get("/api/models/{model_id:path}")
    def model_detail(model_id: str) -> dict[str, Any]:
        from llmctl.checkpoint.files import read_config
        from llmctl.tokenizer import load_tokenizer_file

        path = pool.resolve(model_id)
        entry = describe(model_id, path)
        config = read_config(path)
        tokenizer = load_tokenizer_file(path / "tokenizer.json")
        return {
            **_card(entry).model_dump(),
            "checkpoint": str(path),
            "loaded": path in pool.loaded_paths(),
            "chat": tokenizer.chat_template is not None,
            "context_length": config.model.context_length,
            "vocab_size": config.model.vocab_size,
            "n_layer": config.model.n_layer,
            "d_model": config.model.d_model,
            "generation": config.generation.model_dump(mode="json"),
            "max_tokens_limit": limits.max_tokens,
        }

    def known_run(name: str) -> str:
        if not runs.exists(name):
            raise HTTPException(404, f"no run '{name}' in this workspace")
        return name

    @app.get("/api/runs")
    def list_runs() -> dict[str, Any]:
        return runs.overview()

    @app.get("/api/runs/{name}")
    def run_detail(name: str) -> dict[str, Any]:
        return runs.detail(known_run(name))

    @app.get("/api/runs/{name}/curves")
    def run_curves(name: str) -> dict[str, Any]:
        return runs.curves(known_run(name))

    return app


def bind_socket(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (0: any free port), so a busy port is a one-line error before
    any model loads."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise LlmctlError(f"cannot listen on {host}:{port}: {reason} (pick another --port)") from None
    sock.set_inheritable(True)
    return sock


def make_pool(settings: ServeSettings) -> ModelPool:
    def load(path: Path) -> LoadedEngine:
        return load_engine(Workspace(settings.workspace_root), str(path), settings.device, settings.precision)

    return ModelPool(settings.workspace_root, load, settings.max_loaded, settings.refs)
