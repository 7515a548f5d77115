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

import builtins
import contextlib
import functools
import json
import os
import resource
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import sandbox_wire as wire  # noqa: E402  (beside this file; the child imports nothing of llmctl)

del sys.path[0]

CLONE_NEWNS = 0x00020000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 0x1, 0x2, 0x4, 0x8
MS_NOATIME, MS_NODIRATIME, MS_REMOUNT, MS_BIND = 0x400, 0x800, 0x20, 0x1000
MS_REC, MS_PRIVATE, MS_RELATIME = 0x4000, 0x40000, 0x200000
MNT_DETACH = 2
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 1, 4, 36, 38
CAPABILITY_VERSION_3 = 0x20080522
PIVOT_ROOT_SYSCALL = {"x86_64": 155, "aarch64": 41, "riscv64": 41, "ppc64le": 203, "s390x": 217}
# The namespace's init cannot die of a signal it sends itself, so it passes a signal death on as
# this plus the signal's number, and the process outside turns that back into the signal.
SIGNAL_EXIT_BASE = 128
SIGKILL = 9
END_NAMESPACE = 10  # SIGUSR1, from the checker to the candidate's process outside its PID namespace
ERROR_CHARS = 500
REPLY_LIMIT_BYTES = 8 << 20  # the most a candidate's reply may hold; the checker decodes it
EXIT_WAIT_S = 0.5  # how long the checker waits to learn how a candidate that hung up ended

# What the private root holds besides the standard library: the system's shared libraries (an
# extension module's dependencies), the linker's cache, and device nodes programs open.
SYSTEM_DIRS = ("usr", "lib", "lib32", "lib64", "libx32")
SYSTEM_FILES = ("/etc/ld.so.cache",)
DEVICES = ("null", "zero", "full", "random", "urandom")
ROOT_OPTIONS = "size=1m,nr_inodes=1024,mode=0755"
SCRATCH = "/tmp"

# Process creation and signals, file removal, moving and permission changes, identity and
# session changes. `posix` holds the originals that `os` re-exports, so both are covered.
DISABLED = {
    "os": (
        "kill",
        "killpg",
        "system",
        "popen",
        "fork",
        "forkpty",
        "execl",
        "execle",
        "execlp",
        "execlpe",
        "execv",
        "execve",
        "execvp",
        "execvpe",
        "spawnl",
        "spawnle",
        "spawnlp",
        "spawnlpe",
        "spawnv",
        "spawnve",
        "spawnvp",
        "spawnvpe",
        "posix_spawn",
        "posix_spawnp",
        "putenv",
        "unsetenv",
        "remove",
        "unlink",
        "rmdir",
        "removedirs",
        "rename",
        "renames",
        "replace",
        "truncate",
        "link",
        "symlink",
        "chmod",
        "fchmod",
        "lchmod",
        "chown",
        "fchown",
        "lchown",
        "chflags",
        "lchflags",
        "chroot",
        "chdir",
        "fchdir",
        "setuid",
        "seteuid",
        "setreuid",
        "setresuid",
        "setgid",
        "setegid",
        "setregid",
        "setresgid",
        "setgroups",
        "setsid",
        "setpgid",
        "setpgrp",
    ),
    "shutil": ("rmtree", "move", "chown"),
    "subprocess": ("Popen", "run", "call", "check_call", "check_output", "getoutput", "getstatusoutput"),
    "builtins": ("exit", "quit", "help"),
}
DISABLED["posix"] = DISABLED["os"]


class ConfinementError(OSError):
    """A confinement step the kernel refused, or a probe step that failed; its text says which."""


class CandidateFault(BaseException):
    """The candidate broke the protocol, sent what is not plain data, or ended mid-test.

    A BaseException, so that a test's `except Exception` cannot swallow it: the test fails.
    """


