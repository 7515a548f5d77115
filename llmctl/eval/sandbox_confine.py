"""Confining a sandboxed program (sandbox_child.py's docstring gives the steps and why): namespaces,
the private root, resource limits, dropping privileges, and the tripwire over destructive
functions. Loaded beside sandbox_child.py by the child processes; imports only the standard library.
"""

from __future__ import annotations

import ctypes
import os
import resource
import signal
import sys

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


def load_libc():

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
