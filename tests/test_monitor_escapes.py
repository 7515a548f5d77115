"""A crafted events.jsonl must not drive the terminal: `status` and `monitor` print every string
from the log with its control characters escaped (ESC shown as `\\x1b`, never sent)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from llmctl.monitor.units import printable

ESC = "\x1b"
# what a hostile log might try: retitle the window, clear the screen, ring, a C1 CSI, reverse text
ATTACKS = {
    "title": f"{ESC}]0;pwned\x07",
    "clear": f"{ESC}[2J{ESC}[H",
    "csi": "\x9b31m",
    "reverse": "\u202eevil",
    "backspace": "ok\x08\x08no",
}
TERMINAL_DRIVING = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def crafted_log(path: Path) -> None:
    evil = "".join(ATTACKS.values())
    events = [
        {"ts": 1.0, "event": "start", "step": 0, "run": f"r{evil}", "stage": f"pretrain{evil}",
         "preset": f"p{evil}", "device": f"cpu{evil}", "precision": f"fp32{evil}", "host": f"h{evil}",
         "max_steps": 10},
        {"ts": 2.0, "event": "train", "step": 1, "loss": 2.0, "lr": 1e-3},
        {"ts": 3.0, "event": "checkpoint", "step": 1, "path": f"/tmp/{evil}", "kind": f"full{evil}"},
        {"ts": 4.0, "event": "sample", "step": 1, "prompt": f"def f{evil}", "text": f"():\n  {evil}"},
        {"ts": 5.0, "event": "alert", "step": 1, "level": f"warning{evil}", "kind": f"k{evil}",
         "message": f"look{evil}"},
        {"ts": 6.0, "event": "end", "step": 1, "reason": f"completed{evil}", f"key{evil}": evil},
    ]  # fmt: skip
    path.parent.mkdir(parents=True)
    path.write_text("".join(json.dumps(event) + "\n" for event in events), encoding="utf-8")


def test_printable_escapes_what_drives_a_terminal_and_keeps_the_rest():
    assert printable("plain text, é, 漢字, tab\tand\nnewline") == "plain text, é, 漢字, tab\tand\nnewline"
    assert printable(ATTACKS["title"]) == "\\x1b]0;pwned\\x07"
    assert printable(ATTACKS["csi"]) == "\\x9b31m"
    assert printable(ATTACKS["reverse"]) == "\\u202eevil"
    assert TERMINAL_DRIVING.search(printable("".join(ATTACKS.values()))) is None


def test_status_and_monitor_print_a_crafted_log_escaped(cli, workspace_dir: Path):
    crafted_log(workspace_dir / "runs" / "crafted" / "events.jsonl")
    outputs = {
        "status": cli("status"),
        "status RUN": cli("status", "crafted"),
        "monitor": cli("monitor", "crafted", "--once", "--width", 160),
    }
    for name, result in outputs.items():
        assert result.exit_code == 0, (name, result.stderr)
        found = TERMINAL_DRIVING.search(result.stdout + result.stderr)
        assert found is None, f"{name} printed {found.group()!r}"
    assert "\\x1b]0;pwned\\x07" in outputs["monitor"].stdout  # shown, as an escape
    assert "\\x1b" in outputs["status RUN"].stdout
    # the JSON document carries the escaped strings too (JSON would have escaped them anyway)
    document = cli("status", "crafted", "--json").json()
    assert ESC not in json.dumps(document, ensure_ascii=False)
