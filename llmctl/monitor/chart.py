"""A line chart drawn with braille dots for the terminal: 2 x 4 dots per character cell."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from rich.text import Text

AXIS_STYLE = "bright_black"
BRAILLE_BLANK = 0x2800
# The bit of the dot at (row 0..3 from the top, column 0..1) inside one braille character.
DOT_BITS = ((0x01, 0x08), (0x02, 0x10), (0x04, 0x20), (0x40, 0x80))
MARKER = "●"


@dataclass
class Line:
    points: Sequence[tuple[float, float]]
    style: str
    markers: bool = False  # a "●" at each point (few points, like evaluations) instead of a line


@dataclass
class _Scale:
    """Data coordinates to dot coordinates; values outside the y range clip to the edge."""

    x_lo: float
    x_hi: float
    y_lo: float
    y_hi: float
    dots_x: int
    dots_y: int

    def column(self, x: float) -> int:
        return round((x - self.x_lo) / ((self.x_hi - self.x_lo) or 1.0) * (self.dots_x - 1))

    def row(self, y: float) -> int:
        row = round((self.y_hi - y) / (self.y_hi - self.y_lo) * (self.dots_y - 1))
        return min(max(row, 0), self.dots_y - 1)

    def value_at_row(self, row: float) -> float:
        return self.y_hi - row / (self.dots_y - 1) * (self.y_hi - self.y_lo)


def _y_range(lines: Sequence[Line], x_lo: float, x_hi: float) -> tuple[float, float]:
    """The values' range, leaving out the first tenth of the steps when it would squash the rest:
    a fresh model's loss starts far above where it spends the run. Those points clip to the top."""
    values = [y for line in lines for _, y in line.points]
    later = [y for line in lines for x, y in line.points if x >= x_lo + 0.1 * (x_hi - x_lo)]
    y_lo, y_hi = min(values), max(later or values)
    if y_hi - y_lo < 1e-9:
        y_lo, y_hi = y_lo - 0.5, y_hi + 0.5
    margin = 0.04 * (y_hi - y_lo)
    return y_lo - margin, y_hi + margin


def _column_means(points: Sequence[tuple[float, float]], scale: _Scale) -> list[tuple[int, int]]:
    """One dot per dot column, at the mean of the points falling in it: thousands of noisy
    points read as a line, not a smear."""
    sums: dict[int, list[float]] = {}
    for x, y in points:
        total = sums.setdefault(scale.column(x), [0.0, 0])
        total[0] += y
        total[1] += 1
    return [(column, scale.row(total / n)) for column, (total, n) in sums.items()]


def _tick(value: float) -> str:
    return f"{value:.3g}"


def braille_chart(
    lines: Sequence[Line],
    width: int,
    height: int,
    x_label: str = "step",
    x_range: tuple[float, float] | None = None,
) -> list[Text]:
    """`height` rows of plot, then an axis row and a label row, each `width` cells wide.

    The x axis spans the points and `x_range` (say, step 0 to the current step).
    """
    lines = [line for line in lines if line.points]
    if not lines or width < 16 or height < 2:
        return [Text("no data yet", style="dim")]
    xs = [x for line in lines for x, _ in line.points] + list(x_range or ())
    y_lo, y_hi = _y_range(lines, min(xs), max(xs))
    ticks = {0: y_hi, height // 2: None, height - 1: y_lo}
    probe = _Scale(min(xs), max(xs), y_lo, y_hi, 2, 4 * height)
    ticks[height // 2] = probe.value_at_row(4 * (height // 2) + 1.5)
    gutter = max(len(_tick(value)) for value in ticks.values())
    plot_width = width - gutter - 2
    scale = _Scale(min(xs), max(xs), y_lo, y_hi, 2 * plot_width, 4 * height)

    bits = [[0] * plot_width for _ in range(height)]
    styles: list[list[str | None]] = [[None] * plot_width for _ in range(height)]
    markers = [[False] * plot_width for _ in range(height)]
    for line in lines:
        if line.markers:
            for x, y in line.points:
                row, column = scale.row(y) // 4, scale.column(x) // 2
                markers[row][column], styles[row][column] = True, line.style
            continue
        dots = _column_means(line.points, scale)
        for (c0, r0), (c1, r1) in list(zip(dots, dots[1:], strict=False)) or [(dots[0], dots[0])]:
            steps = max(abs(c1 - c0), abs(r1 - r0), 1)
            for i in range(steps + 1):
                column, row = c0 + round((c1 - c0) * i / steps), r0 + round((r1 - r0) * i / steps)
                bits[row // 4][column // 2] |= DOT_BITS[row % 4][column % 2]
                if not markers[row // 4][column // 2]:
                    styles[row // 4][column // 2] = line.style

    rows = []
    for r in range(height):
        row = Text(
            _tick(ticks[r]).rjust(gutter) + " ┤" if r in ticks else " " * gutter + " │", style=AXIS_STYLE
        )
        for c in range(plot_width):
            if markers[r][c]:
                row.append(MARKER, style=styles[r][c])
            else:
                row.append(chr(BRAILLE_BLANK + bits[r][c]) if bits[r][c] else " ", style=styles[r][c])
        rows.append(row)
    rows.append(Text(" " * (gutter + 1) + "└" + "─" * plot_width, style=AXIS_STYLE))
    first, last = f"{scale.x_lo:,.0f}", f"{scale.x_hi:,.0f}"
    middle = max(1, plot_width - len(first) - len(last))
    rows.append(Text(" " * (gutter + 2) + first + x_label.center(middle)[:middle] + last, style=AXIS_STYLE))
    return rows
