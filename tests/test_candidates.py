"""What ``optimize`` may try (``bertexport.search.candidates``): ``--backend`` restricts the search
(a backend not installed is exit 2 before any work), the ORT candidates include the
transformer optimizer's fused graph in int8 (per-tensor and per-channel), and a fused
candidate is restored to float region by region."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from bertexport.search import candidates
from bertexport.search.candidates import candidate_recipes, check_backends, ort_int8_candidates
from bertexport.cli import cli
from bertexport.judging.gates import Gates
from bertexport.building.convert import convert
from bertexport.core.errors import UserError
from bertexport.building.graph import Graph
from bertexport.core.manifest import load_manifest


def _graph(artifact: Path) -> Graph:
    return Graph.load(next((Path(artifact) / "model").glob("*.onnx")))


def _float_weight_nodes(g: Graph) -> list:
    return [n for n in g.nodes if n.op_type in ("MatMul", "Attention") and any(i in g.initializers for i in n.input)]


def test_ort_candidates_include_fused_int8_per_tensor_and_per_channel():
    for features, isa in (({"avx2", "fma"}, "avx2"), ({"avx512_vnni"}, "avx512_vnni")):
        ort = [c for c in candidate_recipes(features, {"onnxruntime"}) if c.int8]
        assert [c.recipe for c in ort] == [f"ort-fused-int8-pt-{isa}", f"ort-fused-int8-pc-{isa}", f"ort-int8-{isa}"]
        fused = ort[:2]
        for c, per_channel in zip(fused, (False, True)):
            assert [p["type"] for p in c.passes] == ["ort-transformers-optimize", "ort-dynamic-quantize"]
            quant = c.passes[1]
            assert quant["per_channel"] is per_channel and "Attention" in quant["op_types"] and quant["isa"] == isa
            assert c.profile().passes[1].config["isa"] == isa  # a valid profile, options checked
    assert all(c.backend == "onnxruntime" for c in candidate_recipes({"avx2"}, {"onnxruntime"}))
    assert all(c.backend == "openvino" for c in candidate_recipes({"avx2"}, {"openvino"}))


def test_int8_candidates_carry_the_int8_profiles_gate():
    """A build judged by its candidate's profile (an early-exit artifact's segments) gets the gate every
    int8 profile has (decisions on their interval + a cosine floor), not the fp32 profiles' 0.99/0.999."""
    from bertexport.building.profiles import load_profile

    shipped = load_profile("openvino-int8").validation
    assert shipped.rule == "int8-decisions"
    for c in candidate_recipes({"avx2", "avx512_vnni"}, {"onnxruntime", "openvino"}):
        v = c.profile().validation
        if c.int8:
            assert v.rule == "int8-decisions" and v.gates() == shipped.gates(), c.recipe
        else:
            assert v.rule is None, c.recipe  # float and weight-only recipes keep the default gate


def test_check_backends_refuses_unknown_and_missing(monkeypatch):
    monkeypatch.setattr(candidates, "available_backends", lambda: {"onnxruntime"})
    assert check_backends(None) == {"onnxruntime"}
    assert check_backends(["onnxruntime"]) == {"onnxruntime"}
    with pytest.raises(UserError, match="openvino"):
        check_backends(["openvino"])
    with pytest.raises(UserError, match="tensorrt"):
        check_backends(["tensorrt"])
    with pytest.raises(UserError):
        check_backends([])


def test_backend_not_installed_is_exit_2_before_any_model_loads(tiny, tmp_path, monkeypatch):
    import bertexport.building.checkpoint as checkpoint

    monkeypatch.setattr(candidates, "available_backends", lambda: {"onnxruntime"})

    def no_loading(*a, **k):
        raise AssertionError("a model was loaded before the --backend check")

    monkeypatch.setattr(checkpoint, "load_model", no_loading)
    monkeypatch.setattr(checkpoint, "resolve_checkpoint", no_loading)
    out = tmp_path / "o"
    r = CliRunner().invoke(cli, ["optimize", str(tiny("bert")), "-o", str(out), "--backend", "openvino"])
    assert r.exit_code == 2 and "openvino" in r.stderr and "not available" in r.stderr and "Traceback" not in r.stderr
    assert not out.exists()
    r = CliRunner().invoke(cli, ["optimize", str(tiny("bert")), "-o", str(out), "--backend", "tensorrt"])
    assert r.exit_code == 2 and not out.exists()  # not a searchable backend: click's choice check


