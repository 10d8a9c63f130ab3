"""Paired intervals against cases computable by hand, and the rows-needed rule."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bertexport.judging import stats

Z = 1.959963984540054


def test_z_value():
    assert stats.z_value(0.95) == pytest.approx(Z, abs=1e-9)
    assert stats.z_value(0.99) == pytest.approx(2.5758293035489, abs=1e-9)


def test_tango_without_discordant_rows_has_its_closed_form():
    # b = c = 0: the score equation reduces to n D / (1 - D) = z^2, so D = z^2 / (n + z^2)
    for n in (50, 150, 400):
        low, high = stats.tango(0, 0, n)
        assert high == pytest.approx(Z ** 2 / (n + Z ** 2), rel=1e-6) and low == pytest.approx(-high, rel=1e-6)


def test_tango_is_symmetric_and_excludes_zero_only_with_clear_evidence():
    lo1, hi1 = stats.tango(5, 1, 100)
    lo2, hi2 = stats.tango(1, 5, 100)
    assert (lo1, hi1) == pytest.approx((-hi2, -lo2))
    assert lo1 < 0 < hi1  # 5 vs 1 discordant rows: not significant (McNemar exact p = 0.22)
    lo, hi = stats.tango(10, 0, 50)
    assert 0 < lo < 0.2 < hi  # 10 vs 0: significant (McNemar exact p = 0.002)
    # the score statistic equals z at the bounds (checked by plugging them back in)
    b, c, n = 7, 2, 120
    lo, hi = stats.tango(b, c, n)
    for d, target in ((lo, Z), (hi, -Z)):
        a_, b_ = 2.0 * n, -b - c + (2.0 * n - b + c) * d
        q21 = (math.sqrt(b_ * b_ + 4 * a_ * c * d * (1 - d)) - b_) / (2 * a_)
        assert (b - c - n * d) / math.sqrt(n * (2 * q21 + d * (1 - d))) == pytest.approx(target, abs=1e-6)


def test_accuracy_drop_counts_discordant_rows_and_resolution():
    ref = np.array([1] * 90 + [1] * 6 + [0] * 2 + [0] * 2, bool)   # 96 right
    cand = np.array([1] * 90 + [0] * 6 + [1] * 2 + [0] * 2, bool)  # 92 right
    iv = stats.accuracy_drop(ref, cand)
    assert iv.estimate == pytest.approx(4.0) and iv.discordant == 8 and iv.rows == 100 and iv.resolution == 1.0
    lo, hi = stats.tango(6, 2, 100)
    assert (iv.low, iv.high) == pytest.approx((100 * lo, 100 * hi))


def test_wilson_known_values():
    # Wilson 95 % for 98/100: 0.9300 to 0.9945 (Newcombe 1998, method 3)
    lo, hi = stats.wilson(98, 100)
    assert lo == pytest.approx(0.9300, abs=1e-4) and hi == pytest.approx(0.9945, abs=1e-4)
    assert stats.wilson(100, 100)[1] == 1.0


def test_agreement_over_tokens_resamples_rows_not_tokens():
    rows = np.repeat(np.arange(50), 10)
    equal = np.ones(500, bool)
    equal[rows == 3] = False  # one whole text disagrees on every token
    iv = stats.agreement(equal, rows)
    assert iv.method == "bootstrap-rows" and iv.rows == 50 and iv.discordant == 1
    assert iv.estimate == pytest.approx(0.98) and iv.low < 0.98 <= iv.high


def test_rows_needed_rule():
    assert stats.rows_to_resolve(1.0, 100.0) == 200  # 1 point: one row must move it by <= 0.5 points
    assert stats.rows_to_resolve(0.02, 1.0) == 100  # agreement 0.98
    assert stats.rows_to_resolve(0.0, 1.0) == 0  # an exact gate decides on any data


def test_rows_needed_table_is_consistent_with_tango():
    table = stats.rows_needed_table([1.0, 2.0], [1.0, 0.99])
    assert table[0]["agreement_1"] == math.ceil(Z ** 2 * (100 - 1) / 1)  # D = z^2/(n+z^2) <= 0.01
    assert table[1]["agreement_1"] < table[0]["agreement_1"] < table[0]["agreement_0.99"]
    n = table[0]["agreement_0.99"]
    assert 100 * stats.tango(0.005 * n, 0.005 * n, n)[1] <= 1.0 < 100 * stats.tango(0.005 * (n - 1), 0.005 * (n - 1), n - 1)[1]
    assert "| 1 | 381 |" in stats.rows_needed_markdown()


def test_describe_reads_as_one_line():
    iv = stats.accuracy_drop(np.ones(200, bool), np.ones(200, bool))
    text = stats.describe(iv)
    assert "200 rows" in text and "0 discordant" in text and "[" in text