def main() -> None:
    config = json.loads(sys.argv[1])
    if config.get("probe"):
        findings = probe(config)
        os.write(config["result_fd"], (json.dumps(findings) + "\n").encode())
        os._exit(0)
    serve_programs(config["control_fd"])


# ---------------------------------------------------------------- the server (trusted)


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


# ---------------------------------------------------------------- the checker (trusted)


class SetupError(Exception):
    """The candidate could not be confined as promised; it ran nothing."""


class Channel:
    """The checker's end of the candidate's pipes: calls out, replies back, and how it ended."""

    def __init__(self, to_candidate: int, from_candidate: int, pid: int, setup_r: int) -> None:
        self.to_candidate, self.from_candidate = to_candidate, from_candidate
        self.pid, self.setup_r = pid, setup_r
        self.exit_status: int | None = None

    def end(self, pid_namespace: bool) -> None:
        """Kill the candidate and wait until every process it started is gone. With a PID namespace
        the process outside kills its init, whose exit the kernel holds back until the namespace
        is empty. Each process signals only a child it has not reaped, whose pid cannot be reused."""
        if self.exit_status is not None:
            return
        os.kill(self.pid, END_NAMESPACE if pid_namespace else SIGKILL)
        self.exit_status = os.waitstatus_to_exitcode(os.waitpid(self.pid, 0)[1])

    def receive(self) -> list:
        """The candidate's next message, decoded; a CandidateFault if there is none."""
        data = read_frame(self.from_candidate, REPLY_LIMIT_BYTES)
        if data is None:
            raise CandidateFault(self.how_it_ended())
        try:
            message = wire.decode(data)
        except wire.WireError as exc:
            raise CandidateFault(f"the program sent a reply that is not plain data: {exc}") from None
        if type(message) is not list or not message or message[0] not in (0, 1, 2):
            raise CandidateFault("the program sent a reply outside the protocol")
        return message

    def call(self, name: str, args: tuple, kwargs: dict) -> object:
        try:
            request = wire.encode([name, list(args), kwargs])
        except wire.WireError as exc:
            raise CandidateFault(f"the test passes {name} what cannot enter the sandbox: {exc}") from None
        try:
            write_frame(self.to_candidate, request)
        except BrokenPipeError:
            raise CandidateFault(self.how_it_ended()) from None
        reply = self.receive()
        if reply[0] == 0 and len(reply) == 2:
            return reply[1]
        if reply[0] == 1 and len(reply) == 3:
            raise rebuilt_exception(reply[1], reply[2])
        if reply[0] == 2 and len(reply) == 2 and type(reply[1]) is str:
            raise CandidateFault(f"{name} returned what cannot leave the sandbox: {reply[1][:ERROR_CHARS]}")
        raise CandidateFault("the program sent a reply outside the protocol")

    def how_it_ended(self) -> str:
        """Why the candidate stopped answering: its setup error, or how its process ended."""
        setup_error = read_all(self.setup_r)
        if setup_error:
            raise SetupError(setup_error.decode("utf-8", "replace"))
        import time

        deadline = time.monotonic() + EXIT_WAIT_S
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.exit_status = os.waitstatus_to_exitcode(status)
                return describe_exit(self.exit_status)
            time.sleep(0.005)
        return "the program closed its end of the channel before the test finished"


class Proxy:
    """What the tests call in place of the candidate's function: the call runs in the sandbox."""

    def __init__(self, channel: Channel, name: str) -> None:
        self._channel, self.__name__ = channel, name

    def __call__(self, *args, **kwargs):
        return self._channel.call(self.__name__, args, kwargs)

    def __repr__(self) -> str:
        return f"<sandboxed function {self.__name__}>"


