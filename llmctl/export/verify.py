"""The round-trip check of an export: transformers loads the directory and must agree with us.

On each prompt, the tokenizer must give the same ids, the logits must match within `tolerance`
(both models in fp32), and greedy generation must give the same tokens. A chat template, when
there is one, must render a conversation exactly as llmctl's does.
"""

from __future__ import annotations

import copy
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from llmctl.config import GenerationConfig
from llmctl.generate import Engine
from llmctl.tokenizer import LoadedTokenizer

TOLERANCE = 1e-4
PROMPTS = (
    "def fibonacci(n):\n",
    "import os\nimport sys\n\n",
    "class Stack:\n    def push(self, item):",
)
CHAT_PROBE = [
    {"role": "system", "content": "You write Python."},
    {"role": "user", "content": "Reverse a list."},
]
GREEDY_TOKENS = 32


@dataclass
class Verification:
    prompts: int = 0
    max_abs_diff: float = 0.0
    greedy_tokens: int = 0  # tokens compared, over every prompt
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def transformers_available() -> bool:
    return importlib.util.find_spec("transformers") is not None


def verify_export(
    directory: Path,
    model: nn.Module,
    tokenizer: LoadedTokenizer,
    prompts: tuple[str, ...] = PROMPTS,
    tolerance: float = TOLERANCE,
    greedy_tokens: int = GREEDY_TOKENS,
) -> Verification:
    """Compare the export in `directory`, as transformers loads it, with `model` and `tokenizer`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    logging.set_verbosity_error()  # its load report and progress bars would bury ours
    logging.disable_progress_bar()
    theirs = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    their_tokenizer = AutoTokenizer.from_pretrained(directory)
    ours = model if _is_fp32(model) else copy.deepcopy(model).float()
    engine = Engine(ours.eval(), tokenizer)
    result = Verification()

    if tokenizer.chat_template is not None:
        rendered = their_tokenizer.apply_chat_template(CHAT_PROBE, tokenize=False, add_generation_prompt=True)
        if rendered != tokenizer.render_chat(CHAT_PROBE):
            result.problems.append("the exported chat template renders a conversation differently")
        prompts = (*prompts, tokenizer.render_chat(CHAT_PROBE))

    for number, prompt in enumerate(prompts, start=1):
        ids = engine.prepare([prompt], greedy_tokens)[0].ids
        if their_tokenizer(prompt, add_special_tokens=False).input_ids != tokenizer.encode(prompt):
            result.problems.append(f"prompt {number}: the exported tokenizer gives different token ids")
        with torch.no_grad():
            diff = (ours(torch.tensor([ids])) - theirs(torch.tensor([ids])).logits).abs().max().item()
        result.max_abs_diff = max(result.max_abs_diff, diff)
        if not diff < tolerance:  # also catches NaN
            result.problems.append(
                f"prompt {number}: logits differ by up to {diff:.2e} (tolerance {tolerance:g})"
            )

        # within the context window: llmctl stops at its end where transformers would go on
        budget = max(1, min(greedy_tokens, engine.context_length - len(ids)))
        greedy = GenerationConfig(temperature=0.0, max_new_tokens=budget)
        our_tokens = engine.generate([ids], greedy)[0].token_ids
        their_tokens = _greedy(theirs, ids, budget, tokenizer.eot_id)
        result.greedy_tokens += len(our_tokens)
        if our_tokens != their_tokens:
            where = _first_difference(our_tokens, their_tokens)
            result.problems.append(f"prompt {number}: greedy generation differs from token {where}")
        result.prompts += 1
    return result


def _first_difference(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def _is_fp32(model: nn.Module) -> bool:
    return all(param.dtype == torch.float32 for param in model.parameters())


def _greedy(model: nn.Module, ids: list[int], max_new_tokens: int, eot_id: int) -> list[int]:
    """transformers' greedy generate, stopping where llmctl stops (at the end-of-text token, left
    out of the result as llmctl leaves it out)."""
    with torch.no_grad():
        output = model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            eos_token_id=eot_id,
            pad_token_id=eot_id,
        )
    tokens = output[0, len(ids) :].tolist()
    return tokens[: tokens.index(eot_id)] if eot_id in tokens else tokens
