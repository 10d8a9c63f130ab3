"""OpenVINO recipes and ORT static int8 on tiny models, for real (OpenVINO, NNCF, ORT)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from bertexport.building.convert import convert
from bertexport.building.profiles import load_profile
from bertexport.core.errors import BackendUnavailable
from bertexport.core.manifest import load_manifest
from tests.tinymodels import tiny_int8_gates

pytest.importorskip("openvino")

FAMILIES = ["bert", "roberta", "distilbert", "albert", "deberta-v2"]
FLOAT_RECIPES = ["openvino-fp32", "openvino-fp16"]
INT8_RECIPES = ["openvino-int8-weights", "openvino-int8", "openvino-int8-accurate", "openvino-int8-full", "ort-static-int8"]
# What depends on the family is run on every family: the conversion (fp32), the family's named
# float regions (int8-accurate keeps both FFN regions float, int8 one of them) and ORT's static
# int8; the recipes that differ only in family-agnostic settings (fp16's precision hint, weight
# compression, int8 with no float region) run on BERT only.
PER_FAMILY = {"openvino-fp32", "openvino-int8-accurate", "ort-static-int8"}
# Tiny random-init heads are not representative of trained int8 damage (it can be worse
# or better); int8 profiles are judged with their own tolerances on the real MiniLM
# (test_default_model). Here: the recipe runs, produces int8, and stays close.
TINY_INT8 = tiny_int8_gates()


@pytest.mark.parametrize("family", FAMILIES)
def test_openvino_and_static_recipes(tiny, tmp_path, family):
    ckpt = str(tiny(family, "text-classification"))
    for target in [t for t in FLOAT_RECIPES if family == "bert" or t in PER_FAMILY]:  # the profile's own tolerances
        m = convert(ckpt, target, tmp_path / target, latency_runs=0).manifest
        assert m["model"]["format"] == "openvino-ir"
        assert m["target"]["runtime"]["inference_precision"] in ("f32", "f16")
        # the profile's own gate (fp16 may flip a near-tied decision of a random-init head
        # among the several hundred built-in texts)
        gate = load_profile(target).validation
        assert all(c["agreement"] >= gate.min_agreement and c["cosine_min"] >= gate.min_cosine
                   for c in m["parity"]["checks"].values())
    for target in [t for t in INT8_RECIPES if family == "bert" or t in PER_FAMILY]:
        m = convert(ckpt, target, tmp_path / target, latency_runs=0, gates=TINY_INT8, calib_samples=48).manifest
        assert m["status"] == "passed"
        if target != "openvino-int8-weights":
            assert m["calibration"]["count"] == 48 and m["calibration"]["seed"] == 0
        assert m["parity"]["checks"]["real-lengths"]["cosine_min"] < 1.0  # int8 really changed the numbers
    conv = load_manifest(tmp_path / "openvino-fp32")["target"]["passes"][0]
    assert conv["notes"]["source"] == ("pytorch" if family == "deberta-v2" else "onnx")


def test_bf16_refused_without_native_support(tiny, tmp_path):
    import openvino as ov

    caps = ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    if "BF16" in caps:
        m = convert(str(tiny("bert")), "openvino-bf16", tmp_path / "bf16", latency_runs=0).manifest
        assert m["target"]["runtime"]["inference_precision"] == "bf16"
    else:
        with pytest.raises(BackendUnavailable, match="no native bf16"):
            convert(str(tiny("bert")), "openvino-bf16", tmp_path / "bf16", latency_runs=0)
        assert not (tmp_path / "bf16").exists()


def test_missing_openvino_names_the_extra():
    code = ("import sys; sys.modules['openvino'] = None\n"
            "from bertexport.backends import get_backend\n"
            "try:\n    get_backend('openvino').check_available()\n"
            "except Exception as e:\n    print(type(e).__name__, e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.startswith("BackendUnavailable") and "bertexport[openvino]" in out


def test_calibration_bad_inputs(tiny, tmp_path):
    from click.testing import CliRunner

    from bertexport.cli import cli

    def run(*a):
        return CliRunner().invoke(cli, ["convert", str(tiny("bert")), "-t", "openvino-int8", "-o", str(tmp_path / "o"),
                                        "--latency-runs", "0", *map(str, a)])

    (tmp_path / "empty.txt").write_text("")
    r = run("--calib", tmp_path / "empty.txt")
    assert r.exit_code == 2 and "no usable text" in r.output
    (tmp_path / "c.csv").write_text("body\nhello\n")
    r = run("--calib", tmp_path / "c.csv")
    assert r.exit_code == 2 and "has no 'text' column (columns: body)" in r.output
    assert "--text-column" in r.output
    (tmp_path / "few.txt").write_text("one\ntwo\nthree\n")
    r = run("--calib", tmp_path / "few.txt")
    assert r.exit_code == 2 and "too few" in r.output
    assert not (tmp_path / "o").exists()
    # one reader for every command (core/textdata.py): a line that is not UTF-8 is refused with
    # its line number before any model loads, never skipped silently; empty lines are skipped
    # and counted in the manifest
    lines = [f"calibration sentence number {i} about movies".encode() for i in range(40)] + [b"\xff\xfe bad bytes"]
    (tmp_path / "mixed.txt").write_bytes(b"\n".join(lines))
    r = run("--calib", tmp_path / "mixed.txt")
    assert r.exit_code == 2 and "mixed.txt:41 is not valid UTF-8" in r.output and not (tmp_path / "o").exists()
    (tmp_path / "gaps.txt").write_bytes(b"\n".join(lines[:40] + [b"", b"   "]))
    r = CliRunner().invoke(cli, ["convert", str(tiny("bert")), "-t", "openvino-int8-full", "-o", str(tmp_path / "ok"),
                                 "--latency-runs", "0", "--calib", str(tmp_path / "gaps.txt")])
    cal = load_manifest(tmp_path / "ok")["calibration"] if r.exit_code == 0 else load_manifest(tmp_path / "ok.rejected")["calibration"]
    assert cal["count"] == 40 and cal["skipped"] == {"empty text": 2}
