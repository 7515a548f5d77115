"""The process that runs one untrusted test program; started by llmctl.eval.sandbox, never imported.

    python -I -S -B sandbox_child.py CONFIG_JSON        (cwd: a fresh directory of its own)

While it still holds the harness's privileges it confines itself, in this order:

1. resource limits: CPU seconds, address space, processes, file size, no core file;
2. a new network namespace, when the harness's probe found one possible (nothing but a
   loopback that is down, so no connection leaves the process);
3. a new PID namespace, when possible: this process forks the namespace's first process (its
   init), which forks the one that runs the program. Each waits for the next and exits as it
   did; when the namespace's init exits, or the harness kills it with the process group, the
   kernel kills every process left in the namespace, including one that left the group with
   setsid() to escape that kill;
4. as root, a new mount namespace with an empty private tmpfs on /tmp, /var/tmp and /dev/shm,
   the directories `nobody` could otherwise write to, and /tmp as the working directory;
5. the standard-library modules the program imports are loaded now: once running as
   `nobody` the interpreter's own files may be unreadable (a Python under /root is);
6. when started as root: every group dropped and uid/gid set to `nobody`, so the kernel
   refuses writes outside the working directory and signals to the harness, and enforces
   RLIMIT_NPROC (it does not for root);
7. destructive functions replaced by ones that raise: a tripwire for accidents, as in the
   reference harness. The boundary is the kernel's limits above, not this.

Then it runs the program and writes one JSON line to the result pipe: {"passed": true},
{"passed": false, "error": "..."} or, when a confinement step failed, {"setup_error": "..."}
without running anything. Only the standard library is importable (-S), which keeps start-up
near 30 ms a program.
"""

from __future__ import annotations

import ast
import json
import os
import resource
import sys

CLONE_NEWNET = 0x40000000
CLONE_NEWNS = 0x00020000
CLONE_NEWPID = 0x20000000
CLONE_NEWUSER = 0x10000000
# The namespace's init cannot die of a signal it sends itself, so it passes a signal death on as
# this plus the signal's number, and the process outside turns that back into the signal.
SIGNAL_EXIT_BASE = 128
MS_NOSUID, MS_NODEV, MS_REC, MS_PRIVATE = 0x2, 0x4, 0x4000, 0x40000
SHARED_WRITABLE_DIRS = ("/tmp", "/var/tmp", "/dev/shm")  # where `nobody` could write
PRIVATE_TMP_OPTIONS = b"size=64m,mode=1777"
ERROR_CHARS = 500

# Importing these has a visible effect (a browser opens, a poem prints), so never as root.
IMPORT_HAS_EFFECTS = frozenset({"antigravity", "this"})

# Modules that functions of a standard-library module import only when called (Counter.most_common
# imports heapq; a socket address is encoded with the idna codec); loaded up front with it, because
# `nobody` may be unable to load them later.
LAZY_IMPORTS = {
    "collections": ("heapq",),
    "datetime": ("_strptime",),
    "socket": ("encodings.idna",),
    "time": ("_strptime",),
}

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
        "register_at_fork",
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


def main() -> None:
    config = json.loads(sys.argv[1])
    result_fd = config["result_fd"]
    write, exit_now, dumps = os.write, os._exit, json.dumps  # kept before the program can replace them

    def report(document: dict) -> None:
        write(result_fd, (dumps(document) + "\n").encode())

    if config.get("probe"):
        report(probe(config))
        exit_now(0)

    with open(config["program"], encoding="utf-8", errors="surrogatepass") as file:
        source = file.read()
    try:
        confine(config, source)
    except Exception as exc:  # refuse to run unconfined
        report({"setup_error": describe(exc)})
        exit_now(2)
    disable_destructive_functions()
    try:
        exec(compile(source, "program.py", "exec"), {"__name__": "__sandbox__"})
    except BaseException as exc:  # SystemExit and KeyboardInterrupt are failures too
        report({"passed": False, "error": describe(exc)})
        exit_now(1)
    report({"passed": True})
    exit_now(0)


def probe(config: dict) -> dict:
    """What this machine allows: a network namespace, and (as root) dropping to `nobody`."""
    findings = {
        "network_namespace": False,
        "pid_namespace": False,
        "private_tmp": False,
        "dropped_privileges": False,
        "errors": [],
    }
    steps = [
        ("network_namespace", lambda: in_a_child(lambda: enter_namespaces(CLONE_NEWNET))),
        ("pid_namespace", lambda: in_a_child(probe_pid_namespace)),
    ]
    if config.get("drop_to"):
        steps += [
            ("private_tmp", enter_private_tmp),
            ("dropped_privileges", lambda: drop_privileges(*config["drop_to"])),
        ]
    for finding, step in steps:
        try:
            step()
            findings[finding] = True
        except OSError as exc:
            findings["errors"].append(describe(exc))
    return findings


def confine(config: dict, source: str) -> None:
    set_limit(resource.RLIMIT_CORE, 0)
    set_limit(resource.RLIMIT_FSIZE, config["max_file_bytes"])
    set_limit(resource.RLIMIT_AS, config["memory_bytes"])
    set_limit(resource.RLIMIT_NPROC, config["max_processes"])
    # The soft limit sends SIGXCPU, which kills; the hard one a second later sends SIGKILL.
    set_limit(resource.RLIMIT_CPU, config["cpu_s"], config["cpu_s"] + 1)
    namespaces = (CLONE_NEWNET if config["network_namespace"] else 0) | (
        CLONE_NEWPID if config["pid_namespace"] else 0
    )
    if namespaces:
        enter_namespaces(namespaces)
    if config["pid_namespace"]:
        continue_below_an_init_of_its_own()
    if config["private_tmp"]:
        enter_private_tmp()
    imported = standard_modules_imported_by(source)
    lazily_imported = [name for module in imported for name in LAZY_IMPORTS.get(module, ())]
    preload(imported + lazily_imported + list(DISABLED))
    if config["drop_to"]:
        drop_privileges(*config["drop_to"])


