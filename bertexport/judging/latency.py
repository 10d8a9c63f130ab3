"""Latency records and interleaved timing.

One ``Latency`` record per measured cell (count, mean, stdev, p50/p90/p95/p99, raw
values), after optimum-benchmark. Runners are timed in rounds, each once per round, so
drift on a shared machine hits every candidate alike; warm-up runs are not counted.
The rounds' orders (``round_orders``) make every contestant follow every other about equally
often: what ran just before a call changes its time (a runtime whose worker threads slept
while another runtime had the cores pays to wake them), and a rotated round-robin keeps the
cyclic order A B C, so each contestant follows the same one in most rounds.
"""

from __future__ import annotations

import statistics
import time
from collections import Counter
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


def round_orders(names: list[str], runs: int) -> list[list[str]]:
    """``runs`` orders of ``names`` (each once per round) balanced for what ran just before:
    over the whole sequence, round boundaries included, each contestant follows every other
    about equally often (counts within one of each other for 2-4 contestants) and never
    itself (first-order carry-over balance, in the spirit of Williams designs, built
    greedily). Each round starts its search at a rotated position, so positions rotate too.

    A rotated round-robin (A B C, B C A, C A B) keeps the cyclic order: on a 2-vCPU AMX Xeon an
    OpenVINO student followed the ORT anchor in 2 rounds of 3 (its worker threads asleep, ~0.7 ms
    a call) while the NNCF anchor mostly followed the student (its threads awake). Timed again
    in balanced rounds, the same artifacts' b1 ratio went from 2.50x to 2.76x the NNCF anchor
    (2026-12-04, docs/measurements.md)."""
    names = list(names)
    counts: Counter = Counter()
    prev, out = None, []
    for r in range(runs):
        left = names[r % len(names):] + names[: r % len(names)] if names else []
        order = []
        while left:
            nxt = min(left, key=lambda c: (c == prev, counts[(prev, c)]))  # ties: the rotated position
            left.remove(nxt)
            order.append(nxt)
            if prev is not None:
                counts[(prev, nxt)] += 1
            prev = nxt
        out.append(order)
    return out


def time_interleaved(calls: dict[str, Callable[[], object]], runs: int, warmup: int = 3,
                     on_round: Callable[[int], None] | None = None) -> dict[str, Latency]:
    """Time each callable ``runs`` times in rounds ordered by ``round_orders``, after
    ``warmup`` untimed rounds."""
    if runs < 1:
        raise ValueError("runs must be >= 1")
    for _ in range(warmup):
        for fn in calls.values():
            fn()
    values: dict[str, list[float]] = {k: [] for k in calls}
    for r, order in enumerate(round_orders(list(calls), runs)):
        for name in order:
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
    for order in round_orders(list(calls), runs):  # balanced as ``time_interleaved``; never after its own turn
        for name in order:
            times = []
            for _ in range(turn):
                t0 = time.perf_counter()
                calls[name]()
                times.append(time.perf_counter() - t0)
            first[name].append(times[0])
            steady[name].append(float(np.median(times[1:])))
    return {k: {"switch": Latency.from_values(first[k]), "steady": Latency.from_values(steady[k])} for k in calls}
