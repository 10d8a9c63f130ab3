"""Timing an early-exit build's exit paths: each round's figure is the paths' times weighted by
the share of rows taking each path."""

from __future__ import annotations

import pytest

from bertexport.judging.latency import Latency
from bertexport.search import exit_paths as X


def test_mix_rounds_weights_each_round_by_the_rows_taking_each_path():
    first, none = Latency.from_values([1.0, 2.0, 3.0]), Latency.from_values([4.0, 4.0, 8.0])
    mixed = X.mix_rounds([first, none], [0.75, 0.25])
    assert mixed.values == pytest.approx([1.75, 2.5, 4.25])
    timed = {"a": first, X.path_name("ee", 0): first, X.path_name("ee", 1): none}
    folded = X.fold_paths(timed, {"ee": [0.5, 0.5]})
    assert set(folded) == {"a", "ee"} and folded["ee"].values == pytest.approx([2.5, 3.0, 5.5])
