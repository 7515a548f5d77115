"""A conversation as one model reads it: the tokenizer's chat template (a base model, which has
none, continues one plain document instead), the oldest turns left out when the conversation
outgrows the context window, and the tokens that end a reply. `llmctl chat` and the server's chat
completions build their prompts here, so both render a conversation the same way.
"""

from __future__ import annotations

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

    def build(self, messages: Messages, user_text: str, max_new_tokens: int) -> tuple[list[int], int]:
        """The prompt's token ids and how many of the oldest turns were left out so the reply has
        room: min(max_new_tokens, context / 2) tokens, as the engine reserves. A message too long
        even alone is left to the engine, which keeps its end."""
        engine = self.engine
        budget = engine.context_length - min(max_new_tokens, engine.context_length // 2)
        turn_starts = [i for i, message in enumerate(messages) if message["role"] == "user"]
        for dropped, start in enumerate([*turn_starts, len(messages)]):
            ids = engine.tokenizer.encode(self.render(messages[start:], user_text))
            if len(ids) <= budget:
                return ids, dropped
        return ids, len(turn_starts)

    def stop_token_ids(self) -> set[int]:
        """End of text, and for chat models the end of a turn or the start of another one."""
        tokenizer = self.engine.tokenizer
        stops = {tokenizer.eot_id}
        if self.is_chat_model:
            specials = tokenizer.special_ids
            stops |= {specials[token] for token in CHAT_SPECIAL_TOKENS if token in specials}
        return stops
