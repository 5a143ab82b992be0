"""Medians, ranges and the formatting every figure shares."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Spread:
    median: float
    low: float
    high: float

    def fmt(self, spec: str = ",.0f", unit: str = "") -> str:
        return f"{self.median:{spec}}{unit} ({self.low:{spec}}-{self.high:{spec}})"


def spread(values: Sequence[float]) -> Spread:
    if not values:
        raise ValueError("no values")
    return Spread(statistics.median(values), min(values), max(values))


def ratios(a: Sequence[float], b: Sequence[float]) -> Spread:
    """Per-round ratios a[i] / b[i]: pairs measured back to back share the machine's mood."""
    return spread([x / y for x, y in zip(a, b, strict=True)])


def verdict(ok: bool) -> str:
    return "met" if ok else "**missed**"
