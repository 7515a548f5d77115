"""Generated tokens -> text that can be shown as it arrives.

`IncrementalDecoder` releases text only once it is made of whole characters: a byte-level
tokenizer splits one emoji over up to four tokens, and decoding a part gives U+FFFD.
`StopMatcher` holds back any tail that might still grow into a stop string, so streamed text
never shows what the final text cuts off.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from llmctl.tokenizer import LoadedTokenizer

REPLACEMENT = "\ufffd"
# Prompt tokens decoded before the first new one, so tokenizers whose decoding depends on the
# token before (SentencePiece's leading-space marker) render the first new token as they would in place.
CONTEXT_TOKENS = 4


class IncrementalDecoder:
    """Decode a growing list of ids, returning only text that no later token can change.

    Two offsets into `ids` (the scheme Hugging Face's TGI and vLLM use): text up to `read`
    has been returned; decoding starts at `prefix`, one released piece earlier, so the new text
    is the difference of two decodes of a short window, never of the whole list.
    """

    def __init__(self, tokenizer: LoadedTokenizer, prompt_ids: Sequence[int] = ()):
        self.tokenizer = tokenizer
        self.ids = list(prompt_ids[-CONTEXT_TOKENS:])
        self.prefix = 0
        self.read = len(self.ids)

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        before = self.tokenizer.decode(self.ids[self.prefix : self.read])
        now = self.tokenizer.decode(self.ids[self.prefix :])
        # a trailing U+FFFD is a character whose remaining bytes have not been generated yet
        if len(now) <= len(before) or now.endswith(REPLACEMENT):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return now[len(before) :]

    def flush(self) -> str:
        """The text still held at the end; a character the tokens left unfinished is dropped."""
        before = self.tokenizer.decode(self.ids[self.prefix : self.read])
        now = self.tokenizer.decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return now[len(before) :].rstrip(REPLACEMENT)


class StopMatcher:
    """Cut a text stream at the first of several stop strings."""

    def __init__(self, stops: Iterable[str]):
        self.stops = [stop for stop in stops if stop]
        self.held = ""
        self.matched: str | None = None

    def feed(self, text: str) -> str:
        """The part of `held + text` that is final: before a stop string, or that cannot start one."""
        if self.matched is not None:
            return ""
        self.held += text
        if not self.stops:
            released, self.held = self.held, ""
            return released
        found = [(self.held.find(stop), stop) for stop in self.stops if stop in self.held]
        if found:
            cut, self.matched = min(found)
            released, self.held = self.held[:cut], ""
            return released
        keep = self._longest_stop_prefix_suffix()
        released, self.held = self.held[: len(self.held) - keep], self.held[len(self.held) - keep :]
        return released

    def flush(self) -> str:
        released, self.held = self.held, ""
        return released

    def _longest_stop_prefix_suffix(self) -> int:
        """Length of the longest tail of `held` that is the beginning of some stop string."""
        longest = 0
        for stop in self.stops:
            for length in range(min(len(stop) - 1, len(self.held)), longest, -1):
                if self.held.endswith(stop[:length]):
                    longest = length
                    break
        return longest
