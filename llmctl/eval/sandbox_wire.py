"""Plain data across the sandbox boundary: what a test passes to the candidate and what it returns.

Both sides of a sandboxed test import this (sandbox_child.py loads it by path, so it imports
nothing of llmctl's). A value is encoded as JSON in which a one-key object tags each type JSON
lacks, and decoded into the built-in types only: None, bool, int, float, complex, str, bytes,
bytearray, list, tuple, dict, set, frozenset, range, and an iterator over a list (for a function
that returns a generator, a map or a zip). Whatever bytes the candidate sends, the trusted side gets
back only those types, so no object of the candidate's making, and no `__eq__` of its own, ever
reaches a test. Subclasses travel as their base type (a namedtuple as a tuple, a Counter as a dict).
"""

from __future__ import annotations

import json

MAX_DEPTH = 200  # nesting of containers; deeper values (or a list that holds itself) are refused
MAX_ITEMS = 1_000_000  # items an iterator may yield before it is refused (one could be endless)
SMALL_INT = 1 << 63  # ints beyond travel as hexadecimal: decimal parsing is capped at 4300 digits

_dumps = json.JSONEncoder(ensure_ascii=True, allow_nan=True, separators=(",", ":")).encode


class WireError(ValueError):
    """Data that is not plain, or bytes that do not decode to plain data."""


def encode(value: object) -> bytes:
    """`value` as bytes; raises WireError for a value that is not plain data."""
    return _dumps(_plain(value, 0)).encode("ascii")


def decode(data: bytes) -> object:
    """The plain value `data` encodes; raises WireError for anything else."""
    try:
        return json.loads(data, object_hook=_untag)
    except WireError:
        raise
    except (ValueError, TypeError, RecursionError, OverflowError, UnicodeDecodeError) as exc:
        raise WireError(f"not plain data ({type(exc).__name__}: {str(exc)[:200]})") from None


def _plain(value: object, depth: int) -> object:
    """`value` with every container and non-JSON type rewritten as a tagged object."""
    if depth > MAX_DEPTH:
        raise WireError(f"a value nested more than {MAX_DEPTH} levels deep")
    kind = type(value)
    if value is None or kind is bool or kind is str or kind is float:
        return value
    if kind is int:
        return value if -SMALL_INT < value < SMALL_INT else {"int": hex(value)}
    if kind is list:
        return [_plain(item, depth + 1) for item in value]
    if kind is tuple:
        return {"tuple": [_plain(item, depth + 1) for item in value]}
    if kind is dict:
        return {"dict": [[_plain(key, depth + 1), _plain(item, depth + 1)] for key, item in value.items()]}
    return _plain_subclass_or_other(value, depth)


def _plain_subclass_or_other(value: object, depth: int) -> object:
    # The checks above take exact types (the common case, fast); here subclasses become their
    # base type, whose methods are used so that no override of the subclass runs.
    if isinstance(value, int):
        return _plain(int.__index__(value), depth)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, complex):
        return {"complex": [complex.real.__get__(value), complex.imag.__get__(value)]}
    if isinstance(value, bytearray):
        return {"bytearray": bytearray.hex(value)}
    if isinstance(value, bytes):
        return {"bytes": bytes.hex(value)}
    if isinstance(value, list):
        return [_plain(item, depth + 1) for item in list.__iter__(value)]
    if isinstance(value, tuple):
        return {"tuple": [_plain(item, depth + 1) for item in tuple.__iter__(value)]}
    if isinstance(value, dict):
        items = dict.items(value)
        return {"dict": [[_plain(key, depth + 1), _plain(item, depth + 1)] for key, item in items]}
    if isinstance(value, frozenset):
        return {"frozenset": [_plain(item, depth + 1) for item in frozenset.__iter__(value)]}
    if isinstance(value, set):
        return {"set": [_plain(item, depth + 1) for item in set.__iter__(value)]}
    if isinstance(value, range):
        return {"range": [value.start, value.stop, value.step]}
    if hasattr(type(value), "__next__") and hasattr(type(value), "__iter__"):
        items = []
        for item in value:
            if len(items) == MAX_ITEMS:
                raise WireError(f"an iterator that yields more than {MAX_ITEMS} items")
            items.append(_plain(item, depth + 1))
        return {"iterator": items}
    raise WireError(
        f"a {type(value).__name__}, which is not plain data (None, bool, int, float, complex, str, bytes, "
        "list, tuple, dict, set, frozenset, range, or an iterator of those)"
    )


def _untag(tagged: dict) -> object:
    """A tagged JSON object as the built-in value it stands for (json.loads calls this innermost first)."""
    if len(tagged) != 1:
        raise WireError("an object that is not one of the wire's tags")
    [(tag, body)] = tagged.items()
    if tag in _CONTAINERS:
        if type(body) is not list:
            raise WireError(f"a {tag} whose body is not a list")
        return _CONTAINERS[tag](body)
    if tag == "int" and type(body) is str:
        return int(body, 16)  # hexadecimal is exempt from the decimal digit cap, and linear
    if tag in ("bytes", "bytearray") and type(body) is str:
        return (bytes if tag == "bytes" else bytearray).fromhex(body)
    if tag == "complex" and type(body) is list and len(body) == 2 and all(type(x) is float for x in body):
        return complex(*body)
    if tag == "range" and type(body) is list and len(body) == 3 and all(type(x) is int for x in body):
        return range(*body)
    raise WireError(f"an unknown or malformed tag {tag[:40]!r}")


def _dict(pairs: list) -> dict:
    if not all(type(pair) is list and len(pair) == 2 for pair in pairs):
        raise WireError("a dict whose items are not key-value pairs")
    return dict(pairs)


_CONTAINERS = {
    "tuple": tuple,
    "dict": _dict,
    "set": set,
    "frozenset": frozenset,
    "iterator": iter,
}
