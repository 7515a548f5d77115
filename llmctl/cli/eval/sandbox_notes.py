"""What humaneval, probes and compare share: how many programs run at once, and what the sandbox
could confine on this machine, said before programs run."""

from __future__ import annotations

import os

from llmctl.cli.common import note, warn

# Each worker runs one program at a time, which may use up to the sandbox's memory limit.
DEFAULT_WORKERS = min(8, os.cpu_count() or 1)


def say_how_confined(sandbox: dict) -> None:
    if sandbox["network_isolation"] == "namespace":
        note(
            f"sandbox: no network (own namespace), user {sandbox['user']}"
            + (", own PID namespace" if sandbox["process_isolation"] == "namespace" else "")
            + (", private /tmp" if sandbox["private_tmp"] else "")
        )
    else:
        warn(
            "sandbox: no network namespace available here, so network isolation is best effort "
            "(programs could open connections)"
        )
    if sandbox["process_isolation"] != "namespace":
        warn(
            "sandbox: no PID namespace available here, so a program's processes are ended by killing its "
            "process group, which a process that starts a session of its own escapes"
        )
    if sandbox["user"] != "nobody":
        warn(
            f"sandbox: programs run as {sandbox['user']}; run as root to have them run as 'nobody', "
            "so file permissions keep them out of your files (otherwise file isolation is best effort)"
        )
