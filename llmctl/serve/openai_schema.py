"""The OpenAI wire format: request bodies as pydantic models, responses and stream chunks as well.

Requests name only the fields llmctl acts on, so a typo (`temprature`) or a feature the engine
lacks (`logprobs`, `tools`) is a 400 that names it instead of being silently ignored. `top_k`,
`min_p` and `repetition_penalty` are extensions that vLLM and llama.cpp's server accept too.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, Strict

MAX_STOP_STRINGS = 4  # OpenAI's own limit


def _whole_characters(text: str) -> str:
    """JSON's "\\ud800" escapes decode to a lone surrogate, which no tokenizer can encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = text[exc.start]
        raise ValueError(f"the text holds a lone surrogate (U+{ord(bad):04X}), not valid Unicode") from None
    return text


# Numbers as JSON numbers only (true is not 1, "5" not 5), floats finite (JSON parsers accept
# Infinity and NaN); text as valid Unicode.
Int = Annotated[int, Strict()]
Float = Annotated[float, Strict(), Field(allow_inf_nan=False)]
Text = Annotated[str, AfterValidator(_whole_characters)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: Text = Field(min_length=1)
    max_tokens: Int | None = Field(None, ge=1)
    temperature: Float | None = Field(None, ge=0, le=2)
    top_p: Float | None = Field(None, gt=0, le=1)
    n: Int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Text | Annotated[list[Text], Field(max_length=MAX_STOP_STRINGS)] | None = None
    seed: Int | None = None
    presence_penalty: Float | None = Field(None, ge=-2, le=2)
    frequency_penalty: Float | None = Field(None, ge=-2, le=2)
    user: Text | None = None
    # extensions
    top_k: Int | None = Field(None, ge=0)
    min_p: Float | None = Field(None, ge=0, lt=1)
    repetition_penalty: Float | None = Field(None, gt=0)

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def stop_strings(self) -> list[str] | None:
        """The stop strings as a list (None: the checkpoint's own)."""
        if self.stop is None:
            return None
        return [self.stop] if isinstance(self.stop, str) else self.stop

    def sampling(self) -> dict[str, object]:
        """GenerationConfig fields the request sets (None: the checkpoint's default stays)."""
        return {
            "max_new_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            # OpenAI-style servers read top_k 0 as "no limit", which GenerationConfig spells None
            "top_k": self.top_k or None,
            "min_p": self.min_p,
            "repetition_penalty": self.repetition_penalty,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
            "seed": self.seed,
            "stop": self.stop_strings(),
        }


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # OpenAI's newer models call the system prompt "developer"; both mean the same here
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[TextPart]
    name: Text | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Int | None = Field(None, ge=1)

    def sampling(self) -> dict[str, object]:
        return {**super().sampling(), "max_new_tokens": self.max_completion_tokens or self.max_tokens}


TokenIds = list[Annotated[Int, Field(ge=0)]]


class CompletionRequest(_Request):
    prompt: Text | list[Text] | TokenIds | list[TokenIds]
    echo: bool = False

    def prompts(self) -> list[str] | list[list[int]]:
        """The prompts as a batch: texts, or token id lists."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if prompt and all(isinstance(item, int) for item in prompt):
            return [prompt]
        return prompt


# ---------------------------------------------------------------- responses


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ModelCard(BaseModel):
    """One entry of GET /v1/models; `run`, `step` and `val_loss` are llmctl's additions."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "llmctl"
    run: str | None = None
    step: int | None = None
    val_loss: float | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: str
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: Delta
    finish_reason: str | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class TextChoice(BaseModel):
    index: int
    text: str
    finish_reason: str | None = None
    logprobs: None = None


class TextCompletion(BaseModel):
    """A completion response, and (with `usage` None until the last) each of its stream chunks."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[TextChoice]
    usage: Usage | None = None


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
