"""`llmctl chat`: a conversation with a model (session), its code mode (code_mode), and the terminal
and pipe front ends (frontends)."""

from llmctl.chat.code_mode import DECLINE_MESSAGE, extract_code, is_code_request
from llmctl.chat.frontends import run_piped, run_terminal
from llmctl.chat.session import MODES, ChatSession, PendingReply

__all__ = [
    "DECLINE_MESSAGE",
    "MODES",
    "ChatSession",
    "PendingReply",
    "extract_code",
    "is_code_request",
    "run_piped",
    "run_terminal",
]
