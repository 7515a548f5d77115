"""The check of a GGUF export, in llama.cpp itself (llmctl.export.llamacpp): it must agree with llmctl.

    tokens       llama.cpp's token ids equal llmctl's on code, whitespace runs, unicode, the special
                 tokens and a rendered chat
    f32/f16/bf16 greedy continuations equal llmctl's token for token (a step where llmctl's own two
                 best tokens are within twice the tolerance may go either way: it ends the comparison),
                 and so do the stops; log-probabilities of every token at every position of one
                 prompt agree within TOLERANCES
    q8_0/q4_0    perplexity of a held-out text in llama.cpp within PERPLEXITY_TOLERANCES of llmctl's
                 fp32 model's (which the f32 file matches within 1e-4)
    chat         llama.cpp's chat template handling renders a conversation to llmctl's text, reads
                 the same number of prompt tokens, and (unquantized) replies with llmctl's reply,
                 stopping where llmctl chat stops

llmctl's side always runs in fp32: the reference is the model as trained, not a rounded copy.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from llmctl.config import GenerationConfig
from llmctl.export.llamacpp import LlamaCpp
from llmctl.export.verify import CHAT_PROBE, PROMPTS
from llmctl.generate import Engine
from llmctl.model.transformer import Transformer
from llmctl.tokenizer import CHAT_SPECIAL_TOKENS, END_OF_TURN_TOKEN, LoadedTokenizer

# largest |Δ log-probability| over the whole vocabulary, llama.cpp against llmctl's fp32 model
TOLERANCES = {"f32": 1e-4, "f16": 5e-2, "bf16": 5e-1}
# llama.cpp's CPU GELU looks its output up in a table indexed by the input rounded to f16, so even
# an f32 `gpt2` file computes its MLPs to about 1e-3 (docs/export.md)
GPT2_F32_TOLERANCE = 1e-2
# largest relative rise of perplexity over llmctl's fp32 model
PERPLEXITY_TOLERANCES = {"q8_0": 0.01, "q4_0": 0.25}
GREEDY_TOKENS = 32
CHAT_TOKENS = 48
TOKEN_PROBES = (
    "def parse(line: str) -> dict:\n    key, _, value = line.partition('=')\n    return {key: value}\n",
    "if x:\n\tpass\n\n\n        return  None   \r\n",
    "naïve café — 日本語のテキスト, emoji 🐍🚀, ünïcödé\u00a0space",
    "it's 12345 items; don't 3.14159 ¯\\_(ツ)_/¯ #!@$%^&*()",
)
# held out from any training llmctl ships: plain code, as most llmctl models are trained on
HELD_OUT_TEXT = '''import json
from pathlib import Path


def load_settings(path):
    """Read a JSON settings file, returning an empty dict when it is missing."""
    file = Path(path)
    if not file.exists():
        return {}
    with file.open() as handle:
        return json.load(handle)


class Counter:
    def __init__(self):
        self.counts = {}

    def add(self, word):
        self.counts[word] = self.counts.get(word, 0) + 1
        return self.counts[word]

    def most_common(self, n=3):
        return sorted(self.counts.items(), key=lambda item: -item[1])[:n]
'''


@dataclass
class GGUFVerification:
    quant: str
    token_strings: int = 0
    prompts: int = 0
    greedy_tokens: int = 0  # compared, over every prompt
    max_logprob_diff: float | None = None
    tolerance: float | None = None
    perplexity: float | None = None  # of HELD_OUT_TEXT, in llama.cpp
    reference_perplexity: float | None = None  # the same, llmctl's fp32 model
    chat_checked: bool = False
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_gguf(
    path: Path, model: Transformer, tokenizer: LoadedTokenizer, quant: str, architecture: str = "llama"
) -> GGUFVerification:
    """Compare the GGUF file at `path`, as llama.cpp runs it, with `model` and `tokenizer`."""
    ours = (
        model if all(p.dtype == torch.float32 for p in model.parameters()) else copy.deepcopy(model).float()
    )
    engine = Engine(ours.eval(), tokenizer, stop_token_ids=[])
    tolerance = TOLERANCES.get(quant, PERPLEXITY_TOLERANCES.get(quant))
    if architecture == "gpt2" and quant == "f32":
        tolerance = GPT2_F32_TOLERANCE
    result = GGUFVerification(quant, tolerance=tolerance)
    with LlamaCpp(path, model.cfg.context_length) as llama:
        check_tokens(llama, tokenizer, result)
        if quant in TOLERANCES:
            prompts = list(PROMPTS)
            if tokenizer.chat_template is not None:
                prompts.append(tokenizer.render_chat(CHAT_PROBE))  # its reply must stop where llmctl's does
            for number, prompt in enumerate(prompts, start=1):
                check_greedy(llama, engine, prompt, number, result)
            check_logprobs(llama, engine, PROMPTS[0], result)
        else:
            check_perplexity(llama, engine, result)
        if tokenizer.chat_template is not None:
            check_chat(llama, engine, result)
    return result


def check_tokens(llama: LlamaCpp, tokenizer: LoadedTokenizer, result: GGUFVerification) -> None:
    probes = [*TOKEN_PROBES, "".join(tokenizer.special_ids)]
    if tokenizer.chat_template is not None:
        probes.append(tokenizer.render_chat(CHAT_PROBE))
    for number, text in enumerate(probes, start=1):
        if llama.tokenize(text) != tokenizer.encode(text):
            result.problems.append(f"string {number} ({text[:24]!r}...): llama.cpp gives other token ids")
    if llama.tokenize("x", add_special=True) != tokenizer.encode_prompt("x"):
        result.problems.append("llama.cpp opens a prompt differently (the beginning-of-text token)")
    result.token_strings = len(probes)


def check_greedy(llama: LlamaCpp, engine: Engine, prompt: str, number: int, result: GGUFVerification) -> None:
    ids = engine.prepare([prompt], GREEDY_TOKENS)[0].ids
    budget = max(1, min(GREEDY_TOKENS, engine.context_length - len(ids)))
    theirs = llama.greedy(ids, budget)
    # llmctl without stop tokens, so both paths are compared as far as llama.cpp went
    ours = engine.generate([ids], GenerationConfig(temperature=0.0, max_new_tokens=budget))[0].token_ids
    compared = _agreeing_prefix(engine, ids, ours, theirs.tokens, number, result)
    result.greedy_tokens += compared
    result.prompts += 1
    if compared < len(theirs.tokens):
        return
    stops = _stop_ids(engine.tokenizer)
    our_stop = next((i for i, token in enumerate(ours) if token in stops), None)
    if theirs.stopped and theirs.tokens[-1] not in stops:
        result.notes.append(f"prompt {number}: llama.cpp also ends generation at token {theirs.tokens[-1]}")
    elif our_stop is not None and (not theirs.stopped or len(theirs.tokens) != our_stop + 1):
        result.problems.append(
            f"prompt {number}: llama.cpp does not stop where llmctl stops (token {our_stop})"
        )


def check_logprobs(llama: LlamaCpp, engine: Engine, prompt: str, result: GGUFVerification) -> None:
    """Every token's log-probability at every position of one prompt (after its first token)."""
    ids = engine.prepare([prompt], 1)[0].ids
    theirs = llama.logprobs(ids[:1], ids[1:], engine.model.cfg.vocab_size)
    with torch.no_grad():
        logits = engine.model(torch.tensor([ids], device=engine.device))[0, :-1]
    ours = torch.log_softmax(logits.double().cpu(), dim=-1)
    diff = (ours - theirs).abs().max().item()  # NaN (a failure) where llama.cpp left a token out
    result.max_logprob_diff = diff
    if not diff <= result.tolerance:
        tolerance = f"tolerance {result.tolerance:g} for {result.quant}"
        result.problems.append(f"log-probabilities differ by up to {diff:.2e} ({tolerance})")


