"""The sandbox is a security boundary: these tests run hostile programs in real processes.

Each hostile program must fail, change nothing outside its sandbox, leave no process behind,
and finish in bounded time. Limits are kept small (timeouts of a second or two, 256 MiB,
8 processes) so that a fork bomb stays harmless on a 2-core machine.
"""

from __future__ import annotations

import ast
import errno
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from llmctl.eval.sandbox import (
    CHILD_SCRIPT,
    FAILED,
    PASSED,
    TIMED_OUT,
    SandboxLimits,
    run_program,
    sandbox_profile,
)

LIMITS = SandboxLimits(timeout_s=2.0, memory_bytes=256 << 20, max_processes=8)
SHORT_LIMITS = SandboxLimits(timeout_s=1.0, memory_bytes=256 << 20, max_processes=8)
PROFILE = sandbox_profile()
needs_nobody = pytest.mark.skipif(
    PROFILE.user != "nobody", reason="file and signal isolation need llmctl to run as root"
)
needs_private_filesystem = pytest.mark.skipif(
    PROFILE.filesystem != "private",
    reason="no mount namespace here: programs see the host's filesystem, its world-writable "
    "directories, Unix sockets and /proc (the profile says filesystem 'host')",
)


def sandbox_processes() -> set[int]:
    """Live processes running the sandbox's child script (a zombie's cmdline is empty), but for
    this process's idle servers: its own children, which outlive a program by design."""
    marker = str(CHILD_SCRIPT).encode()
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker in (entry / "cmdline").read_bytes() and parent_of(entry) != os.getpid():
                    found.add(int(entry.name))
            except OSError:  # it exited while we looked
                continue
    return found


def parent_of(process: Path) -> int:
    return int((process / "stat").read_text().rpartition(")")[2].split()[1])


def sandbox_dirs() -> set[str]:
    return {name for name in os.listdir(tempfile.gettempdir()) if name.startswith("llmctl-sandbox-")}


@pytest.fixture(autouse=True)
def nothing_left_behind():
    """After each test: no sandbox process alive, no sandbox directory left."""
    processes_before, dirs_before = sandbox_processes(), sandbox_dirs()
    yield
    deadline = time.monotonic() + 2.0  # SIGKILLed processes need a moment to finish exiting
    while (leftovers := sandbox_processes() - processes_before) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not leftovers, f"sandbox processes left behind: {sorted(leftovers)}"
    assert sandbox_dirs() <= dirs_before


def run(source: str, limits: SandboxLimits = LIMITS):
    started = time.monotonic()
    result = run_program(textwrap.dedent(source), limits)
    elapsed = time.monotonic() - started
    assert elapsed < limits.timeout_s + 3, f"took {elapsed:.1f} s"
    return result


def test_profile_reports_isolation():
    assert PROFILE.network_isolation in ("namespace", "best-effort")
    assert PROFILE.process_isolation in ("namespace", "process-group")
    if os.geteuid() == 0:
        assert PROFILE.user == "nobody" and PROFILE.drop_to is not None


def test_a_program_that_finishes_passes_and_one_that_raises_fails():
    assert run("assert sum([1, 2]) == 3").status == PASSED
    failed = run("assert 1 == 2, 'wrong answer'")
    assert failed.status == FAILED and failed.detail == "AssertionError: wrong answer"
    assert run("def broken(:\n    pass").status == FAILED


def test_the_program_may_use_the_standard_library_and_its_own_directory():
    result = run("""
        import collections, hashlib, math, re
        import random, statistics  # random registers fork handlers as it loads, which must work
        assert collections.Counter("abca").most_common(1) == [("a", 2)]
        assert statistics.mean([random.choice([2]), 4]) == 3
        assert hashlib.md5(b"x").hexdigest().startswith("9dd4")
        with open("scratch.txt", "w") as file:
            file.write("kept only while the program runs")
        assert open("scratch.txt").read().startswith("kept")
    """)
    assert result.status == PASSED, result.detail


@pytest.mark.parametrize("source", ["x = 1\x00", "text = '\ud800'", "x = " + "(" * 500 + ")" * 500])
def test_a_program_that_cannot_be_compiled_fails_without_stopping_the_harness(source):
    assert run_program(source, LIMITS).status == FAILED


