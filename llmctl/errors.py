"""The one exception type the CLI turns into a one-line message and an exit code."""

from __future__ import annotations

USAGE = 2  # bad flags, config keys, names: the user must change the command
FAILURE = 1  # the command was well formed but could not be carried out


class LlmctlError(Exception):
    """A problem the user can act on: `message` names the thing and the fix."""

    def __init__(self, message: str, exit_code: int = FAILURE):
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


class UsageError(LlmctlError):
    def __init__(self, message: str):
        super().__init__(message, USAGE)
