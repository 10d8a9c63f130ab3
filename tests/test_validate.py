"""validate: accuracy/agreement gates on tiny models, a damaged artifact fails with exit 1,
JUnit XML parses, bad inputs exit 2."""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import numpy_helper

from bertexport.cli import cli
from bertexport.building.convert import convert
from bertexport.core.manifest import load_manifest, write_manifest

LABELS = ["negative", "neutral", "positive"]


@pytest.fixture(scope="module")
def built(tiny, fp32_artifact, tmp_path_factory):
    root = tmp_path_factory.mktemp("validate")
    ckpt = tiny("bert", "text-classification")
    good = fp32_artifact("bert", "text-classification").artifact  # shared: read only
    bad = convert(str(ckpt), "ort-fp32", root / "bad", latency_runs=0).artifact
    # a damaged compile that still passes integrity checks: the classifier's weights
    # scrambled inside the graph, manifest re-written with the new checksums
    path = bad / load_manifest(bad)["model"]["path"]
    model = onnx.load(str(path))
    for init in model.graph.initializer:
        if "classifier" in init.name or init.name.startswith("onnx::MatMul"):
            arr = numpy_helper.to_array(init)
            init.CopyFrom(numpy_helper.from_array(np.random.default_rng(0).permutation(arr.ravel()).reshape(arr.shape) * -3, init.name))
    onnx.save(model, str(path))
    m = load_manifest(bad)
    m.pop("files")
    write_manifest(bad, m)
    data = root / "data.csv"
    data.write_text("text,label\n" + "\n".join(f"review {i}: {t},{LABELS[i % 3]}" for i, t in
                                                enumerate(["fine film", "dull plot", "great cast", "awful", "ok"] * 80)))
    return {"ckpt": ckpt, "good": good, "bad": bad, "data": data, "root": root}


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_good_artifact_passes_gates_and_writes_junit(built, tmp_path):
    junit = tmp_path / "j.xml"
    r = run("validate", built["good"], "--data", built["data"], "--max-accuracy-drop", "0.5", "--min-agreement", "0.99",
            "--junit", junit, "--json", tmp_path / "r.json")
    assert r.exit_code == 0, r.output
    assert "PASSED" in r.output
    suite = ET.parse(junit).getroot()
    assert suite.tag == "testsuite" and suite.get("tests") == "2" and suite.get("failures") == "0"
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["metrics"]["agreement"] == 1.0 and res["metrics"]["metric_drop"] == 0.0 and res["samples"] == 400
    # every gated figure carries its paired interval: 400 agreeing rows still allow ~0.95 points
    drop = res["metrics"]["stats"]["metric_drop"]
    assert drop["rows"] == 400 and drop["discordant"] == 0 and drop["resolution"] == 0.25
    assert drop["low"] == pytest.approx(-drop["high"]) and drop["high"] == pytest.approx(100 * 1.959964 ** 2 / (400 + 1.959964 ** 2), rel=1e-4)
    props = {p.get("name"): p.get("value") for p in suite.iter("property")}
    assert props["metric_drop.rows"] == "400" and float(props["agreement.low"]) < 1.0 and "metric_drop.high" in props


def test_the_macro_f1_gate_is_judged_and_reported(built, tmp_path):
    junit = tmp_path / "j.xml"
    r = run("validate", built["good"], "--data", built["data"], "--max-macro-f1-drop", "0.5", "--junit", junit,
            "--json", tmp_path / "r.json")
    assert r.exit_code == 0 and "(max_macro_f1_drop=0.5)" in r.output.splitlines()[-1], r.output
    assert "PASSED" in r.output and re.search(r"macro_f1_drop +0\.0000 \[0\.0000, 0\.0000\]", r.output), r.output
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["metrics"]["macro_f1_drop"] == 0.0 and res["metrics"]["stats"]["macro_f1_drop"]["rows"] == 400
    assert {c.get("name").split(":")[-1] for c in ET.parse(junit).getroot().iter("testcase")} == {"max_macro_f1_drop"}
    r = run("validate", built["bad"], "--data", built["data"], "--max-macro-f1-drop", "1")
    assert r.exit_code == 1 and "FAILED" in r.output and "macro-F1 drop" in r.output, r.output


