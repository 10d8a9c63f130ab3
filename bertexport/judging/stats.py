"""How sure a gate's figure is: paired intervals on the rows both models saw.

A candidate and the original answer the *same* rows, so their difference is judged on
the paired outcomes, never on two separate accuracies:

- **Accuracy drop** (points): only the *discordant* rows carry information — ``b`` rows the
  original gets right and the candidate wrong, ``c`` the reverse; drop = (b - c) / n.
  Interval: Tango's score interval for a difference of paired proportions (Tango 1998,
  Stat. Med. 17:891; recommended by Newcombe 1998 and Fagerland et al. 2013 over Wald and
  bootstrap intervals, which collapse to a point when b = c = 0). With no discordant row it
  has the closed form ±z²/(n+z²): 100 agreeing rows still allow a 3.7-point drop.
- **Agreement** (equal decisions, one per row): Wilson's score interval for a proportion.
- Everything else (agreement over several decisions per row — tokens, answer start/end —
  retrieval agreement, macro-F1 drop, mean cosine): a paired percentile bootstrap over rows
  (2,000 resamples, fixed seed, so the same data always gives the same interval).

``resolution`` is how far one row moves the metric; a gate whose slack is smaller than two
rows' worth cannot be resolved by its data (``rows_to_resolve``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

CONFIDENCE = 0.95
BOOTSTRAP_RESAMPLES = 2000


def z_value(confidence: float) -> float:
    """Two-sided normal quantile (e.g. 1.96 for 0.95), via the inverse error function."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    return math.sqrt(2.0) * _erfinv(confidence)


def _erfinv(y: float) -> float:
    # Newton on math.erf from Giles' approximation as the starting point; |error| < 1e-12
    w = -math.log((1.0 - y) * (1.0 + y))
    x = math.copysign(math.sqrt(max(w, 0.0)), y) * 0.8
    for _ in range(60):
        err = math.erf(x) - y
        x -= err / (2.0 / math.sqrt(math.pi) * math.exp(-x * x))
        if abs(err) < 1e-15:
            break
    return x


@dataclass
class Interval:
    """A metric with its paired interval. ``estimate``, ``low``, ``high`` and ``resolution``
    are in the metric's own unit (points for drops, fractions for agreement)."""

    estimate: float
    low: float
    high: float
    confidence: float
    rows: int
    method: str
    resolution: float | None = None  # how far one row moves the metric
    discordant: int | None = None  # rows where candidate and original differ

    def to_dict(self) -> dict:
        return asdict(self)


def wilson(successes: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Wilson score interval for a proportion."""
    if n <= 0:
        return 0.0, 1.0
    z = z_value(confidence)
    p = successes / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return max(0.0, centre - half), min(1.0, centre + half)


def tango(b: int, c: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Tango's score interval for the paired difference (b - c) / n, as fractions.

    ``b``: rows only the first model gets right; ``c``: rows only the second gets right.
    Solves |b - c - nD| / sqrt(n (2 q21(D) + D (1 - D))) = z for D, where q21(D) is the
    constrained maximum-likelihood estimate of the c-cell probability (Tango 1998, eq. 4)."""
    if n <= 0:
        return -1.0, 1.0
    z = z_value(confidence)

    def score(d: float) -> float:
        a_, b_ = 2.0 * n, -b - c + (2.0 * n - b + c) * d
        c_ = -c * d * (1.0 - d)
        q21 = (math.sqrt(max(b_ * b_ - 4 * a_ * c_, 0.0)) - b_) / (2 * a_)
        var = n * (2 * q21 + d * (1 - d))
        diff = b - c - n * d
        if var <= 0:
            return math.copysign(math.inf, diff) if diff else 0.0
        return diff / math.sqrt(var)

    est = (b - c) / n

    def solve(target: float, lo: float, hi: float) -> float:
        # score() decreases in d; find d with score(d) == target on [lo, hi]
        for _ in range(200):
            mid = (lo + hi) / 2
            if score(mid) > target:
                lo = mid
            else:
                hi = mid
        return (lo + hi) / 2

    low = -1.0 if score(-1.0 + 1e-12) <= z else solve(z, -1.0 + 1e-12, est)
    high = 1.0 if score(1.0 - 1e-12) >= -z else solve(-z, est, 1.0 - 1e-12)
    return low, high


def bootstrap(values: np.ndarray, statistic=np.mean, confidence: float = CONFIDENCE, seed: int = 0,
              resamples: int = BOOTSTRAP_RESAMPLES) -> tuple[float, float]:
    """Percentile interval of ``statistic`` over rows resampled with replacement.
    ``values``: one entry per row (or rows x columns; rows are resampled together)."""
    values = np.asarray(values)
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(resamples, n))
    stats = np.array([statistic(values[i]) for i in idx]) if values.ndim > 1 or statistic is not np.mean \
        else values[idx].mean(axis=1)
    alpha = (1 - confidence) / 2
    return float(np.quantile(stats, alpha)), float(np.quantile(stats, 1 - alpha))


