"""The processes that run sandboxed programs; started by llmctl.eval.sandbox, never imported.

    python -I -S -B sandbox_child.py CONFIG_JSON

The process the harness starts is a server (one per harness thread that runs programs), and it is
trusted. For each program the harness sends it the limits and a memory file holding the program
and the tests; the server forks a checker in a session of its own, waits at most the wall-clock
timeout, kills the checker's process group, kills and reaps whatever is left of it (as a child
subreaper, every orphan of a program comes back to it), and says how the checker ended; the
checker sends its report to the harness itself, so the server never holds one.
Forking from a server that is already running saves every program an interpreter start-up.

The checker is trusted too. It forks the candidate before it reads the tests, so the untrusted
program never holds them, not even in its memory. The candidate confines itself (below) and runs
the program: the problem's prompt and the completion. The checker runs the tests (the problem's
prompt and test: trusted text) and calls the candidate's functions through proxies: each call
sends the arguments over a pipe as plain data (sandbox_wire) and decodes the reply into plain
data, so the program decides what its function returns and nothing else. Only the checker holds
the verdict socket, and it writes one JSON line there: {"passed": true}, {"passed": false, "error":
"..."} or, when a confinement step failed, {"setup_error": "..."}. With no tests, the program
passes if it runs to its end (run_program). Before it reports, the checker kills the candidate and
waits until every process of it is gone.

The candidate, before anything of the program runs:

1. closes every descriptor but its pipes to the checker (the verdict socket among them);
2. sets resource limits: CPU seconds, address space, file size, no core file;
3. enters new namespaces where the harness's probe found them possible (as an ordinary user,
   inside a user namespace of its own): network (nothing but a loopback that is down), IPC (no
   shared memory or message queue of the host's, none that outlives it), mount, and PID, then
   caps its processes (RLIMIT_NPROC);
4. with a PID namespace, forks the namespace's first process (its init), which forks the one that
   runs the program; each waits for the next and exits as it did. When the init exits, or the
   harness kills it with the process group, the kernel kills every process left in the namespace,
   even one that left the group with setsid();
5. with a mount namespace, moves into a root of its own: an empty tmpfs with the system's
   libraries (/usr, /lib*) and Python's standard library bound read-only, no set-user-ID,
   five device nodes (null, zero, full, random, urandom), its own /proc (which shows its own
   processes alone), and one writable place, /tmp: a tmpfs capped in bytes and in files, which
   vanishes with it. No host directory is writable, and no host Unix socket is reachable;
6. gives up its privileges: as root, every group and uid/gid `nobody`, so the kernel enforces
   RLIMIT_NPROC and file permissions; in a user namespace, every capability. Then no_new_privs,
   so no set-user-ID program could give them back. The program's imports run after this, as
   that user: nothing is imported on its behalf with more rights than it has;
7. replaces destructive functions by ones that raise: a tripwire for accidents, as in the
   reference harness. The boundary is the kernel's, above, not this.

Only the standard library is importable (-S).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import resource
import sys

# the modules beside this file; the child processes import nothing of llmctl (-I -S)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from sandbox_checker import (  # noqa: E402
    Channel,
    SetupError,
    check,
    describe,
    read_frame,
    run_candidate,
)
from sandbox_confine import (  # noqa: E402
    CLONE_NEWIPC,
    CLONE_NEWNET,
    CLONE_NEWNS,
    CLONE_NEWPID,
    PR_SET_CHILD_SUBREAPER,
    PR_SET_DUMPABLE,
    PR_SET_PDEATHSIG,
    SIGKILL,
    ConfinementError,
    drop_privileges,
    enter_namespaces,
    enter_private_root,
    load_libc,
    set_limit,
    set_parent_death_signal,
)

del sys.path[0]


def main() -> None:
    config = json.loads(sys.argv[1])
    if config.get("probe"):
        findings = probe(config)
        os.write(config["result_fd"], (json.dumps(findings) + "\n").encode())
        os._exit(0)
    serve_programs(config["control_fd"])


def serve_programs(control_fd: int) -> None:
    """Run one program per request on the control socket, until the harness closes it."""
    import socket

    libc = load_libc()
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    # A program running as our uid (no user namespace here) could otherwise trace us, or open
    # through /proc/<pid>/fd the memory file of the tests we hand the next checker.
    libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
    control = socket.socket(fileno=control_fd)
    while True:
        try:
            message, fds, _, _ = socket.recv_fds(control, 1 << 16, 1)
        except OSError:
            message, fds = b"", []
        if not message or len(fds) != 1:
            os._exit(0)
        outcome, harness_gone = run_checked(libc, json.loads(message), fds[0], control)
        if harness_gone:
            os._exit(0)
        control.send(json.dumps(outcome).encode())


def run_checked(libc, request: dict, payload_fd: int, control) -> tuple[dict, bool]:
    """Fork a checker for one program, give it at most the timeout, leave nothing of it behind.

    The checker sends its report to the harness itself, on the control socket: the server never
    holds a report (a test's failure message can hold its expected answer), so no later program
    forked from it could find one in its memory. Returns {"exit_status" (None when it timed out),
    "seconds"} and whether the harness went away meanwhile.
    """
    import time

    server = os.getpid()
    started = time.monotonic()
    checker = os.fork()
    if checker == 0:
        os.setsid()  # a process group of its own, to be killed as one
        libc.prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0)
        if os.getppid() != server:  # the server died before the line above
            os._exit(1)
        os.dup2(payload_fd, 0)
        os.dup2(control.fileno(), 3)
        os.closerange(4, os.sysconf("SC_OPEN_MAX"))
        os.chdir(request["workdir"])
        run_one(libc, request, payload_fd=0, result_fd=3)
    os.close(payload_fd)
    exited, harness_gone = wait_for(checker, request["timeout_s"], control)
    # The checker is not reaped yet, so its pid (the group's id) cannot have been reused.
    for kill in (os.killpg, os.kill):
        with contextlib.suppress(ProcessLookupError):
            kill(checker, SIGKILL)
    status = os.waitstatus_to_exitcode(os.waitpid(checker, 0)[1])
    seconds = time.monotonic() - started
    end_orphans()
    return {"exit_status": status if exited else None, "seconds": seconds}, harness_gone


def wait_for(pid: int, timeout_s: float, control) -> tuple[bool, bool]:
    """Whether the child `pid` exited within the timeout (it stays a zombie), and whether the
    harness closed the control socket meanwhile."""
    import select
    import time

    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):  # before Linux 5.3: look every few milliseconds
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                return True, False
            time.sleep(0.002)
        return False, False
    try:
        readable, _, _ = select.select([pidfd, control], [], [], timeout_s)
        return pidfd in readable, control in readable
    finally:
        os.close(pidfd)


def end_orphans() -> None:
    """Kill and reap every child the server still has: the orphans of a program's processes,
    which the kernel hands to the nearest subreaper. Each is ours and unreaped, so its pid is
    not reused; reaping one hands us its own children, until none is left."""
    children = f"/proc/{os.getpid()}/task/{os.getpid()}/children"
    while True:
        try:
            with open(children) as file:
                pids = [int(pid) for pid in file.read().split()]
        except OSError:  # no such file (CONFIG_PROC_CHILDREN): reap those already gone
            pids = []
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, SIGKILL)
        for pid in pids:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
    try:
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass
    except ChildProcessError:
        pass


def run_one(libc, config: dict, payload_fd: int, result_fd: int) -> None:
    """Be the checker of one program: fork the candidate, run the tests, report; never returns."""

    def report(document: dict) -> None:
        os.write(result_fd, (json.dumps(document) + "\n").encode())

    # Where the program runs as our own uid, this keeps it from tracing us or reading our descriptors.
    libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
    set_limit(resource.RLIMIT_CORE, 0)
    set_limit(resource.RLIMIT_AS, config["memory_bytes"])
    # The soft limit sends SIGXCPU, which kills; the hard one a second later sends SIGKILL.
    set_limit(resource.RLIMIT_CPU, config["cpu_s"], config["cpu_s"] + 1)
    source = read_frame(payload_fd).decode("utf-8", "surrogatepass")
    from_checker, to_candidate = os.pipe()
    from_candidate, to_checker = os.pipe()
    setup_r, setup_w = os.pipe()  # the candidate's setup error, if confining it failed
    checker = os.getpid()
    candidate = os.fork()
    if candidate == 0:
        set_parent_death_signal(libc, checker)
        os._exit(run_candidate(libc, config, source, (from_checker, to_checker, setup_w)))
    for fd in (from_checker, to_checker, setup_w):
        os.close(fd)
    tests = read_frame(payload_fd)  # only now, with the candidate out of this process
    channel = Channel(to_candidate, from_candidate, candidate, setup_r)
    try:
        verdict = check(channel, json.loads(tests) if tests else None)
    except SetupError as exc:
        verdict = {"setup_error": str(exc)}
    channel.end(config["pid_namespace"])
    report(verdict)
    os._exit(0)


def probe(config: dict) -> dict:
    """Try each kind of confinement in a child of its own; as root, dropping to `nobody` last."""
    findings = {
        "network_namespace": False,
        "pid_namespace": False,
        "private_filesystem": False,
        "mount_proc": False,
        "dropped_privileges": False,
        "errors": {},  # finding: why the kernel refused it (the last try's reason)
    }

    def attempt(finding: str, step) -> None:
        try:
            step()
            findings[finding] = True
            findings["errors"].pop(finding, None)
        except OSError as exc:
            findings["errors"][finding] = describe(exc)

    attempt("network_namespace", lambda: in_a_child(lambda: enter_namespaces(load_libc(), CLONE_NEWNET)))
    attempt("pid_namespace", lambda: in_a_child(probe_pid_namespace))
    pid_namespace = findings["pid_namespace"]
    # Its own /proc where it can; a container that masks parts of its /proc refuses a new one.
    for mount_proc in (True, False) if pid_namespace else (False,):
        step = functools.partial(probe_private_filesystem, config, pid_namespace, mount_proc)
        attempt("private_filesystem", functools.partial(in_a_child, step))
        if findings["private_filesystem"]:
            findings["mount_proc"] = mount_proc
            break
    if config.get("drop_to"):
        attempt("dropped_privileges", lambda: drop_privileges(None, config["drop_to"]))
    return findings


def in_a_child(step) -> None:
    """Run a probe step in a child process, so that the namespaces it enters do not change what
    the next step finds (a user namespace without a uid map may not create another)."""
    read_fd, write_fd = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(read_fd)
        try:
            step()
            os._exit(0)
        except Exception as exc:
            os.write(write_fd, describe(exc).encode())
            os._exit(1)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as errors:
        error = errors.read().decode("utf-8", "replace")
    if os.waitstatus_to_exitcode(os.waitpid(child, 0)[1]) != 0:
        raise ConfinementError(error or "the probe step failed")


def probe_pid_namespace() -> None:
    enter_namespaces(load_libc(), CLONE_NEWPID)
    first = os.fork()
    if first == 0:
        os._exit(0 if os.getpid() == 1 else 1)
    if os.waitstatus_to_exitcode(os.waitpid(first, 0)[1]) != 0:
        raise ConfinementError("the first process in a new PID namespace is not its process 1")


def probe_private_filesystem(config: dict, pid_namespace: bool, mount_proc: bool) -> None:
    """Enter a private root as a program would, drop privileges, and import a module from it."""
    libc = load_libc()
    enter_namespaces(libc, CLONE_NEWNS | CLONE_NEWIPC | (CLONE_NEWPID if pid_namespace else 0))
    if pid_namespace:
        first = os.fork()  # /proc shows the PID namespace of its mounter: mount it from inside
        if first:
            os._exit(os.waitstatus_to_exitcode(os.waitpid(first, 0)[1]))
    enter_private_root(libc, {**config, "pid_namespace": pid_namespace, "mount_proc": mount_proc})
    drop_privileges(libc, config.get("drop_to"))
    import importlib

    try:  # a module not loaded yet: read from the private root, as the program's user
        importlib.import_module("colorsys")
    except ImportError as exc:
        stdlib = os.path.dirname(os.__file__)
        raise ConfinementError(
            f"the standard library ({stdlib}) is not readable by the sandbox's user: {exc}"
        ) from None


if __name__ == "__main__":
    main()