def check(channel: Channel, tests: dict | None) -> dict:
    """The verdict: run the tests (or, with none, wait for the program to finish)."""
    namespace = {"__name__": "__check__"}
    tests_error = None
    if tests is not None:
        try:  # while the candidate starts up
            code = compile(tests["source"], "tests.py", "exec")
            exec(code, namespace)
        except BaseException as exc:
            tests_error = f"the tests did not run: {describe(exc)}"
    try:
        started = channel.receive()
    except CandidateFault as exc:
        return {"passed": False, "error": str(exc)}
    if started[0] != 0:  # the program failed on its own, before any test
        return {"passed": False, "error": described(started[1:])}
    if tests is None:
        return {"passed": True}
    if tests_error:
        return {"passed": False, "error": tests_error}
    entry_point = tests["entry_point"]
    # The tests may call, by name, functions the completion defines (MBPP's tests do): every
    # global they name that neither they nor the builtins define is a function in the sandbox.
    for name in global_names(code) - set(namespace) - set(dir(builtins)) | {entry_point}:
        namespace[name] = Proxy(channel, name)
    if not callable(namespace.get("check")):
        return {"passed": False, "error": "the tests define no check(candidate) function"}
    try:
        namespace["check"](namespace[entry_point])
    except BaseException as exc:
        return {"passed": False, "error": describe(exc)}
    return {"passed": True}


def global_names(code) -> set[str]:
    """The names `code` and the functions in it look up (attributes too: a superset suffices)."""
    names = set(code.co_names)
    for constant in code.co_consts:
        if hasattr(constant, "co_names"):
            names |= global_names(constant)
    return names


def rebuilt_exception(mro: object, message: object) -> BaseException:
    """The candidate's exception as one the tests can catch as they would have: its own class
    name, and the nearest built-in exception class it derives from as base."""
    if type(mro) is not list or not mro or not all(type(n) is str for n in mro) or type(message) is not str:
        return CandidateFault("the program sent a reply outside the protocol")
    message = message[:ERROR_CHARS]
    name = mro[0][:100]
    for base_name in mro:
        base = getattr(builtins, base_name, None)
        if isinstance(base, type) and issubclass(base, BaseException):
            break
    else:
        base = Exception
    if not issubclass(base, Exception):  # SystemExit, KeyboardInterrupt: fail, uncatchable
        return CandidateFault(f"{name}: {message}" if message else name)
    if base.__name__ != name and name.isidentifier():
        base = type(name, (base,), {})  # named as the program named it; caught as its built-in base
    try:
        return base(message) if message else base()
    except Exception:  # a built-in whose constructor wants more (UnicodeDecodeError)
        return Exception(f"{name}: {message}")


def described(failure: list) -> str:
    """A candidate's own failure report ([mro, message]) as one line."""
    if len(failure) == 2 and type(failure[0]) is list and failure[0] and type(failure[0][0]) is str:
        name, message = failure[0][0][:100], str(failure[1])[:ERROR_CHARS]
        return f"{name}: {message}" if message else name
    return "the program sent a reply outside the protocol"


# ---------------------------------------------------------------- the candidate (untrusted)


def run_candidate(libc, config: dict, source: str, pipes: tuple[int, int, int]) -> int:
    """Confine this fork, run the program, answer the checker's calls; returns the exit status."""
    requests, replies, setup_w = pipes
    keep = sorted(pipes)
    null = os.open("/dev/null", os.O_RDWR)
    os.dup2(null, 0)  # the payload was on stdin, and the tests are still there
    low = 3
    for fd in keep:
        os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, os.sysconf("SC_OPEN_MAX"))
    try:
        confine(libc, config)
    except Exception as exc:  # refuse to run unconfined
        os.write(setup_w, describe(exc).encode())
        return 2
    os.close(setup_w)
    serve(source, requests, replies)
    return 0


