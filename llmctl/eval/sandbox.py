"""Run untrusted programs and score them with trusted tests: the verdict never comes from the program.

A test program is two sources: the candidate (a problem's prompt and a model's completion:
untrusted) and the tests (the prompt and its `check(candidate)`: trusted). Each harness thread
keeps a server process (sandbox_child.py), started once; for each program it forks a checker,
waits at most the wall-clock timeout, kills the checker's process group and whatever it left,
and says how the checker ended, after the checker's own report. The checker forks the
candidate, which confines itself and runs the untrusted source, and runs the tests itself,
calling the candidate's function across the boundary with arguments and results encoded as
plain data (sandbox_wire). The checker alone reports, on a socket the candidate never holds, so
nothing the program does inside its process (writing a pass anywhere, walking frames, patching
or tracing `check`, returning an object equal to everything) can make a failing program pass.

What the machine allows is probed once per process (`sandbox_profile`): network, PID and mount
namespaces (as an ordinary user, inside a user namespace), the private filesystem they make
possible, and, when llmctl runs as root, dropping to `nobody` (required: root would ignore
RLIMIT_NPROC and file permissions). Where one is missing the profile says so, and what is lost.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import json
import math
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

from llmctl.errors import LlmctlError

CHILD_SCRIPT = Path(__file__).with_name("sandbox_child.py")
CHILD_COMMAND = (sys.executable, "-I", "-S", "-B", str(CHILD_SCRIPT))
SERVER_GRACE_S = 10.0  # past a program's timeout, how long the harness waits for its server
REPORT_LIMIT_BYTES = 64 * 1024
PROBE_TIMEOUT_S = 30.0
NOBODY_ID = 65534  # the traditional uid/gid of `nobody` where the account is missing

PASSED, FAILED, TIMED_OUT = "passed", "failed", "timed out"


class SandboxError(LlmctlError):
    """The sandbox could not confine a program as promised; nothing was run unconfined."""


@dataclass(frozen=True)
class SandboxLimits:
    timeout_s: float = 5.0  # wall clock for the whole program, confinement and clean-up included
    memory_bytes: int = 1 << 30  # address space (RLIMIT_AS), of the program and of its checker
    max_processes: int = 16  # RLIMIT_NPROC: counts every process of the sandbox's user
    max_file_bytes: int = 16 << 20  # the largest file the program may write (RLIMIT_FSIZE)
    scratch_bytes: int = 64 << 20  # its private /tmp, the one place it may write, holds this much
    scratch_files: int = 1024  # and this many files and directories (inodes)

    @property
    def cpu_s(self) -> int:
        """CPU seconds: past the wall clock, so the timeout reports first for a busy loop."""
        return math.ceil(self.timeout_s) + 1


@dataclass(frozen=True)
class SandboxProfile:
    network_isolation: str  # "namespace" or "best-effort"
    # "namespace": whatever a program starts ends with it; "process-group": a process that leaves
    # the group (setsid through ctypes) may outlive it
    process_isolation: str
    # "private": a root of its own (read-only system files, a capped /tmp, its own /proc or none,
    # no host socket, its own IPC); "host": the host's filesystem, and the programs' user decides
    filesystem: str
    user: str  # who programs run as: "nobody" when llmctl runs as root, else the user's own name
    drop_to: tuple[int, int] | None  # (uid, gid) the child switches to, when started as root
    own_proc: bool = False  # the private root has a /proc of its PID namespace (else none at all)
    # why the probe could not have each confinement it lacks: {"pid_namespace": "OSError: ..."}
    refusals: dict[str, str] = field(default_factory=dict, compare=False)

    @property
    def private_tmp(self) -> bool:
        """Whether /tmp is the program's alone (it is, with the private filesystem)."""
        return self.filesystem == "private"

    def limitations(self) -> list[str]:
        """What programs could do here that the full sandbox stops, one line each; none when
        every namespace is available (the guarantees docs/eval.md lists all hold)."""
        lost = []

        def why(finding: str) -> str:
            return f" ({self.refusals[finding]})" if finding in self.refusals else ""

        if self.network_isolation != "namespace":
            lost.append(
                "no network namespace: programs could open network connections" + why("network_namespace")
            )
        if self.process_isolation != "namespace":
            lost.append(
                "no PID namespace: a process a program detaches (setsid) is killed only once orphaned, "
                "and programs could see other processes and their command lines" + why("pid_namespace")
            )
        if self.filesystem != "private":
            lost.append(
                "no private filesystem: programs see the host's; they could leave files in its "
                "world-writable directories, connect to its Unix sockets and read /proc"
                + why("private_filesystem")
            )
            if self.user != "nobody":
                lost.append(
                    f"programs run as {self.user} on the host's filesystem, so file isolation is best "
                    "effort, and where the kernel lets a process trace its parents (kernel.yama.ptrace_scope "
                    "0) one could tamper with llmctl itself; run as root to have them run as 'nobody'"
                )
        return lost

    def as_dict(self) -> dict[str, str | bool]:
        return {
            "network_isolation": self.network_isolation,
            "process_isolation": self.process_isolation,
            "filesystem": self.filesystem,
            "user": self.user,
            "private_tmp": self.private_tmp,
        }


