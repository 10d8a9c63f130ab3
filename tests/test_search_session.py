"""The search session's timing cache: a build's quick latency is measured once per machine,
runtime settings, threads and cell, and a rerun reads it instead of timing again (so two
recipes within noise of each other keep their order, and a rerun takes seconds)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from bertexport.search.session import Search


def _search(threads=2, batch=1, sequence=128):
    s = object.__new__(Search)  # only what ``latency`` reads: no model, no data
    s.threads, s.batch, s.sequence = threads, batch, sequence
    return s


def test_a_builds_quick_latency_is_timed_once_and_read_back_per_machine_runtime_threads_and_cell(tmp_path, monkeypatch):
    timed = []

    def quick_latency(self, art):
        timed.append((self.threads, self.batch, art))
        return 1.5 + len(timed)

    monkeypatch.setattr(Search, "quick_latency", quick_latency)
    build = tmp_path / "builds" / "abc"
    build.mkdir(parents=True)
    bf16 = {"INFERENCE_PRECISION_HINT": "bf16"}
    assert _search().latency("art", build, bf16) == (2.5, False)
    assert _search().latency("art", build, bf16) == (2.5, True)  # the rerun: read back, not timed
    assert len(timed) == 1
    # other runtime settings, threads or cell are other timings
    assert _search().latency("art", build, {}) == (3.5, False)
    assert _search(threads=1).latency("art", build, bf16) == (4.5, False)
    assert _search(batch=8).latency("art", build, bf16) == (5.5, False)
    assert len(timed) == 4 and _search(batch=8).latency("art", build, bf16) == (5.5, True)
    # another machine (CPU features or package versions) times again
    import bertexport.search.cost_model as cm

    monkeypatch.setattr(cm, "machine_key", lambda: {"cpu": "another", "features": [], "packages": {}})
    assert _search().latency("art", build, bf16) == (6.5, False)
    # kept next to the build, not inside it (the build folder is the artifact)
    assert not any(p.name.startswith("latency") for p in build.iterdir())
    assert len(list(build.parent.glob("abc.latency-*.json"))) == 5


def test_a_build_quick_timed_a_little_slower_than_the_best_is_timed_side_by_side_with_it_before_it_is_pruned(tmp_path, monkeypatch):
    import bertexport.judging.latency as lat
    import bertexport.shipping.runtime as rt
    from bertexport.judging.latency import Latency
    from bertexport.search.candidates import Candidate
    from bertexport.search.session import SIDE_BY_SIDE_BELOW, Trial

    opened, timed = [], []

    class FakeArtifact:  # the best build, as the search reopens it
        def __init__(self, folder, **kw):
            opened.append((folder, kw["runtime_overrides"]))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            pass

        def infer(self, feeds):
            return None

        runner = SimpleNamespace(input_names=["input_ids"])  # what an early-exit build's paths read

    p50 = {}

    def fake_interleaved(calls, runs, warmup=3):
        timed.append(sorted(calls))
        return {k: Latency.from_values([p50[k]] * runs) for k in calls}

    monkeypatch.setattr(rt, "Artifact", FakeArtifact)
    monkeypatch.setattr(lat, "time_interleaved", fake_interleaved)
    s = _search()
    s._machine, s._feeds = {"cpu": "x"}, {"input_ids": None}  # what ``latency`` would have set
    cand = Candidate("r", "onnxruntime", "int8", [], {})
    s.best = Trial(cand, "passed", latency_ms=10.0, artifact=str(tmp_path / "builds" / "best"))
    build = tmp_path / "builds" / "this"
    build.mkdir(parents=True)

    # far slower than the quick timing's noise: pruned on the quick timing, nothing else timed
    t = Trial(cand, "failed", latency_ms=10.0 * SIDE_BY_SIDE_BELOW)
    assert s._faster_side_by_side(t, "art", build) is False and timed == [] and t.latency_ms == 15.0
    # a little slower alone, faster side by side: judged; its latency put on the best's scale
    p50.update(best=0.004, this=0.003)
    t = Trial(cand, "failed", latency_ms=12.0)
    assert s._faster_side_by_side(t, "art", build) is True
    assert timed == [["best", "this"]] and opened == [(s.best.artifact, {})] and t.latency_ms == 7.5
    # cached next to the build: a rerun decides alike without timing
    p50.update(best=0.003, this=0.004)
    t = Trial(cand, "failed", latency_ms=12.0)
    assert s._faster_side_by_side(t, "art", build) is True and len(timed) == 1 and t.latency_ms == 7.5
    assert len(list(build.parent.glob("this.side-by-side-*.json"))) == 1
    # against another best: timed again, slower there too -> pruned
    s.best = Trial(cand, "passed", latency_ms=10.0, artifact=str(tmp_path / "builds" / "other"))
    t = Trial(cand, "failed", latency_ms=12.0)
    assert s._faster_side_by_side(t, "art", build) is False and len(timed) == 2
    assert abs(t.latency_ms - 10.0 * 4 / 3) < 1e-9
    # an early-exit best, and an early-exit build: each exit path timed in the same rounds, mixed by its shares of rows
    s.best = Trial(Candidate("r", "onnxruntime", "int8", [], {}, early_exit=True), "passed", latency_ms=10.0,
                   artifact=str(tmp_path / "builds" / "ee"), exit_shares=[0.5, 0.5])
    p50.update({"best@exit-path-0": 0.002, "best@exit-path-1": 0.004, "this": 0.0027})
    t = Trial(cand, "failed", latency_ms=11.0)
    assert s._faster_side_by_side(t, "art", build) is True and timed[-1] == ["best@exit-path-0", "best@exit-path-1", "this"]
    assert t.latency_ms == pytest.approx(10.0 * 0.0027 / 0.003)
    s.best = Trial(cand, "passed", latency_ms=10.0, artifact=str(tmp_path / "builds" / "best"))
    p50.update({"best": 0.003, "this@exit-path-0": 0.001, "this@exit-path-1": 0.006})
    t = Trial(cand, "failed", latency_ms=11.0, exit_shares=[0.25, 0.75])
    exit_art = SimpleNamespace(runner=SimpleNamespace(input_names=["input_ids"]))
    assert s._faster_side_by_side(t, exit_art, tmp_path / "builds" / "ee") is False
    assert timed[-1] == ["best", "this@exit-path-0", "this@exit-path-1"] and len(timed) == 4
    assert t.latency_ms == pytest.approx(10.0 * (0.25 * 0.001 + 0.75 * 0.006) / 0.003)


def test_the_side_by_side_timing_runs_two_real_builds_in_one_run_and_keeps_the_ratio(fp32_artifact, tmp_path):
    import json
    import math
    import shutil

    from bertexport.core.textdata import builtin_samples
    from bertexport.judging.compare import fixed_cell_feeds
    from bertexport.search.candidates import Candidate
    from bertexport.search.session import Trial
    from bertexport.shipping.runtime import Artifact

    shared = fp32_artifact("bert", "text-classification").artifact
    best, this = tmp_path / "builds" / "best", tmp_path / "builds" / "this"
    for folder in (best, this):  # copies: the shared artifact is read, never written beside
        shutil.copytree(shared, folder)
    s = _search(threads=1, batch=2, sequence=16)
    cand = Candidate("ort-fp32", "onnxruntime", "fp32", [], {})
    s.best = Trial(cand, "passed", latency_ms=1.0, artifact=str(best))
    with Artifact(this, threads=1) as art:
        s._feeds = fixed_cell_feeds(art.encoder.encode, builtin_samples(), 2, 16)
        ratio = s.side_by_side_ratio(Trial(cand, "failed", latency_ms=1.1), art, this)
        again = s.side_by_side_ratio(Trial(cand, "failed", latency_ms=1.1), art, this)
    assert math.isfinite(ratio) and ratio > 0 and again == ratio  # the second read back from the cache
    (kept,) = best.parent.glob("this.side-by-side-*.json")
    assert json.loads(kept.read_text()) == {"p50_ratio": ratio, "best": "best"}


def test_a_passing_build_takes_the_best_place_only_when_faster_beyond_the_noise_or_side_by_side(tmp_path, monkeypatch):
    """A best that one quick timing put slightly ahead would prune every later build against a
    figure the noise gave it: within the noise, the new best is decided side by side."""
    import bertexport.search.session as session
    from bertexport.judging.gates import Gates
    from bertexport.search.candidates import Candidate
    from bertexport.search.session import SIDE_BY_SIDE_BELOW, Trial

    passed = SimpleNamespace(status="passed", failures=[], undecided=[], within_noise=[], reasons=lambda: [])
    monkeypatch.setattr(session, "decide", lambda metrics, gates: passed)
    monkeypatch.setattr(Search, "evaluate", lambda self, art, folder, sl, runtime=None: {})
    ratios = []
    monkeypatch.setattr(Search, "side_by_side_ratio", lambda self, t, art, folder: ratios.append(t) or ratio)
    s = _search()
    s.gates, s.search, s.confirm = Gates(max_accuracy_drop=1.0), None, None
    cand = Candidate("r", "onnxruntime", "int8", [], {})
    s.best = best = Trial(cand, "passed", latency_ms=10.0, artifact=str(tmp_path / "best"))

    # quick-timed faster by less than the noise, slower side by side: passed, the best stays
    ratio = 1.02
    t = Trial(cand, "failed", latency_ms=8.0, artifact=str(tmp_path / "t"))
    s._judge(t, "art", tmp_path / "t", cand)
    assert t.status == "passed" and s.best is best and ratios == [t] and t.latency_ms == pytest.approx(10.2)
    assert "not faster" in t.reason
    # faster side by side too: it is the best, on the best's scale
    ratio = 0.9
    t = Trial(cand, "failed", latency_ms=8.0, artifact=str(tmp_path / "t2"))
    s._judge(t, "art", tmp_path / "t2", cand)
    assert s.best is t and len(ratios) == 2 and t.latency_ms == pytest.approx(9.0)
    # faster by more than the noise: no side-by-side
    t = Trial(cand, "failed", latency_ms=9.0 / SIDE_BY_SIDE_BELOW, artifact=str(tmp_path / "t3"))
    s._judge(t, "art", tmp_path / "t3", cand)
    assert s.best is t and len(ratios) == 2
