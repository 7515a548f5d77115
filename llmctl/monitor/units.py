"""Figures as people read them: 1h12m, 48.1k, 6.9 GB, 3 min ago."""

from __future__ import annotations

import math
import re
from typing import Any

from llmctl.events import as_float

DASH = "—"


def duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return DASH
    seconds = max(0, int(seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def ago(seconds: float | None) -> str:
    return DASH if seconds is None else f"{duration(seconds)} ago"


def count(value: float | None) -> str:
    """48123 -> 48.1k; 3.7e6 -> 3.7M."""
    if value is None or not math.isfinite(value):
        return DASH
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.1f}{suffix}"
    return f"{value:.0f}" if value == int(value) else f"{value:.1f}"


def gigabytes(value: float | None) -> str:
    return DASH if value is None else f"{value / 1e9:.1f}"


def size(value: float | None) -> str:
    """Bytes: 40000 -> 40.0 kB; 5.6e6 -> 5.6 MB."""
    if value is None:
        return DASH
    for scale, suffix in ((1e12, "TB"), (1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
        if value >= scale:
            return f"{value / scale:.1f} {suffix}"
    return f"{value:.0f} B"


def figure(value: float | str | None, digits: int = 4) -> str:
    """A perplexity-like figure: 4 significant digits, 'nan' and 'inf' as themselves (JSON
    documents carry them as strings, as the event log does)."""
    value = as_float(value)
    if value is None:
        return DASH
    if not math.isfinite(value):
        return str(value)
    return f"{value:.{digits}g}" if abs(value) < 10**digits else f"{value:,.0f}"


def fixed(value: float | str | None, decimals: int = 3) -> str:
    """A loss or bits-per-byte figure: 2.031, 'nan' and 'inf' as themselves."""
    value = as_float(value)
    if value is None:
        return DASH
    return f"{value:.{decimals}f}" if math.isfinite(value) else str(value)


def rate(value: float | None) -> str:
    """A learning rate: 1.9e-04 -> 1.9e-4."""
    if value is None:
        return DASH
    if value == 0 or 1e-2 <= abs(value) < 1e3:
        return f"{value:.3g}"
    mantissa, _, exponent = f"{value:.1e}".partition("e")
    return f"{mantissa.removesuffix('.0')}e{int(exponent)}"


def percent(fraction: float | None) -> str:
    return DASH if fraction is None or not math.isfinite(fraction) else f"{100 * fraction:.1f}%"


# C0 controls but newline and tab (which the frame lays out itself), DEL, C1 controls (a lone 0x9b
# is CSI on some terminals), and the bidirectional overrides that make text read as other text
_CONTROLS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def printable(text: str) -> str:
    """`text` with every character that could drive a terminal written as an escape (ESC as
    `\\x1b`), so a crafted log cannot move the cursor, retitle the window or recolour the screen."""
    if not _CONTROLS.search(text):
        return text
    return _CONTROLS.sub(lambda found: found.group().encode("unicode_escape").decode("ascii"), text)


def printable_values(value: Any) -> Any:
    """`value` with `printable` applied to every string in it, dictionary keys included."""
    if isinstance(value, str):
        return printable(value)
    if isinstance(value, dict):
        return {printable_values(key): printable_values(item) for key, item in value.items()}
    if isinstance(value, list):
        return [printable_values(item) for item in value]
    return value