def confine(libc, config: dict) -> None:
    set_limit(resource.RLIMIT_FSIZE, config["max_file_bytes"])
    # Inherited from the checker; a process that is not dumpable cannot write its own uid_map.
    libc.prctl(PR_SET_DUMPABLE, 1, 0, 0, 0)
    namespaces = (
        (CLONE_NEWNET if config["network_namespace"] else 0)
        | (CLONE_NEWPID if config["pid_namespace"] else 0)
        | (CLONE_NEWNS | CLONE_NEWIPC if config["private_filesystem"] else 0)
    )
    if namespaces:
        enter_namespaces(libc, namespaces)
    # After the namespaces: in a user namespace of its own, the count starts from its own processes.
    set_limit(resource.RLIMIT_NPROC, config["max_processes"])
    if config["pid_namespace"]:
        continue_below_an_init_of_its_own(libc)
    if config["private_filesystem"]:
        enter_private_root(libc, config)
    else:
        os.environ.update(HOME=os.getcwd(), TMPDIR=os.getcwd())
    drop_privileges(libc, config.get("drop_to"))


def serve(source: str, requests: int, replies: int) -> None:
    """Run the program, say whether it ran to its end, then answer calls until the checker hangs up."""
    write, exit_now = write_frame, os._exit  # kept before the program can replace them
    namespace = {"__name__": "__sandbox__"}
    disable_destructive_functions()
    try:
        exec(compile(source, "program.py", "exec"), namespace)
    except BaseException as exc:  # SystemExit and KeyboardInterrupt are failures too
        write(replies, wire.encode([1, exception_names(exc), exception_text(exc)]))
        exit_now(1)
    write(replies, wire.encode([0]))
    while (request := read_frame(requests)) is not None:
        name, args, kwargs = wire.decode(request)
        try:
            value = namespace[name](*args, **kwargs) if name in namespace else undefined(name)
            reply = [0, value]
        except BaseException as exc:
            reply = [1, exception_names(exc), exception_text(exc)]
        try:
            data = wire.encode(reply)
        except wire.WireError as exc:
            data = wire.encode([2, str(exc)])
        except BaseException as exc:  # an iterator result that raised while it was read
            data = wire.encode([1, exception_names(exc), exception_text(exc)])
        write(replies, data)
    exit_now(0)


def undefined(name: str):
    raise NameError(f"name '{name}' is not defined")


def exception_names(exc: BaseException) -> list[str]:
    return [cls.__name__ for cls in type(exc).__mro__]


def exception_text(exc: BaseException) -> str:
    try:
        return str(exc)[:ERROR_CHARS]
    except Exception:  # an exception whose __str__ fails still names its type
        return ""


# ---------------------------------------------------------------- confinement


def load_libc():
    import ctypes

    return ctypes.CDLL(None, use_errno=True)


def checked(libc, status: int, what: str) -> None:
    if status != 0:
        import ctypes

        errno = ctypes.get_errno()
        raise ConfinementError(f"{what}: {os.strerror(errno)}")


def set_parent_death_signal(libc, parent: int | None = None) -> None:
    """Die with the process that forked this one, so the candidate never outlives its checker
    (`parent`, if known: should it have died already, there is no signal to wait for)."""
    libc.prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0)
    if parent is not None and os.getppid() != parent:
        os._exit(1)


