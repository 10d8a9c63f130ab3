"""int8-embeddings: the word-embedding table stored int8 per row shrinks the artifact by
~3/4 of the table on ONNX Runtime and OpenVINO (the IR's .bin too), keeps parity with the
fp32 original within the gate, composes with the int8 and fusion passes, and a table that
something else reads too is dequantized for it, not kept twice."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from bertexport.cli import cli
from bertexport.building.convert import convert
from bertexport.core.errors import UserError
from bertexport.building.passes.int8_embeddings import quantize_rows, rewrite
from bertexport.building.profiles import load_profile, parse_profile

# the int8-weights gate (openvino-int8-weights): what a float-compute build with int8-stored weights must keep
GATE = {"min_cosine": 0.995, "min_agreement": 0.95}


def _profile(backend: str, passes: list[dict], gate=GATE):
    runtime = {"inference_precision": "f32"} if backend == "openvino" else {}
    return parse_profile({"backend": backend, "passes": passes, "runtime": runtime, "validation": gate}, "test")


def test_rows_are_symmetric_int8_with_half_a_step_of_error():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(50, 16)).astype(np.float32) * rng.uniform(0.01, 3, size=(50, 1)).astype(np.float32)
    w[7] = 0.0
    q, scale, err = quantize_rows(w)
    assert q.dtype == np.int8 and scale.shape == (50,) and np.abs(q).max() == 127
    back = q.astype(np.float32) * scale[:, None]
    assert np.all(np.abs(back - w) <= scale[:, None] / 2 + 1e-7) and err == pytest.approx(np.abs(back - w).max())
    assert np.all(back[7] == 0)


def _sizes(res) -> tuple[int, dict]:
    notes = {h["type"]: h["notes"] for h in res.manifest["target"]["passes"]}
    return res.manifest["sizes"]["model_bytes"], notes


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_table_shrinks_by_three_quarters_with_parity(tiny, tmp_path, backend):
    """Real runs: the same checkpoint built with and without the pass; the artifact (the
    OpenVINO IR's .bin included) is smaller by the table's int8 saving, and the outputs stay
    within the gate of the fp32 original (parity checks: real lengths, padded batch)."""
    ckpt = str(tiny("bert", "text-classification"))
    convert_pass = [{"type": "openvino-convert"}] if backend == "openvino" else []
    plain = convert(ckpt, _profile(backend, convert_pass), tmp_path / "plain", latency_runs=0)
    small = convert(ckpt, _profile(backend, [{"type": "int8-embeddings"}] + convert_pass), tmp_path / "small", latency_runs=0)
    plain_bytes, _ = _sizes(plain)
    small_bytes, notes = _sizes(small)
    n = notes["int8-embeddings"]
    rows, width = n["rows"], n["width"]
    assert n["table"].endswith("word_embeddings.weight") and n["table_bytes_before"] == rows * width * 4
    saved = plain_bytes - small_bytes
    expected = rows * width * 3 - rows * 4  # int8 instead of float, plus one float scale per row
    assert abs(saved - expected) < 0.01 * expected, (saved, expected)
    assert n["bytes_before"] - n["bytes_after"] == pytest.approx(expected, rel=0.01)
    if backend == "openvino":
        bins = {k: next((r.artifact / "model").glob("*.bin")).stat().st_size for k, r in (("plain", plain), ("small", small))}
        assert bins["plain"] - bins["small"] == pytest.approx(expected, rel=0.01)
    checks = small.manifest["parity"]["checks"]
    assert small.passed
    for c in checks.values():
        assert c["cosine_min"] >= GATE["min_cosine"] and c["agreement"] >= GATE["min_agreement"]
        assert c["max_abs_diff"] > 0  # the table really changed what the model computes


def test_before_dynamic_int8_keeps_the_ort_int8_gate_on_a_trained_model(keyword_model, tmp_path):
    """ort-int8 with int8-embeddings in front, on a trained classifier: passes ort-int8's own
    gate, keeps every decision, and is smaller than the ort-int8 artifact by the table's saving."""
    import tomllib

    from bertexport.building.profiles import profiles_dir

    raw = tomllib.loads((profiles_dir() / "ort-int8.toml").read_text())
    raw["passes"] = [{"type": "int8-embeddings"}] + raw["passes"]
    small = convert(str(keyword_model), parse_profile(raw, "ort-int8+int8-embeddings"), tmp_path / "small", latency_runs=0)
    base = convert(str(keyword_model), "ort-int8", tmp_path / "base", latency_runs=0)
    n = _sizes(small)[1]["int8-embeddings"]
    expected = n["rows"] * n["width"] * 3 - n["rows"] * 4
    assert _sizes(base)[0] - _sizes(small)[0] == pytest.approx(expected, rel=0.02)
    gate = load_profile("ort-int8").validation
    assert small.passed
    for c in small.manifest["parity"]["checks"].values():
        assert c["cosine_min"] >= gate.min_cosine and c["agreement"] == 1.0


def test_with_the_transformer_optimizer(tiny, tmp_path):
    """In front of ort-transformers-optimize: EmbedLayerNormalization no longer fuses (its
    pattern needs a float Gather), every other fusion does, parity holds. Behind it: refused
    with one line naming the alternative, before the model loads; a graph fused elsewhere
    is refused when the pass meets it."""
    ckpt = str(tiny("bert", "text-classification"))
    res = convert(ckpt, _profile("onnxruntime", [{"type": "int8-embeddings"}, {"type": "ort-transformers-optimize"}]),
                  tmp_path / "front", latency_runs=0)
    fused = _sizes(res)[1]["ort-transformers-optimize"]["fused_operators"]
    assert "EmbedLayerNormalization" not in fused and fused.get("Attention") == 2 and fused.get("SkipLayerNormalization") == 4
    assert res.passed
    prof = tmp_path / "behind.toml"
    prof.write_text('backend = "onnxruntime"\n[[passes]]\ntype = "ort-transformers-optimize"\n'
                    '[[passes]]\ntype = "int8-embeddings"\n')
    r = CliRunner().invoke(cli, ["convert", ckpt, "--target", str(prof), "--out", str(tmp_path / "behind"), "--latency-runs", "0"],
                           catch_exceptions=False)
    assert r.exit_code == 2 and "cannot follow 'ort-transformers-optimize'" in r.output, r.output
    assert "EmbedLayerNormalization" in r.output and "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1
    assert not (tmp_path / "behind").exists()
    fused = next((tmp_path / "front").glob("model/*.onnx"))  # no EmbedLayerNormalization here: make one
    m = onnx.load(str(fused))
    m.graph.node.insert(0, onnx.helper.make_node("EmbedLayerNormalization", ["input_ids"], ["x"], name="eln", domain="com.microsoft"))
    with pytest.raises(UserError, match="fused into EmbedLayerNormalization"):
        rewrite(m)


def test_a_table_read_elsewhere_is_dequantized_for_it(tmp_path):
    """A tied output projection reading the table gets DequantizeLinear(int8 table): the
    float table is gone from the graph, and both outputs stay close."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    table = rng.normal(size=(40, 8)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["W", "input_ids"], ["emb"], name="/embeddings/word_embeddings/Gather"),
         helper.make_node("Transpose", ["W"], ["WT"], name="tied/Transpose"),
         helper.make_node("MatMul", ["emb", "WT"], ["logits"], name="tied/MatMul")],
        "tied", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"])],
        [helper.make_tensor_value_info("emb", TensorProto.FLOAT, ["b", "s", 8]),
         helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", "s", 40])],
        [numpy_helper.from_array(table, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    ids = {"input_ids": rng.integers(0, 40, size=(2, 5))}

    def run(m):
        return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, ids)

    want = run(model)
    notes = rewrite(model)
    onnx.checker.check_model(model)
    assert notes["shared_with"] == ["tied/Transpose"]
    assert "W" not in {t.name for t in model.graph.initializer}
    assert {t.name: t.data_type for t in model.graph.initializer}["W.int8"] == TensorProto.INT8
    got = run(model)
    for w, g in zip(want, got):
        cos = (w * g).sum(-1) / (np.linalg.norm(w, axis=-1) * np.linalg.norm(g, axis=-1))
        assert cos.min() > 0.999 and np.abs(w - g).max() < 0.02 * np.abs(w).max()
    with pytest.raises(UserError, match="no input 'token_ids'"):
        rewrite(model, "token_ids")


def test_options_are_described():
    out = CliRunner().invoke(cli, ["targets", "--describe", "int8-embeddings"]).output
    assert "ids_input" in out and "int8-weights" in out and "takes onnx, makes onnx" in out