@pytest.mark.parametrize("exit_call", ["import sys; sys.exit(0)", "import os; os._exit(0)", "exit()"])
def test_exiting_early_is_not_a_pass(exit_call):
    assert run(exit_call).status == FAILED


def test_an_endless_loop_times_out():
    result = run("while True:\n    pass", SHORT_LIMITS)
    assert result.status == TIMED_OUT
    assert result.seconds < 2.5


def test_endless_output_times_out_without_blocking_the_harness():
    result = run("while True:\n    print('x' * 10000)", SHORT_LIMITS)
    assert result.status == TIMED_OUT


@pytest.mark.parametrize(
    "allocation",
    [
        "block = bytearray(8 << 30)",
        "blocks = []\nwhile True:\n    blocks.append(bytearray(16 << 20))",
    ],
)
def test_allocating_more_than_the_memory_limit_fails(allocation):
    result = run(allocation)
    assert result.status == FAILED and "MemoryError" in result.detail


def test_os_fork_is_disabled():
    result = run("import os\nwhile True:\n    os.fork()")
    assert result.status == FAILED and "os.fork is disabled" in result.detail


def test_a_fork_bomb_around_the_guard_is_bounded_by_the_process_limit():
    # ctypes reaches libc's fork directly: only RLIMIT_NPROC (as nobody, or as an ordinary
    # user) stops it, and killing the process group at the deadline ends every copy.
    result = run(
        """
        import ctypes
        libc = ctypes.CDLL(None)
        while True:
            libc.fork()
    """,
        SHORT_LIMITS,
    )
    assert result.status in (FAILED, TIMED_OUT)


@pytest.mark.parametrize(
    "spawn",
    [
        "import subprocess; subprocess.run(['true'])",
        "import os; os.system('true')",
        "import posix; posix.system('true')",
        "import os; os.execv('/bin/true', ['true'])",
    ],
)
def test_starting_other_programs_is_disabled(spawn):
    result = run(spawn)
    assert result.status == FAILED and "disabled in the sandbox" in result.detail


@pytest.fixture
def outside_dir():
    """A root-style directory the sandbox can see but must not change: 0755 dir, 0644 sentinel."""
    directory = Path(tempfile.mkdtemp(prefix=".sandbox-outside-", dir=Path(__file__).parent))
    directory.chmod(0o755)
    sentinel = directory / "sentinel.txt"
    sentinel.write_text("untouched")
    sentinel.chmod(0o644)
    yield directory
    shutil.rmtree(directory)


def assert_untouched(directory: Path) -> None:
    assert sorted(path.name for path in directory.iterdir()) == ["sentinel.txt"]
    sentinel = directory / "sentinel.txt"
    assert sentinel.read_text() == "untouched"
    assert stat.S_IMODE(sentinel.stat().st_mode) == 0o644


@pytest.mark.parametrize(
    "attack",
    [
        "import os; os.remove({sentinel!r})",
        "import shutil; shutil.rmtree({directory!r})",
        "open({sentinel!r}, 'w').write('overwritten')",
        "open({directory!r} + '/new.txt', 'w').write('planted')",
        "import os; os.rename({sentinel!r}, {sentinel!r} + '.moved')",
        "import ctypes; assert ctypes.CDLL(None).unlink({sentinel!r}.encode()) == 0",
        "import ctypes; assert ctypes.CDLL(None).chmod({sentinel!r}.encode(), 0o666) == 0",
    ],
)
@needs_nobody
def test_files_outside_the_working_directory_survive(attack, outside_dir):
    sentinel = outside_dir / "sentinel.txt"
    result = run(attack.format(sentinel=str(sentinel), directory=str(outside_dir)))
    assert result.status == FAILED
    assert_untouched(outside_dir)


def world_writable_directories() -> list[str]:
    """The host's directories anyone may write to: the usual ones, and any under /run, /var, /dev."""
    found = {"/tmp", "/var/tmp", "/dev/shm", "/run/lock", "/var/lock", "/dev/mqueue"}
    for top in ("/run", "/var", "/dev"):
        for directory, subdirectories, _ in os.walk(top):
            if directory.count("/") > 3:
                subdirectories.clear()
            elif not os.path.islink(directory) and os.stat(directory).st_mode & stat.S_IWOTH:
                found.add(directory)
    return sorted(path for path in found if os.path.isdir(path) and not os.path.islink(path))


