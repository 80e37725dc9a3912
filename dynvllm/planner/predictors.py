"""Predictors of the next interval's load from the past ones (entry-point group
`dynvllm.planner_predictors`). Pure: fed one value per interval, asked for the next.

A predictor is built as `Factory(window)`; it never predicts below zero. One that can see
further than the next interval has `forecast(steps)`: the planner asks it for the interval
`--planner-lookahead` ahead, so workers that take that long to start are asked for in time.
"""

from __future__ import annotations

from collections import deque
from typing import Protocol


class Predictor(Protocol):
    def observe(self, value: float) -> None:
        """Record the value measured over the interval that just ended."""

    def predict(self) -> float:
        """The value expected over the next interval (0 before any observation)."""


class Constant:
    """The next interval looks like the last one: reacts at once, never anticipates."""

    def __init__(self, window: int = 1) -> None:
        self.last = 0.0

    def observe(self, value: float) -> None:
        self.last = value

    def predict(self) -> float:
        return max(0.0, self.last)


class MovingAverage:
    """Mean of the last `window` intervals: smooths bursts, lags a ramp by about window/2."""

    def __init__(self, window: int = 6) -> None:
        self.values: deque[float] = deque(maxlen=max(1, window))

    def observe(self, value: float) -> None:
        self.values.append(value)

    def predict(self) -> float:
        return max(0.0, sum(self.values) / len(self.values)) if self.values else 0.0


class HoltWinters:
    """Additive Holt-Winters: level, trend and a season of `window` intervals (a daily cycle
    sampled `window` times, say). Before two seasons have been seen it predicts with level and
    trend only (Holt's linear method), so a ramp is followed from the second interval.
    """

    def __init__(self, window: int = 6, alpha: float = 0.5, beta: float = 0.3, gamma: float = 0.3) -> None:
        self.period = max(1, window)
        self.alpha, self.beta, self.gamma = alpha, beta, gamma
        self.history: list[float] = []
        self.level: float | None = None
        self.trend = 0.0
        self.season: list[float] = []

    def observe(self, value: float) -> None:
        self.history.append(value)
        n, p = len(self.history), self.period
        if p > 1 and n == 2 * p:
            self._init_seasonal()
            return
        if self.season:
            i = (n - 1) % p
            prev_level = self.level or 0.0
            self.level = self.alpha * (value - self.season[i]) + (1 - self.alpha) * (prev_level + self.trend)
            self.trend = self.beta * (self.level - prev_level) + (1 - self.beta) * self.trend
            self.season[i] = self.gamma * (value - self.level) + (1 - self.gamma) * self.season[i]
            return
        if self.level is None:
            self.level = value
            return
        prev_level = self.level
        self.level = self.alpha * value + (1 - self.alpha) * (prev_level + self.trend)
        self.trend = self.beta * (self.level - prev_level) + (1 - self.beta) * self.trend

    def _init_seasonal(self) -> None:
        """Initial components from the first two seasons (the classic textbook start)."""
        p, h = self.period, self.history
        first, second = sum(h[:p]) / p, sum(h[p:]) / p
        self.trend = (second - first) / p
        self.season = [((h[i] - first) + (h[i + p] - second)) / 2 for i in range(p)]
        self.level = second + self.trend * (p - 1) / 2

    def predict(self) -> float:
        return self.forecast(1)

    def forecast(self, steps: int) -> float:
        """The value `steps` intervals ahead (1: the next one)."""
        if self.level is None:
            return 0.0
        value = self.level + self.trend * steps
        if self.season:
            value += self.season[(len(self.history) + steps - 1) % self.period]
        return max(0.0, value)
