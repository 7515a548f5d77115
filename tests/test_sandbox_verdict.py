"""The verdict cannot be forged: programs that fail their tests and try to report a pass anyway.

Each program here answers its test wrongly and then attacks the scoring the way a program in one
process with its tests could: writing a pass to every descriptor, calling the reporter through
its frames, patching or tracing `check` away, returning objects equal to everything. Each must
fail. The controls (an honest right answer, an exception the test expects) must pass, so a
sandbox that failed everything would not pass these tests. Also: what the wire carries and
refuses (sandbox_wire, a pure module, tested directly), and that the program never holds the
tests, not even in its memory.
"""

from __future__ import annotations

import collections
import enum
import math
import textwrap

import pytest

from llmctl.eval import sandbox_wire as wire
from llmctl.eval.sandbox import FAILED, PASSED, TIMED_OUT, SandboxLimits, TestProgram, run_tests

LIMITS = SandboxLimits(timeout_s=3.0, memory_bytes=256 << 20, max_processes=8)
TESTS = "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"


def score(candidate: str, tests: str = TESTS, entry_point: str = "add", limits: SandboxLimits = LIMITS):
    return run_tests(TestProgram(textwrap.dedent(candidate), textwrap.dedent(tests), entry_point), limits)


def test_a_right_answer_passes_and_a_wrong_one_fails():
    assert score("def add(a, b):\n    return a + b\n").status == PASSED
    wrong = score("def add(a, b):\n    return a - b\n")
    assert wrong.status == FAILED and wrong.detail == "AssertionError"


FORGERIES = {
    "pass written to every descriptor": """
        import json, os
        LINE = (json.dumps({"passed": True}) + "\\n").encode()
        FRAME = len(LINE).to_bytes(8, "big") + LINE
        def forge():
            for fd in range(1024):
                for data in (LINE, FRAME, b"\\x00" * 7 + b"\\x01" + b"[0,5]"):
                    try:
                        os.write(fd, data)
                    except OSError:
                        pass
        forge()
        def add(a, b):
            forge()
            return 0
    """,
    "reporter called through the frames": """
        import sys
        def forge():
            frame = sys._getframe()
            while frame is not None:
                for scope in (frame.f_locals, frame.f_globals):
                    for name, value in list(scope.items()):
                        if callable(value) and "report" in name:
                            try:
                                value({"passed": True})
                            except Exception:
                                pass
                frame = frame.f_back
        forge()
        def add(a, b):
            forge()
            return 0
    """,
    "check patched and traced away": """
        import builtins, gc, sys
        def quiet(*args):
            return None
        def forge():
            sys.settrace(lambda frame, event, arg: None)
            sys.setprofile(lambda frame, event, arg: None)
            for obj in gc.get_objects():
                named = getattr(obj, "__name__", None) in ("check", "candidate", "report", "describe")
                if named and hasattr(obj, "__code__"):
                    try:
                        obj.__code__ = quiet.__code__
                    except (TypeError, ValueError):
                        pass
            builtins.AssertionError = type("AssertionError", (BaseException,), {})
            for module in list(sys.modules.values()):
                for name in ("check", "describe", "report"):
                    if hasattr(module, name):
                        setattr(module, name, quiet)
        forge()
        def add(a, b):
            forge()
            return 0
    """,
    "an object equal to everything": """
        class Everything:
            def __eq__(self, other):
                return True
            def __ne__(self, other):
                return False
            __hash__ = object.__hash__
        def add(a, b):
            return Everything()
    """,
    "an int equal to everything": """
        class Anything(int):
            def __eq__(self, other):
                return True
            __hash__ = int.__hash__
        def add(a, b):
            return Anything(0)
    """,
    "the encoder replaced": """
        import sys
        wire = sys.modules["sandbox_wire"]
        plain = wire.encode
        # its answers become an object of no known type; its other messages stay as they were
        def forged(value):
            return b'[0, {"eq": "always"}]' if len(value) == 2 and value[0] == 0 else plain(value)
        wire.encode = forged
        def add(a, b):
            return 0
    """,
    "an exit while the test runs": """
        import os
        def add(a, b):
            os._exit(0)
    """,
}


@pytest.mark.parametrize("forgery", FORGERIES.values(), ids=FORGERIES.keys())
def test_a_failing_program_cannot_forge_a_pass(forgery):
    result = score(forgery)
    assert result.status == FAILED, result