@needs_private_filesystem
def test_nothing_written_to_world_writable_host_directories_outlives_the_program():
    name = f"llmctl-left-behind-{os.getpid()}"
    directories = world_writable_directories()
    result = run(f"""
        import os
        written = []
        for directory in {directories!r}:
            try:
                with open(os.path.join(directory, {name!r}), "w") as file:
                    file.write("left behind?")
                os.mkdir(os.path.join(directory, {name!r} + ".d"))
                written.append(directory)
            except OSError:
                pass
        assert False, f"wrote to {{written}}"
    """)
    assert result.status == FAILED and "wrote to" in result.detail
    assert "/run/lock" not in result.detail and "/var/tmp" not in result.detail  # not even inside
    for directory in directories:
        assert not os.path.lexists(os.path.join(directory, name)), directory
        assert not os.path.lexists(os.path.join(directory, name + ".d")), directory


@needs_private_filesystem
def test_the_one_writable_place_is_capped_in_files_and_bytes():
    limits = SandboxLimits(
        timeout_s=3.0, memory_bytes=256 << 20, max_processes=8, scratch_bytes=1 << 20, scratch_files=64
    )
    result = run(
        """
        import errno, os
        assert os.getcwd() == "/tmp" and os.environ["HOME"] == os.environ["TMPDIR"] == "/tmp"
        refused = []
        for place in ("/", "/usr", "/dev", "/proc", os.path.dirname(os.__file__)):
            try:
                open(os.path.join(place, "planted"), "w")
            except OSError as error:
                refused.append(error.errno in (errno.EROFS, errno.EACCES, errno.ENOENT))
        files = 0
        try:
            while files < 10_000:
                open(f"f{files}", "w").close()
                files += 1
        except OSError as error:
            files_errno = error.errno
        written = 0
        try:
            with open("big", "wb", buffering=0) as file:
                while written < 64 << 20:
                    written += file.write(b"x" * 65536)
        except OSError as error:
            bytes_errno = error.errno
        assert False, (all(refused) and len(refused), files, files_errno, written, bytes_errno)
    """,
        limits,
    )
    assert result.status == FAILED
    refused_all, files, files_errno, written, bytes_errno = ast.literal_eval(result.detail.partition(": ")[2])
    assert refused_all == 5
    assert files < 64 and files_errno == errno.ENOSPC
    assert written <= 1 << 20 and bytes_errno == errno.ENOSPC


@pytest.fixture
def host_unix_socket():
    """A Unix socket anyone on the host may connect to, in a directory anyone may enter."""
    directory = Path(tempfile.mkdtemp(prefix="sandbox-socket-"))
    directory.chmod(0o777)
    path = directory / "service.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(str(path))
        path.chmod(0o777)
        server.listen()
        server.settimeout(0.2)
        yield str(path), server
    shutil.rmtree(directory)


@needs_private_filesystem
def test_host_unix_sockets_are_out_of_reach(host_unix_socket):
    path, server = host_unix_socket
    abstract = f"\0llmctl-sandbox-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as abstract_server:
        abstract_server.bind(abstract)
        abstract_server.listen()
        abstract_server.settimeout(0.2)
        result = run(f"""
            import socket
            errors = []
            for address in ({path!r}, {abstract!r}):
                try:
                    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
                        client.connect(address)
                        client.sendall(b"escaped")
                    errors.append("connected")
                except OSError as error:
                    errors.append(type(error).__name__)
            assert False, errors
        """)
        assert result.status == FAILED
        named, nameless = ast.literal_eval(result.detail.partition(": ")[2])
        assert named == "FileNotFoundError"  # no such path in its root
        with pytest.raises(TimeoutError):
            server.accept()
        if PROFILE.network_isolation == "namespace":  # abstract sockets belong to the network namespace
            assert nameless == "ConnectionRefusedError"
            with pytest.raises(TimeoutError):
                abstract_server.accept()


@pytest.fixture
def process_with_a_secret():
    """A host process with a secret on its command line, as a served API key might be."""
    secret = f"sk-llmctl-test-{os.getpid()}-{time.monotonic_ns()}"
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", secret])
    yield secret
    process.kill()
    process.wait()