def enter_namespaces(libc, flags: int) -> None:
    """Unshare `flags`; as an ordinary user, inside a user namespace that maps our uid and gid to
    themselves (a PID or mount namespace is created only in a user namespace one owns)."""
    if not hasattr(libc, "unshare"):
        raise ConfinementError("this system has no unshare() (namespaces are Linux's)")
    as_root = os.geteuid() == 0
    uid, gid = os.getuid(), os.getgid()
    if not as_root:
        flags |= CLONE_NEWUSER
    names = [
        name
        for name, bit in (
            ("CLONE_NEWUSER", CLONE_NEWUSER),
            ("CLONE_NEWNET", CLONE_NEWNET),
            ("CLONE_NEWPID", CLONE_NEWPID),
            ("CLONE_NEWNS", CLONE_NEWNS),
            ("CLONE_NEWIPC", CLONE_NEWIPC),
        )
        if flags & bit
    ]
    checked(libc, libc.unshare(flags), f"unshare({' | '.join(names)})")
    if not as_root and flags & (CLONE_NEWNS | CLONE_NEWPID):
        maps = (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1"))
        for path, text in maps:
            with open(f"/proc/self/{path}", "w") as file:
                file.write(text)


def continue_below_an_init_of_its_own(libc) -> None:
    """Fork twice and return in the grandchild, process 2 of the new PID namespace.

    This process waits outside the namespace, and the child, the namespace's init, waits for the
    grandchild; each exits as the one it waited for. The program does not run as init because
    init ignores signals that have no handler, the CPU limit's SIGXCPU among them.
    """
    import signal

    # The checker's word to end the namespace (Channel.end), and the init's exit, are taken with
    # sigwaitinfo while blocked: a Python handler could run only after a waitpid that had
    # already begun, and that one would wait for an init nobody kills.
    awaited = {END_NAMESPACE, signal.SIGCHLD}
    signal.pthread_sigmask(signal.SIG_BLOCK, awaited)
    init = os.fork()
    if init:
        os.closerange(3, os.sysconf("SC_OPEN_MAX"))  # the checker learns of an end from its pipes
        while not (ended := os.waitpid(init, os.WNOHANG))[0]:
            if signal.sigwaitinfo(awaited).si_signo == END_NAMESPACE:
                os.kill(init, SIGKILL)  # not reaped yet, so the pid is still the init's
        signal.pthread_sigmask(signal.SIG_UNBLOCK, awaited)
        exit_as(os.waitstatus_to_exitcode(ended[1]))
    signal.pthread_sigmask(signal.SIG_UNBLOCK, awaited)
    set_parent_death_signal(libc)
    libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)  # the program may share its uid: no ptrace of init
    program = os.fork()
    if program:
        os.closerange(3, os.sysconf("SC_OPEN_MAX"))
        status = os.waitstatus_to_exitcode(os.waitpid(program, 0)[1])
        # Exiting ends the namespace: the kernel kills whatever the program left running in it.
        os._exit(status if status >= 0 else SIGNAL_EXIT_BASE - status)


def exit_as(status: int) -> None:
    """Exit as the namespace's init did, dying of the signal it passed on as an exit status (a
    program exiting with a status above SIGNAL_EXIT_BASE on its own reads as a signal too)."""
    import signal

    signal_number = -status if status < 0 else status - SIGNAL_EXIT_BASE if status > SIGNAL_EXIT_BASE else 0
    if signal_number:
        if signal_number not in (signal.SIGKILL, signal.SIGSTOP):  # whose action cannot be set
            signal.signal(signal_number, signal.SIG_DFL)
        os.kill(os.getpid(), signal_number)
    os._exit(status if status >= 0 else SIGNAL_EXIT_BASE + signal_number)


