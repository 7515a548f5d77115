"""OpenAI requests -> engine calls -> OpenAI responses, whole or as server-sent events.

The checkpoint's own `generation:` config gives the defaults (as for `llmctl sample` and `chat`);
a request's sampling fields override them one by one. Chat prompts are built by the same
`ChatPrompt` as `llmctl chat`: the tokenizer's chat template, the oldest turns left out when the
conversation outgrows the context window, and the end-of-turn tokens as stops. A base model
(no chat template) continues the conversation as one plain text, as in `llmctl chat`.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass

from pydantic import BaseModel, ValidationError

from llmctl.config import GenerationConfig
from llmctl.errors import UsageError
from llmctl.generate import Chunk, Completion, LoadedEngine, override_generation
from llmctl.generate.chat_prompt import ChatPrompt
from llmctl.serve.batching import Ticket
from llmctl.serve.openai_schema import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    CompletionRequest,
    Delta,
    ErrorBody,
    ErrorResponse,
    TextChoice,
    TextCompletion,
    Usage,
)

log = logging.getLogger("llmctl.serve")

# GenerationConfig field -> the request field that sets it, so errors name what the client sent
REQUEST_NAMES = {
    "max_new_tokens": "max_tokens",
    "top_k": "top_k",
    "top_p": "top_p",
    "min_p": "min_p",
    "temperature": "temperature",
    "repetition_penalty": "repetition_penalty",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
    "seed": "seed",
    "stop": "stop",
}
# the engine's finish reasons in OpenAI's words: a full context window also cut the text short
FINISH_REASONS = {"stop": "stop", "length": "length", "context": "length"}
SYSTEM_ROLES = ("system", "developer")


class ApiError(Exception):
    """A request the server refuses, answered in OpenAI's error shape with `status`."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
    ):
        super().__init__(message)
        self.status = status
        self.body = ErrorResponse(error=ErrorBody(message=message, type=kind, param=param, code=code))


@dataclass(frozen=True)
class Limits:
    """What one request may ask for."""

    max_tokens: int = 1024  # tokens generated per sample
    max_samples: int = 16  # prompts x n in one request
    max_messages: int = 512  # in one chat request
    max_body_bytes: int = 1 << 20


@dataclass
class Plan:
    """One request as the engine takes it."""

    prompts: list[list[int]]
    config: GenerationConfig
    num_samples: int
    stop_token_ids: set[int] | None  # None: the engine's default (end of text)
    echo: list[str] | None = None  # completions with echo: each prompt's text, put before its samples


def generation_config(
    loaded: LoadedEngine, request: ChatCompletionRequest | CompletionRequest, limits: Limits
) -> GenerationConfig:
    overrides = request.sampling()
    asked = overrides["max_new_tokens"]
    if asked is not None and asked > limits.max_tokens:
        raise ApiError(
            400,
            f"max_tokens {asked} is over this server's limit of {limits.max_tokens} "
            "(llmctl serve --max-tokens)",
            param="max_tokens",
        )
    base = loaded.config.generation
    if base.max_new_tokens > limits.max_tokens:
        base = base.model_copy(update={"max_new_tokens": limits.max_tokens})
    try:
        return override_generation(base, overrides, REQUEST_NAMES)
    except UsageError as exc:
        cause = exc.__cause__
        field = cause.errors()[0]["loc"][0] if isinstance(cause, ValidationError) and cause.errors() else None
        raise ApiError(400, exc.message, param=REQUEST_NAMES.get(str(field))) from None


def _check_samples(prompts: int, request: ChatCompletionRequest | CompletionRequest, limits: Limits) -> None:
    if prompts * request.n > limits.max_samples:
        raise ApiError(
            400,
            f"{prompts} prompt(s) x n={request.n} is over this server's limit of "
            f"{limits.max_samples} samples per request",
            param="n",
        )


def plan_chat(
    loaded: LoadedEngine, request: ChatCompletionRequest, limits: Limits, check: Callable[[], None]
) -> Plan:
    """`check` raises once the client has gone, so a long prompt is not built for nobody."""
    if len(request.messages) > limits.max_messages:
        raise ApiError(
            400,
            f"{len(request.messages)} messages is over this server's limit of {limits.max_messages} "
            "(llmctl serve --max-messages)",
            param="messages",
        )
    _check_samples(1, request, limits)
    config = generation_config(loaded, request, limits)
    system = "\n\n".join(m.text() for m in request.messages if m.role in SYSTEM_ROLES) or None
    turns = [{"role": m.role, "content": m.text()} for m in request.messages if m.role not in SYSTEM_ROLES]
    if not turns or turns[-1]["role"] != "user":
        raise ApiError(400, "the last message must be the user's (role 'user')", param="messages")
    prompt = ChatPrompt(loaded.engine, system)
    ids, _ = prompt.build(turns[:-1], turns[-1]["content"], config.max_new_tokens, check)
    context = loaded.engine.context_length
    if len(ids) >= context:
        raise ApiError(
            400,
            f"the last message (with the system prompt) is {len(ids)} tokens; this model's "
            f"context window is {context} tokens",
            param="messages",
            code="context_length_exceeded",
        )
    return Plan([ids], config, request.n, prompt.stop_token_ids())


