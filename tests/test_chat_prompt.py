"""ChatPrompt.build: the same prompt and dropped-turn count as rendering every candidate from the
oldest turn, at a cost that does not grow with the number of turns left out."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from tiny_checkpoints import write_run_checkpoint

from llmctl.generate import load_engine
from llmctl.generate.chat_prompt import ChatPrompt
from llmctl.workspace import Workspace


@pytest.fixture
def prompt(workspace_dir: Path) -> ChatPrompt:
    write_run_checkpoint(workspace_dir, "tiny", step=100)  # byte-level chat tokenizer, 256-token context
    return ChatPrompt(load_engine(Workspace(workspace_dir), "tiny", "cpu", "fp32").engine, system="Be brief.")


def reference_build(prompt: ChatPrompt, messages, user_text, max_new_tokens):
    """The former builder: every candidate start rendered and encoded, oldest first."""
    engine = prompt.engine
    budget = engine.context_length - min(max_new_tokens, engine.context_length // 2)
    turn_starts = [i for i, message in enumerate(messages) if message["role"] == "user"]
    for dropped, start in enumerate([*turn_starts, len(messages)]):
        ids = engine.tokenizer.encode(prompt.render(messages[start:], user_text))
        if len(ids) <= budget:
            return ids, dropped
    return ids, len(turn_starts)


def conversation(rng: random.Random, turns: int) -> list[dict[str, str]]:
    messages = []
    for index in range(turns):
        messages.append({"role": "user", "content": "q" * rng.randint(0, 40) + str(index)})
        if rng.random() < 0.9:  # now and then two user messages in a row
            messages.append({"role": "assistant", "content": "a" * rng.randint(0, 60)})
    if rng.random() < 0.5:  # and a conversation that opens with the assistant
        messages.insert(0, {"role": "assistant", "content": "welcome"})
    return messages


@pytest.mark.parametrize("seed", range(12))
def test_same_prompt_and_dropped_turns_as_rendering_every_candidate(prompt, seed):
    rng = random.Random(seed)
    messages = conversation(rng, rng.choice([0, 1, 2, 5, 20, 60]))
    user_text = "u" * rng.choice([1, 30, 200, 400])  # 400: too long even alone
    for max_new_tokens in (16, 60, 500):
        assert prompt.build(messages, user_text, max_new_tokens) == reference_build(
            prompt, messages, user_text, max_new_tokens
        )


def test_a_long_history_costs_what_a_short_one_does(prompt):
    """Characters encoded for 5,000 turns: bounded by the context window, not the history (the old
    builder encoded about 10^8 characters here)."""
    tokenizer = prompt.engine.tokenizer
    encoded: list[int] = []
    original = tokenizer.encode

    def counting(text: str, *args, **kwargs):
        encoded.append(len(text))
        return original(text, *args, **kwargs)

    tokenizer.encode = counting
    try:
        costs = {}
        for turns in (50, 5000):
            messages = conversation(random.Random(turns), turns)
            encoded.clear()
            ids, dropped = prompt.build(messages, "hi", 60)
            costs[turns] = (sum(encoded), len(encoded))
            assert dropped > 0 and len(ids) <= prompt.engine.context_length - 60
    finally:
        tokenizer.encode = original
    (short_chars, short_calls), (long_chars, long_calls) = costs[50], costs[5000]
    assert long_calls <= short_calls + 14  # two more probes per doubling of the history, at most
    assert long_chars <= 4 * max(short_chars, 2000)


def test_the_check_can_abandon_a_build(prompt):
    class Gone(Exception):
        pass

    calls = []

    def check():
        calls.append(1)
        if len(calls) == 2:
            raise Gone

    messages = conversation(random.Random(0), 100)
    with pytest.raises(Gone):
        prompt.build(messages, "hi", 60, check=check)
    assert len(calls) == 2
