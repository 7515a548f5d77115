"""The dashboard frame: one rounded box of sections, drawn at the console's width.

    ╭ run · stage · preset · device ──────────── state · elapsed · ETA ╮
    │ progress bar                                                     │
    ├ loss ─────────────────────────────┬ throughput ──────────────────┤
    │ braille chart of train and val    │ loss, tokens/s, MFU, lr, ... │
    ├ eval ─────────────────────────────┼ checkpoints ─────────────────┤
    ├ sample @ step N ──────────────────┴──────────────────────────────┤
    ├ alerts ──────────────────────────────────────────────────────────┤
    ╰──────────────────────────────────────────────── q quit · r refresh ╯

Everything is built as lines of rich Text from a RunState and the clock, so `--once` and the
live screen draw the same frame and tests can read it as plain text.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console, ConsoleOptions, RenderResult
from rich.text import Text

from llmctl.monitor import units
from llmctl.monitor.chart import Line, braille_chart
from llmctl.monitor.runs import read_run_config
from llmctl.monitor.state import Alert, RunState
from llmctl.monitor.watch import RunWatch

BORDER = "bright_black"
TRAIN_STYLE = "cyan"
VAL_STYLE = "magenta"
STATE_STYLES = {
    "waiting": "dim",
    "running": "bold green",
    "stalled": "bold yellow",
    "finished": "bold blue",
    "stopped": "bold yellow",
    "failed": "bold red",
    "crashed": "bold red",
}
ALERT_ICONS = {"error": ("✖", "red"), "warning": ("⚠", "yellow")}
MIN_CHART_ROWS = 6
LABEL_WIDTH = 10


@dataclass
class Section:
    title: Text
    lines: list[Text] = field(default_factory=list)


@dataclass
class Row:
    left: Section
    right: Section | None = None  # a second section beside the first


@dataclass
class View:
    """What the frame needs besides the state: where it came from and how it is being shown."""

    log: Path
    run_config: dict[str, Any] | None = None
    live: bool = False
    catching_up: float | None = None  # fraction of the log read, while a big log is read in slices


# ---------------------------------------------------------------- the box


def _fit(text: Text, width: int) -> Text:
    fitted = text.copy()
    fitted.truncate(width, overflow="ellipsis")
    fitted.pad_right(width - fitted.cell_len)
    return fitted


def _label(text: Text | str, room: int) -> Text:
    label = Text(" ") + (text if isinstance(text, Text) else Text(text, style="bold")) + Text(" ")
    label.truncate(max(room, 0), overflow="ellipsis")
    return label


def _rule(
    width: int,
    ends: str,
    split: tuple[int, str] | None,
    labels: Iterable[tuple[int, Text]],
    right_label: Text | None = None,
) -> Text:
    """A horizontal border with labels laid over it at the given columns."""
    marks: list[tuple[int, Text]] = [(0, Text(ends[0], style=BORDER))]
    if split is not None:
        marks.append((split[0], Text(split[1], style=BORDER)))
    marks.extend(labels)
    if right_label is not None:
        marks.append((width - 1 - right_label.cell_len, right_label))
    marks.sort(key=lambda mark: mark[0])
    line, cursor = Text(), 0
    for column, piece in marks:
        if column < cursor:
            continue
        line.append("─" * (column - cursor), style=BORDER)
        line.append_text(piece)
        cursor = column + piece.cell_len
    line.append("─" * max(0, width - 1 - cursor), style=BORDER)
    line.append(ends[1], style=BORDER)
    return line


def _split_column(width: int) -> int:
    """Where a two-section row divides: the left section gets 55% of the inside."""
    return 2 + (width - 7) * 11 // 20 + 1


def frame(
    width: int, title: Text, title_right: Text, top: list[Text], rows: list[Row], footer: Text
) -> list[Text]:
    split_at = _split_column(width)
    left_width, right_width = split_at - 3, width - split_at - 4
    bar = Text("│", style=BORDER)
    lines = [
        _rule(
            width,
            "╭╮",
            None,
            [(1, _label(title, width - title_right.cell_len - 8))],
            _label(title_right, width // 2),
        )
    ]
    lines += [Text.assemble(bar, " ", _fit(line, width - 4), " ", bar) for line in top]
    previous_split = False
    for row in rows:
        split = row.right is not None
        joint = {(True, True): "┼", (True, False): "┴", (False, True): "┬"}.get((previous_split, split))
        labels = [(1, _label(row.left.title, (left_width if split else width - 4) + 2))]
        if split:
            labels.append((split_at + 1, _label(row.right.title, right_width + 2)))
        lines.append(_rule(width, "├┤", (split_at, joint) if joint else None, labels))
        if split:
            height = max(len(row.left.lines), len(row.right.lines))
            for i in range(height):
                left = row.left.lines[i] if i < len(row.left.lines) else Text()
                right = row.right.lines[i] if i < len(row.right.lines) else Text()
                lines.append(
                    Text.assemble(
                        bar, " ", _fit(left, left_width), " ", bar, " ", _fit(right, right_width), " ", bar
                    )
                )
        else:
            lines += [Text.assemble(bar, " ", _fit(line, width - 4), " ", bar) for line in row.left.lines]
        previous_split = split
    joint = "┴" if previous_split else None
    lines.append(_rule(width, "╰╯", (split_at, joint) if joint else None, [], _label(footer, width - 4)))
    return lines


# ---------------------------------------------------------------- the sections


def _pair(label: str, value: str, note: str | None = None, style: str = "bold") -> Text:
    line = Text()
    line.append(label.ljust(LABEL_WIDTH), style="dim")
    line.append(value, style=style)
    if note:
        line.append(f"  ({note})", style="dim")
    return line


def _title(state: RunState, view: View) -> Text:
    name = state.run or view.log.parent.name
    title = Text()
    title.append(name, style="bold")
    ranks = f" ×{state.world_size}" if state.world_size > 1 else ""
    device = f"{state.device}{ranks}" if state.device else None
    resumed = f"resumed ×{state.starts - 1}" if state.starts > 1 else None
    for part in (state.stage, state.preset, device, state.precision, resumed):
        if part:
            title.append(" · ", style=BORDER)
            title.append(part)
    return title


def _title_right(state: RunState, status: str, now: float) -> Text:
    right = Text()
    right.append(status, style=STATE_STYLES.get(status, "bold"))
    elapsed = state.elapsed_s(now, status)
    if elapsed is not None:
        right.append(f" · {units.duration(elapsed)}")
    eta = state.eta_s(now, status)
    if eta is not None:
        right.append(f" · ETA {units.duration(eta)}")
    return right


def _progress(state: RunState, status: str, now: float, width: int) -> Text:
    if state.end is not None:
        outcome = Text()
        outcome.append(
            f"{status}: {state.end['reason'].replace('_', ' ')} at step {state.step:,}",
            style=STATE_STYLES.get(status),
        )
        if state.best_eval is not None:
            outcome.append(
                f" · best val loss {units.fixed(state.best_eval['val_loss'])}"
                f" at step {state.best_eval['step']:,}"
            )
        best = state.best_checkpoint or (state.checkpoints[-1] if state.checkpoints else None)
        if best is not None:
            outcome.append(f" · checkpoint step-{best['step']:08d}")
        return outcome
    limits = {limit.kind: limit for limit in state.limits(now, status)}
    figures = Text()
    figures.append(
        f"step {state.step:,}" + (f" / {state.max_steps:,}" if "steps" in limits else ""), style="bold"
    )
    if "time" in limits:
        figures.append(f" · {units.duration(limits['time'].done)} of {units.duration(limits['time'].total)}")
    tokens = state.latest.get("tokens")
    if "tokens" in limits:
        figures.append(f" · {units.count(tokens)} of {units.count(state.max_tokens)} tokens")
    elif tokens is not None:
        figures.append(f" · {units.count(tokens)} tokens", style="dim")
    if not limits:
        return figures
    fraction = max(limit.fraction for limit in limits.values())
    figures = Text.assemble("  ", figures, f"  {100 * fraction:3.0f}%")
    bar_width = max(10, width - figures.cell_len)
    filled = round(bar_width * fraction)
    bar = Text()
    bar.append("█" * filled, style=STATE_STYLES.get(status, "green").replace("bold ", ""))
    bar.append("░" * (bar_width - filled), style=BORDER)
    return bar + figures


def _throughput(state: RunState, view: View) -> list[Text]:
    latest = state.latest
    mem, total = latest.get("mem_bytes"), state.device_memory_bytes
    train_cfg = (view.run_config or {}).get("train") or {}
    schedule = None
    if train_cfg.get("lr") is not None:
        schedule = f"peak {units.rate(train_cfg['lr'])}, floor {units.rate(train_cfg.get('min_lr'))}"
    speed = state.steps_per_s()
    lines = [
        _pair(
            "loss",
            units.fixed(latest.get("loss")),
            f"avg {units.fixed(state.loss_smoothed.value)}" if state.loss_smoothed.value else None,
            style=f"bold {TRAIN_STYLE}",
        ),
        _pair(
            "tokens/s",
            units.count(latest.get("tokens_per_s")),
            f"avg {units.count(state.tokens_per_s_smoothed.value)}"
            if state.tokens_per_s_smoothed.value
            else None,
        ),
        _pair(
            "MFU",
            units.percent(latest.get("mfu")),
            f"avg {units.percent(state.mfu_smoothed.value)}" if state.mfu_smoothed.value else None,
        ),
        _pair("lr", units.rate(latest.get("lr")), schedule),
        _pair(
            "grad norm",
            units.figure(latest.get("grad_norm"), 3),
            f"avg {units.figure(state.grad_norm_smoothed.value, 3)}"
            if state.grad_norm_smoothed.value
            else None,
        ),
        _pair(
            "memory",
            f"{units.gigabytes(mem)} / {units.gigabytes(total)} GB"
            if total
            else (f"{units.gigabytes(mem)} GB" if mem is not None else units.DASH),
            f"peak {units.gigabytes(state.peak_mem_bytes)}" if state.peak_mem_bytes else None,
        ),
        *_preference(latest),
        _pair(
            "speed",
            (f"{speed:.3g}" if speed < 1000 else units.count(speed)) + " steps/s" if speed else units.DASH,
            _params(state),
        ),
    ]
    return lines


def _preference(latest: dict[str, float | None]) -> list[Text]:
    """A preference stage's (dpo) figures: how often the chosen reply wins, and by how much."""
    if latest.get("preference_accuracy") is None:
        return []
    rewards = (
        f"chosen {units.figure(latest.get('rewards_chosen'), 3)} · "
        f"rejected {units.figure(latest.get('rewards_rejected'), 3)}"
    )
    return [
        _pair("pref acc", units.percent(latest.get("preference_accuracy")), None, style="bold"),
        _pair("margin", units.figure(latest.get("reward_margin"), 3), rewards),
    ]