@dataclass(frozen=True)
class TestProgram:
    """What run_tests runs: untrusted source in the sandbox, trusted tests in the checker."""

    __test__ = False  # not a pytest test class, whatever its name

    candidate: str  # untrusted: defines the function under test (a prompt and its completion)
    tests: str  # trusted: defines check(candidate) and whatever it needs (a prompt and its test)
    # the function check is given; it, and any global the tests name but lack, is the candidate's
    entry_point: str


@dataclass(frozen=True)
class ExecutionResult:
    status: str  # PASSED, FAILED or TIMED_OUT
    detail: str  # why it failed; empty when it passed
    seconds: float

    @property
    def passed(self) -> bool:
        return self.status == PASSED

    def describe(self) -> str:
        """One line in the reference harness's style: 'passed', 'failed: ...', 'timed out'."""
        return f"{self.status}: {self.detail}" if self.status == FAILED else self.status


@functools.cache
def sandbox_profile() -> SandboxProfile:
    """Probe once what confinement this machine allows; raise if root cannot drop to nobody."""
    if os.name != "posix":
        raise SandboxError("the sandbox needs Linux (or another Unix); on Windows, run llmctl under WSL")
    drop_to = _nobody_ids() if os.geteuid() == 0 else None
    findings = _probe({"probe": True, "drop_to": drop_to, **_scratch_config(SandboxLimits())})
    if not findings or "network_namespace" not in findings:
        raise SandboxError("the sandbox probe did not report; the sandbox needs Linux or another Unix")
    if drop_to and not findings["dropped_privileges"]:
        raise SandboxError(
            "llmctl runs as root, and the sandbox could not switch to user 'nobody' "
            f"({findings['errors'].get('dropped_privileges', 'no reason given')}): as root, process limits"
            " and file permissions would not hold;"
            " run llmctl as an ordinary user"
        )
    return SandboxProfile(
        network_isolation="namespace" if findings["network_namespace"] else "best-effort",
        process_isolation="namespace" if findings["pid_namespace"] else "process-group",
        filesystem="private" if findings["private_filesystem"] else "host",
        user="nobody" if drop_to else _user_name(os.getuid()),
        drop_to=drop_to,
        own_proc=findings["private_filesystem"] and findings["mount_proc"],
        refusals=dict(findings["errors"]),
    )


def run_tests(program: TestProgram, limits: SandboxLimits = SandboxLimits()) -> ExecutionResult:
    """Run `program.candidate` in the sandbox and `program.tests` in a trusted process that calls
    `check(<the candidate's entry point>)`; it passes if check returns.

    Safe to call from several threads at once: each call owns its processes.
    """
    tests = json.dumps({"source": program.tests, "entry_point": program.entry_point}).encode()
    return _run(program.candidate, tests, limits)


def run_program(program: str, limits: SandboxLimits = SandboxLimits()) -> ExecutionResult:
    """Run `program` (Python source) in the sandbox; it passes if it runs to its end without an
    exception. That verdict is the program's own word, so anything can arrange it: use it to run
    code, and run_tests to score it."""
    return _run(program, b"", limits)