@needs_private_filesystem
def test_other_processes_command_lines_are_out_of_sight(process_with_a_secret):
    result = run(f"""
        import os
        seen, found = [], False
        if os.path.isdir("/proc"):
            for entry in os.listdir("/proc"):
                if entry.isdigit():
                    seen.append(int(entry))
                    try:
                        with open(f"/proc/{{entry}}/cmdline", "rb") as file:
                            found = found or {process_with_a_secret.encode()!r} in file.read()
                    except OSError:
                        pass
        assert False, (found, sorted(seen))
    """)
    found, seen = ast.literal_eval(result.detail.partition(": ")[2])
    assert found is False
    if PROFILE.own_proc:  # its own /proc: the namespace's init, and the program
        assert seen == [1, 2]
    else:
        assert seen == []


@needs_private_filesystem
def test_the_program_imports_as_its_own_user_what_it_names():
    """No module the program names is loaded for it beforehand (as root, say): it imports each
    itself, from the read-only standard library of its root, as the sandbox's user."""
    result = run("""
        import sys
        loaded_before = set(sys.modules)
        import colorsys, fractions, statistics, os
        from email import message
        names = {"colorsys", "fractions", "statistics", "email", "email.message"}
        read_only = all(os.statvfs(sys.modules[name].__file__).f_flag & os.ST_RDONLY for name in names)
        assert False, (sorted(names & loaded_before), os.getuid(), read_only)
    """)
    preloaded, uid, read_only = ast.literal_eval(result.detail.partition(": ")[2])
    assert preloaded == [] and read_only
    assert uid == (PROFILE.drop_to[0] if PROFILE.drop_to else os.getuid())


@needs_private_filesystem
def test_shared_memory_does_not_outlive_the_program():
    key = 0x11C7_0000 + os.getpid() % 0xFFFF
    result = run(f"""
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        segment = libc.shmget({key}, 4096, 0o1000 | 0o666)  # IPC_CREAT
        assert False, segment
    """)
    assert int(result.detail.partition(": ")[2]) >= 0  # it made one, in its own IPC namespace
    with open("/proc/sysvipc/shm") as segments:
        keys = {int(line.split()[0]) for line in segments.readlines()[1:]}
    assert key not in keys


@needs_private_filesystem
def test_no_set_user_id_program_could_raise_its_privileges():
    result = run("""
        import ctypes, os
        no_new_privs = ctypes.CDLL(None).prctl(39, 0, 0, 0, 0)  # PR_GET_NO_NEW_PRIVS
        flags = os.statvfs("/usr/bin").f_flag
        assert False, (no_new_privs, bool(flags & os.ST_NOSUID), bool(flags & os.ST_RDONLY))
    """)
    assert ast.literal_eval(result.detail.partition(": ")[2]) == (1, True, True)


def test_the_profile_says_what_is_lost_and_why():
    assert PROFILE.private_tmp == (PROFILE.filesystem == "private")
    assert PROFILE.filesystem in ("private", "host")
    if PROFILE.filesystem == "host":
        assert not PROFILE.own_proc
    full = PROFILE.network_isolation == PROFILE.process_isolation == "namespace" and PROFILE.private_tmp
    assert (PROFILE.limitations() == []) == full


@pytest.mark.skipif(PROFILE.network_isolation != "namespace", reason="no network namespace on this machine")
def test_network_connections_do_not_leave_the_sandbox():
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        result = run(f"""
            import socket
            with socket.create_connection(("127.0.0.1", {port}), timeout=1) as connection:
                connection.sendall(b"escaped")
        """)
        assert result.status == FAILED, result.detail
        server.settimeout(0.2)
        with pytest.raises(TimeoutError):
            server.accept()


HARNESS = """
import json, sys
from llmctl.eval.sandbox import SandboxLimits, run_program
result = run_program(sys.argv[1], SandboxLimits(timeout_s=2.0, memory_bytes=256 << 20, max_processes=8))
print(json.dumps({"status": result.status, "detail": result.detail}))
"""

KILL_PARENT = [
    "import os, signal; os.kill(os.getppid(), signal.SIGKILL)",
    "import os, signal; os.killpg(os.getpgid(os.getppid()), signal.SIGKILL)",
]
KILL_PARENT_AROUND_THE_GUARD = [
    "import ctypes, os; assert ctypes.CDLL(None).kill(os.getppid(), 9) == 0",
    "import ctypes, os; assert ctypes.CDLL(None).kill(-os.getpgid(os.getppid()), 9) == 0",
]


