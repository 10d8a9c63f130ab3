"""``optimize --early-exit`` (bertexport/search/early_exit_candidate.py): planned before any model
loads (``auto`` skips a model early exit cannot serve with the reason, ``on`` refuses it with
exit 2), the early-exit artifact built from the search slice and judged by the gate like any
candidate, its mean/p90/worst row latency and threshold in search.json and search.md, the
published winner run by ``bertexport run``, and ``off`` leaving the search as it was."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from click.testing import CliRunner

from bertexport.cli import cli
from bertexport.core.errors import UserError
from bertexport.judging.gates import Gates
from bertexport.judging.latency import Latency
from bertexport.search import early_exit_candidate as X
from bertexport.judging.latency import QUICK_RUNS, QUICK_WARMUP
from tests.tinymodels import checkpoint as _ckpt, keyword_sentence, write_keyword_jsonl


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    # the default 1-point gate needs >= 200 held-out rows
    return write_keyword_jsonl(tmp_path_factory.mktemp("ee-search-data") / "kw.jsonl", seed=11, rows=500)


def test_plan_reads_off_auto_on_and_refuses_on_where_early_exit_cannot_serve(tiny, keyword_model):
    classifier, embedder = _ckpt(keyword_model), _ckpt(tiny("bert"))
    assert not X.plan_exit_search(None, classifier).on and not X.plan_exit_search("off", classifier).on
    assert X.plan_exit_search("auto", classifier) == X.ExitPlan("auto", None)
    assert X.plan_exit_search("ON", classifier) == X.ExitPlan("on", None)
    skipped = X.plan_exit_search("auto", embedder)
    assert skipped.on and "text-classification only, not feature-extraction" in skipped.reason
    with pytest.raises(UserError, match="--early-exit on: early exit serves text-classification only"):
        X.plan_exit_search("on", embedder)
    with pytest.raises(UserError, match="text pairs"):
        X.plan_exit_search("on", classifier, pairs=True)
    with pytest.raises(UserError, match="give one of off, auto, on"):
        X.plan_exit_search("sometimes", classifier)


def test_agreement_target_halves_what_the_gate_allows():
    assert X.agreement_target(Gates(min_agreement=0.98)) == pytest.approx(0.99)
    assert X.agreement_target(Gates(max_accuracy_drop=1.0)) == pytest.approx(0.995)
    assert X.agreement_target(Gates(min_agreement=0.9, max_accuracy_drop=1.0)) == pytest.approx(0.995)  # the stricter
    from bertexport.students.early_exit import EarlyExitConfig

    assert X.agreement_target(Gates(min_cosine=0.99)) == EarlyExitConfig.agreement  # no decision gate: the library's default


def test_an_early_exit_artifact_wins_the_final_timing_only_when_clearly_faster():
    """Within the noise of the fastest single model (round ratio p10 <= 1), the single model
    ranks first; clearly faster (p10 > 1), the early-exit artifact does."""
    from bertexport.search.candidates import Candidate
    from bertexport.search.optimize import rank_by_final_timing
    from bertexport.search.session import Trial

    base = Candidate("ov-int8-f32", "openvino", "int8", [], {})
    single, ee = Trial(base, "passed", latency_ms=7.4), Trial(Candidate("ov-int8-f32", "openvino", "int8", [], {},
                                                                          early_exit=True), "passed", latency_ms=7.0)

    def final(p10):
        return {single.candidate.name: {"p50_ms": 7.40}, ee.candidate.name: {
            "p50_ms": 7.36, "vs_fastest_single": {"name": single.candidate.name, "round_ratio_p10": p10}}}

    assert rank_by_final_timing([ee, single], final(0.94)) == [single, ee]  # 0.5 % ahead: noise
    assert rank_by_final_timing([ee, single], final(1.03)) == [ee, single]
    assert rank_by_final_timing([ee], final(0.94)) == [ee]  # nothing else passed
    slower = final(1.2) | {ee.candidate.name: {"p50_ms": 7.9}}
    assert rank_by_final_timing([ee, single], slower) == [single, ee]


def test_cli_refuses_on_for_a_non_classifier_before_any_model_loads(tiny, tmp_path, monkeypatch):
    def no_loading(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr("bertexport.building.checkpoint.load_model", no_loading)
    r = CliRunner().invoke(cli, ["optimize", str(tiny("bert")), "--early-exit", "on", "-o", str(tmp_path / "o")])
    assert r.exit_code == 2 and "text-classification only" in r.stderr and "Traceback" not in r.output, r.output
    r = CliRunner().invoke(cli, ["optimize", str(tiny("bert")), "--early-exit", "always", "-o", str(tmp_path / "o")])
    assert r.exit_code == 2 and "always" in r.stderr
    assert not (tmp_path / "o").exists()


def test_auto_on_a_non_classifier_is_skipped_with_the_reason(tiny):
    from bertexport.core.progress import Reporter
    from bertexport.search.report import early_exit_markdown

    plan = X.plan_exit_search("auto", _ckpt(tiny("bert")))
    section = X.search_early_exit(SimpleNamespace(reporter=Reporter()), plan=plan)  # nothing else is read: nothing built
    assert section["candidate"] is None and section["status"] == "skipped" and "feature-extraction" in section["skipped"]
    assert early_exit_markdown(section) == [
        "Early exit (--early-exit auto): skipped — early exit serves text-classification only, not feature-extraction"]
    assert X.search_early_exit(None, plan=X.plan_exit_search("off", _ckpt(tiny("bert")))) is None  # off: no section
    assert X.exit_mix(section) == {} and X.exit_mix(None) == {}


def _fake_paths(runner, feeds, runs=QUICK_RUNS, warmup=QUICK_WARMUP):
    """An injected clock (tests never time): a row costs 0.8 ms per full model, in proportion to the layers it runs."""
    depth = [*runner.exit_layers, runner.layers]
    return [Latency.from_values([0.8e-3 * layers / runner.layers] * runs) for layers in depth]


def test_optimize_tries_an_early_exit_artifact_judged_by_the_gate(keyword_model, labelled, tmp_path, monkeypatch):
    """Latency from an injected clock (tests never time; on a tiny model the segments' overhead decides):
    the original's int8 builds 1 ms, fp32 2 ms, an early-exit row 0.8 ms per full model run in
    proportion to its layers, and 0.5 ms in the final timing; so the early-exit artifact is
    judged by the gate rather than pruned by its latency, and wins when the gate holds."""
    from bertexport.search.optimize import optimize
    from bertexport.search.session import Search
    from bertexport.shipping.runtime import Artifact
    from tests.searchclock import inject_search_clock

    import bertexport.search.optimize as optimize_module

    real_final_timing = optimize_module._final_timing
    real_side_by_side = Search.side_by_side_ratio
    inject_search_clock(monkeypatch, lambda c: 0.5 if c.early_exit else (1.0 if c.int8 else 2.0))
    monkeypatch.setattr(X, "time_paths", _fake_paths)
    kw = dict(budget="5m", backends={"onnxruntime"}, threads=1)  # the default gate: 1 point of accuracy
    res = optimize(str(keyword_model), labelled, tmp_path / "ee", early_exit="auto", **kw)
    section = res.report["early_exit"]
    assert section["asked"] == "auto" and section["skipped"] is None and section["agreement_target"] == pytest.approx(0.995)
    (cand,) = [c for c in res.report["candidates"] if c["candidate"]["early_exit"]]
    assert cand["candidate"]["name"] == section["candidate"] == f"early-exit/{section['target']}"
    assert cand["label"].startswith("early exit + ") and cand["status"] == section["status"]
    # built from the search slice only: heads trained on it, the threshold chosen on it
    manifest = json.loads((Path(cand["artifact"]) / "manifest.json").read_text())
    early = manifest["early_exit"]
    assert early["data"]["texts"] == res.report["data"]["search"]["rows"] == section["search_slice"]["rows"]
    assert early["agreement_gate"] == pytest.approx(0.995) and section["threshold"] == early["threshold"]
    # no parity gate of the profile's on it, as on every build the search makes (its built-in texts are out of a
    # narrow classifier's domain); the figures are still recorded, and the gate is judged on the slice
    assert manifest["parity"]["gates"] == {} and manifest["parity"]["checks"]["real-lengths"]["agreement"] is not None
    sl, lat = section["search_slice"], section["latency"]
    assert sum(sl["exits"].values()) == sl["rows"] and sum(sl["shares"]) == pytest.approx(1.0)
    if section["threshold"] < 1.0:
        # the latency: the slice's mean row cost over the exit paths (from the injected clock), row p90 and worst case
        expected = 0.8 * (sl["shares"][0] * 0.5 + sl["shares"][1] * 1.0)
        assert lat["mean_ms"] == pytest.approx(expected) == pytest.approx(cand["latency_ms"])
        assert lat["worst_ms"] == pytest.approx(0.8) and 0.4 - 1e-9 <= lat["p90_ms"] <= 0.8 + 1e-9
        assert cand["status"] in ("passed", "failed", "undecided")  # judged by the gate, on the held-out slice when not refuted
        assert cand["metrics"]["metric_reference"] > 90 and "metric_drop" in cand["metrics"]
    md = (res.artifact / "search.md").read_text()
    assert "Early exit (--early-exit auto" in md and f"| {cand['label']} |" in md and "worst case (no row exits)" in md
    if cand["status"] == "passed":
        assert section["confirm"]["agreement"] is not None and section["confirm"]["metric_drop"] <= 1.0
        assert res.report["winner"]["name"] == cand["candidate"]["name"]
        published = json.loads((res.artifact / "manifest.json").read_text())
        assert published["early_exit"]["threshold"] == section["threshold"] and published["search"]["early_exit"] == section
        rng = np.random.default_rng(5)
        truth = [int(rng.random() < 0.5) for _ in range(40)]
        texts = [keyword_sentence(rng, int(rng.integers(4, 20)), "excellent" if y else None) for y in truth]
        r = CliRunner().invoke(cli, ["run", str(res.artifact), *texts, "--json", "-"])
        assert r.exit_code == 0, r.output
        got = [json.loads(line)["label"] for line in r.stdout.strip().splitlines()]
        expected_labels = [["absent", "present"][y] for y in truth]
        assert np.mean([g == e for g, e in zip(got, expected_labels)]) >= 0.9, (got, expected_labels)

    # optimize's final interleaved timing, for real (ONNX Runtime): one call per exit path, folded per round
    from bertexport.core.progress import Reporter
    from bertexport.search.candidates import Candidate
    from bertexport.search.session import Trial

    mix = X.exit_mix(section)
    name = cand["candidate"]["name"]
    assert list(mix) == [name] and mix[name] == sl["shares"]
    trial = Trial(Candidate(**{k: v for k, v in cand["candidate"].items() if k != "name"}), "passed",
                  latency_ms=cand["latency_ms"], artifact=cand["artifact"])
    with Artifact(cand["artifact"], threads=1) as art:
        encoder = art.encoder
    pytorch = SimpleNamespace(infer=lambda feeds: None)  # only its own row of the table reads it
    plain = next(c for c in res.report["candidates"] if c["artifact"] and not c["candidate"]["early_exit"])
    single = Trial(Candidate(**{k: v for k, v in plain["candidate"].items() if k != "name"}), "passed",
                   latency_ms=plain["latency_ms"], artifact=plain["artifact"])
    final = real_final_timing([trial, single], None, pytorch, encoder, 1, 32, 1, Reporter(), exit_paths=mix)
    assert set(final) == {"pytorch", name, single.candidate.name}
    assert final[name]["p50_ms"] > 0 and final[name]["p90_ms"] >= final[name]["p50_ms"]
    vs = final[name]["vs_fastest_single"]  # what ranks it: its round-by-round ratio to the fastest single model
    assert vs["name"] == single.candidate.name and 0 < vs["round_ratio_p10"] <= vs["round_ratio_p90"]

    # the search's side-by-side timing, for real, both ways: an early-exit build's paths mixed by its shares of rows
    import math

    from bertexport.judging.compare import fixed_cell_feeds

    trial.exit_shares = sl["shares"]
    s = object.__new__(Search)
    s.threads, s.batch, s.sequence, s._machine = 1, 1, 32, {"cpu": "test"}
    s._feeds = fixed_cell_feeds(encoder.encode, ["an excellent film", "a dull one"], 1, 32)
    for best, this in ((single, trial), (trial, single)):
        s.best = best
        with Artifact(this.artifact, threads=1, allow_rejected=True) as art:
            ratio = real_side_by_side(s, this, art, Path(this.artifact))
            assert math.isfinite(ratio) and ratio > 0 and real_side_by_side(s, this, art, Path(this.artifact)) == ratio
        assert len(list(Path(this.artifact).parent.glob(Path(this.artifact).name + ".side-by-side-*.json"))) == 1

    # a rerun builds no heads (cached on the same search slice); off leaves search.json as it was before --early-exit
    again = optimize(str(keyword_model), labelled, tmp_path / "again", early_exit="auto", **kw)
    assert again.report["early_exit"]["cached"] and again.report["early_exit"]["threshold"] == section["threshold"]
    off = optimize(str(keyword_model), labelled, tmp_path / "off", early_exit="off", **kw)
    assert "early_exit" not in off.report and not any(c["candidate"]["early_exit"] for c in off.report["candidates"])
    assert "early_exit" not in json.loads((off.artifact / "manifest.json").read_text())["search"]
    assert [c["candidate"]["name"] for c in off.report["candidates"]] == [
        c["candidate"]["name"] for c in res.report["candidates"] if not c["candidate"]["early_exit"]]
    assert "Early exit" not in (off.artifact / "search.md").read_text()