@pytest.mark.parametrize("name", ["reporter called through the frames", "check patched and traced away"])
def test_a_forgery_that_answers_right_passes(name):
    """A control: these forgeries leave their channel alone, and with the right sum instead of 0
    they pass, so they fail above for their wrong answer, not because the sandbox refuses them.
    (The others garble their own replies, and fail either way.)"""
    assert score(FORGERIES[name].replace("return 0", "return a + b")).status == PASSED


def test_an_answer_the_wire_refuses_fails_even_where_the_test_swallows_exceptions():
    tests = """
        def check(candidate):
            try:
                assert candidate(2, 3) == 5
            except Exception:
                pass
    """
    result = score(FORGERIES["an object equal to everything"], tests)
    assert result.status == FAILED
    assert (
        "add returned what cannot leave the sandbox: a Everything, which is not plain data" in result.detail
    )
    assert score("def add(a, b):\n    return a + b\n", tests).status == PASSED


def test_the_programs_exceptions_reach_the_test_as_their_builtin_bases():
    tests = """
        def check(candidate):
            try:
                candidate(1, 0)
            except ZeroDivisionError as error:
                assert "division by zero" in str(error)
            else:
                raise AssertionError("no exception")
            try:
                candidate(-1, 1)
            except ValueError as error:
                assert type(error).__name__ == "NegativeError" and str(error) == "negative"
    """
    candidate = """
        class NegativeError(ValueError):
            pass
        def add(a, b):
            if a < 0:
                raise NegativeError("negative")
            return a / b
    """
    assert score(candidate, tests).status == PASSED
    # SystemExit and KeyboardInterrupt end the test, which `except Exception` does not stop
    exits = score(
        "def add(a, b):\n    raise SystemExit(0)\n", tests.replace("ZeroDivisionError", "Exception")
    )
    assert exits.status == FAILED and exits.detail == "SystemExit: 0"


def test_a_loop_inside_one_call_times_out():
    result = score("def add(a, b):\n    while True:\n        pass\n", limits=SandboxLimits(timeout_s=1.0))
    assert result.status == TIMED_OUT and result.seconds < 2.5


@pytest.mark.parametrize(
    "reply, message",
    [
        ("'x' * (9 << 20)", "more than the 8388608 allowed"),
        ("functools.reduce(lambda inner, _: [inner], range(10000), [])", "nested more than 200 levels"),
    ],
)
def test_an_oversized_or_overdeep_reply_fails_the_test(reply, message):
    result = score(f"import functools\ndef add(a, b):\n    return {reply}\n")
    assert result.status == FAILED and message in result.detail


def test_a_raw_reply_too_deep_to_decode_fails_without_harm():
    """The program skips the encoder and writes the nesting itself, past what json decodes."""
    candidate = """
        import os
        def add(a, b):
            data = b"[0," + b"[" * 100000 + b"]" * 100000 + b"]"
            for fd in range(3, 64):  # its replies pipe among them, written raw
                try:
                    os.write(fd, len(data).to_bytes(8, "big") + data)
                except OSError:
                    pass
            return a + b
    """
    result = score(candidate)
    assert result.status == FAILED and "not plain data" in result.detail


def test_tests_may_call_helpers_the_prompt_defines_and_functions_the_completion_defines():
    # HumanEval/38's shape: the test encodes with the prompt's helper, the candidate decodes.
    prompt = "def shift(s):\n    return ''.join(chr(ord(c) + 1) for c in s)\n\ndef unshift(s):\n"
    completion = "    return ''.join(chr(ord(c) - 1) for c in s)\n\ndef double(x):\n    return 2 * x\n"
    tests = "def check(candidate):\n    assert candidate(shift('abc')) == 'abc'\n    assert double(4) == 8\n"
    assert run_tests(TestProgram(prompt + completion, prompt + "    pass\n" + tests, "unshift")).passed


MARKER = "zq-the-tests-alone-hold-this-9c41"


def memory_scan(candidate_extra: str = "") -> str:
    """A candidate that reads all its anonymous memory (heap, stack, arenas: wherever data read or
    received lands) for MARKER, with a pattern whose text is not MARKER itself (its last character
    in a class), so only a copy from elsewhere can match."""
    pattern = MARKER[:-1] + "[" + MARKER[-1] + "]"
    return (
        textwrap.dedent(f"""
        import ctypes, re
        PATTERN = re.compile({pattern.encode()!r})
        def find():
            with open("/proc/self/maps") as maps:
                regions = [line.split() for line in maps]
            for fields in regions:
                start, end = (int(part, 16) for part in fields[0].split("-"))
                anonymous = len(fields) == 5 or fields[5] in ("[heap]", "[stack]")
                if anonymous and fields[1].startswith("r"):
                    if PATTERN.search(ctypes.string_at(start, end - start)):
                        return True
            return False
        """)
        + candidate_extra
    )