def _params(state: RunState) -> str | None:
    if not state.params:
        return None
    if state.trainable_params and state.trainable_params < state.params:
        return f"{units.count(state.trainable_params)} of {units.count(state.params)} params trained"
    return f"{units.count(state.params)} params"


def _eval(state: RunState, now: float) -> list[Text]:
    last, best = state.last_eval, state.best_eval
    if last is None:
        return [Text("no evaluation yet", style="dim")]
    line = Text()
    line.append("val loss ", style="dim")
    line.append(units.fixed(last.get("val_loss")), style=f"bold {VAL_STYLE}")
    preference = "val_preference_accuracy" in last  # a dpo loss: its exp is no perplexity
    for name, key, shown in (
        ("ppl", "val_ppl", units.figure),
        ("bpb", "val_bpb", units.fixed),
        ("acc", "val_accuracy", units.percent),
        ("pref acc", "val_preference_accuracy", units.percent),
        ("margin", "val_reward_margin", lambda value: units.figure(value, 3)),
    ):
        if key in last and not (preference and key == "val_ppl"):
            line.append(f"  {name} ", style="dim")
            line.append(shown(last[key]), style="bold")
    lines = [line]
    if best is not None:
        best_line = Text()
        best_line.append("best     ", style="dim")
        best_line.append(units.fixed(best["val_loss"]), style="bold green")
        best_line.append(f" at step {best['step']:,}", style="dim")
        if "val_bpb" in best:
            best_line.append(f"  bpb {units.fixed(best['val_bpb'])}", style="dim")
        lines.append(best_line)
    age = units.ago(now - last["ts"]) if last.get("ts") else ""
    lines.append(Text(f"{state.eval_count:,} evals · last at step {last['step']:,} {age}", style="dim"))
    return lines


