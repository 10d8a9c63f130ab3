"""ort-dynamic-quantize and ort-static-quantize: named regions stay float, the sensitivity
scan is cached, the decision fallback's group search finds the nodes that matter, sensitive
nodes are excluded from static int8."""

from __future__ import annotations

from pathlib import Path

import pytest

from bertexport.building.convert import convert
from bertexport.core.errors import UserError
from bertexport.building.graph import Graph
from bertexport.building.passes import get_pass
from bertexport.building.profiles import parse_profile


def _graph(artifact: Path) -> Graph:
    return Graph.load(next((artifact / "model").glob("*.onnx")))


def _profile(passes: list[dict]):
    return parse_profile({"backend": "onnxruntime", "precision": "int8", "passes": passes,
                          "validation": {"min_cosine": 0.5, "min_agreement": 0.5}}, "test")


@pytest.mark.parametrize("family", ["bert", "distilbert"])
def test_dynamic_int8_keeps_named_regions_float(tiny, tmp_path, family):
    ckpt = str(tiny(family))
    art = convert(ckpt, _profile([{"type": "ort-dynamic-quantize", "keep_float": ["ffn_output"]}]), tmp_path / "a",
                  latency_runs=0).artifact
    g = _graph(art)
    float_matmuls = [n.name for n in g.nodes if n.op_type == "MatMul" and any(i in g.initializers for i in n.input)]
    int8 = [n for n in g.nodes if n.op_type in ("MatMulInteger", "DynamicQuantizeMatMul")]
    assert len(float_matmuls) == 2  # one FFN output per layer, both layers
    assert all(("output/dense" in n or "ffn/lin2" in n) for n in float_matmuls)
    assert len(int8) >= 10  # the other weight MatMuls are int8


def test_keep_float_accepts_one_layer_and_refuses_unknown_regions(tiny, tmp_path):
    art = convert(str(tiny("bert")), _profile([{"type": "ort-dynamic-quantize", "keep_float": ["ffn_input@1"]}]),
                  tmp_path / "a", latency_runs=0).artifact
    g = _graph(art)
    float_matmuls = [n.name for n in g.nodes if n.op_type == "MatMul" and any(i in g.initializers for i in n.input)]
    assert len(float_matmuls) == 1 and float_matmuls[0].endswith("encoder/layer.1/intermediate/dense/MatMul")
    with pytest.raises(UserError, match="not a region"):
        get_pass("ort-dynamic-quantize").make_config({"keep_float": ["ffn"]})


def test_static_int8_excludes_sensitive_nodes_and_regions(tiny, tmp_path):
    art = convert(str(tiny("bert")), _profile([{"type": "ort-static-quantize", "keep_float": ["ffn_input", "ffn_output"],
                                                "calibration_samples": 16}]), tmp_path / "s", latency_runs=0).artifact
    g = _graph(art)
    quantized_inputs = {i for n in g.nodes if n.op_type == "DequantizeLinear" for i in n.output}
    for n in g.nodes:
        ffn = n.op_type == "MatMul" and "attention" not in n.name and ("intermediate/dense" in n.name or "output/dense" in n.name)
        if n.op_type in ("LayerNormalization", "Softmax") or ffn:
            assert not any(i in quantized_inputs for i in n.input), n.name
    assert any(n.op_type == "QuantizeLinear" for n in g.nodes)


def test_sensitivity_scan_is_cached(tiny, tmp_path):
    """Converting the same export again with the same calibration and settings reuses the
    scan's answer instead of re-quantizing per node (the default command's ~50 s)."""
    prof = tmp_path / "scan.toml"
    prof.write_text('backend = "onnxruntime"\nprecision = "int8"\n[[passes]]\ntype = "ort-dynamic-quantize"\n'
                    'target_min_cosine = 0.99999999\nmax_excluded_fraction = 0.5\n[validation]\nmin_cosine = 0.5\n'
                    'min_agreement = 0.5\n')
    ckpt = str(tiny("bert", "feature-extraction"))
    first = convert(ckpt, prof, tmp_path / "a", latency_runs=0).manifest["target"]["passes"][0]["notes"]
    again = convert(ckpt, prof, tmp_path / "b", latency_runs=0).manifest["target"]["passes"][0]["notes"]
    assert first["scan"] == "ran" and again["scan"] == "cached"
    assert again["excluded_nodes"] == first["excluded_nodes"] and "why" in first
    report = (tmp_path / "a" / "report.md").read_text()
    assert "Mixed precision:" in report and "kept fp32" in report


