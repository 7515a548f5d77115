"""What humaneval, probes and compare share: how many programs run at once, and what the sandbox
could confine on this machine, said before programs run."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from llmctl.cli.common import note, warn

if TYPE_CHECKING:  # the sandbox module is imported only when programs are to run
    from llmctl.eval.sandbox import SandboxProfile

# Each worker runs one program at a time, which may use up to the sandbox's memory limit.
DEFAULT_WORKERS = min(8, os.cpu_count() or 1)


def say_how_confined(profile: SandboxProfile) -> None:
    """One warning per guarantee this machine's kernel takes away, or one note when all hold."""
    lost = profile.limitations()
    for line in lost:
        warn(f"sandbox: {line}")
    if not lost:
        note(
            f"sandbox: no network, own PID namespace, private root ({profile.filesystem}), "
            f"programs run as {profile.user}"
        )
