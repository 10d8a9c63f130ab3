"""Latency records and interleaved timing.

One ``Latency`` record per measured cell (count, mean, stdev, p50/p90/p95/p99, raw
values), after optimum-benchmark. Runners are timed round-robin (A B C A B C ...) so
drift on a shared machine hits every candidate alike; warm-up runs are not counted.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np


@dataclass
class Latency:
    count: int
    total: float
    mean: float
    stdev: float
    p50: float
    p90: float
    p95: float
    p99: float
    min: float
    max: float
    unit: str = "s"
    values: list[float] = field(default_factory=list, repr=False)

    @classmethod
    def from_values(cls, values: list[float]) -> "Latency":
        if not values:
            raise ValueError("no timings")
        a = np.asarray(values, dtype=np.float64)
        q = np.percentile(a, [50, 90, 95, 99])
        return cls(
            count=len(values), total=float(a.sum()), mean=float(a.mean()),
            stdev=float(statistics.stdev(values)) if len(values) > 1 else 0.0,
            p50=float(q[0]), p90=float(q[1]), p95=float(q[2]), p99=float(q[3]),
            min=float(a.min()), max=float(a.max()), values=[float(v) for v in values],
        )

    def throughput(self, items_per_call: int) -> float:
        """Items (sequences) per second at the median latency."""
        return items_per_call / self.p50 if self.p50 > 0 else float("inf")

    def to_dict(self, with_values: bool = False) -> dict:
        d = asdict(self)
        if not with_values:
            d.pop("values")
        return d


def speedup(reference: Latency, candidate: Latency) -> dict:
    """Median speedup (reference p50 / candidate p50) with the spread of round-by-round
    ratios, which is meaningful because rounds were interleaved."""
    n = min(len(reference.values), len(candidate.values))
    ratios = np.asarray(reference.values[:n]) / np.asarray(candidate.values[:n])
    lo, hi = np.percentile(ratios, [10, 90]) if n else (float("nan"), float("nan"))
    return {"p50_ratio": reference.p50 / candidate.p50, "round_ratio_p10": float(lo), "round_ratio_p90": float(hi)}


# ``optimize``'s quick timing of a build (and of an early-exit build's exit paths): enough
# rounds to rank builds far apart; builds within its noise are timed again side by side
QUICK_RUNS, QUICK_WARMUP = 12, 3


def time_interleaved(calls: dict[str, Callable[[], object]], runs: int, warmup: int = 3,
                     on_round: Callable[[int], None] | None = None) -> dict[str, Latency]:
    """Time each callable ``runs`` times, round-robin, after ``warmup`` untimed rounds."""
    if runs < 1:
        raise ValueError("runs must be >= 1")
    for _ in range(warmup):
        for fn in calls.values():
            fn()
    values: dict[str, list[float]] = {k: [] for k in calls}
    order = list(calls)
    for r in range(runs):
        # rotate the start each round so no candidate always runs right after the same one
        for name in order[r % len(order):] + order[: r % len(order)]:
            t0 = time.perf_counter()
            calls[name]()
            values[name].append(time.perf_counter() - t0)
        if on_round:
            on_round(r)
    return {k: Latency.from_values(v) for k, v in values.items()}