@pytest.mark.parametrize(
    "attack",
    KILL_PARENT + [pytest.param(attack, marks=needs_nobody) for attack in KILL_PARENT_AROUND_THE_GUARD],
)
def test_the_harness_survives_a_program_that_kills_its_parent(attack):
    # The harness runs in a process (and session) of its own here, so that if it died we would see
    # it die, and a group kill that got through would not reach pytest.
    done = subprocess.run(
        [sys.executable, "-c", HARNESS, attack],
        capture_output=True,
        text=True,
        timeout=30,
        start_new_session=True,
    )
    assert done.returncode == 0, done.stderr
    assert '"status": "failed"' in done.stdout


def test_a_program_that_kills_its_own_group_fails():
    result = run("import ctypes; ctypes.CDLL(None).kill(0, 9)")
    assert result.status == FAILED and "SIGKILL" in result.detail


# fork and setsid through ctypes take a process out of the group that the harness kills
ESCAPE = """
import ctypes, os, time
libc = ctypes.CDLL(None)
detached_r, detached_w = os.pipe()
child = libc.fork()
if child == 0:
    if libc.setsid() > 0:
        os.write(detached_w, b"x")
        time.sleep(30)
    libc._exit(0)
os.close(detached_w)
assert child > 0 and os.read(detached_r, 1) == b"x"  # it has left the group
"""


@pytest.mark.skipif(
    PROFILE.process_isolation != "namespace",
    reason="no PID namespace here: a process that leaves the group may outlive the program",
)
def test_a_process_that_leaves_the_group_does_not_outlive_the_program():
    """The PID namespace the program runs in ends such a process with the program."""
    before = sandbox_processes()
    assert run(ESCAPE).status == PASSED
    assert not sandbox_processes() - before  # gone by the time the result is in


def test_a_sandbox_server_that_died_between_programs_is_replaced():
    assert run("pass").status == PASSED
    servers = [
        int(entry.name)
        for entry in Path("/proc").iterdir()
        if entry.name.isdigit()
        and parent_of(entry) == os.getpid()
        and str(CHILD_SCRIPT).encode() in (entry / "cmdline").read_bytes()
    ]
    assert servers  # idle, each waiting for the next program of a harness thread
    for pid in servers:
        os.kill(pid, signal.SIGKILL)
        os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)  # dead, and left for its Popen to reap
    assert run("pass").status == PASSED
    assert run("assert False").status == FAILED


def test_programs_run_in_parallel_threads_stay_apart():
    from concurrent.futures import ThreadPoolExecutor

    programs = [f"assert {i} * 2 == {i * 2}" for i in range(6)] + ["assert False"] * 2
    with ThreadPoolExecutor(max_workers=2) as pool:
        statuses = list(pool.map(lambda source: run_program(source, LIMITS).status, programs))
    assert statuses == [PASSED] * 6 + [FAILED] * 2


AS_ORDINARY_USER = """
import json, sys
from llmctl.eval.sandbox import SandboxLimits, TestProgram, run_program, run_tests, sandbox_profile
programs, tested = json.loads(sys.argv[1])
limits = SandboxLimits(timeout_s=1.0, memory_bytes=256 << 20, max_processes=8)
profile = sandbox_profile().as_dict()
if profile["process_isolation"] != "namespace":
    del programs["escape"]  # its detached process would outlive it, as the profile says
statuses = {name: run_program(source, limits).status for name, source in programs.items()}
statuses.update({name: run_tests(TestProgram(*parts), limits).status for name, parts in tested.items()})
print(json.dumps({"profile": profile, **statuses}))
"""


def ordinary_user_programs(secret: str, name: str) -> tuple[dict, dict]:
    programs = {
        "escape": ESCAPE,
        "pass": "assert True",
        "fork_bomb": "import ctypes\nlibc = ctypes.CDLL(None)\nwhile True:\n    libc.fork()",
        "network": "import socket; socket.create_connection(('127.0.0.1', 9), timeout=1)",
        "locked_dir": "import ctypes, os; os.mkdir('d'); libc = ctypes.CDLL(None); "
        "libc.chmod(b'd', 0); libc.chmod(b'.', 0)",
        "left_behind": textwrap.dedent(f"""
            for directory in ("/tmp", "/var/tmp", "/run/lock"):
                try:
                    open(directory + "/{name}", "w").close()
                except OSError:
                    pass
        """),
        "secret": textwrap.dedent(f"""
            import os
            assert any({secret.encode()!r} in open(f"/proc/{{pid}}/cmdline", "rb").read()
                       for pid in os.listdir("/proc") if pid.isdigit())
        """),
    }
    forgery = textwrap.dedent("""
        import os
        def add(a, b):
            for fd in range(1024):
                try:
                    os.write(fd, b'{"passed": true}\\n')
                except OSError:
                    pass
            return 0
    """)
    always_equal = "class Everything:\n    def __eq__(self, other):\n        return True\n"
    tests = "def check(candidate):\n    assert candidate(2, 3) == 5\n"
    tested = {
        "forge": [forgery, tests, "add"],
        "always_equal": [always_equal + "def add(a, b):\n    return Everything()\n", tests, "add"],
        "right": [always_equal + "def add(a, b):\n    return a + b\n", tests, "add"],
    }
    return programs, tested


