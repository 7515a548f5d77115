"""An Ollama Modelfile for a GGUF export, so `ollama create NAME -f Modelfile` runs it as llmctl chat does.

    FROM ./FILE.gguf                     the export, beside the Modelfile
    TEMPLATE \"\"\"...\"\"\"                   llmctl's chat format in Ollama's Go template language
    PARAMETER stop "..."                 one per token llmctl chat stops at (Ollama matches their text)
    PARAMETER temperature / top_p / ...  the checkpoint's sampling defaults, with Ollama's own
                                         defaults (top_k 40, repeat_penalty 1.1) turned off where
                                         llmctl has none

Ollama does not read the GGUF file's Jinja chat template for a format it does not recognise, so
the TEMPLATE is written out; only llmctl's own chat format has a known Go translation.
"""

from __future__ import annotations

from llmctl import __version__
from llmctl.config import GenerationConfig
from llmctl.errors import UsageError
from llmctl.tokenizer import CHAT_SPECIAL_TOKENS, CHAT_TEMPLATE, LoadedTokenizer

MODELFILE = "Modelfile"
MARKER = "# Ollama Modelfile written by llmctl"

# llmctl.tokenizer.render_chat: every message, then the opening of the assistant's turn
OLLAMA_CHAT_TEMPLATE = (
    "{{- range .Messages }}<|{{ .Role }}|>\n{{ .Content }}<|end|>\n{{ end }}<|assistant|>\n"
)
# a model without a chat template continues the prompt as given
OLLAMA_PROMPT_TEMPLATE = "{{ .Prompt }}"


def check_modelfile_template(tokenizer: LoadedTokenizer) -> None:
    """Refuse, before anything is written, a chat template that has no Ollama translation."""
    if tokenizer.chat_template not in (None, CHAT_TEMPLATE):
        raise UsageError(
            "--modelfile writes Ollama's TEMPLATE for llmctl's own chat format only; this model brings "
            "its own chat template (from its tokenizer_config.json): leave out --modelfile and write "
            "the TEMPLATE by hand"
        )


def stop_strings(tokenizer: LoadedTokenizer, generation: GenerationConfig) -> list[str]:
    """What llmctl chat stops at: the end of text, for a chat model every turn marker, and the
    checkpoint's stop strings."""
    stops = [tokenizer.meta["eot_token"]]
    if tokenizer.chat_template is not None:
        stops += [token for token in CHAT_SPECIAL_TOKENS if token in tokenizer.special_ids]
    return list(dict.fromkeys([*stops, *generation.stop]))


def modelfile_text(
    gguf_name: str, tokenizer: LoadedTokenizer, generation: GenerationConfig, context_length: int
) -> str:
    check_modelfile_template(tokenizer)
    template = OLLAMA_CHAT_TEMPLATE if tokenizer.chat_template is not None else OLLAMA_PROMPT_TEMPLATE
    lines = [
        f"{MARKER} {__version__} for {gguf_name}",
        "#   ollama create NAME -f Modelfile && ollama run NAME",
        f"FROM ./{gguf_name}",
        f'TEMPLATE """{template}"""',
    ]
    lines += [f"PARAMETER stop {_quoted(stop)}" for stop in stop_strings(tokenizer, generation)]
    lines += [f"PARAMETER {name} {value}" for name, value in sampling_parameters(generation, context_length)]
    return "\n".join(lines) + "\n"


def sampling_parameters(generation: GenerationConfig, context_length: int) -> list[tuple[str, object]]:
    parameters: list[tuple[str, object]] = [
        ("temperature", generation.temperature),
        ("top_p", generation.top_p),
        ("top_k", generation.top_k or 0),  # 0: no top-k, as llmctl's None
        ("min_p", generation.min_p),
        ("repeat_penalty", generation.repetition_penalty),
        ("repeat_last_n", -1),  # llmctl's repetition penalty sees the whole sequence
        ("num_predict", generation.max_new_tokens),
        ("num_ctx", context_length),
    ]
    if generation.presence_penalty:
        parameters.append(("presence_penalty", generation.presence_penalty))
    if generation.frequency_penalty:
        parameters.append(("frequency_penalty", generation.frequency_penalty))
    if generation.seed is not None:
        parameters.append(("seed", generation.seed))
    return parameters


def _quoted(text: str) -> str:
    if not any(char in text for char in '"\\\n'):
        return f'"{text}"'
    if '"""' in text:
        raise UsageError(f'the stop string {text!r} cannot be written into a Modelfile (it holds \'"""\')')
    return f'"""{text}"""'