def check_perplexity(llama: LlamaCpp, engine: Engine, result: GGUFVerification) -> None:
    tokenizer = engine.tokenizer
    ids = tokenizer.encode_documents([HELD_OUT_TEXT])[0][: engine.context_length - 1]
    context = [tokenizer.document_start_id]
    with torch.no_grad():
        logits = engine.model(torch.tensor([context + ids], device=engine.device))[0, :-1]
    ours = torch.log_softmax(logits.double().cpu(), dim=-1)[torch.arange(len(ids)), torch.tensor(ids)]
    result.reference_perplexity = math.exp(-ours.mean().item())
    result.perplexity = math.exp(-llama.score(context, ids).mean().item())
    rise = result.perplexity / result.reference_perplexity - 1
    if not rise <= result.tolerance:
        result.problems.append(
            f"perplexity {result.perplexity:.3f} in llama.cpp is {rise:+.1%} over llmctl's "
            f"{result.reference_perplexity:.3f} (tolerance {result.tolerance:.0%} for {result.quant})"
        )


def check_chat(llama: LlamaCpp, engine: Engine, result: GGUFVerification) -> None:
    tokenizer = engine.tokenizer
    rendered = tokenizer.render_chat(CHAT_PROBE)
    if llama.render_chat(CHAT_PROBE) != rendered:
        result.problems.append("llama.cpp renders the chat template to other text than llmctl chat")
        return
    ids = tokenizer.encode(rendered)
    reply = llama.chat(CHAT_PROBE, CHAT_TOKENS)
    expected_tokens = len(ids) + (1 if tokenizer.add_bos else 0)
    if reply.prompt_tokens != expected_tokens:
        result.problems.append(
            f"llama.cpp reads the chat as {reply.prompt_tokens} tokens, llmctl chat {len(ids)}"
        )
    result.chat_checked = True
    if result.quant not in TOLERANCES:
        return
    stops = {tokenizer.eot_id} | {
        tokenizer.special_ids[t] for t in CHAT_SPECIAL_TOKENS if t in tokenizer.special_ids
    }
    greedy = GenerationConfig(temperature=0.0, max_new_tokens=CHAT_TOKENS)
    ours = engine.generate([ids], greedy, stop_token_ids=stops)[0]
    finish = "stop" if ours.finish_reason == "stop" else "length"
    if "\ufffd" in tokenizer.decode(ours.token_ids):
        # bytes that are no UTF-8 (an untrained model's) print differently in each; the greedy
        # check above compared this reply's token ids already
        result.notes.append("the chat reply holds invalid UTF-8: compared by token ids only")
    elif ours.stop is not None and tokenizer.tokenizer.token_to_id(ours.stop) not in _stop_ids(tokenizer):
        # a new turn's token ends llmctl chat's reply; llama.cpp knows no such stop (docs/export.md)
        if not reply.text.startswith(ours.text):
            result.problems.append("llama.cpp's chat reply differs from llmctl chat's")
        result.notes.append(f"llmctl chat stops at {ours.stop}, which llama.cpp does not stop at")
    elif (reply.text, reply.finish_reason) != (ours.text, finish) and result.ok:
        # (a greedy disagreement found above already explains a different reply)
        result.problems.append(
            f"llama.cpp's chat reply ({reply.finish_reason}) differs from llmctl chat's ({finish}): "
            f"{reply.text[:40]!r} against {ours.text[:40]!r}"
        )


