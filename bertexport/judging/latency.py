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


def time_turns(calls: dict[str, Callable[[], object]], runs: int, turn: int = 4, warmup: int = 3) -> dict[str, dict[str, Latency]]:
    """Interleaved rounds as ``time_interleaved``, but each contestant's turn is ``turn``
    consecutive calls, read as two latencies a deployment can see:

    - ``switch``: the turn's first call, right after another model had the cores — what a
      sporadic request meets (the runtime's worker threads gone to sleep: measured, the same
      cost after 5 ms idle as after another model ran);
    - ``steady``: the median of the turn's other calls — back-to-back requests, a busy server.

    Each is one value per round, so round-by-round ratios (``speedup``) stay paired. A fixed
    wake-up cost per call weighs more on a small model: on a 2-vCPU AMX Xeon it was ~1 ms
    for every OpenVINO model (a 3-layer student 1.63 ms back-to-back, 2.65 ms after ORT ran;
    the 6-layer anchor 3.69 / 4.63), so the two can rank a student's gain differently."""
    if runs < 1 or turn < 2:
        raise ValueError("runs must be >= 1 and turn >= 2")
    for _ in range(warmup):
        for fn in calls.values():
            fn()
    first: dict[str, list[float]] = {k: [] for k in calls}
    steady: dict[str, list[float]] = {k: [] for k in calls}
    order = list(calls)
    for r in range(runs):
        # rotated as ``time_interleaved`` from three contestants on; two just alternate, else
        # one of them would open a round right after its own turn (no switch)
        shift = r % len(order) if len(order) > 2 else 0
        for name in order[shift:] + order[:shift]:
            times = []
            for _ in range(turn):
                t0 = time.perf_counter()
                calls[name]()
                times.append(time.perf_counter() - t0)
            first[name].append(times[0])
            steady[name].append(float(np.median(times[1:])))
    return {k: {"switch": Latency.from_values(first[k]), "steady": Latency.from_values(steady[k])} for k in calls}
