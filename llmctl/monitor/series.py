"""A curve of (step, value) points kept at bounded size however long the run."""

from __future__ import annotations

import math


class Series:
    """At most `capacity` points, each the mean of `stride` consecutive raw points.

    Points arrive in step order. When the series fills up, neighbouring pairs merge and the
    stride doubles: memory stays bounded, appending stays O(1) amortised, and the curve keeps
    its shape (a million-step run is drawn from at most `capacity` points).
    """

    def __init__(self, capacity: int = 1024):
        if capacity < 2 or capacity % 2:
            raise ValueError("capacity must be an even number >= 2")
        self.capacity = capacity
        self.stride = 1
        self.steps: list[float] = []
        self.values: list[float] = []
        self._pending_steps = 0.0
        self._pending_values = 0.0
        self._pending_count = 0

    def __len__(self) -> int:
        return len(self.steps) + (1 if self._pending_count else 0)

    def append(self, step: int, value: float) -> None:
        self._pending_steps += step
        self._pending_values += value
        self._pending_count += 1
        if self._pending_count == self.stride:
            self.steps.append(self._pending_steps / self.stride)
            self.values.append(self._pending_values / self.stride)
            self._pending_steps = self._pending_values = 0.0
            self._pending_count = 0
            if len(self.steps) == self.capacity:
                self._halve()

    def append_finite(self, step: int, value: float | None) -> None:
        """Append `value` unless it is missing, NaN or infinite (a figure read from an event)."""
        if value is not None and math.isfinite(value):
            self.append(step, value)

    def _halve(self) -> None:
        self.steps = [(a + b) / 2 for a, b in zip(self.steps[::2], self.steps[1::2], strict=True)]
        self.values = [(a + b) / 2 for a, b in zip(self.values[::2], self.values[1::2], strict=True)]
        self.stride *= 2

    def truncate_after(self, step: int) -> None:
        """Drop the points past `step` (a resumed run repeats the steps after its checkpoint)."""
        keep = len(self.steps)
        while keep and self.steps[keep - 1] > step:
            keep -= 1
        del self.steps[keep:], self.values[keep:]
        if self._pending_count and self._pending_steps / self._pending_count > step:
            self._pending_steps = self._pending_values = 0.0
            self._pending_count = 0

    def points(self) -> list[tuple[float, float]]:
        """Every kept point, the partly filled last bucket included so the curve reaches now."""
        points = list(zip(self.steps, self.values, strict=True))
        if self._pending_count:
            points.append(
                (self._pending_steps / self._pending_count, self._pending_values / self._pending_count)
            )
        return points