def enter_private_root(libc, config: dict) -> None:
    """Make a root of our own and move into it (see the module's docstring, step 5)."""
    os.umask(0o022)  # the directories made on the way to each bind must be traversable
    # Private propagation first, or the mounts below would appear in the host's namespace too.
    checked(libc, libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None), "making / private")
    links, binds = [], []  # binds: (O_PATH descriptor, path, read-only), opened before the root
    for name in SYSTEM_DIRS:  # hides whatever lay under its mount point
        host = f"/{name}"
        if os.path.islink(host):
            links.append((host, os.readlink(host)))
        elif os.path.isdir(host):
            binds.append((os.open(host, os.O_PATH), host, True))
    bound = [f"/{name}" for name in SYSTEM_DIRS]
    for path in [*sys.path, *SYSTEM_FILES]:
        real = os.path.realpath(path)
        if os.path.exists(real) and not any(real == top or real.startswith(top + "/") for top in bound):
            binds.append((os.open(real, os.O_PATH), real, True))
            bound.append(real)
    for device in DEVICES:
        if os.path.exists(f"/dev/{device}"):
            binds.append((os.open(f"/dev/{device}", os.O_PATH), f"/dev/{device}", False))

    root = config["root"]
    mount_tmpfs(libc, root, ROOT_OPTIONS)
    for host, target in links:
        os.symlink(target, root + host)
    for fd, host, read_only in binds:
        bind(libc, fd, host, root + host, read_only)
        os.close(fd)
    uid, gid = config.get("drop_to") or (os.getuid(), os.getgid())
    caps = f"size={config['scratch_bytes']},nr_inodes={config['scratch_files']}"
    mount_tmpfs(libc, root + SCRATCH, f"{caps},mode=0700,uid={uid},gid={gid}")
    if config["pid_namespace"] and config["mount_proc"]:  # never the host's /proc: its own, or none
        os.mkdir(root + "/proc", 0o555)
        flags = MS_NOSUID | MS_NODEV | MS_NOEXEC
        checked(libc, libc.mount(b"proc", f"{root}/proc".encode(), b"proc", flags, None), "mounting /proc")
    enter_root(libc, root)
    # Read-only last: the root tmpfs belongs to whoever mounted it, in a user namespace the program's uid.
    remount = MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV
    checked(libc, libc.mount(None, b"/", None, remount, None), "making the private root read-only")
    os.chdir(SCRATCH)
    os.environ.update(HOME=SCRATCH, TMPDIR=SCRATCH)


def mount_tmpfs(libc, target: str, options: str) -> None:
    os.makedirs(target, mode=0o755, exist_ok=True)
    status = libc.mount(b"tmpfs", target.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, options.encode())
    checked(libc, status, f"mounting a tmpfs on {target}")


def bind(libc, fd: int, host: str, target: str, read_only: bool) -> None:
    """Bind what `fd` holds (opened as `host`) at `target`; read-only, without set-user-ID or devices."""
    is_dir = os.path.isdir(f"/proc/self/fd/{fd}")
    if is_dir:
        os.makedirs(target, mode=0o755, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(target), mode=0o755, exist_ok=True)
        os.close(os.open(target, os.O_CREAT | os.O_WRONLY, 0o644))
    source = f"/proc/self/fd/{fd}".encode()
    checked(libc, libc.mount(source, target.encode(), None, MS_BIND, None), f"binding {host}")
    if not read_only:
        return
    # In a user namespace the flags the host mounted it with are locked: keep them, add ours.
    host_flags = os.statvfs(fd).f_flag
    kept = host_flags & (MS_NOEXEC | MS_NOATIME | MS_NODIRATIME) | (MS_RELATIME if host_flags & 4096 else 0)
    flags = MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV | kept
    checked(libc, libc.mount(None, target.encode(), None, flags, None), f"making {host} read-only")


def enter_root(libc, root: str) -> None:
    """pivot_root into `root` and detach the old one, so no path leads back to the host's files;
    chroot where pivot_root is refused (a root on rootfs), which as `nobody` holds as well."""
    old = root + "/.old-root"
    os.mkdir(old, 0o700)
    number = PIVOT_ROOT_SYSCALL.get(os.uname().machine)
    if number is not None and libc.syscall(number, root.encode(), old.encode()) == 0:
        os.chdir("/")
        checked(libc, libc.umount2(b"/.old-root", MNT_DETACH), "detaching the host's root")
        os.rmdir("/.old-root")
    else:
        os.rmdir(old)
        os.chroot(root)
        os.chdir("/")