def test_too_small_data_is_refused_with_the_rows_it_needs(built, tmp_path):
    r = run("validate", built["good"], "--data", built["data"], "--limit", "150", "--max-accuracy-drop", "1.0")
    assert r.exit_code == 2 and "150 rows" in r.output and "needs >= 200 rows" in r.output, r.output
    r = run("validate", built["good"], "--data", built["data"], "--limit", "30", "--min-agreement", "0.98")
    assert r.exit_code == 2 and "needs >= 100 rows" in r.output, r.output


def test_confidence_gate_passes_only_when_the_interval_is_inside(built, tmp_path):
    # 400 identical decisions: the drop's upper bound (0.95 points) is inside 1.0 but not inside 0.5
    r = run("validate", built["good"], "--data", built["data"], "--max-accuracy-drop", "1.0", "--confidence", "0.95")
    assert r.exit_code == 0 and "PASSED" in r.output, r.output
    r = run("validate", built["good"], "--data", built["data"], "--max-accuracy-drop", "0.5", "--confidence", "0.95")
    assert r.exit_code == 1 and "UNDECIDED" in r.output and "rows would decide it" in r.output, r.output
    assert "Traceback" not in r.output
    r = run("validate", built["bad"], "--data", built["data"], "--min-agreement", "0.95", "--confidence", "0.95")
    assert r.exit_code == 1 and r.output.count("FAILED") == 1 and "entirely <" in r.output, r.output


def test_damaged_artifact_fails_gate_with_exit_1(built, tmp_path):
    junit = tmp_path / "j.xml"
    r = run("validate", built["bad"], "--data", built["data"], "--min-agreement", "0.95", "--min-cosine", "0.99", "--junit", junit)
    assert r.exit_code == 1, r.output
    assert "FAILED" in r.output and "agreement" in r.output
    suite = ET.parse(junit).getroot()
    assert int(suite.get("failures")) >= 1
    assert suite.find("testcase/failure") is not None


def test_bad_inputs_exit_2(built, tmp_path):
    unknown = tmp_path / "u.csv"
    unknown.write_text("text,label\nhello,happy\nbye,sad\n")
    r = run("validate", built["good"], "--data", unknown, "--max-accuracy-drop", "1")
    assert r.exit_code == 2 and "labels not known to the model: happy, sad" in r.output and "0=negative" in r.output
    empty = tmp_path / "e.csv"
    empty.write_text("")
    r = run("validate", built["good"], "--data", empty, "--report-only")
    assert r.exit_code == 2 and "empty" in r.output
    r = run("validate", built["good"], "--min-agreement", "0.9", "--model", str(built["root"] / "nope"))
    assert r.exit_code == 2


def test_mismatched_model_refused_unless_forced(built, tmp_path):
    from tests.tinymodels import build_checkpoint

    other = build_checkpoint("bert", "text-classification", tmp_path / "other", tmp_path / "tok", seed=1)
    r = run("validate", built["good"], "--model", other, "--min-cosine", "0.5")
    assert r.exit_code == 2 and "not the checkpoint this artifact was built from" in r.output
    r = run("validate", built["good"], "--model", other, "--report-only", "--force")
    assert r.exit_code == 0, r.output


def test_labels_by_index_are_accepted(built, tmp_path):
    d = tmp_path / "i.jsonl"
    d.write_text("\n".join(json.dumps({"text": f"t {i}", "label": i % 3}) for i in range(9)))
    r = run("validate", built["good"], "--data", d, "--max-accuracy-drop", "0")
    assert r.exit_code == 0, r.output
