"""convert() end to end on tiny models of every family and task: real export, real ONNX
Runtime, parity measured against PyTorch."""

from __future__ import annotations

import json

import onnx
import pytest

from bertexport.convert import convert
from tests.tinymodels import tiny_int8_gates
from bertexport.manifest import load_manifest, verify_files
from bertexport.compare import Gates
from bertexport.profiles import parse_profile
from tests.tinymodels import FAMILY_TASKS

# RoBERTa-style models and DistilBERT take no segment ids; DeBERTa-v3 has type_vocab_size 0.
TAKES_TOKEN_TYPES = {"bert", "electra", "mobilebert", "albert"}
PLAIN_INT8 = parse_profile({"backend": "onnxruntime", "precision": "int8", "passes": [
    {"type": "ort-dynamic-quantize", "isa": "avx512_vnni", "per_channel": True}]}, "plain-int8")
CASES = [(f, t) for f, tasks in FAMILY_TASKS.items() for t in tasks]


@pytest.mark.parametrize("family,task", CASES, ids=[f"{f}-{t}" for f, t in CASES])
def test_convert_fp32_and_int8(tiny, tmp_path, family, task):
    ckpt = tiny(family, task)
    fp32 = convert(str(ckpt), "ort-fp32", tmp_path / "fp32", latency_runs=0)
    assert fp32.passed
    m = load_manifest(fp32.artifact)
    assert m["family"] == family and m["task"] == task
    for check in m["parity"]["checks"].values():
        assert check["cosine_min"] >= 0.9999 and check["max_abs_diff"] < 1e-3
        if task != "feature-extraction":
            assert check["agreement"] == 1.0
    names = [i["name"] for i in m["inputs"]]
    assert names[:2] == ["input_ids", "attention_mask"]
    # only the inputs a family really takes
    assert ("token_type_ids" in names) == (family in TAKES_TOKEN_TYPES)
    assert all(i["shape"][:2] == ["batch_size", "sequence_length"] for i in m["inputs"])
    assert verify_files(fp32.artifact) == []

    # int8: tolerances by this CPU's int8 kernels (tests.tinymodels.tiny_int8_gates); int8
    # accuracy is judged strictly on the trained MiniLM (test_default_model). The float
    # fallback of ort-int8 is exercised in test_decision_fallback below.
    gates = tiny_int8_gates()
    if task != "feature-extraction":  # random heads have near-tied logits: agreement is judged loosely
        gates = Gates(min_cosine=gates.min_cosine, min_agreement=min(gates.min_agreement, 0.6))
    int8 = convert(str(ckpt), PLAIN_INT8, tmp_path / "int8", latency_runs=0, gates=gates)
    q = load_manifest(int8.artifact)
    assert q["target"]["passes"][0]["type"] == "ort-dynamic-quantize"
    ops = {n.op_type for n in onnx.load(str(int8.artifact / q["model"]["path"])).graph.node}
    assert {"DynamicQuantizeLinear", "MatMulInteger"} <= ops
    if task in ("text-classification", "token-classification"):
        labels = json.loads((int8.artifact / "labels.json").read_text())
        assert len(labels) == (3 if task == "text-classification" else 5)


@pytest.mark.parametrize("family", ["bert", "roberta", "deberta-v2"])
def test_decision_fallback(tiny, tmp_path, family):
    """ort-int8's float fallback is decided on the task's decisions: restored weight nodes
    only when they buy decisions back, never more than max_float."""
    r = convert(str(tiny(family, "text-classification")), "ort-int8", tmp_path / "a", latency_runs=0,
                gates=Gates(min_cosine=0.5, min_agreement=0.5))
    notes = r.manifest["target"]["passes"][0]["notes"]
    assert notes["fallback"] == "decisions" and notes["target_agreement"] == 1.0
    assert notes["kept_float"] <= notes["max_float"] and notes["after"]["agreement"] >= notes["all_int8"]["agreement"]
    assert ("rejected" in notes["why"]) == (notes["kept_float"] > 0)  # the report says why all-int8 was not shipped
    assert len(notes["excluded_nodes"]) == notes["float_weight_nodes"]


def test_ort_fused(tiny, tmp_path):
    r = convert(str(tiny("bert", "text-classification")), "ort-fused", tmp_path / "f", latency_runs=0)
    fused = r.manifest["target"]["passes"][0]["notes"]["fused_operators"]
    assert fused.get("Attention", 0) + fused.get("SkipLayerNormalization", 0) > 0

