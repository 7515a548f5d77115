"""The two sides of one sandboxed program: the trusted checker, which runs the tests and calls the
candidate's functions through proxies, and the untrusted candidate, which confines itself and
answers those calls with plain data (sandbox_wire). sandbox_child.py's docstring tells the whole.
"""

from __future__ import annotations

import builtins
import os
import resource
import time

import sandbox_wire as wire
from sandbox_confine import (
    CLONE_NEWIPC,
    CLONE_NEWNET,
    CLONE_NEWNS,
    CLONE_NEWPID,
    END_NAMESPACE,
    PR_SET_DUMPABLE,
    SIGKILL,
    ConfinementError,
    continue_below_an_init_of_its_own,
    disable_destructive_functions,
    drop_privileges,
    enter_namespaces,
    enter_private_root,
    set_limit,
)

ERROR_CHARS = 500


REPLY_LIMIT_BYTES = 8 << 20  # the most a candidate's reply may hold; the checker decodes it


EXIT_WAIT_S = 0.5  # how long the checker waits to learn how a candidate that hung up ended


class CandidateFault(BaseException):
    """The candidate broke the protocol, sent what is not plain data, or ended mid-test.

    A BaseException, so that a test's `except Exception` cannot swallow it: the test fails.
    """


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
