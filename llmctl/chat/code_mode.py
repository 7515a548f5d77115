"""Code mode of `llmctl chat`: which requests it answers, and the code block a reply is kept as.

The classifier is a keyword heuristic, on purpose: a request is about code when it uses a
programming word or contains code-like syntax.
"""

from __future__ import annotations

import re

CODE_SYSTEM_PROMPT = "You are a coding assistant. Answer with code only, in one fenced code block."
DECLINE_MESSAGE = "In code mode I only help with programming: ask me to write, fix, explain or test code."

# Everyday words that are also programming words ("list", "test", "sort", "import") are left out,
# so "list the planets" is declined.
CODE_WORDS = frozenset(
    (
        "code",
        "coding",
        "coder",
        "program",
        "programming",
        "programmer",
        "script",
        "scripts",
        "function",
        "functions",
        "class",
        "classes",
        "bug",
        "bugs",
        "debug",
        "debugging",
        "error",
        "errors",
        "exception",
        "traceback",
        "stacktrace",
        "compile",
        "compiler",
        "syntax",
        "refactor",
        "implement",
        "implementation",
        "algorithm",
        "algorithms",
        "recursion",
        "recursive",
        "loop",
        "loops",
        "variable",
        "variables",
        "array",
        "arrays",
        "dict",
        "dictionary",
        "tuple",
        "tuples",
        "string",
        "strings",
        "integer",
        "integers",
        "boolean",
        "regex",
        "regexp",
        "sql",
        "database",
        "api",
        "endpoint",
        "json",
        "yaml",
        "xml",
        "csv",
        "html",
        "css",
        "parse",
        "parser",
        "parsing",
        "unittest",
        "pytest",
        "def",
        "lambda",
        "async",
        "await",
        "python",
        "javascript",
        "typescript",
        "java",
        "rust",
        "golang",
        "cpp",
        "bash",
        "shell",
        "powershell",
        "ruby",
        "php",
        "kotlin",
        "swift",
        "haskell",
        "numpy",
        "pandas",
        "pytorch",
        "torch",
        "react",
        "django",
        "flask",
        "git",
        "docker",
        "linux",
        "cli",
        "stdout",
        "stdin",
        "segfault",
        "null",
        "nullptr",
        "pointer",
        "pointers",
        "iterator",
        "generator",
        "decorator",
    )
)
CODE_SYNTAX = re.compile(
    r"```|`[^`\n]+`"  # markdown code
    r"|\b[A-Za-z_]\w*\("  # a call: print(
    r"|[{};]|==|!=|<=|>=|=>|->|::|\+=|&&|\|\|"  # operators and braces
    r"|\b\w+\.(?:py|js|ts|rs|go|c|cpp|h|java|rb|sh|sql|json|yaml|yml|toml|ipynb)\b"  # file names
)
FENCE = re.compile(r"```[ \t]*([\w+#.-]*)[^\n]*\n(.*?)(?:\n?```|\Z)", re.S)


def is_code_request(text: str) -> bool:
    """Whether code mode answers `text`: it names a programming word (CODE_WORDS) or has code syntax."""
    words = set(re.findall(r"[a-z][a-z+#]*", text.lower()))
    return bool(words & CODE_WORDS) or bool(CODE_SYNTAX.search(text))


def extract_code(reply: str) -> tuple[str, str | None]:
    """(code, language) of a reply: its first fenced block (an unclosed fence runs to the end),
    else the whole reply, taken to be bare code."""
    match = FENCE.search(reply)
    if match is None:
        return reply.strip("\n"), None
    return match.group(2).rstrip("\n"), match.group(1) or None
