"""``optimize`` on tiny models trained or built in the session: candidates follow the CPU's
features, int8 regions are restored to float until the gate holds, prune/budget/rerun,
no winner -> exit 1 with ``.rejected``, and the winner's manifest carries the search."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from bertexport.cli import cli
from bertexport.compare import Gates
from bertexport.errors import GateFailed, UserError
from bertexport.manifest import load_manifest, verify_files
from bertexport.optimize import candidate_recipes, optimize, parse_budget
from tests.tinymodels import keyword_sentence


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    rng = np.random.default_rng(5)
    path = tmp_path_factory.mktemp("data") / "kw.jsonl"
    with open(path, "w") as f:
        for _ in range(120):
            y = int(rng.integers(0, 2))
            f.write(json.dumps({"text": keyword_sentence(rng, int(rng.integers(4, 30)), "excellent" if y else None),
                                "label": ["absent", "present"][y]}) + "\n")
    return path


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
    assert [c.recipe for c in avx2] == ["ort-int8-avx2", "ort-fp32"]  # no VNNI: ORT's AVX2 int8 preset
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
    ladder = [len(t["candidate"]["keep_float"]) for t in trials if t["candidate"]["recipe"].startswith("ort-int8")]
    assert ladder[0] == 0 and ladder == sorted(ladder) and len(ladder) > 1
    assert all(a * 2 == b or b == ladder[-1] for a, b in zip(ladder[1:], ladder[2:]))  # 1, 2, 4, ...
    assert trials[0]["status"] == "failed" and "cosine_min" in trials[0]["reason"]
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
    assert s["data"]["search"]["rows"] + s["data"]["confirm"]["rows"] == 120
    assert s["winner"]["confirm_metrics"]["metric_drop"] <= 1.0 and "macro_f1_candidate" in s["winner"]["confirm_metrics"]
    assert {c["status"] for c in s["candidates"]} <= {"passed", "failed", "pruned", "skipped", "error"}
    assert any(c["status"] == "pruned" for c in s["candidates"])  # float recipes cannot beat a passing int8 one
    assert (res.artifact / "search.md").is_file() and (res.artifact / "search.png").is_file()
    anchor = [c for c in res.report["candidates"] if c["candidate"]["anchor"]]
    assert anchor and res.report["final_timing"][anchor[0]["candidate"]["name"]]["vs_anchor"] == pytest.approx(1.0)
    r = CliRunner().invoke(cli, ["run", str(res.artifact), "an excellent film", "--json", "-"])
    assert r.exit_code == 0 and json.loads(r.stdout)["label"] in ("absent", "present")
    again = optimize(str(keyword_model), labelled, tmp_path / "kw2", budget="5m", threads=1)  # a rerun reuses every build
    assert all(c["cached"] for c in again.report["candidates"] if c["artifact"])


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
    # the student really is smaller: half the transformer layers' weight MatMuls
    from pathlib import Path

    from bertexport.graph import weight_nodes

    def matmuls(c):
        (onnx_file,) = (Path(c["artifact"]) / "model").glob("*.onnx")
        return len([n for n in weight_nodes(onnx_file, ["MatMul", "MatMulInteger"]) if "/layer." in n])

    student = evaluated[0]
    teacher = next(c for c in res.report["candidates"] if c["candidate"]["recipe"] == student["candidate"]["recipe"]
                   and not c["candidate"]["student_layers"] and c["artifact"])
    assert matmuls(teacher) > 0 and matmuls(student) * 2 == matmuls(teacher)