def _stop_ids(tokenizer: LoadedTokenizer) -> set[int]:
    """The tokens the file names as ends of generation: end of text, and end of a chat turn."""
    stops = {tokenizer.eot_id}
    if END_OF_TURN_TOKEN in tokenizer.special_ids and tokenizer.chat_template is not None:
        stops.add(tokenizer.special_ids[END_OF_TURN_TOKEN])
    return stops


def _agreeing_prefix(
    engine: Engine, ids: list[int], ours: list[int], theirs: list[int], number: int, result: GGUFVerification
) -> int:
    """How many greedy tokens agree. A disagreement is a problem unless llmctl's own margin between
    the two tokens is within twice the tolerance: each log-probability may be off by the tolerance,
    so such a near tie may go either way."""
    for index, (mine, other) in enumerate(zip(ours, theirs, strict=False)):
        if mine == other:
            continue
        with torch.no_grad():
            logits = engine.model(torch.tensor([ids + ours[:index]], device=engine.device))[0, -1]
        logprobs = torch.log_softmax(logits.double(), dim=-1)
        margin = (logprobs[mine] - logprobs[other]).item()
        if margin <= 2 * result.tolerance:
            result.notes.append(
                f"prompt {number}: a near tie at token {index} ({margin:.1e}) ends the comparison"
            )
        else:
            result.problems.append(f"prompt {number}: greedy generation differs from token {index}")
        return index
    return min(len(ours), len(theirs))