def _checkpoints(state: RunState, now: float) -> list[Text]:
    latest = state.checkpoints[-1] if state.checkpoints else None
    if latest is None:
        return [Text("none yet", style="dim")]

    def describe(label: str, record: dict[str, Any], note: str) -> Text:
        line = Text()
        line.append(label.ljust(7), style="dim")
        line.append(f"step-{record['step']:08d}", style="bold")
        line.append(f"  {note}", style="dim")
        return line

    lines = []
    if state.best_checkpoint is not None:
        lines.append(
            describe("best", state.best_checkpoint, f"val {units.fixed(state.best_checkpoint['val_loss'])}")
        )
    lines.append(describe("latest", latest, units.ago(now - latest["ts"]) if latest.get("ts") else ""))
    lines.append(Text(f"{state.checkpoint_count:,} written so far", style="dim"))
    return lines


def _sample(state: RunState, max_lines: int) -> Section:
    sample = state.sample
    assert sample is not None
    text = (sample["prompt"] + sample["text"]).replace("\t", "    ")
    prompt_chars = len(sample["prompt"].replace("\t", "    "))
    lines, offset = [], 0
    for raw in text.split("\n"):
        line = Text("".join(ch if ch.isprintable() else "·" for ch in raw))
        line.stylize("dim", 0, max(0, prompt_chars - offset))
        lines.append(line)
        offset += len(raw) + 1
    if len(lines) > max_lines:
        lines = lines[: max_lines - 1] + [Text(f"… {len(lines) - max_lines + 1} more lines", style="dim")]
    return Section(Text.assemble(("sample", "bold"), (f" @ step {sample['step']:,}", "dim")), lines)


