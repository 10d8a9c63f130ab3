import pytest

from bertexport.judging.latency import Latency, speedup, time_interleaved


def test_latency_record_statistics():
    lat = Latency.from_values([0.1, 0.2, 0.3, 0.4, 0.5])
    assert lat.count == 5 and lat.p50 == pytest.approx(0.3) and lat.mean == pytest.approx(0.3)
    assert lat.min == 0.1 and lat.max == 0.5 and lat.p99 <= 0.5 and lat.p90 >= lat.p50
    assert lat.throughput(8) == pytest.approx(8 / 0.3)
    assert "values" not in lat.to_dict() and len(lat.to_dict(with_values=True)["values"]) == 5
    with pytest.raises(ValueError):
        Latency.from_values([])


def test_interleaved_order_and_counts():
    calls = []
    timed = time_interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, runs=4, warmup=1)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b", "b", "a"]  # warm-up, then rotated rounds
    assert timed["a"].count == 4 and timed["b"].count == 4


def test_speedup_ratio():
    ref = Latency.from_values([2.0, 2.0, 2.0])
    cand = Latency.from_values([1.0, 1.0, 1.0])
    s = speedup(ref, cand)
    assert s["p50_ratio"] == pytest.approx(2.0) and s["round_ratio_p10"] == pytest.approx(2.0)