def set_limit(which: int, soft: int, hard: int | None = None) -> None:
    """Lower a limit; a limit already below ours stays (only root could raise it)."""
    hard = soft if hard is None else hard
    _, current_hard = resource.getrlimit(which)
    if current_hard != resource.RLIM_INFINITY:
        soft, hard = min(soft, current_hard), min(hard, current_hard)
    resource.setrlimit(which, (soft, hard))


def enter_namespaces(flags: int) -> None:
    """Network and PID namespaces; a PID namespace holds the children forked after this."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if not hasattr(libc, "unshare"):
        raise OSError("this system has no unshare() (namespaces are Linux's)")
    # An ordinary user may create these only inside a user namespace of its own.
    if os.geteuid() != 0:
        flags |= CLONE_NEWUSER
    if libc.unshare(flags) != 0:
        errno = ctypes.get_errno()
        names = [
            name
            for name, bit in (("CLONE_NEWNET", CLONE_NEWNET), ("CLONE_NEWPID", CLONE_NEWPID))
            if flags & bit
        ]
        raise OSError(errno, f"unshare({' | '.join(names)}): {os.strerror(errno)}")


def in_a_child(step) -> None:
    """Run a probe step in a child process, so that the namespaces it enters do not change what
    the next step finds (a user namespace without a uid map may not create another)."""
    read_fd, write_fd = os.pipe()
    child = os.fork()
    if child == 0:
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
        raise OSError(error or "the probe step failed")


def probe_pid_namespace() -> None:
    enter_namespaces(CLONE_NEWPID)
    first = os.fork()
    if first == 0:
        os._exit(0 if os.getpid() == 1 else 1)
    if os.waitstatus_to_exitcode(os.waitpid(first, 0)[1]) != 0:
        raise OSError("the first process in a new PID namespace is not its process 1")


def continue_below_an_init_of_its_own() -> None:
    """Fork twice and return in the grandchild, process 2 of the new PID namespace.

    This process waits outside the namespace, and the child, the namespace's init, waits for the
    grandchild; each exits as the one it waited for. The program does not run as init because
    init ignores signals that have no handler, the CPU limit's SIGXCPU among them.
    """
    init = os.fork()
    if init:
        exit_as(os.waitstatus_to_exitcode(os.waitpid(init, 0)[1]))
    program = os.fork()
    if program:
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


def enter_private_tmp() -> None:
    """A mount namespace of our own, with fresh tmpfs over the shared writable directories.

    The mounts vanish with the last process in the namespace, so nothing written there outlives
    the program. Only root may do this (outside a user namespace).
    """
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if not hasattr(libc, "unshare"):
        raise OSError("this system has no unshare() (namespaces are Linux's)")

    def check(status: int, what: str) -> None:
        if status != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"{what}: {os.strerror(errno)}")

    check(libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    # Private propagation first, or the mounts below would appear in the host's namespace too.
    check(libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None), "making / private")
    for directory in SHARED_WRITABLE_DIRS:
        if os.path.isdir(directory):
            flags = MS_NOSUID | MS_NODEV
            status = libc.mount(b"tmpfs", directory.encode(), b"tmpfs", flags, PRIVATE_TMP_OPTIONS)
            check(status, f"mounting a private tmpfs on {directory}")
    os.chdir("/tmp")
    os.environ.update(HOME="/tmp", TMPDIR="/tmp")  # the harness's directory is hidden under the mount


def standard_modules_imported_by(source: str) -> list[str]:
    try:
        tree = ast.parse(source)
    except Exception:  # a syntax error, a null byte, too deep a nesting: running it reports the error
        return []
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            # `from package import name` may name a submodule
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    allowed = sys.stdlib_module_names - IMPORT_HAS_EFFECTS
    return sorted(name for name in names if name.partition(".")[0] in allowed)


def preload(module_names: list[str]) -> None:
    import importlib

    for name in module_names:
        try:
            importlib.import_module(name)
        except Exception:  # not a module, or broken: the program meets the same error itself
            continue


def drop_privileges(uid: int, gid: int) -> None:
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
    if os.getuid() != uid or os.geteuid() != uid or os.getgid() != gid:
        raise OSError(f"still uid {os.getuid()}/{os.geteuid()}, gid {os.getgid()} after dropping privileges")


def disable_destructive_functions() -> None:
    for module_name, function_names in DISABLED.items():
        module = sys.modules.get(module_name)
        if module is None:
            continue
        for name in function_names:
            if hasattr(module, name):
                setattr(module, name, refusal(f"{module_name}.{name}"))


def refusal(qualified_name: str):
    def refuse(*args, **kwargs):
        raise PermissionError(f"{qualified_name} is disabled in the sandbox")

    return refuse


def describe(exc: BaseException) -> str:
    try:
        text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    except Exception:  # an exception whose __str__ fails still names its type
        text = type(exc).__name__
    return text[:ERROR_CHARS]


if __name__ == "__main__":
    main()
