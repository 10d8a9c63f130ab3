"""An injected clock for ``optimize`` tests (tests never time): every candidate's quick and
final latency come from ``fake_ms(candidate)``."""

from __future__ import annotations


def inject_search_clock(monkeypatch, fake_ms) -> None:
    import bertexport.search.optimize as opt
    from bertexport.search.session import Search

    # the clock replaces the cached timing as a whole: fake figures must not reach the timing cache
    monkeypatch.setattr(Search, "latency", lambda self, art, folder, runtime: (fake_ms(self._current), False))
    real_try = Search.try_candidate

    def try_candidate(self, cand, model_path):
        self._current = cand
        return real_try(self, cand, model_path)

    monkeypatch.setattr(Search, "try_candidate", try_candidate)
    # a search on the clock neither replays a search timed for real nor is replayed by one (``search.replay``)
    monkeypatch.setattr(opt, "load_memo", lambda key: (None, None))
    monkeypatch.setattr(opt, "save_memo", lambda *a, **k: None)
    monkeypatch.setattr(opt, "_final_timing", lambda passing, anchor, *a, **k: {
        t.candidate.name: {"p50_ms": fake_ms(t.candidate), "p90_ms": fake_ms(t.candidate), "vs_pytorch": 1.0, "vs_anchor": None}
        for t in passing})