def bootstrap_ratio(numerators: np.ndarray, denominators: np.ndarray, confidence: float = CONFIDENCE, seed: int = 0,
                    resamples: int = BOOTSTRAP_RESAMPLES) -> tuple[float, float]:
    """``bootstrap`` of sum(numerators) / max(sum(denominators), 1) over rows, vectorised
    (the same resamples as ``bootstrap`` with the same seed, so the same interval)."""
    num, den = np.asarray(numerators, np.float64), np.asarray(denominators, np.float64)
    n = len(num)
    if n == 0:
        return float("nan"), float("nan")
    idx = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    ratios = num[idx].sum(axis=1) / np.maximum(den[idx].sum(axis=1), 1)
    alpha = (1 - confidence) / 2
    return float(np.quantile(ratios, alpha)), float(np.quantile(ratios, 1 - alpha))


def accuracy_drop(ref_correct: np.ndarray, cand_correct: np.ndarray, confidence: float = CONFIDENCE) -> Interval:
    """Drop in points (original minus candidate) with Tango's paired interval."""
    r, c = np.asarray(ref_correct, bool), np.asarray(cand_correct, bool)
    n = int(r.size)
    only_ref, only_cand = int((r & ~c).sum()), int((~r & c).sum())
    low, high = tango(only_ref, only_cand, n, confidence)
    return Interval(100.0 * (only_ref - only_cand) / max(n, 1), 100.0 * low, 100.0 * high, confidence, n,
                    "tango-paired-score", 100.0 / max(n, 1), only_ref + only_cand)


def agreement(equal: np.ndarray, rows: np.ndarray | None = None, confidence: float = CONFIDENCE) -> Interval:
    """Fraction of equal decisions. One decision per row: Wilson; several per row
    (``rows``: the row of each decision): bootstrap over rows, since a text's tokens are not
    independent of each other."""
    eq = np.asarray(equal, bool).ravel()
    n_dec = int(eq.size)
    if rows is None or len(np.unique(rows)) == n_dec:
        low, high = wilson(int(eq.sum()), n_dec, confidence)
        return Interval(float(eq.mean()) if n_dec else 1.0, low, high, confidence, n_dec, "wilson",
                        1.0 / max(n_dec, 1), int((~eq).sum()))
    ids, inverse = np.unique(np.asarray(rows), return_inverse=True)
    per_row = np.stack([np.bincount(inverse, weights=eq.astype(np.float64), minlength=len(ids)),
                        np.bincount(inverse, minlength=len(ids)).astype(np.float64)], axis=1)
    low, high = bootstrap_ratio(per_row[:, 0], per_row[:, 1], confidence)
    biggest = per_row[:, 1].max() if len(per_row) else 1
    return Interval(float(eq.mean()), low, high, confidence, int(len(ids)), "bootstrap-rows",
                    float(biggest / max(n_dec, 1)), int(((per_row[:, 0] < per_row[:, 1])).sum()))


