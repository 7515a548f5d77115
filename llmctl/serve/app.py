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
import logging
import socket
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
from starlette.exceptions import HTTPException
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from llmctl.errors import LlmctlError
from llmctl.generate import LoadedEngine, load_engine
from llmctl.serve.batching import Batcher, BatcherClosed, QueueFull, Ticket
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
)
from llmctl.serve.guards import ApiKeyGuard, BodyLimit, ClientGone, ClientWatch, error_response
from llmctl.serve.models import Lease, ModelEntry, ModelNotFound, ModelPool, describe
from llmctl.serve.openai_schema import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList
from llmctl.serve.runs import RunsView
from llmctl.serve.transport import ConnectionLimits
from llmctl.workspace import Workspace

STATIC = Path(__file__).parent / "static"
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
    dtype: str | None = None  # None: each checkpoint's generation.dtype
    api_key: str | None = None
    limits: Limits = field(default_factory=Limits)
    connections: ConnectionLimits = field(default_factory=ConnectionLimits)
    max_batch: int = 16  # sequences one model decodes at once
    max_queue: int = 64  # sequences waiting for a slot, past which a request gets 429


@dataclass
class ServedModel:
    """A loaded model and the batch every request for it joins."""

    loaded: LoadedEngine
    batcher: Batcher


class EventStream(StreamingResponse):
    """Server-sent events that, however the response ends (finished, client gone, server stopping),
    take the request's rows out of the batch and give the model back."""

    def __init__(self, body: AsyncIterator[str], ticket: Ticket, served: ServedModel, lease: Lease):
        super().__init__(
            body,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self.ticket, self.served, self.lease = ticket, served, lease

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            try:
                self.served.batcher.cancel(self.ticket)
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
    async def apierror_response(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body.model_dump(), status_code=exc.status)

    @app.exception_handler(ClientGone)
    async def client_gone(_: Request, exc: ClientGone) -> Response:
        return Response(status_code=499)  # nobody reads it: nginx's code for "client closed request"

    @app.exception_handler(QueueFull)
    async def queue_full(_: Request, exc: QueueFull) -> JSONResponse:
        headers = {"Retry-After": str(exc.retry_after_s)}
        return error_response(429, exc.message, kind="server_busy", code="queue_full", headers=headers)

    @app.exception_handler(BatcherClosed)
    async def batcher_closed(_: Request, exc: BatcherClosed) -> JSONResponse:
        return error_response(503, str(exc), kind="server_error", code="model_unloaded")

    @app.exception_handler(ModelNotFound)
    async def model_not_found(_: Request, exc: ModelNotFound) -> JSONResponse:
        return error_response(404, exc.message, param="model", code="model_not_found")

    @app.exception_handler(LlmctlError)
    async def llmctlerror_response(_: Request, exc: LlmctlError) -> JSONResponse:
        # a checkpoint that cannot be read or loaded: the server's data, not the request, is wrong
        return error_response(500, exc.message, kind="server_error", code="model_unavailable")

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _describe_validation(list(exc.errors()))
        return error_response(400, message, param=param)

    @app.exception_handler(HTTPException)
    async def httperror_response(request: Request, exc: HTTPException) -> JSONResponse:
        message = str(exc.detail)
        # Starlette's routing errors say only "Not Found": name what was asked for
        if exc.status_code in ROUTING_ERRORS and message == HTTPStatus(exc.status_code).phrase:
            message = ROUTING_ERRORS[exc.status_code].format(path=request.url.path, method=request.method)
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return error_response(exc.status_code, message, kind=kind)

    @app.exception_handler(Exception)
    async def internalerror_response(_: Request, exc: Exception) -> JSONResponse:
        log.error("internal error", exc_info=exc)
        return error_response(500, "internal error (the server's log has the details)", kind="server_error")


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
    ) -> tuple[Lease, ServedModel, Plan, Ticket]:
        """The request's model, held for this request, and its rows in the model's batch."""
        path = await anyio.to_thread.run_sync(pool.resolve, request.model)
        lease = await pool.acquire(path)
        try:
            served: ServedModel = lease.loaded
            plan = await anyio.to_thread.run_sync(plan_request, served.loaded, request, limits, watch.check)
            ticket = served.batcher.submit(
                plan.prompts, plan.config, plan.num_samples, plan.stop_token_ids, asyncio.get_running_loop()
            )
            return lease, served, plan, ticket
        except BaseException:
            lease.release()
            raise

    async def whole(
        lease: Lease, served: ServedModel, ticket: Ticket, watch: ClientWatch, respond: Callable[..., Any]
    ) -> Any:
        """The whole answer, once every row has finished; a client that leaves first takes its rows
        out of the batch at the next step."""
        try:
            return respond(await watch.until_gone(ticket.completions()))
        finally:
            served.batcher.cancel(ticket)
            lease.release()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: ChatCompletionRequest, http: Request) -> Any:
        async with ClientWatch(http) as watch:
            lease, served, _, ticket = await generate(request, plan_chat, watch)
            if request.stream:
                body = chat_stream(request.model, ticket, request.include_usage())
                return EventStream(body, ticket, served, lease)
            return await whole(
                lease, served, ticket, watch, lambda done: chat_response(request.model, ticket, done)
            )

    @app.post("/v1/completions")
    async def completions(request: CompletionRequest, http: Request) -> Any:
        async with ClientWatch(http) as watch:
            lease, served, plan, ticket = await generate(request, plan_completion, watch)
            if request.stream:
                body = completion_stream(request.model, ticket, request.include_usage(), plan.echo)
                return EventStream(body, ticket, served, lease)
            return await whole(
                lease,
                served,
                ticket,
                watch,
                lambda done: completion_response(request.model, ticket, done, plan.echo),
            )

    # ------------------------------------------------------------ the page's JSON

    def planned_dtype(checkpoint_default: str) -> str:
        """The dtype a model not loaded yet will load in."""
        from llmctl.generate import resolve_device
        from llmctl.model.decode_dtype import resolve_decode_dtype

        return resolve_decode_dtype(settings.dtype or checkpoint_default, resolve_device(settings.device))

    @app.get("/api/models/{model_id:path}")
    def model_detail(model_id: str) -> dict[str, Any]:
        from llmctl.checkpoint.files import read_config
        from llmctl.tokenizer import load_tokenizer_file

        path = pool.resolve(model_id)
        entry = describe(model_id, path)
        config = read_config(path)
        tokenizer = load_tokenizer_file(path / "tokenizer.json")
        served: ServedModel | None = pool.loaded(path)
        return {
            **_card(entry).model_dump(),
            "checkpoint": str(path),
            "loaded": served is not None,
            # the weights' dtype once loaded, and the batch's rows now (decoding, waiting) and limits
            "dtype": served.loaded.engine.dtype if served else planned_dtype(config.generation.dtype),
            "batch": served.batcher.load() if served else None,
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
    def load(path: Path) -> ServedModel:
        loaded = load_engine(Workspace(settings.workspace_root), str(path), settings.device, settings.dtype)
        return ServedModel(loaded, Batcher(loaded.engine, settings.max_batch, settings.max_queue))

    def unload(served: ServedModel) -> None:
        served.batcher.close(wait=False)

    return ModelPool(settings.workspace_root, load, settings.max_loaded, settings.refs, unload)