@pytest.mark.parametrize("profile", ["ort-int8", "ort-fused-int8"])
def test_decision_fallback_keeps_nothing_float_when_decisions_hold(keyword_model, tmp_path, profile):
    """A trained classifier whose decisions all-int8 does not move: the profiles' fallback
    (decided on decisions, not on a cosine target) keeps no weight node float, and says so."""
    res = convert(str(keyword_model), profile, tmp_path / profile, latency_runs=0)
    notes = res.manifest["target"]["passes"][-1]["notes"]
    assert notes["fallback"] == "decisions" and notes["measure"] == "decisions"
    assert notes["all_int8"]["agreement"] == 1.0 and notes["kept_float"] == 0 and notes["float_weight_nodes"] == 0
    assert notes["excluded_nodes"] == [] and "no weight node kept float" in notes["why"]
    g = _graph(res.artifact)
    float_weights = [n.name for n in g.nodes if n.op_type in ("MatMul", "Attention") and any(i in g.initializers for i in n.input)]
    assert float_weights == []  # every weight MatMul (and fused Attention) is int8
    assert res.manifest["status"] == "passed" and res.manifest["parity"]["checks"]["real-lengths"]["agreement"] == 1.0
    assert "no weight node kept float" in (res.artifact / "report.md").read_text()


def test_decision_fallback_restores_when_decisions_move_and_says_why(tiny, tmp_path):
    """Token decisions of a random-init tagger sit on ties, so 7-bit per-tensor int8 moves
    some: the fallback restores at most max_float nodes, only when that brings decisions back,
    and records the rejected all-int8 build with its figures."""
    prof = _profile([{"type": "ort-dynamic-quantize", "per_channel": False, "reduce_range": True, "target_agreement": 1.0,
                      "max_float": 2}])
    res = convert(str(tiny("bert", "token-classification")), prof, tmp_path / "t", latency_runs=0)
    n = res.manifest["target"]["passes"][0]["notes"]
    before, after = n["all_int8"]["agreement"], n["after"]["agreement"]
    assert n["fallback"] == "decisions" and 0 <= n["kept_float"] <= 2 and n["float_weight_nodes"] == n["kept_float"]
    if before < 1.0:
        assert after >= before and (n["kept_float"] == 0) == (after == before)
        assert ("rejected" in n["why"]) == (n["kept_float"] > 0)
    else:
        pytest.skip("int8 moved no token decision of this tiny model: nothing to restore")


# -- the decision fallback's search -----------------------------------------------------

_REGIONS = ("attention_qkv", "attention_output", "ffn_input", "ffn_output")


def _synthetic(culprit: str, helper: str, calls: list):
    """A decision score over sets of float nodes: ``culprit`` float brings back most
    decisions, ``helper`` a few more; cosine grows with both. ``calls`` records each try."""
    def score(nodes):
        calls.append(tuple(nodes))
        gain = 0.08 * (culprit in nodes) + 0.01 * (helper in nodes)
        return {"agreement": 0.90 + gain, "cosine_mean": 0.99 + gain / 100}
    return score


def _region_groups(layers=6):
    return {r: [f"/encoder/layer.{i}/{r}/MatMul" for i in range(layers)] for r in _REGIONS}