def drop_privileges(libc, drop_to: list | None) -> None:
    """As root: no groups, uid and gid `nobody`. In a user namespace: no capabilities. Then
    no_new_privs, so no set-user-ID binary or file capability can raise them again."""
    if drop_to:
        uid, gid = drop_to
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)
        if os.getuid() != uid or os.geteuid() != uid or os.getgid() != gid:
            ids = f"uid {os.getuid()}/{os.geteuid()}, gid {os.getgid()}"
            raise ConfinementError(f"still {ids} after dropping privileges")
    if libc is None:
        return
    if not drop_to and os.geteuid() != 0:  # no capability to lose outside a user namespace: harmless
        import ctypes

        header = (ctypes.c_uint32 * 2)(CAPABILITY_VERSION_3, 0)
        data = (ctypes.c_uint32 * 6)()  # effective, permitted, inheritable: all empty, twice
        checked(libc, libc.capset(header, data), "dropping capabilities")
    checked(libc, libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "setting no_new_privs")


def set_limit(which: int, soft: int, hard: int | None = None) -> None:
    """Lower a limit; a limit already below ours stays (only root could raise it)."""
    hard = soft if hard is None else hard
    _, current_hard = resource.getrlimit(which)
    if current_hard != resource.RLIM_INFINITY:
        soft, hard = min(soft, current_hard), min(hard, current_hard)
    resource.setrlimit(which, (soft, hard))


def disable_destructive_functions() -> None:
    """Replace the functions in DISABLED: now in the modules loaded, and in shutil and subprocess
    when the program imports them (importing them for it would cost every program 5 ms)."""
    for module_name in ("os", "posix", "builtins"):
        disable_in(sys.modules[module_name])
    sys.meta_path.insert(0, GuardOnImport())


def disable_in(module) -> None:
    for name in DISABLED.get(module.__name__, ()):
        if hasattr(module, name):
            setattr(module, name, refusal(f"{module.__name__}.{name}"))


class GuardOnImport:
    """A meta path finder that lets the usual finders load shutil and subprocess, then disables
    their destructive functions before the importer sees the module."""

    def find_spec(self, name, path=None, target=None):
        if name not in ("shutil", "subprocess"):
            return None
        import importlib.machinery

        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None:
            spec.loader = GuardedLoader(spec.loader)
        return spec


class GuardedLoader:
    def __init__(self, loader) -> None:
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        self.loader.exec_module(module)
        disable_in(module)


def refusal(qualified_name: str):
    def refuse(*args, **kwargs):
        raise PermissionError(f"{qualified_name} is disabled in the sandbox")

    return refuse


# ---------------------------------------------------------------- what this machine allows


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


# ---------------------------------------------------------------- small things both sides use


def read_frame(fd: int, limit: int | None = None) -> bytes | None:
    """One length-prefixed message; None at end of file (or if the sender stopped mid-message)."""
    header = read_exactly(fd, 8)
    if header is None:
        return None
    length = int.from_bytes(header, "big")
    if limit is not None and length > limit:
        raise CandidateFault(f"the program's reply holds {length} bytes, more than the {limit} allowed")
    return read_exactly(fd, length)


def read_exactly(fd: int, n: int) -> bytes | None:
    chunks, left = [], n
    while left:
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def write_frame(fd: int, data: bytes) -> None:
    message = memoryview(len(data).to_bytes(8, "big") + data)
    while message:
        message = message[os.write(fd, message) :]


def read_all(fd: int) -> bytes:
    os.set_blocking(fd, False)
    try:
        return os.read(fd, 4096)
    except BlockingIOError:
        return b""


def describe_exit(exit_status: int) -> str:
    if exit_status < 0:
        import signal

        try:
            name = signal.Signals(-exit_status).name
        except ValueError:  # a real-time signal has no name
            return f"killed by signal {-exit_status}"
        return f"killed by {name} (CPU time limit)" if name == "SIGXCPU" else f"killed by {name}"
    return f"exited with status {exit_status} before the test finished"


def describe(exc: BaseException) -> str:
    if isinstance(exc, (CandidateFault, ConfinementError)):  # ours, and said in full
        return str(exc)[:ERROR_CHARS]
    try:
        text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    except Exception:  # an exception whose __str__ fails still names its type
        text = type(exc).__name__
    return text[:ERROR_CHARS]


if __name__ == "__main__":
    main()
