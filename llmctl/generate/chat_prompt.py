"""A conversation as one model reads it: the tokenizer's chat template (a base model, which has
none, continues one plain document instead), the oldest turns left out when the conversation
outgrows the context window, and the tokens that end a reply. `llmctl chat` and the server's chat
completions build their prompts here, so both render a conversation the same way.
"""

from __future__ import annotations

from collections.abc import Callable

from llmctl.generate.engine import Engine
from llmctl.tokenizer import CHAT_SPECIAL_TOKENS

Messages = list[dict[str, str]]


class ChatPrompt:
    def __init__(self, engine: Engine, system: str | None = None):
        self.engine = engine
        self.system = system

    @property
    def is_chat_model(self) -> bool:
        return self.engine.tokenizer.chat_template is not None

    def render(self, messages: Messages, user_text: str) -> str:
        """`messages` (the earlier turns) and the new user turn, ready for the reply."""
        tokenizer = self.engine.tokenizer
        if self.is_chat_model:
            system = [{"role": "system", "content": self.system}] if self.system else []
            turn = [{"role": "user", "content": user_text}]
            return tokenizer.render_chat(system + messages + turn, add_generation_prompt=True)
        # a base model continues one plain document: each typed line, then what the model added to it
        parts: list[str] = []
        for message in [*messages, {"role": "user", "content": user_text}]:
            if message["role"] == "user" and parts:
                parts.append("\n")
            parts.append(message["content"])
        return "".join(parts)

    def build(
        self,
        messages: Messages,
        user_text: str,
        max_new_tokens: int,
        check: Callable[[], None] | None = None,
    ) -> tuple[list[int], int]:
        """The prompt's token ids and how many of the oldest turns were left out so the reply has
        room: min(max_new_tokens, context / 2) tokens, as the engine reserves. A message too long
        even alone is left to the engine, which keeps its end. `check` is called before each
        encoding and may raise to abandon the work (a server's client that left).

        The prompt keeps the most turns that fit, whole turns (from a user message on) dropped
        from the oldest. Rendering every candidate from the oldest would cost the square of the
        conversation's length; instead the search starts from the newest turns, doubling the
        number kept until one does not fit, then halves the gap. Only conversations about the
        context window's size are encoded, so a long history costs no more than a short one.
        This finds the same prompt because adding an older turn never shortens the tokens.
        """
        engine = self.engine
        budget = engine.context_length - min(max_new_tokens, engine.context_length // 2)
        starts = [i for i, message in enumerate(messages) if message["role"] == "user"]
        starts.append(len(messages))  # the last candidate keeps no earlier turn at all
        encoded: dict[int, list[int]] = {}

        def ids(dropped: int) -> list[int]:
            if dropped not in encoded:
                if check is not None:
                    check()
                text = self.render(messages[starts[dropped] :], user_text)
                encoded[dropped] = engine.tokenizer.encode(text)
            return encoded[dropped]

        fitting = len(starts) - 1
        if len(ids(fitting)) > budget:
            return ids(fitting), fitting
        step, too_long = 1, -1  # -1: keeping every turn is not known to be too long
        while fitting > 0:
            probe = max(fitting - step, 0)
            if len(ids(probe)) > budget:
                too_long = probe
                break
            fitting, step = probe, step * 2
        while fitting - too_long > 1 and too_long >= 0:
            middle = (fitting + too_long) // 2
            if len(ids(middle)) > budget:
                too_long = middle
            else:
                fitting = middle
        return ids(fitting), fitting

    def stop_token_ids(self) -> set[int]:
        """End of text, and for chat models the end of a turn or the start of another one."""
        tokenizer = self.engine.tokenizer
        stops = {tokenizer.eot_id}
        if self.is_chat_model:
            specials = tokenizer.special_ids
            stops |= {specials[token] for token in CHAT_SPECIAL_TOKENS if token in specials}
        return stops