def test_the_program_never_holds_the_tests():
    tests = f"def check(candidate):\n    expected = {MARKER!r}\n    assert candidate() is False\n"
    result = run_tests(TestProgram(memory_scan(), tests, "find"), LIMITS)
    if result.status == FAILED and "No such file" in result.detail:
        pytest.skip("no /proc in the sandbox here, so the program cannot map its own memory")
    assert result.status == PASSED, result.detail
    # the control: with the marker in its own source, the same scan finds it
    seeded = memory_scan(f"\nSEED = {MARKER!r}\n")
    assert run_tests(TestProgram(seeded, tests, "find"), LIMITS).status == FAILED


def test_no_later_program_finds_an_earlier_report_in_its_memory():
    """A failure message can hold a test's expected answer; the server that forks every checker of
    a harness thread never holds one, so the next program (on the same server) cannot find it."""
    expecting = f"def check(candidate):\n    assert candidate() == 1, {MARKER!r}\n"
    earlier = run_tests(TestProgram("def find():\n    return 0\n", expecting, "find"), LIMITS)
    assert earlier.status == FAILED and MARKER in earlier.detail
    later = run_tests(
        TestProgram(memory_scan(), "def check(candidate):\n    assert candidate() is False\n", "find")
    )
    assert later.status == PASSED, later.detail


# ---------------------------------------------------------------- the wire


Point = collections.namedtuple("Point", "x y")


class Colour(enum.IntEnum):
    RED = 1


PLAIN = [
    None,
    True,
    False,
    0,
    -7,
    1 << 200,
    -(1 << 70),
    1.5,
    -0.0,
    math.inf,
    complex(1, -2),
    "text",
    "\ud800 lone surrogate",
    b"\x00\xff",
    bytearray(b"ab"),
    [1, [2, [3]]],
    (1, (2,), ()),
    {"a": 1, (1, 2): [3], 4: None, frozenset({1}): "f"},
    {1, 2, (3, 4)},
    frozenset({"x"}),
    range(2, 10, 3),
]


@pytest.mark.parametrize("value", PLAIN, ids=[repr(value)[:30] for value in PLAIN])
def test_plain_values_cross_the_wire_as_themselves(value):
    back = wire.decode(wire.encode(value))
    assert back == value and type(back) is type(value)


def test_nan_iterators_and_subclasses_arrive_as_builtins():
    assert math.isnan(wire.decode(wire.encode(math.nan)))
    back = wire.decode(wire.encode(x * 2 for x in range(3)))
    assert type(back).__name__ == "list_iterator" and list(back) == [0, 2, 4]
    assert type(wire.decode(wire.encode(map(str, [1])))) is type(iter([]))
    for value, expected in [
        (Point(1, 2), (1, 2)),
        (Colour.RED, 1),
        (collections.Counter("aab"), {"a": 2, "b": 1}),
        (collections.OrderedDict(a=1), {"a": 1}),
    ]:
        back = wire.decode(wire.encode(value))
        assert back == expected and type(back) is type(expected)
    assert wire.decode(wire.encode([True, 1]))[0] is True


@pytest.mark.parametrize(
    "value",
    [object(), lambda: 1, print, ValueError("x"), type, iter([object()])],
    ids=["object", "lambda", "builtin", "exception", "type", "iterator of objects"],
)
def test_what_is_not_plain_data_is_refused(value):
    with pytest.raises(wire.WireError, match="not plain data"):
        wire.encode(value)


def test_a_value_that_holds_itself_is_refused():
    loop: list = []
    loop.append(loop)
    with pytest.raises(wire.WireError, match="nested more than"):
        wire.encode(loop)


@pytest.mark.parametrize(
    "data",
    [
        b'{"x": 1}',  # not a tag
        b'{"tuple": [1], "set": [2]}',  # two tags
        b'{"set": [[1]]}',  # unhashable member
        b'{"dict": [[[1], 2]]}',  # unhashable key
        b'{"dict": [1]}',  # not pairs
        b'{"int": 5}',  # malformed int
        b'{"complex": ["1", 2]}',
        b'{"range": [1, 2]}',
        b"[" * 100000 + b"]" * 100000,  # deeper than the decoder recurses
        b"1" * 5000,  # a decimal int longer than Python parses
        b"\xff\xfe",
        b"",
    ],
)
def test_bytes_that_are_not_plain_data_are_refused(data):
    with pytest.raises(wire.WireError):
        wire.decode(data)
