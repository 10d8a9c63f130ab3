"""convert() end to end on tiny models of every family and task: real export, real ONNX
Runtime, parity measured against PyTorch (fp32: every family x every task). int8 takes the
same export through dynamic quantization: every family once, and every task on a WordPiece
(bert) and a byte-level BPE (roberta) family — the quantizer's code path does not depend on
the pair beyond that (tiny random-init int8 accuracy is not judged here: tiny_int8_gates)."""

from __future__ import annotations

import json

import onnx
import pytest

from bertexport.building.convert import convert
from tests.tinymodels import tiny_int8_gates
from bertexport.core.manifest import load_manifest, verify_files
from bertexport.judging.gates import Gates
from bertexport.building.profiles import parse_profile
from tests.tinymodels import FAMILY_TASKS, TASK_AUTO

# RoBERTa-style models and DistilBERT take no segment ids; DeBERTa-v3 has type_vocab_size 0.
TAKES_TOKEN_TYPES = {"bert", "electra", "mobilebert", "albert"}
PLAIN_INT8 = parse_profile({"backend": "onnxruntime", "precision": "int8", "passes": [
    {"type": "ort-dynamic-quantize", "isa": "avx512_vnni", "per_channel": True}]}, "plain-int8")
CASES = [(f, t) for f, tasks in FAMILY_TASKS.items() for t in tasks]
# int8: every task on two families with different tokenizers and graphs, and every other
# family once, the tasks spread so each task is quantized on three or more families
INT8_CASES = [(f, t) for f in ("bert", "roberta") for t in TASK_AUTO] + [
    ("electra", "token-classification"), ("mpnet", "question-answering"), ("mobilebert", "text-classification"),
    ("distilbert", "feature-extraction"), ("xlm-roberta", "fill-mask"), ("camembert", "text-classification"),
    ("albert", "token-classification"), ("deberta-v2", "question-answering")]


def test_int8_cases_cover_every_family_and_task():
    assert {f for f, _ in INT8_CASES} == set(FAMILY_TASKS) and {t for _, t in INT8_CASES} == set(TASK_AUTO)
    assert set(INT8_CASES) <= set(CASES) and len(set(INT8_CASES)) == len(INT8_CASES)


@pytest.mark.parametrize("family,task", CASES, ids=[f"{f}-{t}" for f, t in CASES])
def test_convert_fp32(fp32_artifact, family, task):
    fp32 = fp32_artifact(family, task)  # converted once per session, shared with the other test files
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


@pytest.mark.parametrize("family,task", INT8_CASES, ids=[f"{f}-{t}" for f, t in INT8_CASES])
def test_convert_int8(tiny, tmp_path, family, task):
    # tolerances by this CPU's int8 kernels (tests.tinymodels.tiny_int8_gates); int8
    # accuracy is judged strictly on the trained MiniLM (test_default_model). The float
    # fallback of ort-int8 is exercised in test_decision_fallback below.
    gates = tiny_int8_gates()
    if task != "feature-extraction":  # random heads have near-tied logits: agreement is judged loosely
        gates = Gates(min_cosine=gates.min_cosine, min_agreement=min(gates.min_agreement, 0.6))
    int8 = convert(str(tiny(family, task)), PLAIN_INT8, tmp_path / "int8", latency_runs=0, gates=gates)
    q = load_manifest(int8.artifact)
    assert q["family"] == family and q["task"] == task and verify_files(int8.artifact) == []
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

