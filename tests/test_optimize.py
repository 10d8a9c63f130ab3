"""``optimize`` on tiny models trained or built in the session: candidates follow the CPU's
features, int8 regions are restored to float until the gate holds, prune/budget/rerun,
no winner -> exit 1 with ``.rejected``, and the winner's manifest carries the search."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from bertexport.cli import cli
from bertexport.judging.gates import Gates
from bertexport.search.candidates import Candidate
from bertexport.core.errors import GateFailed, UserError
from bertexport.core.manifest import load_manifest, verify_files
from bertexport.search.optimize import candidate_recipes, optimize, parse_budget
from tests.tinymodels import write_keyword_jsonl


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    # the default 1-point gate needs >= 200 held-out rows
    return write_keyword_jsonl(tmp_path_factory.mktemp("data") / "kw.jsonl", seed=5, rows=500)


@pytest.fixture(scope="module")
def texts(labelled, tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "texts.txt"
    path.write_text("\n".join(json.loads(l)["text"] for l in labelled.read_text().splitlines()))
    return path


def test_candidates_follow_cpu_features():
    both = {"onnxruntime", "openvino"}
    zen5 = candidate_recipes({"avx512_vnni", "avx512_bf16"}, both)
    xeon = candidate_recipes({"avx512_vnni"}, both)
    avx2 = candidate_recipes({"avx2"}, {"onnxruntime"})
    assert zen5[0].anchor and zen5[0].runtime["inference_precision"] == "bf16"
    assert any(c.recipe == "ov-bf16" for c in zen5)
    assert not any("bf16" in json.dumps(c.to_dict()) for c in xeon)  # no emulated bf16, ever
    assert xeon[0].anchor and xeon[0].runtime["inference_precision"] == "f32"
    assert [c.recipe for c in avx2] == ["ort-fused-int8-pt-avx2", "ort-fused-int8-pc-avx2", "ort-int8-avx2", "ort-fp32"]
    assert candidate_recipes({"avx512_bf16"}, set()) == []


def test_budget_parsing():
    assert parse_budget("20m") == 1200 and parse_budget("90s") == 90 and parse_budget("1.5h") == 5400 and parse_budget(30) == 30
    for bad in ("soon", "-5m", "0"):
        with pytest.raises(UserError):
            parse_budget(bad)


def test_regions_restored_until_the_gate_holds(tiny, texts, tmp_path):
    # int8 of even a tiny encoder moves embeddings by more than this strict gate allows;
    # restoring the most harmful regions (ranked by quantizing each alone) brings it back
    res = optimize(str(tiny("bert")), texts, tmp_path / "emb", gates=Gates(min_cosine=0.99995), budget="5m",
                   backends={"onnxruntime"}, threads=1)
    trials = res.report["candidates"]
    recipes = [t["candidate"]["recipe"] for t in trials if t["candidate"]["keep_float"]]
    assert recipes, "no candidate was restored region by region"
    ladder = [len(t["candidate"]["keep_float"]) for t in trials if t["candidate"]["recipe"] == recipes[0]]
    assert ladder[0] == 0 and ladder == sorted(ladder) and len(ladder) > 1
    assert all(a * 2 == b or b == ladder[-1] for a, b in zip(ladder[1:], ladder[2:]))  # 1, 2, 4, ...
    first = next(t for t in trials if t["candidate"]["recipe"] == recipes[0])
    assert first["status"] == "failed" and "cosine_min" in first["reason"]
    ranking = res.report["region_ranking"]
    assert ranking and all(r["region"].split("@")[0] in ("attention_qkv", "attention_output", "ffn_input", "ffn_output")
                           for r in ranking)
    assert [r["harm"] for r in ranking] == sorted((r["harm"] for r in ranking), reverse=True)
    restored = [t for t in trials if t["candidate"]["keep_float"] and t["status"] == "passed"]
    assert restored or any(t["status"] == "passed" for t in trials)
    w = res.report["winner"]
    assert w["search_metrics"]["cosine_min"] >= 0.99995 and w["confirm_metrics"]["cosine_min"] >= 0.99995


def test_labelled_search_manifest_and_rerun(keyword_model, labelled, tmp_path):
    res = optimize(str(keyword_model), labelled, tmp_path / "kw", budget="5m", threads=1)  # default gate: 1 point
    m = load_manifest(res.artifact)
    assert m["status"] == "passed" and verify_files(res.artifact, m) == []
    s = m["search"]
    assert s["gate"] == {"max_accuracy_drop": 1.0} and s["winner"]["name"] == res.report["winner"]["name"]
    assert s["data"]["search"]["rows"] + s["data"]["confirm"]["rows"] == 500
    assert s["winner"]["confirm_metrics"]["metric_drop"] <= 1.0 and "macro_f1_candidate" in s["winner"]["confirm_metrics"]
    assert {c["status"] for c in s["candidates"]} <= {"passed", "failed", "undecided", "pruned", "skipped", "error"}
    # nothing is pruned by prediction: every pruned candidate was built and measured slower
    assert all(c["latency_ms"] is not None and "measured slower" in c["reason"] for c in s["candidates"] if c["status"] == "pruned")
    assert all("within_noise" in c and "batch_invariance" in c for c in s["candidates"]) and s["batch_invariant"] is False
    stats = s["winner"]["confirm_metrics"]["stats"]["metric_drop"]
    assert stats["rows"] == s["data"]["confirm"]["rows"] and stats["low"] <= stats["estimate"] <= stats["high"]
    assert (res.artifact / "search.md").is_file() and (res.artifact / "search.png").is_file()
    anchor = [c for c in res.report["candidates"] if c["candidate"]["anchor"]]
    assert anchor and res.report["final_timing"][anchor[0]["candidate"]["name"]]["vs_anchor"] == pytest.approx(1.0)
    r = CliRunner().invoke(cli, ["run", str(res.artifact), "an excellent film", "--json", "-"])
    assert r.exit_code == 0 and json.loads(r.stdout)["label"] in ("absent", "present")
    again = optimize(str(keyword_model), labelled, tmp_path / "kw2", budget="5m", threads=1, search_again=True)
    assert all(c["cached"] for c in again.report["candidates"] if c["artifact"])  # searched again: every build reused


def test_budget_stops_the_search_after_the_first_build(keyword_model, labelled, tmp_path):
    res = optimize(str(keyword_model), labelled, tmp_path / "b", budget=0.001, backends={"onnxruntime"}, threads=1)
    statuses = [c["status"] for c in res.report["candidates"]]
    assert statuses[0] in ("passed", "failed") and set(statuses[1:]) == {"skipped"}


def test_no_winner_exits_1_and_keeps_the_best_as_rejected(tiny, texts, tmp_path):
    with pytest.raises(GateFailed) as e:
        optimize(str(tiny("bert")), texts, tmp_path / "none", gates=Gates(max_abs_diff=1e-12), budget="2m",
                 backends={"onnxruntime"}, threads=1)
    rejected = tmp_path / "none.rejected"
    assert e.value.exit_code == 1 and not (tmp_path / "none").exists()
    m = load_manifest(rejected)
    assert m["status"] == "rejected" and m["search"]["winner"] is None and (rejected / "search.md").is_file()
    # run again: the same verdict, replayed
    with pytest.raises(GateFailed) as again:
        optimize(str(tiny("bert")), texts, tmp_path / "none", gates=Gates(max_abs_diff=1e-12), budget="2m",
                 backends={"onnxruntime"}, threads=1, force=True)
    assert again.value.exit_code == 1 and "replayed" in str(again.value) and again.value.result.report["replayed"]
    assert load_manifest(rejected)["status"] == "rejected" and not (tmp_path / "none").exists()


def test_cli_refuses_bad_input_before_loading(tiny, tmp_path):
    r = CliRunner().invoke(cli, ["optimize", str(tiny("bert")), "--data", str(tmp_path / "nope.csv"), "-o", str(tmp_path / "o")])
    assert r.exit_code == 2 and "not found" in r.stderr
    r = CliRunner().invoke(cli, ["optimize", str(tiny("bert")), "-o", str(tmp_path / "o"), "--budget", "soon"])
    assert r.exit_code == 2 and "budget" in r.stderr
    r = CliRunner().invoke(cli, ["optimize", str(tiny("bert")), "-o", str(tmp_path / "o"), "--max-accuracy-drop", "1"])
    assert r.exit_code == 2 and "labelled" in r.stderr


def test_distilled_student_is_judged_against_the_original(keyword_model, labelled, tmp_path):
    res = optimize(str(keyword_model), labelled, tmp_path / "d", budget="5m", distill="1", distill_epochs=1,
                   backends={"onnxruntime"}, threads=1, gates=Gates(max_accuracy_drop=100.0))
    students = [c for c in res.report["candidates"] if c["candidate"]["student_layers"] == 1]
    evaluated = [c for c in students if c["status"] in ("passed", "failed")]
    assert evaluated and all("metric_drop" in c["metrics"] and c["metrics"]["metric_reference"] > 90 for c in evaluated)
    # the student really is smaller: half the transformer layers carry weight MatMuls (counted
    # by layer: its first-token skip computes Q/K/V apart where the teacher's are one fused Attention)
    import re
    from pathlib import Path

    from bertexport.building.graph import weight_nodes

    def layers_with_matmuls(c):
        (onnx_file,) = (Path(c["artifact"]) / "model").glob("*.onnx")
        return len({re.search(r"/layer\.(\d+)/", n).group(1) for n in weight_nodes(onnx_file, ["MatMul", "MatMulInteger"])
                    if "/layer." in n})

    student = evaluated[0]
    base = student["candidate"]["recipe"].split("+")[0]  # a student's recipe adds +skip/+emb8 to the original's
    teacher = next(c for c in res.report["candidates"] if c["candidate"]["recipe"] == base
                   and not c["candidate"]["student_layers"] and c["artifact"])
    assert layers_with_matmuls(teacher) == 2 and layers_with_matmuls(student) == 1


def test_split_is_stratified_by_label():
    from bertexport.search.session import split_slices as _split
    from bertexport.core.textdata import TextSet

    labels = np.array([0] * 270 + [1] * 30)
    ts = TextSet([f"t{i}" for i in range(300)], None)
    search, confirm = _split(ts, labels, 0.5, 0, 600)
    assert (search.labels == 1).sum() == 15 and (confirm.labels == 1).sum() == 15
    assert len(search.data.texts) + len(confirm.data.texts) == 300
    assert not set(search.data.texts) & set(confirm.data.texts)


def test_too_small_data_and_too_deep_students_are_refused_before_any_work(tiny, keyword_model, labelled, tmp_path):
    small = tmp_path / "small.jsonl"
    small.write_text("\n".join(labelled.read_text().splitlines()[:300]))
    r = CliRunner().invoke(cli, ["optimize", str(keyword_model), "--data", str(small), "-o", str(tmp_path / "o")])
    assert r.exit_code == 2 and "150 rows" in r.stderr and "needs >= 200 rows" in r.stderr and "give >= 399 rows" in r.stderr
    r = CliRunner().invoke(cli, ["optimize", str(tiny("bert")), "--distill", "99", "-o", str(tmp_path / "o")])
    assert r.exit_code == 2 and "the model has 2 layers" in r.stderr and "Traceback" not in r.output
    assert not (tmp_path / "o").exists()


def test_data_of_one_class_is_refused_under_an_accuracy_gate(tiny, tmp_path):
    """An accuracy gate on one class cannot see a change on the others (it once ran a full
    search and PASSED): refused before any model loads, naming the gate that would work."""
    from bertexport.judging.gates import Gates
    from bertexport.search.optimize import check_classes
    from bertexport.core.textdata import load_texts

    one = tmp_path / "one.jsonl"
    one.write_text("".join(json.dumps({"text": f"review number {i}", "label": 1}) + "\n" for i in range(400)))
    model = tiny("bert", "text-classification")
    for gate in ([], ["--max-accuracy-drop", "2"]):
        r = CliRunner().invoke(cli, ["optimize", str(model), "--data", str(one), *gate, "-o", str(tmp_path / "o")])
        assert r.exit_code == 2, (r.exit_code, r.output, r.stderr)
        assert "every row has the same label (1)" in r.stderr and "--min-agreement" in r.stderr
        assert "\n" not in r.stderr.strip() and "Traceback" not in r.output
    assert not (tmp_path / "o").exists()
    ts = load_texts(one)
    check_classes(ts, np.ones(400, dtype=int), Gates(min_agreement=0.98))  # agreement needs no labels: allowed
    check_classes(ts, np.arange(400) % 2, Gates(max_accuracy_drop=1.0))  # two classes: allowed


def test_search_measures_float_recipes_instead_of_predicting_them(tiny, texts, tmp_path, monkeypatch):
    """A strict gate makes int8 restore most regions; the float recipe is then measured, not
    pruned by its class, and wins because it is faster. Latency comes from an injected
    clock (tests never time): int8 1.0 ms + 0.4 ms per float region, fp32 2.0 ms."""
    from tests.searchclock import inject_search_clock

    def fake_ms(cand):
        return 2.0 if cand.precision == "fp32" else 1.0 + 0.4 * len(cand.keep_float)

    inject_search_clock(monkeypatch, fake_ms)
    res = optimize(str(tiny("bert")), texts, tmp_path / "f", gates=Gates(min_cosine=0.99995), budget="5m",
                   backends={"onnxruntime"}, threads=1)
    trials = res.report["candidates"]
    fp32 = [t for t in trials if t["candidate"]["precision"] == "fp32"]
    assert fp32 and fp32[0]["status"] == "passed" and fp32[0]["latency_ms"] == 2.0
    restored = [t for t in trials if t["candidate"]["keep_float"] and t["status"] == "passed"]
    assert all(t["latency_ms"] > 2.0 for t in restored)
    assert res.report["winner"]["name"] == fp32[0]["candidate"]["name"]


def test_a_rejection_within_noise_is_marked(tiny, texts, tmp_path):
    """The held-out verdict failed on its point estimate while its interval straddles the
    gate: the candidate is rejected, and the report says the rejection was within noise."""
    import bertexport.search.optimize as opt
    from bertexport.judging.compare import Comparison, task_metrics
    from bertexport.search.report import to_markdown

    def metrics(discordant_ref_only, n=400):
        comp = Comparison("text-classification")
        pr = np.zeros(n, int)
        pc = np.r_[np.ones(discordant_ref_only, int), np.zeros(n - discordant_ref_only, int)]
        comp.pred_reference, comp.pred_candidate, comp.pred_rows = [pr], [pc], [np.arange(n)]
        comp.decided, comp.agree, comp.samples = n, int((pr == pc).sum()), n
        return task_metrics(comp, np.zeros(n, int))

    search = object.__new__(opt.Search)
    search.gates, search.best = Gates(max_accuracy_drop=1.0), None
    search.search = search.confirm = None
    outcomes = iter([metrics(5), metrics(6)])  # search slice: 1.25 [0.4, 2.9]; held out: 1.5 [0.6, 3.2]
    search.evaluate = lambda *a, **k: next(outcomes)
    t = opt.Trial(Candidate("ort-int8", "onnxruntime", "int8", [], {}), "failed")
    search._judge(t, None, tmp_path, t.candidate)
    assert t.status == "failed" and t.noise and t.to_dict()["within_noise"]
    assert "search slice" in t.noise[0] and any("within noise" in n for n in t.noise)
    report = {"model": {"source": "m", "task": "text-classification"}, "gate": {"max_accuracy_drop": 1.0},
              "data": {"search": {"rows": 400}, "confirm": {"rows": 400}}, "cell": {"batch": 1, "sequence": 128, "threads": 1},
              "machine": {"cpu_features": []}, "elapsed_seconds": 1, "budget_seconds": 60, "winner": None,
              "final_timing": {}, "candidates": [t.to_dict()], "region_ranking": None}
    assert "within noise" in to_markdown(report)


def test_batch_invariant_keeps_only_candidates_whose_outputs_ignore_the_batch(tiny, texts, tmp_path):
    res = optimize(str(tiny("bert")), texts, tmp_path / "bi", gates=Gates(min_cosine=0.99), budget="5m",
                   backends={"onnxruntime"}, threads=1, batch_invariant=True)
    trials = [t for t in res.report["candidates"] if t["batch_invariance"] is not None]
    assert trials and res.report["batch_invariant"]
    for t in trials:
        if not t["batch_invariance"]["invariant"]:
            assert t["status"] == "excluded" and "--batch-invariant" in t["reason"]
    assert any(t["status"] == "excluded" for t in trials)  # ORT dynamic int8: one activation scale per batch
    assert load_manifest(res.artifact)["batch_invariance"]["invariant"]