def plan_completion(
    loaded: LoadedEngine, request: CompletionRequest, limits: Limits, check: Callable[[], None]
) -> Plan:
    prompts = request.prompts()
    if not prompts:
        raise ApiError(400, "the prompt list is empty", param="prompt")
    _check_samples(len(prompts), request, limits)
    config = generation_config(loaded, request, limits)
    engine = loaded.engine
    vocab = engine.model.cfg.vocab_size
    token_lists = []
    for prompt in prompts:
        check()
        ids = engine.tokenizer.encode_prompt(prompt) if isinstance(prompt, str) else list(prompt)
        if any(token >= vocab for token in ids):
            raise ApiError(400, f"token ids must be below the vocabulary size, {vocab}", param="prompt")
        if len(ids) >= engine.context_length:
            raise ApiError(
                400,
                f"the prompt is {len(ids)} tokens; this model's context window is "
                f"{engine.context_length} tokens",
                param="prompt",
                code="context_length_exceeded",
            )
        token_lists.append(ids)
    echo = [engine.tokenizer.decode(ids) for ids in token_lists] if request.echo else None
    return Plan(token_lists, config, request.n, None, echo)


# ---------------------------------------------------------------- whole responses


def _usage(ticket: Ticket) -> Usage:
    prompt, completion = ticket.prompt_tokens, ticket.generated_tokens
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def _index(completion: Completion, num_samples: int) -> int:
    """OpenAI numbers choices prompt by prompt, then sample by sample: the engine's row order."""
    return completion.prompt_index * num_samples + completion.sample_index


def chat_response(model: str, ticket: Ticket, completions: list[Completion]) -> ChatCompletion:
    return ChatCompletion(
        id=f"chatcmpl-{uuid.uuid4().hex}",
        created=int(time.time()),
        model=model,
        choices=[
            ChatChoice(
                index=_index(c, ticket.num_samples),
                message=AssistantMessage(content=c.text),
                finish_reason=FINISH_REASONS[c.finish_reason],
            )
            for c in completions
        ],
        usage=_usage(ticket),
    )


def completion_response(
    model: str, ticket: Ticket, completions: list[Completion], echo: list[str] | None
) -> TextCompletion:
    return TextCompletion(
        id=f"cmpl-{uuid.uuid4().hex}",
        created=int(time.time()),
        model=model,
        choices=[
            TextChoice(
                index=_index(c, ticket.num_samples),
                text=(echo[c.prompt_index] if echo else "") + c.text,
                finish_reason=FINISH_REASONS[c.finish_reason],
            )
            for c in completions
        ],
        usage=_usage(ticket),
    )


# ---------------------------------------------------------------- streams


def _event(item: BaseModel) -> str:
    return f"data: {item.model_dump_json()}\n\n"


async def event_stream(
    ticket: Ticket,
    opening: Iterable[BaseModel],
    chunk_events: Callable[[Chunk], Iterable[BaseModel]],
    closing: Callable[[], Iterable[BaseModel]],
) -> AsyncIterator[str]:
    """Server-sent events: `opening`, one or more per chunk as the model's batch decodes them,
    `closing`, then `data: [DONE]`."""
    for item in opening:
        yield _event(item)
    try:
        async for chunk in ticket.chunks():
            for item in chunk_events(chunk):
                yield _event(item)
    except Exception:  # the response has started: the error can only be an event
        log.exception("generation failed")
        error = ErrorResponse(error=ErrorBody(message="internal error while generating", type="server_error"))
        yield _event(error)
    else:
        for item in closing():
            yield _event(item)
    yield "data: [DONE]\n\n"


def chat_stream(model: str, ticket: Ticket, include_usage: bool) -> AsyncIterator[str]:
    stream_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    rows = len(ticket.prompts) * ticket.num_samples

    def chunk(choices: list[ChatChunkChoice], usage: Usage | None = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=stream_id, created=created, model=model, choices=choices, usage=usage)

    def events(item: Chunk) -> list[ChatCompletionChunk]:
        found = []
        if item.text:
            found.append(chunk([ChatChunkChoice(index=item.row, delta=Delta(content=item.text))]))
        if item.completion is not None:
            reason = FINISH_REASONS[item.completion.finish_reason]
            found.append(chunk([ChatChunkChoice(index=item.row, delta=Delta(), finish_reason=reason)]))
        return found

    opening = [
        chunk([ChatChunkChoice(index=row, delta=Delta(role="assistant", content=""))]) for row in range(rows)
    ]
    return event_stream(ticket, opening, events, lambda: [chunk([], _usage(ticket))] if include_usage else [])


def completion_stream(
    model: str, ticket: Ticket, include_usage: bool, echo: list[str] | None
) -> AsyncIterator[str]:
    stream_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

    def chunk(choices: list[TextChoice], usage: Usage | None = None) -> TextCompletion:
        return TextCompletion(id=stream_id, created=created, model=model, choices=choices, usage=usage)

    def events(item: Chunk) -> list[TextCompletion]:
        reason = FINISH_REASONS[item.completion.finish_reason] if item.completion is not None else None
        return [chunk([TextChoice(index=item.row, text=item.text, finish_reason=reason)])]

    rows = range(len(ticket.prompts) * ticket.num_samples)
    opening = (
        [chunk([TextChoice(index=row, text=echo[row // ticket.num_samples])]) for row in rows] if echo else []
    )
    return event_stream(ticket, opening, events, lambda: [chunk([], _usage(ticket))] if include_usage else [])