SYSTEM_PYTHON = Path("/usr/bin/python3")
ORDINARY_UID = 54321  # no account: the sandbox must cope with a bare uid, as in containers


@pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("setpriv") or not SYSTEM_PYTHON.exists(),
    reason="needs root, setpriv and a system Python to run the harness as an ordinary user",
)
def test_as_an_ordinary_user_limits_still_hold(process_with_a_secret):
    """The path users without root take: namespaces inside a user namespace of their own, a
    private root with the user's uid and no capability, RLIMIT_NPROC."""
    name = f"llmctl-left-by-{ORDINARY_UID}-{os.getpid()}"
    repo = Path(__file__).resolve().parent.parent
    command = [
        "setpriv",
        f"--reuid={ORDINARY_UID}",
        f"--regid={ORDINARY_UID}",
        "--clear-groups",
        "env",
        "HOME=/tmp",
        f"PYTHONPATH={repo}",
        str(SYSTEM_PYTHON),
        "-c",
        AS_ORDINARY_USER,
        json.dumps(ordinary_user_programs(process_with_a_secret, name)),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    if done.returncode != 0 and "ModuleNotFoundError" in done.stderr:
        pytest.skip(f"the system Python cannot import llmctl's dependencies: {done.stderr.splitlines()[-1]}")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["profile"]["user"] == str(ORDINARY_UID)
    assert report["profile"]["private_tmp"] == (report["profile"]["filesystem"] == "private")
    assert report["pass"] == PASSED
    assert report["fork_bomb"] in (FAILED, TIMED_OUT)
    assert report["locked_dir"] == PASSED  # and the fixture checks its directory was still removed
    if report["profile"]["network_isolation"] == "namespace":
        assert report["network"] == FAILED
    if report["profile"]["process_isolation"] == "namespace":
        assert report["escape"] == PASSED  # the fixture checks that its detached process is gone too
    assert report["forge"] == report["always_equal"] == FAILED and report["right"] == PASSED
    if report["profile"]["filesystem"] == "private":
        assert report["left_behind"] == PASSED  # into its own /tmp; the others do not exist there
        assert report["secret"] == FAILED  # no host /proc to find it in
    for directory in ("/tmp", "/var/tmp", "/run/lock"):
        assert not os.path.lexists(f"{directory}/{name}")


UNSHARE_SYSCALL = {"x86_64": 272, "aarch64": 97}
WITHOUT_NAMESPACES = """
import ctypes, json, os, sys
# A seccomp filter that fails unshare() with EPERM, in this process and all it starts: a kernel
# that refuses namespaces, as some containers do.
ld_nr, jeq, ret = 0x20, 0x15, 0x06
program = [(ld_nr, 0, 0, 0), (jeq, 0, 1, UNSHARE), (ret, 0, 0, 0x00050000 | 1), (ret, 0, 0, 0x7FFF0000)]
class SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte),
                ("k", ctypes.c_uint)]
class SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(SockFilter))]
filters = (SockFilter * len(program))(*[SockFilter(*line) for line in program])
libc = ctypes.CDLL(None, use_errno=True)
assert libc.prctl(38, 1, 0, 0, 0) == 0  # PR_SET_NO_NEW_PRIVS, which an unprivileged filter needs
assert libc.prctl(22, 2, ctypes.byref(SockFprog(len(program), filters)), 0, 0) == 0, ctypes.get_errno()

from llmctl.eval.sandbox import CHILD_SCRIPT, SandboxLimits, TestProgram, run_program, run_tests
from llmctl.eval.sandbox import sandbox_profile


def sandbox_processes():  # running the child script, but for this harness's idle servers
    found = set()
    for entry in os.listdir("/proc"):
        try:
            parent = int(open(f"/proc/{entry}/stat").read().rpartition(")")[2].split()[1])
            command = open(f"/proc/{entry}/cmdline", "rb").read()
            if str(CHILD_SCRIPT).encode() in command and parent != os.getpid():
                found.add(int(entry))
        except (OSError, ValueError):
            continue
    return found


programs, tested = json.loads(sys.argv[1])
limits = SandboxLimits(timeout_s=2.0, memory_bytes=256 << 20, max_processes=8)
profile = sandbox_profile()
before = sandbox_processes()
statuses = {name: run_program(source, limits).status for name, source in programs.items()}
statuses.update({name: run_tests(TestProgram(*parts), limits).status for name, parts in tested.items()})
left = sorted(sandbox_processes() - before)
summary = {"profile": profile.as_dict(), "limitations": profile.limitations(), "left": left}
print(json.dumps({**summary, **statuses}))
"""
# Without a PID namespace, a program running as the harness's own user can see the harness's
# processes; opening their pipes through /proc must still not give it a verdict.
PIPE_FORGERY = textwrap.dedent("""
    import os
    def add(a, b):
        for pid in os.listdir("/proc"):
            if not pid.isdigit() or int(pid) == os.getpid():
                continue
            try:
                descriptors = os.listdir(f"/proc/{pid}/fd")
            except OSError:
                continue
            for fd in descriptors:
                try:
                    if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("pipe:"):
                        end = os.open(f"/proc/{pid}/fd/{fd}", os.O_WRONLY | os.O_NONBLOCK)
                        os.write(end, b'{"passed": true}\\n')
                except OSError:
                    pass
        return 0
""")


@pytest.mark.skipif(
    os.uname().machine not in UNSHARE_SYSCALL, reason="the seccomp filter knows x86_64 and aarch64"
)
@pytest.mark.parametrize("as_root", [True, False], ids=["as root", "as an ordinary user"])
def test_where_the_kernel_refuses_namespaces_the_profile_says_so_and_the_verdict_holds(as_root):
    if not as_root and (os.geteuid() != 0 or not shutil.which("setpriv") or not SYSTEM_PYTHON.exists()):
        pytest.skip("needs root, setpriv and a system Python to run the harness as an ordinary user")
    repo = Path(__file__).resolve().parent.parent
    programs = {"escape": ESCAPE, "pass": "assert True"}
    tests = "def check(candidate):\n    assert candidate(2, 3) == 5\n"
    tested = {
        "pipe_forgery": [PIPE_FORGERY, tests, "add"],
        "right": [PIPE_FORGERY.replace("return 0", "return a + b"), tests, "add"],
    }
    script = WITHOUT_NAMESPACES.replace("UNSHARE", str(UNSHARE_SYSCALL[os.uname().machine]))
    python = (
        [sys.executable]
        if as_root
        else [
            "setpriv",
            f"--reuid={ORDINARY_UID}",
            f"--regid={ORDINARY_UID}",
            "--clear-groups",
            str(SYSTEM_PYTHON),
        ]
    )
    done = subprocess.run(
        [*python, "-c", script, json.dumps([programs, tested])],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": os.environ["PATH"], "HOME": "/tmp", "PYTHONPATH": str(repo)},
    )
    if done.returncode != 0 and "ModuleNotFoundError" in done.stderr:
        pytest.skip(f"the system Python cannot import llmctl's dependencies: {done.stderr.splitlines()[-1]}")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["profile"]["network_isolation"] == "best-effort"
    assert report["profile"]["process_isolation"] == "process-group"
    assert report["profile"]["filesystem"] == "host" and not report["profile"]["private_tmp"]
    lost = report["limitations"]
    assert any(
        line.startswith("no private filesystem") and "Operation not permitted" in line for line in lost
    )
    assert any(line.startswith("no PID namespace") and "unshare(" in line for line in lost)
    assert report["profile"]["user"] == ("nobody" if as_root else str(ORDINARY_UID))
    assert report["pass"] == PASSED and report["right"] == PASSED
    assert report["pipe_forgery"] == FAILED
    # the detached process was killed once its program's end orphaned it
    assert report["escape"] == PASSED and report["left"] == []
