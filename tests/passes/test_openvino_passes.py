"""openvino-convert, openvino-compress-weights, nncf-quantize: the family record decides the
conversion source; named regions stay float in the NNCF graph."""

from __future__ import annotations

import pytest

from bertexport.building.convert import convert
from bertexport.building.profiles import parse_profile

pytest.importorskip("openvino")


def _fake_quantize_inputs(artifact):
    """FakeQuantize ops, and the MatMuls fed by one (or by int8 weight constants) within a few hops."""
    import openvino as ov

    model = ov.Core().read_model(str(artifact / "model" / "model.int8.xml"))
    fq = {op.get_friendly_name() for op in model.get_ops() if op.get_type_name() == "FakeQuantize"}

    def quantized_upstream(node, depth=4):
        if node.get_type_name() == "FakeQuantize":
            return True
        if node.get_type_name() == "Constant" and str(node.get_element_type()) in ("<Type: 'int8_t'>", "<Type: 'uint8_t'>", "i8", "u8"):
            return True
        if depth == 0 or node.get_type_name() in ("MatMul", "Parameter", "Erf", "Softmax", "MVN"):
            return False
        return any(quantized_upstream(i.get_source_output().get_node(), depth - 1) for i in node.inputs())

    quantized_matmuls = {op.get_friendly_name() for op in model.get_ops()
                         if op.get_type_name() == "MatMul"
                         and any(quantized_upstream(i.get_source_output().get_node()) for i in op.inputs())}
    return fq, quantized_matmuls


def test_nncf_keeps_named_regions_float(tiny, tmp_path):
    ckpt = str(tiny("bert"))

    def build(name, extra):
        prof = parse_profile({"backend": "openvino", "precision": "int8", "runtime": {"inference_precision": "f32"},
                              "passes": [{"type": "openvino-convert"}, {"type": "nncf-quantize", "subset_size": 32, **extra}],
                              "validation": {"min_cosine": 0.5, "min_agreement": 0.5}}, name)
        return convert(ckpt, prof, tmp_path / name, latency_runs=0, calib_samples=32).artifact

    fq_all, q_all = _fake_quantize_inputs(build("all", {}))
    fq_kept, q_kept = _fake_quantize_inputs(build("kept", {"keep_float": ["ffn_output"]}))
    ffn_out = {n for n in q_all if "output/dense" in n and "attention" not in n}
    assert ffn_out and not (ffn_out & q_kept)  # the FFN output MatMuls lost their quantizers
    assert len(fq_kept) < len(fq_all)


def test_deberta_converts_from_pytorch_per_its_family_record(tiny, tmp_path):
    prof = parse_profile({"backend": "openvino", "passes": [{"type": "openvino-convert"}],
                          "runtime": {"inference_precision": "f32"}}, "ov")
    m = convert(str(tiny("deberta-v2")), prof, tmp_path / "d", latency_runs=0).manifest
    assert m["target"]["passes"][0]["notes"]["source"] == "pytorch"
    m = convert(str(tiny("bert")), prof, tmp_path / "b", latency_runs=0).manifest
    assert m["target"]["passes"][0]["notes"]["source"] == "onnx"
