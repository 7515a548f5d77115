"""Instruction data: detecting the format and normalising it to one record schema.

Every instruction record in a corpus's train.jsonl/val.jsonl is one of

    single turn:  {"system": str, "prompt": str, "response": str, ...}
    conversation: {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}

with "text" (a plain rendering a tokenizer can train on), "source" and "format" beside it.
SMS spam records add "label" ('spam' or 'ham') and "input" (the message alone) for classifiers.
`as_messages` turns either shape into a message list, which is what trainers should consume.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from llmctl.data.clean import normalize_text
from llmctl.data.sources import Skip
from llmctl.errors import UsageError

FORMATS = ("alpaca", "dolly", "chat", "code-contests", "sms-spam", "preference")
FORMAT_CHOICES = (*FORMATS, "auto")

# The fields whose presence identifies a format, in the order detection tries them.
_SIGNATURES: dict[str, tuple[tuple[str, ...], ...]] = {
    "preference": (("chosen", "rejected"),),  # pairs for dpo (llmctl.data.preference)
    "chat": (("messages",), ("conversations",)),
    "code-contests": (("description", "solutions"),),
    "alpaca": (("instruction", "output"),),
    "dolly": (("instruction", "response"),),
    "sms-spam": (("label", "text"), ("label", "sms"), ("v1", "v2")),
}
_ROLES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "bot": "assistant",
    "model": "assistant",
}
# deepmind/code_contests numbers its languages: 0 unknown, 1 Python 2, 2 C++, 3 Python 3, 4 Java.
_PYTHON_LANGUAGE_IDS = {1, 3}
_PYTHON_LANGUAGE_NAMES = {"python", "python2", "python3", "py", "py2", "py3"}
CODE_CONTESTS_SYSTEM = "Solve the programming problem in Python."
_SMS_LABELS = {0: "ham", 1: "spam"}
SMS_PROMPT = 'Classify this text message as "spam" or "ham" (not spam). Answer with one word.'


def detect_format(record: dict[str, Any]) -> str | None:
    for name, signatures in _SIGNATURES.items():
        if any(all(field in record for field in fields) for fields in signatures):
            return name
    return None


def check_format(record: dict[str, Any], fmt: str, where: str) -> None:
    """Fail on a source whose first record lacks the fields `fmt` needs, naming the fields it has."""
    if any(all(field in record for field in fields) for fields in _SIGNATURES[fmt]):
        return
    fields = _SIGNATURES[fmt][0]
    needed = " and ".join(f"'{f}'" for f in fields) + (" fields" if len(fields) > 1 else " field")
    detected = detect_format(record)
    hint = (
        f"it looks like --format {detected}"
        if detected
        else "pick the matching --format or try --format auto"
    )
    raise UsageError(
        f"{where} has no {needed} that --format {fmt} needs (fields found: {_field_list(record)}); {hint}"
    )


def undetected(record: dict[str, Any], where: str) -> UsageError:
    return UsageError(
        f"could not detect the instruction format of {where} from its fields ({_field_list(record)}); "
        f"pass --format {'|'.join(FORMATS)}, or drop --format and pass --text-field FIELD for plain text"
    )


def _field_list(record: dict[str, Any]) -> str:
    return ", ".join(map(str, record)) or "none"


def normalize(record: dict[str, Any], fmt: str, max_solutions: int) -> Iterator[dict[str, Any] | Skip]:
    """One raw record -> normalised records (a code-contests problem gives one per solution) or Skips."""
    if fmt == "code-contests":
        yield from _code_contests(record, max_solutions)
        return
    if fmt == "preference":
        from llmctl.data import preference  # it renders through sft, which imports this module

        yield preference.normalize(record)
        return
    normalized = {"alpaca": _alpaca, "dolly": _dolly, "chat": _chat, "sms-spam": _sms_spam}[fmt](record)
    if isinstance(normalized, dict):
        normalized["format"] = fmt
        normalized["text"] = render_text(normalized)
    yield normalized


def as_messages(record: dict[str, Any]) -> list[dict[str, str]]:
    if "messages" in record:
        return record["messages"]
    messages = [{"role": "system", "content": record["system"]}] if record.get("system") else []
    return [
        *messages,
        {"role": "user", "content": record["prompt"]},
        {"role": "assistant", "content": record["response"]},
    ]


def render_text(record: dict[str, Any]) -> str:
    return "\n\n".join(f"{m['role'].capitalize()}:\n{m['content']}" for m in as_messages(record))


def _field(record: dict[str, Any], name: str) -> str:
    value = record.get(name)
    return normalize_text(value).strip() if isinstance(value, str) else ""


def _single_turn(prompt: str, response: str, system: str = "", **extra: Any) -> dict[str, Any] | Skip:
    if not prompt or not response:
        return Skip("incomplete")
    return {"system": system, "prompt": prompt, "response": response, **extra}


def _alpaca(record: dict[str, Any]) -> dict[str, Any] | Skip:
    prompt = "\n\n".join(part for part in (_field(record, "instruction"), _field(record, "input")) if part)
    return _single_turn(prompt, _field(record, "output"), _field(record, "system"))


def _dolly(record: dict[str, Any]) -> dict[str, Any] | Skip:
    prompt = "\n\n".join(part for part in (_field(record, "instruction"), _field(record, "context")) if part)
    return _single_turn(prompt, _field(record, "response"))


def _chat(record: dict[str, Any]) -> dict[str, Any] | Skip:
    turns = record.get("messages", record.get("conversations"))
    if not isinstance(turns, list):
        return Skip("malformed")
    messages = [{"role": "system", "content": _field(record, "system")}] if _field(record, "system") else []
    for turn in turns:
        if not isinstance(turn, dict):
            return Skip("malformed")
        role = _ROLES.get(str(turn.get("role", turn.get("from", ""))).lower())
        content = turn.get("content", turn.get("value"))
        if role is None or not isinstance(content, str):
            return Skip("malformed")
        messages.append({"role": role, "content": normalize_text(content).strip()})
    roles = {m["role"] for m in messages if m["content"]}
    if not {"user", "assistant"} <= roles:
        return Skip("incomplete")
    return {"messages": messages}


def _sms_spam(record: dict[str, Any]) -> dict[str, Any] | Skip:
    label = record.get("label", record.get("v1"))
    # the hub's sms_spam dataset stores the label as a class index: 0 ham, 1 spam
    label = _SMS_LABELS.get(label, "") if isinstance(label, int) else str(label or "").strip().lower()
    message = _field(record, "text") or _field(record, "sms") or _field(record, "v2")
    if label not in ("spam", "ham"):
        return Skip("malformed")
    return _single_turn(f"{SMS_PROMPT}\n\n{message}" if message else "", label, label=label, input=message)


def _code_contests(record: dict[str, Any], max_solutions: int) -> Iterator[dict[str, Any] | Skip]:
    description = _field(record, "description")
    name = _field(record, "name")
    prompt = f"{name}\n\n{description}" if name and description else description
    kept: set[str] = set()
    for language, solution in _solutions(record.get("solutions")):
        code = normalize_text(solution).strip("\n").rstrip() if isinstance(solution, str) else ""
        if not _is_python(language):
            yield Skip("not_python")
        elif code in kept:
            yield Skip("duplicate")
        elif len(kept) >= max_solutions:
            yield Skip("over_max_solutions")
        else:
            kept.add(code)
            normalized = _single_turn(prompt, code, CODE_CONTESTS_SYSTEM)
            if isinstance(normalized, dict):
                normalized["format"] = "code-contests"
                normalized["text"] = render_text(normalized)
            yield normalized


def _solutions(solutions: Any) -> list[tuple[Any, Any]]:
    """Both layouts: {'language': [...], 'solution': [...]} (the hub's), [{'language', 'solution'}, ...]."""
    if isinstance(solutions, dict):
        return list(zip(solutions.get("language") or [], solutions.get("solution") or [], strict=False))
    if isinstance(solutions, list):
        return [(s.get("language"), s.get("solution")) for s in solutions if isinstance(s, dict)]
    return []


def _is_python(language: Any) -> bool:
    if isinstance(language, int) or str(language).isdigit():
        return int(language) in _PYTHON_LANGUAGE_IDS
    return re.sub(r"[^a-z0-9]", "", str(language).lower()) in _PYTHON_LANGUAGE_NAMES
