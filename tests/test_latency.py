import pytest

from collections import Counter

from bertexport.judging.latency import Latency, round_orders, speedup, time_interleaved


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
    assert calls == ["a", "b"] * 5  # warm-up, then rounds: two contestants alternate, never one after itself
    assert timed["a"].count == 4 and timed["b"].count == 4


@pytest.mark.parametrize("n", [3, 4, 5, 8])
def test_rounds_balance_what_runs_just_before_each_contestant(n):
    """Each contestant once per round, and over the whole sequence (round boundaries included)
    each follows every other about equally often and never itself: a rotated round-robin
    (A B C, B C A, C A B) had A after C twice as often as after B."""
    names = [f"c{i}" for i in range(n)]
    runs = 6 * n
    orders = round_orders(names, runs)
    assert len(orders) == runs and all(sorted(o) == names for o in orders)
    sequence = [name for order in orders for name in order]
    pairs = Counter(zip(sequence, sequence[1:]))
    assert not any(a == b for a, b in pairs)
    counts = [pairs[(a, b)] for a in names for b in names if a != b]
    assert sum(counts) == len(sequence) - 1
    assert max(counts) - min(counts) <= (1 if n <= 4 else 2)
    rotated = [names[r % n:] + names[: r % n] for r in range(runs)]
    old_sequence = [name for order in rotated for name in order]
    old = Counter(zip(old_sequence, old_sequence[1:]))
    assert max(old.values()) >= 2 * min(old[(a, b)] for a in names for b in names if a != b)  # the old bias


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
