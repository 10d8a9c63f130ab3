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


def test_turns_split_the_first_call_of_a_turn_from_the_steady_ones(monkeypatch):
    """A fake clock: a call costs 5 units right after another contestant ran (a wake-up), 1 unit
    back-to-back; ``switch`` reads the first kind, ``steady`` the second, one value per round."""
    from bertexport.judging import latency

    clock = {"t": 0.0, "last": None}
    calls = []

    def contestant(name):
        def call():
            calls.append(name)
            clock["t"] += 5.0 if clock["last"] not in (None, name) else 1.0
            clock["last"] = name
        return call

    monkeypatch.setattr(latency.time, "perf_counter", lambda: clock["t"])
    timed = latency.time_turns({"a": contestant("a"), "b": contestant("b")}, runs=3, turn=3, warmup=1)
    assert calls == ["a", "b"] + (["a"] * 3 + ["b"] * 3) * 3  # two contestants alternate: every turn follows the other
    for name in "ab":
        assert timed[name]["switch"].count == 3 and timed[name]["steady"].count == 3
        assert timed[name]["switch"].values == [5.0, 5.0, 5.0] and timed[name]["steady"].values == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError):
        latency.time_turns({"a": contestant("a")}, runs=1, turn=1)
    clock["last"] = None
    three = latency.time_turns({n: contestant(n) for n in "abc"}, runs=6, turn=2, warmup=0)
    assert all(three[n]["switch"].values[1:] == [5.0] * 5 for n in "abc")  # rotated, never after itself
