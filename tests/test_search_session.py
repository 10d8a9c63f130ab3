"""The search session's timing cache: a build's quick latency is measured once per machine,
runtime settings, threads and cell, and a rerun reads it instead of timing again (so two
recipes within noise of each other keep their order, and a rerun takes seconds)."""

from __future__ import annotations

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
