"""The foreground progress line on stderr: a live Rich bar on a terminal, plain lines otherwise
(so a log file or CI output gets one line per logging interval instead of control codes)."""

from __future__ import annotations

from dataclasses import dataclass, field

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn

from llmctl.model.sizing import human_count


@dataclass
class Interval:
    """What the training loop sums between two train events."""

    loss: float = 0.0
    steps: int = 0
    tokens: int = 0
    seconds: float = 0.0
    figures: dict[str, float] = field(default_factory=dict)  # the loss's own figures, summed per step

    def add(self, loss: float, tokens: int, seconds: float, figures: dict[str, float]) -> None:
        self.loss += loss
        self.steps += 1
        self.tokens += tokens
        self.seconds += seconds
        for name, value in figures.items():
            self.figures[name] = self.figures.get(name, 0.0) + value

    @property
    def mean_loss(self) -> float:
        return self.loss / max(self.steps, 1)

    @property
    def mean_figures(self) -> dict[str, float]:
        return {name: total / max(self.steps, 1) for name, total in self.figures.items()}

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    def eta(self, steps_left: int | None, time_left: float | None) -> float | None:
        """Seconds until the first limit is reached, at this interval's pace."""
        remaining = [] if steps_left is None else [steps_left * self.seconds / max(self.steps, 1)]
        if time_left is not None:
            remaining.append(time_left)
        return max(0.0, min(remaining)) if remaining else None


def format_duration(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "?"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def describe(step: int, total: int | None, figures: dict, eta_s: float | None) -> str:
    of_total = f"/{total:,}" if total else ""
    mfu = figures.get("mfu")
    parts = [
        f"step {step:,}{of_total}",
        f"loss {figures['loss']:.4f}",
        f"lr {figures['lr']:.2e}",
        f"{human_count(figures['tokens_per_s'])} tok/s",
        f"MFU {mfu * 100:.1f}%" if mfu is not None else "MFU ?",
        f"ETA {format_duration(eta_s)}",
    ]
    return " · ".join(parts)


class ProgressLine:
    def __init__(self, console: Console, total_steps: int | None, first_step: int, enabled: bool = True):
        self.console = console
        self.enabled = enabled
        self.live = enabled and console.is_terminal
        self._progress: Progress | None = None
        if self.live:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                TaskProgressColumn(),
                console=console,
                transient=False,
            )
            self._task = self._progress.add_task("starting", total=total_steps, completed=first_step)
            self._progress.start()

    def update(self, step: int, total: int | None, figures: dict, eta_s: float | None) -> None:
        if not self.enabled:
            return
        text = describe(step, total, figures, eta_s)
        if self._progress is not None:
            self._progress.update(self._task, description=text, completed=step, total=total)
        else:
            self.console.print(text, highlight=False, soft_wrap=True)

    def note(self, message: str) -> None:
        if self.enabled:
            self.console.print(message, highlight=False, soft_wrap=True)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