@pytest.mark.parametrize("culprit_layer", [0, 4, 5])
def test_search_bisects_regions_down_to_the_nodes_that_bring_decisions_back(culprit_layer):
    from bertexport.building.passes.ort_quantize import search_float_nodes

    groups, calls = _region_groups(), []
    culprit, helper = f"/encoder/layer.{culprit_layer}/ffn_input/MatMul", "/encoder/layer.1/attention_output/MatMul"
    score = _synthetic(culprit, helper, calls)
    found = search_float_nodes(groups, score, score([]), max_float=4, target=1.0)
    assert sorted(found.kept) == sorted([culprit, helper]) and found.figures["agreement"] == pytest.approx(0.99)
    assert found.champions[:2] == [culprit, helper]  # the best group's best node first
    assert found.tries == len(set(map(frozenset, calls[1:]))) < 24  # fewer tries than one per node
    one = search_float_nodes(groups, score, score([]), max_float=1, target=1.0)
    assert one.kept == [culprit]


def test_search_prefers_fewer_float_nodes_and_keeps_none_that_buy_nothing():
    from bertexport.building.passes.ort_quantize import search_float_nodes

    groups = _region_groups()
    culprit = "/encoder/layer.3/ffn_output/MatMul"

    def saturating(nodes):  # any set holding the culprit keeps every decision
        return {"agreement": 1.0 if culprit in nodes else 0.9, "cosine_mean": 0.99 + 0.001 * len(nodes)}

    # the whole ffn_output group (6 nodes, within max_float) scores as well: one node is kept
    assert search_float_nodes(groups, saturating, saturating([]), max_float=8, target=1.0).kept == [culprit]
    flat = search_float_nodes(groups, lambda n: {"agreement": 0.9, "cosine_mean": 0.999}, {"agreement": 0.9,
                              "cosine_mean": 0.99}, max_float=4, target=1.0)
    assert flat.kept == [] and flat.figures["agreement"] == 0.9  # no group float buys a decision: kept nothing,
    assert flat.tries == len(groups) and flat.champions == []  # and bisected none
    assert search_float_nodes(groups, saturating, saturating([]), max_float=0, target=1.0).tries == 0


def test_search_groups_follow_the_family_regions(tiny, fp32_artifact):
    from bertexport.building.graph import weight_nodes
    from bertexport.building.passes.ort_quantize import search_groups
    from bertexport.core.families import get_family

    model = next((fp32_artifact("bert", "feature-extraction").artifact / "model").glob("*.onnx"))
    nodes = weight_nodes(model)
    groups = search_groups(model, nodes, get_family("bert").regions)
    assert set(groups) == set(_REGIONS) and sorted(sum(groups.values(), [])) == sorted(nodes)
    assert [n.split("layer.")[1][0] for n in groups["ffn_input"]] == ["0", "1"]  # layer order: halves are layer ranges
    chunks = search_groups(model, nodes, {})  # no regions: runs of about sqrt(n) consecutive nodes
    assert len(chunks) > 1 and sum(chunks.values(), []) == nodes


def _hostile_attention_output(src: Path, dst: Path, layer: int, factor: float = 1000.0, channels: int = 4) -> Path:
    """``src`` with the same function in float but an attention output projection int8
    cannot hold: value channels scaled down by ``factor``, the output rows that read them
    up by ``factor`` (exact through softmax), so per-channel int8 of that one MatMul keeps
    only those rows and dynamic int8 of its input loses those channels."""
    import torch
    import transformers as T

    model = T.AutoModelForSequenceClassification.from_pretrained(src)
    attention = model.bert.encoder.layer[layer].attention
    with torch.no_grad():
        for j in range(channels):
            attention.self.value.weight[j, :] /= factor
            attention.self.value.bias[j] /= factor
            attention.output.dense.weight[:, j] *= factor
    model.save_pretrained(dst, safe_serialization=True)
    T.AutoTokenizer.from_pretrained(src).save_pretrained(dst)
    return dst