def test_fused_int8_candidate_builds_runs_and_is_restored_region_by_region(tiny, tmp_path):
    ckpt = str(tiny("bert", "text-classification"))
    fused_pt = ort_int8_candidates({"avx2"})[0]
    builds = {}
    for name, cand in (("all-int8", fused_pt), ("qkv1+ffn_out0", fused_pt.with_float(["attention_qkv@1", "ffn_output@0"]))):
        res = convert(ckpt, cand.profile(), tmp_path / name, latency_runs=0, gates=Gates())
        builds[name] = res
        assert res.manifest["status"] == "passed"
        checks = res.manifest["parity"]["checks"]
        assert all(c["cosine_min"] > 0.9 and np.isfinite(c["max_abs_diff"]) for c in checks.values())  # it runs, sanely
    g = _graph(builds["all-int8"].artifact)
    ops = [n.op_type for n in g.nodes]
    assert ops.count("QAttention") == 2 and "Attention" not in ops  # both layers' fused attention in int8
    assert "EmbedLayerNormalization" in ops and "SkipLayerNormalization" in ops
    assert not [n for n in _float_weight_nodes(g) if "encoder" in n.name]  # every encoder weight node int8
    g = _graph(builds["qkv1+ffn_out0"].artifact)
    ops = [n.op_type for n in g.nodes]
    assert ops.count("QAttention") == 1 and ops.count("Attention") == 1
    float_nodes = _float_weight_nodes(g)
    attention = [n for n in float_nodes if n.op_type == "Attention"]
    # the float Attention is layer 1's: its output feeds layer 1's attention output projection
    # (through the DynamicQuantizeLinear of that int8 MatMul)
    near = [c for c in g.consumers[attention[0].output[0]]]
    near += [d for c in near for o in c.output for d in g.consumers.get(o, [])]
    assert any("layer.1/attention/output/dense" in c.name for c in near)
    matmuls = [n.name for n in float_nodes if n.op_type == "MatMul" and "encoder" in n.name]
    assert matmuls == ["/bert/encoder/layer.0/output/dense/MatMul"]
    excluded = builds["qkv1+ffn_out0"].manifest["target"]["passes"][1]["notes"]["excluded_nodes"]
    assert len(excluded) == 2 and attention[0].name in excluded


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    from tests.tinymodels import keyword_sentence

    rng = np.random.default_rng(7)
    path = tmp_path_factory.mktemp("data") / "texts.txt"
    path.write_text("\n".join(keyword_sentence(rng, int(rng.integers(4, 30)), None) for _ in range(80)))
    return path


def test_backend_restricts_the_search_and_the_fused_ladder_restores_regions(tiny, texts, tmp_path):
    # a strict cosine gate: int8 of even a tiny encoder misses it, so every int8 candidate,
    # the fused ones first, climbs the per-region restore ladder
    r = CliRunner().invoke(cli, ["optimize", str(tiny("bert")), "--data", str(texts), "-o", str(tmp_path / "w"),
                                 "--min-cosine", "0.99995", "--budget", "5m", "--threads", "1", "--backend", "onnxruntime",
                                 "--json", "-"])
    assert r.exit_code in (0, 1), r.stderr
    report = json.loads(r.stdout)
    assert report["backends"] == ["onnxruntime"] and report["backends_restricted"] is True
    tried = [c["candidate"] for c in report["candidates"]]
    assert tried and all(c["backend"] == "onnxruntime" for c in tried)
    fused = [c for c in report["candidates"] if c["candidate"]["recipe"].startswith("ort-fused-int8-pt")]
    assert fused[0]["status"] == "failed" and not fused[0]["candidate"]["keep_float"]
    ladder = [len(c["candidate"]["keep_float"]) for c in fused]
    assert len(ladder) > 1 and ladder == sorted(ladder)
    restored = next(c for c in fused if c["candidate"]["keep_float"] and c["artifact"])
    g = Graph.load(next((Path(restored["artifact"]) / "model").glob("*.onnx")))
    qkv = [s for s in restored["candidate"]["keep_float"] if s.startswith("attention_qkv")]
    assert [n.op_type for n in g.nodes].count("Attention") == len(qkv)  # each restored qkv region: one float Attention
    folder = tmp_path / "w" if r.exit_code == 0 else tmp_path / "w.rejected"
    search = load_manifest(folder)["search"]
    assert search["backends"] == ["onnxruntime"] and search["backends_restricted"] is True