def mean_of_rows(values: np.ndarray, confidence: float = CONFIDENCE, method_note: str = "") -> Interval:
    """The mean of a per-row figure (retrieval kept-fraction, cosine) with a bootstrap interval."""
    v = np.asarray(values, dtype=np.float64)
    low, high = bootstrap(v, confidence=confidence)
    span = float(v.max() - v.min()) if v.size else 0.0
    return Interval(float(v.mean()) if v.size else float("nan"), low, high, confidence, int(v.size),
                    "bootstrap-rows" + method_note, span / max(v.size, 1) if v.size else None)


def rows_to_resolve(slack: float, resolution_numerator: float) -> int:
    """Rows needed so that one row moves the metric by at most half the gate's slack
    (``resolution = resolution_numerator / rows``): the smallest data a gate can decide on."""
    if slack <= 0:
        return 0  # an exact gate (e.g. agreement 1.0): any difference decides it
    return int(math.ceil(2.0 * resolution_numerator / slack - 1e-9))


def rows_for_confidence(iv: Interval, threshold: float) -> int | None:
    """Rows an interval like ``iv`` would need for its bound to clear ``threshold`` (on the
    side the estimate is on), assuming the estimate stays and the width shrinks as 1/sqrt(n).
    None when the estimate sits on the threshold (no amount of data separates them)."""
    half = max(iv.estimate - iv.low, iv.high - iv.estimate)
    gap = abs(iv.estimate - threshold)
    if gap <= 1e-12 or not math.isfinite(half):
        return None
    return max(iv.rows + 1, int(math.ceil(iv.rows * (half / gap) ** 2)))


def rows_needed_table(gates_points: list[float], agreements: list[float], confidence: float = CONFIDENCE) -> list[dict]:
    """For README: rows needed so a ``--confidence`` gate of N points passes when the candidate
    and original agree on a fraction ``a`` of rows and the disagreements split evenly (drop
    estimate 0; expected counts b = c = (1 - a) n / 2): the smallest n whose Tango upper
    bound is <= N points."""
    out = []
    for pts in gates_points:
        row = {"gate_points": pts}
        for a in agreements:
            def ok(n):
                half = (1 - a) * n / 2
                return 100 * tango(half, half, n, confidence)[1] <= pts
            lo, hi = 1, 1
            while not ok(hi):  # the bound shrinks with n: double, then bisect
                lo, hi = hi, hi * 2
                if hi > 10_000_000:
                    hi = None
                    break
            if hi is not None:
                while hi - lo > 1:
                    mid = (lo + hi) // 2
                    lo, hi = (lo, mid) if ok(mid) else (mid, hi)
            row[f"agreement_{a:g}"] = hi
        out.append(row)
    return out


def describe(iv: dict | Interval) -> str:
    """One line: ``0.9850 [0.9700, 0.9930] 95% · 400 rows · 6 discordant · one row = 0.0025``."""
    d = iv.to_dict() if isinstance(iv, Interval) else iv
    big = max(abs(d["estimate"]), abs(d["low"]), abs(d["high"])) > 1.5  # points, not fractions
    f = (lambda v: f"{v:.2f}") if big else (lambda v: f"{v:.4f}")
    parts = [f"{f(d['estimate'])} [{f(d['low'])}, {f(d['high'])}] {d['confidence']:.0%}", f"{d['rows']} rows"]
    if d.get("discordant") is not None:
        parts.append(f"{d['discordant']} discordant")
    if d.get("resolution"):
        parts.append(f"one row = {f(d['resolution'])}")
    return " · ".join(parts)


def rows_needed_markdown(gates_points=(0.5, 1.0, 2.0, 5.0), agreements=(1.0, 0.99, 0.98, 0.95),
                         confidence: float = CONFIDENCE) -> str:
    """The README's table: rows a ``--confidence`` accuracy-drop gate needs (``python -m bertexport.judging.stats``)."""
    rows = rows_needed_table(list(gates_points), list(agreements), confidence)
    head = "| gate (points) | " + " | ".join(f"agreement {a:.0%}" for a in agreements) + " |"
    lines = [head, "|---|" + "---|" * len(agreements)]
    for r in rows:
        lines.append(f"| {r['gate_points']:g} | " + " | ".join(str(r[f'agreement_{a:g}']) for a in agreements) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(rows_needed_markdown())