def _run(candidate: str, tests: bytes, limits: SandboxLimits) -> ExecutionResult:
    profile = sandbox_profile()
    # With a private filesystem the program writes only to its own /tmp; without, to a fresh
    # directory of the harness's, its working directory, removed afterwards.
    workdir = None if profile.filesystem == "private" else Path(tempfile.mkdtemp(prefix="llmctl-sandbox-"))
    try:
        if workdir is not None and profile.drop_to:
            os.chown(workdir, *profile.drop_to)
        request = {
            "timeout_s": limits.timeout_s,
            "workdir": str(workdir or tempfile.gettempdir()),
            "cpu_s": limits.cpu_s,
            "memory_bytes": limits.memory_bytes,
            "max_processes": limits.max_processes,
            "max_file_bytes": limits.max_file_bytes,
            **_scratch_config(limits),
            "network_namespace": profile.network_isolation == "namespace",
            "pid_namespace": profile.process_isolation == "namespace",
            "private_filesystem": profile.filesystem == "private",
            "mount_proc": profile.own_proc,
            "drop_to": profile.drop_to,
        }
        # A model may emit a lone surrogate; it travels as is, and compiling it fails the program.
        payload = _frame(candidate.encode("utf-8", "surrogatepass")) + _frame(tests)
        outcome = _run_on_a_server(request, payload, limits.timeout_s + SERVER_GRACE_S)
    finally:
        if workdir is not None:
            _remove_tree(workdir)
    if outcome is None:
        return ExecutionResult(FAILED, "the sandbox's server process died while the program ran", 0.0)
    exit_status, report, seconds = outcome["exit_status"], outcome["report"], outcome["seconds"]
    if "setup_error" in report:
        raise SandboxError(f"the sandbox could not confine a program: {report['setup_error']}")
    if exit_status is None:
        return ExecutionResult(TIMED_OUT, f"no result within {limits.timeout_s:g} s", seconds)
    if report.get("passed") is True:
        return ExecutionResult(PASSED, "", seconds)
    return ExecutionResult(FAILED, report.get("error") or _describe_exit(exit_status), seconds)


