"""The event stream: whole lines, non-finite figures, and a tail that survives real logs."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from llmctl.events import EventTail, EventWriter, as_float, read_events


def test_writer_lines_are_json_with_nonfinite_as_strings(tmp_path: Path):
    log = tmp_path / "events.jsonl"
    with EventWriter(log) as writer:
        writer.write("start", 0, run="r")
        writer.write("train", 10, loss=float("nan"), grad_norm=float("inf"), lr=1e-3)
    lines = log.read_text().splitlines()
    assert [json.loads(line)["event"] for line in lines] == ["start", "train"]
    train = json.loads(lines[1])
    assert train["loss"] == "nan" and train["grad_norm"] == "inf"
    assert math.isnan(as_float(train["loss"])) and as_float(train["lr"]) == 1e-3
    assert as_float(None) is None and as_float("garbage") is None


def test_tail_reads_only_new_complete_lines(tmp_path: Path):
    log = tmp_path / "events.jsonl"
    tail = EventTail(log)
    assert tail.poll() == []  # the log does not exist yet
    writer = EventWriter(log)
    writer.write("start", 0)
    assert [e["event"] for e in tail.poll()] == ["start"]
    assert tail.poll() == []

    # a writer caught mid-line: the half line waits until it is complete
    with open(log, "ab") as handle:
        handle.write(b'{"ts":1,"event":"train","step":5,"lo')
    assert tail.poll() == []
    with open(log, "ab") as handle:
        handle.write(b'ss":2.5}\n')
    assert tail.poll()[0]["loss"] == 2.5


def test_tail_restarts_on_truncation_and_replacement(tmp_path: Path):
    log = tmp_path / "events.jsonl"
    with EventWriter(log) as writer:
        for step in range(5):
            writer.write("train", step, loss=1.0)
    tail = EventTail(log)
    assert len(tail.poll()) == 5

    log.write_text("")  # truncated in place
    with EventWriter(log) as writer:
        writer.write("start", 0)
    assert [e["event"] for e in tail.poll()] == ["start"] and tail.restarted

    replacement = tmp_path / "new.jsonl"
    with EventWriter(replacement) as writer:
        for step in range(9):
            writer.write("train", step, loss=0.5)
    os.replace(replacement, log)  # a copy from elsewhere replaces the file
    events = tail.poll()
    assert tail.restarted and len(events) == 9


def test_malformed_lines_are_counted_not_fatal(tmp_path: Path):
    log = tmp_path / "events.jsonl"
    log.write_text('{"ts":1,"event":"start","step":0}\nnot json\n[1,2]\n{"ts":2,"event":"end","step":3}\n')
    tail = EventTail(log)
    assert [e["event"] for e in tail.poll()] == ["start", "end"]
    assert tail.malformed_lines == 2
    assert len(read_events(log)) == 2
