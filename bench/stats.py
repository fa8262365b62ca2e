"""Small statistics and the result rows every scenario reports."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else math.nan


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values (q in 0..100)."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return float(sorted_values[rank - 1])


def latency_summary(latencies_ns: Sequence[int], elapsed_ns: int) -> dict[str, float]:
    """Throughput (calls/s) and p50, p99, max latency (ms) of pooled calls."""
    ordered = sorted(latencies_ns)
    return {
        "calls": float(len(ordered)),
        "throughput": len(ordered) / (elapsed_ns / 1e9) if elapsed_ns else math.nan,
        "p50_ms": percentile(ordered, 50) / 1e6,
        "p99_ms": percentile(ordered, 99) / 1e6,
        "max_ms": (ordered[-1] / 1e6) if ordered else math.nan,
    }


@dataclass
class Row:
    """One measured quantity of a scenario, for each variant (omkd, client, floor, direct)."""

    scenario: str
    metric: str
    unit: str
    better: str  # "lower" or "higher"
    runs: dict[str, list[float]] = field(default_factory=dict)

    def add(self, variant: str, value: float) -> None:
        self.runs.setdefault(variant, []).append(value)

    def value(self, variant: str) -> float:
        return median(self.runs.get(variant, []))

    def ratio(self, variant: str, baseline: str) -> float:
        base = self.value(baseline)
        if not base or math.isnan(base):
            return math.nan
        return self.value(variant) / base

    def as_json(self) -> dict[str, Any]:
        variants = list(self.runs)
        ratios = {
            f"{v}/{b}": _finite(self.ratio(v, b))
            for v in variants
            for b in ("floor", "direct")
            if v not in ("floor", "direct") and b in self.runs
        }
        return {
            "scenario": self.scenario,
            "metric": self.metric,
            "unit": self.unit,
            "better": self.better,
            "median": {v: _finite(self.value(v)) for v in variants},
            "ratios": ratios,
            "runs": {v: [_finite(x) for x in xs] for v, xs in self.runs.items()},
        }


def _finite(x: float) -> float | None:
    return None if math.isnan(x) else round(x, 6)