def test_decision_fallback_finds_the_one_node_int8_breaks(keyword_model, tmp_path):
    """A trained classifier with one MatMul int8 breaks (its float function unchanged):
    all-int8 moves its decisions, the search restores exactly that node — in fewer tries
    than one per weight node — the artifact keeps it float, and a rebuild reuses the answer."""
    ckpt = _hostile_attention_output(keyword_model, tmp_path / "hostile", layer=0)
    prof = _profile([{"type": "ort-dynamic-quantize", "target_agreement": 1.0, "max_float": 2}])
    res = convert(str(ckpt), prof, tmp_path / "a", latency_runs=0)
    n = res.manifest["target"]["passes"][0]["notes"]
    culprit = "/bert/encoder/layer.0/attention/output/dense/MatMul"
    assert n["all_int8"]["agreement"] < 0.5 and n["after"]["agreement"] == 1.0
    assert n["excluded_nodes"] == [culprit] and n["kept_float"] == 1 and "rejected" in n["why"]
    assert n["search"]["tries"] < n["search"]["candidates"] == 12
    g = _graph(res.artifact)
    assert [x.name for x in g.nodes if x.op_type == "MatMul" and any(i in g.initializers for i in x.input)] == [culprit]
    again = convert(str(ckpt), prof, tmp_path / "b", latency_runs=0).manifest["target"]["passes"][0]["notes"]
    assert again["scan"] == "cached" and again["excluded_nodes"] == [culprit]


@pytest.mark.parametrize("profile", ["ort-fp32", "ort-fused"])
def test_float_restore_by_graph_edit_equals_quantizing_without_the_node(tiny, tmp_path, profile):
    """The decision fallback's probes put weight nodes back in float by editing the all-int8
    graph (no new quantization of every weight): the model computes exactly what
    quantize_dynamic makes with those nodes excluded — a node sharing its activation's
    quantization with others (attention query), an FFN output, a fused Attention, and two at once."""
    import numpy as np
    import onnx

    from bertexport.backends.onnxruntime.runner import OrtRunner
    from bertexport.building.graph import weight_nodes
    from bertexport.building.passes.ort_quantize import DynamicQuantizeConfig, OrtDynamicQuantize, with_float_nodes
    from bertexport.shipping.runtime import TextEncoder
    from bertexport.core.textdata import builtin_calibration

    art = convert(str(tiny("bert", "text-classification")), profile, tmp_path / "fp32", latency_runs=0).artifact
    fp32 = next((art / "model").glob("*.onnx"))
    config = DynamicQuantizeConfig(op_types=["MatMul", "Attention"])
    quantize = OrtDynamicQuantize()._quantize
    quantize(fp32, tmp_path / "all.onnx", config, [])
    nodes = weight_nodes(fp32, config.op_types)
    fused = [n for n in nodes if "Attention" in n]
    assert bool(fused) == (profile == "ort-fused")
    picks = [[nodes[0]], [n for n in nodes if "output/dense" in n and "attention" not in n][:1], nodes[1:3]] + [fused[:1]] * bool(fused)
    encode = TextEncoder.from_folder(art / "tokenizer", [i.name for i in onnx.load(str(fp32)).graph.input], 128).encode
    texts = builtin_calibration()[:8]
    feeds = [encode(texts, padding="max_length", length=48), encode(texts[:1], padding="longest")]
    int8, float_model = onnx.load(str(tmp_path / "all.onnx")), onnx.load(str(fp32))

    def outputs(path):
        with OrtRunner(path, threads=1) as r:
            return [r.infer(f) for f in feeds]

    for i, names in enumerate(picks):
        assert names
        quantize(fp32, tmp_path / f"q{i}.onnx", config, names)
        edited = with_float_nodes(int8, float_model, names)
        onnx.save(edited, str(tmp_path / f"e{i}.onnx"))
        onnx.checker.check_model(edited)
        ops = {n.name: n.op_type for n in edited.graph.node}
        assert all(ops.get(n) in ("MatMul", "Attention") for n in names)  # the float node, where it was
        assert len(edited.graph.node) == len(onnx.load(str(tmp_path / f"q{i}.onnx")).graph.node)
        for a, b in zip(outputs(tmp_path / f"q{i}.onnx"), outputs(tmp_path / f"e{i}.onnx")):
            assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a), names
    with pytest.raises(ValueError, match="not int8"):
        with_float_nodes(with_float_nodes(int8, float_model, nodes[:1]), float_model, nodes[:1])