def _alert_line(alert: Alert) -> Text:
    icon, style = ALERT_ICONS.get(alert.level, ("•", "yellow"))
    return Text.assemble((f"{icon} ", style), (alert.message, style))


def _alerts(alerts: list[Alert], max_lines: int) -> list[Text]:
    if not alerts:
        return [Text("✓ no alerts", style="green")]
    return [_alert_line(alert) for alert in alerts[-max_lines:]]


def _chart_title() -> Text:
    return Text.assemble(("loss", "bold"), ("  ⠒ train", TRAIN_STYLE), ("  ● val", VAL_STYLE))


# ---------------------------------------------------------------- the whole frame


def render_lines(
    state: RunState, view: View, width: int, height: int | None = None, now: float | None = None
) -> list[Text]:
    """The frame as lines. With `height` (a live screen) the chart grows to fill it."""
    now = time.time() if now is None else now
    width = max(width, 60)
    status = state.liveness(now)
    footer = (
        Text("q quit · r refresh", style="dim")
        if view.live
        else Text(
            f"{state.events:,} events · {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(now))}",
            style="dim",
        )
    )
    if view.catching_up is not None:
        footer = Text(f"reading the log: {100 * view.catching_up:.0f}% · ", style="yellow") + footer
    if not state.starts:
        waiting = Text(f"waiting for {view.log} …", style="yellow")
        hint = Text("the dashboard fills in when the trainer writes its first event", style="dim")
        return frame(width, _title(state, view), Text("waiting", style="dim"), [waiting, hint], [], footer)

    alerts = state.current_alerts(now, status)
    alert_rows = 5 if state.end is not None else 3
    sample = _sample(state, max_lines=4) if state.sample is not None else None
    right = _throughput(state, view)
    chart_rows = max(MIN_CHART_ROWS, len(right) - 2)
    if height is not None:
        # besides the chart: 11 lines of borders, rules, progress, axis and eval, then the alerts and
        # the sample, and one spare so the screen never scrolls
        others = 12 + min(alert_rows, max(1, len(alerts))) + (1 + len(sample.lines) if sample else 0)
        chart_rows = max(chart_rows, height - others)
    split_at = _split_column(width)
    val_points = state.val_loss.points()
    chart = braille_chart(
        [
            Line(state.train_loss.points(), TRAIN_STYLE),
            Line(val_points, VAL_STYLE, markers=len(val_points) <= split_at - 11),
        ],
        split_at - 3,
        chart_rows,
        x_range=(0, state.step),
    )

    rows = [
        Row(Section(_chart_title(), chart), Section(Text("throughput", style="bold"), right)),
        Row(
            Section(Text("eval", style="bold"), _eval(state, now)),
            Section(Text("checkpoints", style="bold"), _checkpoints(state, now)),
        ),
    ]
    if sample is not None:
        rows.append(Row(sample))
    rows.append(Row(Section(Text("alerts", style="bold"), _alerts(alerts, alert_rows))))
    return frame(
        width,
        _title(state, view),
        _title_right(state, status, now),
        [_progress(state, status, now, width - 4)],
        rows,
        footer,
    )


class Dashboard:
    """A rich renderable drawing a watched run at whatever width (and height) it is given."""

    def __init__(self, watch: RunWatch, live: bool = False):
        self.watch = watch
        self.live = live
        self.run_config: dict[str, Any] | None = None

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        if self.run_config is None and self.watch.state.starts:
            # saved by the trainer as it starts: a monitor started first finds it later
            self.run_config = read_run_config(self.watch.log.parent)
        tail = self.watch.tail
        catching_up = tail.offset / tail.size if self.watch.catching_up and tail.size else None
        view = View(self.watch.log, self.run_config, self.live, catching_up)
        height = options.height or (console.height if self.live else None)
        yield from render_lines(self.watch.state, view, options.max_width, height)
