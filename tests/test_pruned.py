"""``optimize --prune`` (bertexport/search/pruned.py): budgets planned before any work,
pruned originals built with the search's int8 recipes and judged like any candidate, named
by what they are in search.md, cached for a rerun; other tasks skipped with a reason."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from bertexport.cli import cli
from bertexport.core.errors import UserError
from bertexport.search.pruned import AUTO_BUDGETS, plan_pruning, pruned_candidates
from bertexport.search.candidates import Candidate
from tests.tinymodels import checkpoint as _ckpt, write_keyword_jsonl


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    # the default 1-point gate needs >= 200 held-out rows
    return write_keyword_jsonl(tmp_path_factory.mktemp("data") / "kw.jsonl", seed=7, rows=500)


def test_plan_reads_auto_fractions_and_off_and_refuses_what_pruning_cannot_take(tiny, keyword_model):
    classifier, embedder = _ckpt(keyword_model), _ckpt(tiny("bert"))
    assert not plan_pruning(None, classifier).on and not plan_pruning("off", classifier).on
    auto = plan_pruning("auto", classifier)
    assert auto.on and auto.budgets == list(AUTO_BUDGETS) and auto.reason is None
    assert plan_pruning("0.75, 0.6,0.75", classifier).budgets == [0.6, 0.75]
    assert plan_pruning([0.5], classifier).budgets == [0.5]
    skipped = plan_pruning("auto", embedder)  # auto: skipped with the reason, reported
    assert skipped.on and skipped.budgets == [] and "text-classification only" in skipped.reason
    for bad, message in (("0.6", "text-classification only"), ("1.2", "MAC budget"), ("0", "MAC budget"),
                         ("half", "fractions of the MACs"), ("auto,0.6", "cannot be combined")):
        with pytest.raises(UserError, match=message):
            plan_pruning(bad, embedder if bad == "0.6" else classifier)
    with pytest.raises(UserError, match="not mpnet"):
        plan_pruning("0.6", _ckpt(tiny("mpnet", "text-classification")))


def test_pruned_candidates_are_named_by_what_they_are():
    from bertexport.search.report import candidate_label

    base = Candidate("ort-fused-int8-pt-avx2", "onnxruntime", "int8", [{"type": "ort-dynamic-quantize"}], {}, anchor=True)
    (c,) = pruned_candidates(0.6, [base])
    assert c.pruned == 0.6 and not c.anchor and c.passes == base.passes and c.name == "pruned-0.6/ort-fused-int8-pt-avx2"
    assert candidate_label(c.to_dict()) == "pruned 0.6 MACs + ort-fused-int8-pt-avx2"


def test_a_budget_that_cannot_beat_a_passing_candidate_is_never_pruned():
    """A build pruned to a fraction f of the MACs is predicted at no less than 0.6 x f x the
    original's fastest int8 time; once a candidate passed below that, the budget is skipped with
    the reason, before any pruning (``run`` would need the teacher otherwise: it has none here)."""
    from types import SimpleNamespace

    from bertexport.core.progress import Reporter
    from bertexport.search.pruned import PrunedSearch, PrunePlan
    from bertexport.search.session import Trial

    base = Candidate("ov-int8", "openvino", "int8", [{"type": "nncf-quantize"}], {})
    student = Candidate("ov-int8", "openvino", "int8", [{"type": "nncf-quantize"}], {}, student="L2-H384")
    original = Trial(base, "passed", latency_ms=10.0)
    best = Trial(student, "passed", latency_ms=3.5)
    search = SimpleNamespace(trials=[original, best], best=best, reporter=Reporter(), remaining=lambda: 600.0,
                             log_board=lambda t: None)
    ps = PrunedSearch(search, plan=PrunePlan([0.6, 0.75, 0.85], None, "auto"), ckpt=None, teacher_model=None,
                      tokenizer=None, recipes=[base])
    records = ps.run()
    assert [r["mac_budget"] for r in records] == [0.6, 0.75, 0.85]
    assert [r["status"] for r in records] == ["skipped"] * 3 and all(r["checkpoint"] is None for r in records)
    assert records[0]["reason"] == ("never pruned: L2-H384/ov-int8 passed at 3.50 ms, faster than pruning to 0.6 of the "
                                    "MACs can be (at least 0.6 x 0.6 x the original's 10.00 ms = 3.60 ms)")
    assert all("faster than pruning to" in r["reason"] for r in records)
    best.latency_ms = 4.0  # 0.6 x 0.6 x 10 ms could beat it: that budget would be pruned (and needs the teacher)
    assert ps._faster_already(0.6, 10.0) is None and ps._faster_already(0.75, 10.0)


def test_cli_refuses_bad_prune_before_any_work(tiny, tmp_path):
    r = CliRunner().invoke(cli, ["optimize", str(tiny("bert")), "--prune", "0.6", "-o", str(tmp_path / "o")])
    assert r.exit_code == 2 and "text-classification only" in r.stderr and "Traceback" not in r.output
    r = CliRunner().invoke(cli, ["optimize", str(tiny("bert")), "--prune", "2", "-o", str(tmp_path / "o")])
    assert r.exit_code == 2 and "MAC budget" in r.stderr
    assert not (tmp_path / "o").exists()


def test_optimize_tries_pruned_originals_as_candidates_and_a_rerun_prunes_nothing(keyword_model, labelled, tmp_path,
                                                                                   monkeypatch):
    """Latency comes from an injected clock (tests never time; on a tiny model the pruned
    builds' real gain is below the timing noise): a build of the original pruned to a
    fraction f of its MACs takes f ms, the original's int8 builds 1 ms, fp32 2 ms. So the
    pruned candidates are judged by the gate rather than pruned by their latency."""
    from bertexport.search.optimize import optimize
    from tests.searchclock import inject_search_clock

    inject_search_clock(monkeypatch, lambda cand: (cand.pruned or 1.0) * (2.0 if cand.precision == "fp32" else 1.0))
    kw = dict(budget="5m", prune="auto", backends={"onnxruntime"}, threads=1)  # the default gate: 1 point
    res = optimize(str(keyword_model), labelled, tmp_path / "p", **kw)
    pruning = res.report["pruning"]
    assert pruning["asked"] == "auto" and pruning["budgets"] == list(AUTO_BUDGETS) and pruning["skipped"] is None
    records = pruning["records"]
    assert [r["mac_budget"] for r in records] == sorted(AUTO_BUDGETS)  # most aggressive first
    first = records[0]
    assert first["status"] in ("passed", "not passed") and first["mac_fraction"] <= 0.6 and not first["cached"]
    assert first["shape"].startswith("L2-") and 0 <= first["agreement"] <= 1
    cands = [c for c in res.report["candidates"] if c["candidate"]["pruned"] == 0.6]
    assert len(cands) == len(first["candidates"]) >= 1
    for c in cands:  # built from the pruned checkpoint
        assert c["label"].startswith("pruned 0.6 MACs + ")
        manifest = json.loads((Path(c["artifact"]) / "manifest.json").read_text())
        config = json.loads((Path(manifest["source"]["path"]) / "config.json").read_text())
        assert config["intermediate_size"] < 64  # the keyword model's FFN is 64
    judged = cands[0]  # faster than the best passing original: judged by the gate against the original, like any candidate
    assert judged["status"] in ("passed", "failed", "undecided") and judged["metrics"]["metric_reference"] > 90
    assert "metric_drop" in judged["metrics"]
    if judged["status"] == "passed":  # held out: it met the gate, and it is the fastest; a larger budget would be slower
        assert judged["confirm_metrics"]["metric_drop"] <= 1.0 and first["status"] == "passed"
        assert res.report["winner"]["name"] == judged["candidate"]["name"]
        assert all(r["status"] == "skipped" and "0.6 of the MACs passed" in r["reason"] for r in records[1:])
    else:
        assert judged["reason"] and records[1]["checkpoint"]  # missed: the next budget was tried
    md = (res.artifact / "search.md").read_text()
    assert "Post-training pruning of the original" in md and all(f"| {c['label']} |" in md for c in cands)
    assert (res.artifact / "search.png").is_file()

    # a rerun prunes nothing: with the time budget spent at once, only cached pruned checkpoints are used
    again = optimize(str(keyword_model), labelled, tmp_path / "p2", **(kw | {"budget": 0.001}))
    pruned_before = {r["mac_budget"]: r["checkpoint"] for r in records if r["checkpoint"]}
    for r in again.report["pruning"]["records"]:
        if r["mac_budget"] in pruned_before:
            assert r["cached"] and r["checkpoint"] == pruned_before[r["mac_budget"]], r
        else:
            assert r["checkpoint"] is None and r["status"] == "skipped", r


def test_auto_skips_a_model_pruning_cannot_take_with_the_reason(tiny):
    """The report section and its search.md line for ``--prune auto`` on an embedding model
    (the keyword test above covers the section inside a whole search)."""
    from types import SimpleNamespace

    from bertexport.core.progress import Reporter
    from bertexport.search.pruned import pruned_search
    from bertexport.search.report import pruning_markdown

    plan = plan_pruning("auto", _ckpt(tiny("bert")))
    pruner = pruned_search(SimpleNamespace(reporter=Reporter()), plan=plan, ckpt=None, teacher_model=None, tokenizer=None,
                           recipes=[])
    section = pruner.section() if pruner.run() == [] else None  # nothing else is read: nothing is pruned
    assert section["asked"] == "auto" and section["records"] == [] and "text-classification only" in section["skipped"]
    assert pruning_markdown(section) == [
        "Post-training pruning (--prune auto): skipped — post-training pruning supports text-classification only (its "
        "loss and agreement are one decision per text), not feature-extraction"]
    assert pruned_search(None, plan=plan_pruning("off", _ckpt(tiny("bert")))) is None  # off: no section
