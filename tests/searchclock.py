"""An injected clock for ``optimize`` tests (tests never time): every candidate's quick and
final latency (and a side-by-side ratio) come from ``fake_ms(candidate)``."""

from __future__ import annotations


def inject_search_clock(monkeypatch, fake_ms) -> None:
    import bertexport.search.optimize as opt
    from bertexport.search.session import Search

    # the clock replaces the cached timing as a whole: fake figures must not reach the timing cache
    monkeypatch.setattr(Search, "latency", lambda self, art, folder, runtime: (fake_ms(self._current), False))
    # a build timed again beside the best: the clock's ratio of the two
    monkeypatch.setattr(Search, "side_by_side_ratio", lambda self, t, art, folder: fake_ms(t.candidate) / fake_ms(self.best.candidate))
    # an early-exit build's paths are timed by the test's own fake (``time_paths``), never kept
    monkeypatch.setattr(Search, "timed_once", lambda self, folder, kind, runtime, measure, *key: (measure(), False))
    real_try = Search.try_candidate

    def try_candidate(self, cand, model_path):
        self._current = cand
        return real_try(self, cand, model_path)

    monkeypatch.setattr(Search, "try_candidate", try_candidate)
    # a search on the clock neither replays a search timed for real nor is replayed by one (``search.replay``)
    monkeypatch.setattr(opt, "load_memo", lambda key: (None, None))
    monkeypatch.setattr(opt, "save_memo", lambda *a, **k: None)
    monkeypatch.setattr(opt, "_final_timing", lambda passing, anchor, *a, **k: fake_final(passing, fake_ms))


def fake_final(passing, fake_ms) -> dict:
    """``_final_timing``'s record from the clock: every round the same, so an early-exit
    candidate's round ratio to the fastest single model is its ratio."""
    out = {t.candidate.name: {"p50_ms": fake_ms(t.candidate), "p90_ms": fake_ms(t.candidate), "vs_pytorch": 1.0,
                              "vs_anchor": None} for t in passing}
    singles = [t.candidate for t in passing if not t.candidate.early_exit]
    if singles:
        fastest = min(singles, key=fake_ms)
        for t in passing:
            if t.candidate.early_exit:
                r = fake_ms(fastest) / fake_ms(t.candidate)
                out[t.candidate.name]["vs_fastest_single"] = {"name": fastest.name, "p50_ratio": r, "round_ratio_p10": r,
                                                              "round_ratio_p90": r}
    return out