class _Server:
    """A sandbox_child.py process that forks a checker per program (see its docstring), so that
    programs do not each pay for an interpreter's start-up. One program at a time."""

    def __init__(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with theirs:
            self.process = subprocess.Popen(
                [*CHILD_COMMAND, json.dumps({"control_fd": theirs.fileno()})],
                cwd=tempfile.gettempdir(),
                env=_child_environment(Path(tempfile.gettempdir())),
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,  # a Ctrl-C in the terminal reaches the harness, not programs
            )
        self.control, self.owner = ours, os.getpid()

    def run(self, request: dict, payload: bytes, wait_s: float) -> dict | None:
        """The server's outcome for one program, or None if the server died meanwhile; raises
        BrokenPipeError if it was dead before (nothing ran) and TimeoutError if it hung."""
        payload_fd = _anonymous_file(payload)
        try:
            socket.send_fds(self.control, [json.dumps(request).encode()], [payload_fd])
        finally:
            os.close(payload_fd)
        self.control.settimeout(wait_s)
        # First the checker's report, unless it sent none; then the server's word on how it ended.
        first = self.control.recv(REPORT_LIMIT_BYTES)
        if not first:
            return None
        report = _parsed_report(first)
        outcome = report if "exit_status" in report else None
        if outcome is None:
            second = self.control.recv(REPORT_LIMIT_BYTES)
            if not second:
                return None
            outcome = json.loads(second)
        return {**outcome, "report": {} if outcome is report else report}

    def close(self) -> None:
        self.control.close()  # the server exits when it reads the end of its control socket
        try:
            self.process.wait(SERVER_GRACE_S)
        except subprocess.TimeoutExpired:
            _kill_process_group(self.process.pid)
            self.process.wait()


_idle_servers: list[_Server] = []
_servers_lock = threading.Lock()


def _run_on_a_server(request: dict, payload: bytes, wait_s: float) -> dict | None:
    for attempt in range(2):
        with _servers_lock:
            server = _idle_servers.pop() if _idle_servers else None
        if server is not None and (server.owner != os.getpid() or server.process.poll() is not None):
            server = None  # a fork of the harness must not share one; a dead one is of no use
        if server is None:
            server = _Server()
        try:
            outcome = server.run(request, payload, wait_s)
        except (BrokenPipeError, ConnectionResetError):
            server.close()  # it died while idle; nothing ran, so run it on another
            if attempt:
                raise SandboxError("the sandbox's server process exits as soon as it starts") from None
            continue
        except TimeoutError:
            server.close()
            raise SandboxError(f"the sandbox's server process did not answer within {wait_s:g} s") from None
        except BaseException:  # Ctrl-C: the server ends the program when its control socket closes
            server.close()
            raise
        if outcome is None:
            server.close()
        else:
            with _servers_lock:
                _idle_servers.append(server)
        return outcome
    raise AssertionError("unreachable")


@atexit.register
def _close_servers() -> None:
    with _servers_lock:
        servers, _idle_servers[:] = list(_idle_servers), []
    for server in servers:
        if server.owner == os.getpid():
            server.close()


def _scratch_config(limits: SandboxLimits) -> dict:
    return {
        "root": tempfile.gettempdir(),  # where, in its own mount namespace, the private root is mounted
        "scratch_bytes": limits.scratch_bytes,
        "scratch_files": limits.scratch_files,
    }


def _frame(data: bytes) -> bytes:
    return len(data).to_bytes(8, "big") + data


def _probe(config: dict) -> dict:
    """Run the child's probe, wait up to PROBE_TIMEOUT_S, kill its process group, read its report."""
    read_fd, write_fd = os.pipe()
    try:
        try:
            child = subprocess.Popen(
                [*CHILD_COMMAND, json.dumps({**config, "result_fd": write_fd})],
                cwd=tempfile.gettempdir(),
                env=_child_environment(Path(tempfile.gettempdir())),
                pass_fds=(write_fd,),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,  # its own session and process group: killable as one
            )
        finally:
            os.close(write_fd)
        try:
            _wait_without_reaping(child, PROBE_TIMEOUT_S)
        finally:
            # The leader is not reaped yet, so its pid (the group's id) cannot have been reused.
            _kill_process_group(child.pid)
            child.wait()
        return _read_report(read_fd)
    finally:
        os.close(read_fd)


def _anonymous_file(data: bytes) -> int:
    """A descriptor of a file holding `data`, positioned at its start, that no path names: once
    the server holds it, nothing but the checker it forks can read the tests in it."""
    try:
        fd = os.memfd_create("llmctl-sandbox-payload", os.MFD_CLOEXEC)
    except (AttributeError, OSError):  # not Linux: an unlinked temporary file
        with tempfile.TemporaryFile() as file:
            fd = os.dup(file.fileno())
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _wait_without_reaping(child: subprocess.Popen, timeout_s: float) -> bool:
    """True if the child exited within the timeout; it stays a zombie until `child.wait()`."""
    try:
        pidfd = os.pidfd_open(child.pid)
    except (AttributeError, OSError):  # not Linux 5.3+: reap first; the group id could then be reused
        try:
            child.wait(timeout_s)
            return True
        except subprocess.TimeoutExpired:
            return False
    try:
        readable, _, _ = select.select([pidfd], [], [], timeout_s)
        return bool(readable)
    finally:
        os.close(pidfd)


def _kill_process_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # an empty group: nothing was left behind
        os.killpg(pgid, signal.SIGKILL)


def _parsed_report(data: bytes) -> dict:
    try:
        report = json.loads(data.decode("utf-8", "replace"))
    except json.JSONDecodeError:
        return {}
    return report if isinstance(report, dict) else {}


def _read_report(read_fd: int) -> dict:
    """The child's one JSON line; non-blocking, because a leftover holder of the pipe is possible."""
    os.set_blocking(read_fd, False)
    data = b""
    try:
        while len(data) < REPORT_LIMIT_BYTES and (chunk := os.read(read_fd, REPORT_LIMIT_BYTES)):
            data += chunk
    except BlockingIOError:
        pass
    try:
        report = json.loads(data.decode("utf-8", "replace").split("\n", 1)[0])
    except json.JSONDecodeError:
        return {}
    return report if isinstance(report, dict) else {}


def _describe_exit(exit_status: int) -> str:
    if exit_status < 0:
        try:
            name = signal.Signals(-exit_status).name
        except ValueError:  # a real-time signal has no name
            return f"killed by signal {-exit_status}"
        return f"killed by {name} (CPU time limit)" if name == "SIGXCPU" else f"killed by {name}"
    return f"exited with status {exit_status} before the test finished"


def _child_environment(workdir: Path) -> dict[str, str]:
    return {"PATH": "/usr/bin:/bin", "HOME": str(workdir), "TMPDIR": str(workdir), "LANG": "C.UTF-8"}


def _user_name(uid: int) -> str:
    import pwd  # POSIX only, like the rest of the sandbox; Windows gets the error above

    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:  # containers often run as a uid with no account
        return str(uid)


def _nobody_ids() -> tuple[int, int]:
    import pwd

    try:
        entry = pwd.getpwnam("nobody")
    except KeyError:
        return NOBODY_ID, NOBODY_ID
    return entry.pw_uid, entry.pw_gid


def _remove_tree(path: Path) -> None:
    try:
        shutil.rmtree(path)
    except OSError:
        # Without the privilege drop the program runs as us and may have left a directory we
        # cannot enter or empty; restore the modes (never through a symlink) and try again.
        os.chmod(path, 0o700)
        for directory, subdirectories, _ in os.walk(path):
            for name in subdirectories:
                subdirectory = os.path.join(directory, name)
                if not os.path.islink(subdirectory):
                    os.chmod(subdirectory, 0o700)
        shutil.rmtree(path)
