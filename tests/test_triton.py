"""`pack --format triton`: the repository's every config.pbtxt parsed with Triton's official
protobufs (tritonclient's model_config_pb2), and the tokenizer's model.py run with a stand-in
for `triton_python_backend_utils`.

No Triton server runs here. `triton_python_backend_utils` exists only inside a Triton server,
so `FakePbUtils` below is a minimal stand-in (Tensor holding a numpy array, InferenceResponse,
TritonError, get_input_tensor_by_name) written from the python_backend README: it checks that
model.py tokenizes as `bertexport run` does, not that Triton loads it.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from bertexport.cli import cli
from bertexport.core.errors import UserError
from bertexport.core.manifest import load_manifest, write_manifest
from bertexport.shipping.packing import pack
from bertexport.shipping.triton import MARKER, triton_repository

model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2", reason="needs tritonclient[grpc] (test extra)")
from google.protobuf import json_format, text_format  # noqa: E402  (tritonclient's protobuf)

TEXTS = ["A gripping, beautifully shot film.", "ok", "Maria Schmidt flew from Berlin to Lisbon on Tuesday to see it."]


def parse(path: Path):
    """config.pbtxt -> ModelConfig; text_format.Parse refuses unknown fields and bad enum values."""
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def configs(repo: Path) -> dict:
    return {p.parent.name: parse(p) for p in sorted(repo.glob("*/config.pbtxt"))}


DT = model_config_pb2.DataType


def assert_ensemble_consistent(cfgs: dict, name: str) -> None:
    """The checks Triton's ensemble validation makes (core ensemble_utils.cc): every mapped
    input/output exists on its model, every model input is fed, no tensor is produced twice,
    and a tensor has one data type and one shape wherever it appears."""
    ens = cfgs[name]
    tensors = {i.name: (i.data_type, list(i.dims)) for i in ens.input}
    produced = set(tensors)
    for step in ens.ensemble_scheduling.step:
        model = cfgs[step.model_name]
        assert model.max_batch_size >= ens.max_batch_size
        inputs = {i.name: (i.data_type, list(i.dims)) for i in model.input}
        assert set(step.input_map) == set(inputs), step.model_name  # every input fed, none unknown
        for key, value in step.input_map.items():
            assert tensors.get(value) == inputs[key], (step.model_name, key, value)
        outputs = {o.name: (o.data_type, list(o.dims)) for o in model.output}
        for key, value in step.output_map.items():
            assert key in outputs and value not in produced, (step.model_name, key, value)
            produced.add(value)
            tensors[value] = outputs[key]
    for o in ens.output:
        assert tensors.get(o.name) == (o.data_type, list(o.dims)), o.name


# ------------------------------------------------------------------ the stand-in pb_utils

class FakePbUtils(types.ModuleType):
    """A stand-in for triton_python_backend_utils (see the module docstring)."""

    class Tensor:
        def __init__(self, name, array):
            self._name, self._array = name, np.asarray(array)

        def name(self):
            return self._name

        def as_numpy(self):
            return self._array

    class TritonError:
        def __init__(self, message, code=None):
            self._message = message

        def message(self):
            return self._message

    class InferenceResponse:
        def __init__(self, output_tensors=None, error=None):
            self.output_tensors, self.error = output_tensors or [], error

    @staticmethod
    def get_input_tensor_by_name(request, name):
        return request.get(name)


@pytest.fixture
def pb_utils(monkeypatch):
    fake = FakePbUtils("triton_python_backend_utils")
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", fake)
    return fake


def load_tokenizer_model(repo: Path, name: str):
    folder = repo / name
    spec = importlib.util.spec_from_file_location(f"triton_model_{name}", folder / "1" / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.TritonPythonModel()
    cfg = json_format.MessageToJson(parse(folder / "config.pbtxt"), preserving_proto_field_name=True)
    model.initialize({"model_config": cfg, "model_instance_kind": "CPU", "model_instance_device_id": "0",
                      "model_repository": str(folder), "model_version": "1", "model_name": name})
    return model


def strings(texts) -> np.ndarray:
    """A TYPE_STRING batch as Triton hands it to a Python model: bytes objects, shape [batch, 1]."""
    return np.array([t.encode("utf-8") for t in texts], dtype=np.object_).reshape(-1, 1)


# ------------------------------------------------------------------ ONNX Runtime


@pytest.fixture(scope="module")
def embed_art(fp32_artifact):
    return fp32_artifact("bert", "feature-extraction").artifact


def test_onnxruntime_repository_parses_with_the_official_protobufs(embed_art, tmp_path):
    info = triton_repository(embed_art, tmp_path / "repo", model_name="minilm")
    repo = Path(info["path"])
    cfgs = configs(repo)
    assert set(cfgs) == {"minilm", "minilm_tokenizer", "minilm_model"}
    manifest = load_manifest(embed_art)

    model = cfgs["minilm_model"]
    assert model.backend == "onnxruntime" and model.max_batch_size == 32
    assert model.default_model_filename == Path(manifest["model"]["path"]).name
    assert (repo / "minilm_model" / "1" / model.default_model_filename).read_bytes() == \
        (embed_art / manifest["model"]["path"]).read_bytes()
    assert [i.name for i in model.input] == [t["name"] for t in manifest["inputs"]]
    assert all(i.data_type == DT.TYPE_INT64 and list(i.dims) == [-1] for i in model.input)  # batch: max_batch_size
    out = model.output[0]
    assert out.name == manifest["outputs"][0]["name"] and out.data_type == DT.TYPE_FP32
    assert list(out.dims) == [-1, int(manifest["outputs"][0]["shape"][-1])]  # [sequence, hidden]
    assert model.HasField("dynamic_batching") and model.dynamic_batching.max_queue_delay_microseconds == 2000
    assert model.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU

    tok = cfgs["minilm_tokenizer"]
    assert tok.backend == "python" and tok.max_batch_size == 32 and tok.HasField("dynamic_batching")
    assert [(i.name, i.data_type, list(i.dims)) for i in tok.input] == [("TEXT", DT.TYPE_STRING, [1])]
    assert [o.name for o in tok.output] == [i.name for i in model.input]
    assert tok.parameters["max_length"].string_value == str(manifest["max_length"])
    assert (repo / "minilm_tokenizer" / "1" / "tokenizer" / "tokenizer.json").is_file()

    ens = cfgs["minilm"]
    assert ens.platform == "ensemble" and ens.max_batch_size == 32
    assert [i.name for i in ens.input] == ["TEXT"]
    assert [o.name for o in ens.output] == [out.name, "attention_mask"]
    first, second = ens.ensemble_scheduling.step
    assert first.model_name == "minilm_tokenizer" and second.model_name == "minilm_model"
    assert first.model_version == -1 and dict(first.input_map) == {"TEXT": "TEXT"}
    # every tensor the model reads is one the tokenizer wrote, under the same ensemble name
    assert {k: v for k, v in first.output_map.items()} == {n: dict(second.input_map)[n] for n in first.output_map}
    assert set(second.input_map) == {i.name for i in model.input}
    assert dict(second.output_map) == {out.name: out.name}
    assert_ensemble_consistent(cfgs, "minilm")
    marker = json.loads((repo / MARKER).read_text())
    assert marker["manifest_sha256"] == manifest["manifest_sha256"] and marker["models"]["ensemble"] == "minilm"


def test_tokenizer_model_py_encodes_as_run_does_and_the_ensemble_gives_runs_vectors(embed_art, tmp_path, pb_utils):
    """model.py (with the stand-in pb_utils) gives the runtime encoder's token ids; those
    through the repository's ONNX file, pooled as the manifest says, give `run`'s vectors."""
    import onnxruntime as ort

    from bertexport.shipping.runtime import Artifact, Predictor

    repo = Path(triton_repository(embed_art, tmp_path / "repo", model_name="m")["path"])
    model = load_tokenizer_model(repo, "m_tokenizer")
    one, two = [{"TEXT": pb_utils.Tensor("TEXT", strings(TEXTS))}, {"TEXT": pb_utils.Tensor("TEXT", strings(["ok"]))}]
    responses = model.execute([one, two])  # two requests in one execute call (dynamic batching)
    assert len(responses) == 2 and all(r.error is None for r in responses)
    got = {t.name(): t.as_numpy() for t in responses[0].output_tensors}
    with Artifact(embed_art) as art:
        want = art.encoder.encode(TEXTS)
        assert set(got) == set(want)
        for name in want:
            assert got[name].dtype == np.int64 and np.array_equal(got[name], want[name]), name
        assert np.array_equal({t.name(): t.as_numpy() for t in responses[1].output_tensors}["input_ids"],
                              art.encoder.encode(["ok"])["input_ids"])
        expected = Predictor(art).predict(TEXTS)

    cfg = parse(repo / "m_model" / "config.pbtxt")
    session = ort.InferenceSession(str(repo / "m_model" / "1" / cfg.default_model_filename), providers=["CPUExecutionProvider"])
    hidden = session.run([cfg.output[0].name], got)[0]
    pooling = load_manifest(embed_art).get("pooling") or {}
    mask = got["attention_mask"][..., None].astype(np.float64)
    vecs = (hidden * mask).sum(1) / mask.sum(1) if pooling.get("mode", "mean") == "mean" else hidden[:, 0]
    if pooling.get("normalize"):
        vecs = vecs / np.linalg.norm(vecs, axis=1, keepdims=True)
    for v, e in zip(vecs, expected):
        np.testing.assert_allclose(v, e["embedding"], atol=1e-4)

    bad = model.execute([{"TEXT": pb_utils.Tensor("TEXT", strings(["  "]))}])  # an error response, not an exception
    assert bad[0].error is not None and "empty text" in bad[0].error.message()
    model.finalize()


def test_question_answering_tokenizer_takes_pairs(fp32_artifact, tmp_path, pb_utils):
    art = fp32_artifact("bert", "question-answering").artifact
    repo = Path(triton_repository(art, tmp_path / "repo", model_name="qa")["path"])
    cfgs = configs(repo)
    assert [i.name for i in cfgs["qa_tokenizer"].input] == ["TEXT", "TEXT_PAIR"]
    assert [i.name for i in cfgs["qa"].input] == ["TEXT", "TEXT_PAIR"]
    assert dict(cfgs["qa"].ensemble_scheduling.step[0].input_map) == {"TEXT": "TEXT", "TEXT_PAIR": "TEXT_PAIR"}
    assert_ensemble_consistent(cfgs, "qa")
    model = load_tokenizer_model(repo, "qa_tokenizer")
    q, c = ["When did it open?", "What does it hold?"], ["It opened in 1897.", "Paintings from the Renaissance."]
    r = model.execute([{"TEXT": pb_utils.Tensor("TEXT", strings(q)), "TEXT_PAIR": pb_utils.Tensor("TEXT_PAIR", strings(c))}])[0]
    from bertexport.shipping.runtime import Artifact

    with Artifact(art) as a:
        want = a.encoder.encode(q, c)
    got = {t.name(): t.as_numpy() for t in r.output_tensors}
    assert all(np.array_equal(got[n], want[n]) for n in want)


def test_classifier_labels_become_the_label_file(fp32_artifact, tmp_path):
    art = fp32_artifact("bert", "text-classification").artifact
    repo = Path(triton_repository(art, tmp_path / "repo")["path"])
    name = art.resolve().name
    model = parse(repo / f"{name}_model" / "config.pbtxt")
    assert model.output[0].label_filename == "labels.txt"
    labels = json.loads((art / load_manifest(art)["labels"]).read_text())
    assert (repo / f"{name}_model" / "labels.txt").read_text().splitlines() == [labels[str(i)] for i in range(len(labels))]
    assert not parse(repo / name / "config.pbtxt").output[0].label_filename


# ------------------------------------------------------------------ OpenVINO and TensorRT


def test_openvino_repository(tiny, tmp_path):
    pytest.importorskip("openvino")
    from bertexport.building.convert import convert

    art = convert(str(tiny("bert", "feature-extraction")), "openvino-fp32", tmp_path / "ov", latency_runs=0).artifact
    repo = Path(triton_repository(art, tmp_path / "repo", model_name="ov")["path"])
    model = parse(repo / "ov_model" / "config.pbtxt")
    assert model.backend == "openvino" and model.default_model_filename.endswith(".xml")
    files = {p.name for p in (repo / "ov_model" / "1").iterdir()}
    assert files == {model.default_model_filename, model.default_model_filename[:-4] + ".bin"}
    assert model.parameters["PERFORMANCE_HINT"].string_value == "LATENCY" and model.HasField("dynamic_batching")
    assert parse(repo / "ov" / "config.pbtxt").platform == "ensemble"
    assert_ensemble_consistent(configs(repo), "ov")


def _rewritten(art: Path, dest: Path, **changes) -> Path:
    """A copy of ``art`` whose manifest says something else (rewritten with its digest and file table)."""
    shutil.copytree(art, dest)
    manifest = load_manifest(dest)
    for key, value in changes.items():
        section, _, field = key.partition("__")
        if field:
            manifest[section][field] = value
        else:
            manifest[section] = value
    write_manifest(dest, manifest)
    return dest


def test_tensorrt_artifact_becomes_a_tensorrt_plan(embed_art, tmp_path):
    """No GPU here: an ONNX artifact whose manifest is rewritten to say TensorRT (engine file,
    batch profile up to 16) checks the config written for one; the file is not an engine."""
    fake = tmp_path / "trt"
    shutil.copytree(embed_art, fake)
    manifest = load_manifest(fake)
    engine = fake / "model" / "model.engine"
    (fake / manifest["model"]["path"]).rename(engine)
    manifest["model"] |= {"path": "model/model.engine", "format": "tensorrt-engine", "backend": "tensorrt"}
    manifest["target"]["shapes"] = {"batch": {"min": 1, "opt": 8, "max": 16}, "sequence": {"min": 1, "opt": 64, "max": 128}}
    write_manifest(fake, manifest)
    repo = Path(triton_repository(fake, tmp_path / "repo", model_name="trt")["path"])
    model = parse(repo / "trt_model" / "config.pbtxt")
    assert model.platform == "tensorrt_plan" and model.backend == "tensorrt"
    assert model.max_batch_size == 16 and model.default_model_filename == "model.engine"
    assert model.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
    with pytest.raises(UserError, match="largest batch"):
        triton_repository(fake, tmp_path / "repo2", max_batch_size=64)


# ------------------------------------------------------------------ refusals (exit 2) and the CLI


def test_cli_pack_triton_and_refusals(embed_art, tmp_path):
    run = CliRunner().invoke
    out = tmp_path / "repo"
    r = run(cli, ["pack", str(embed_art), "--format", "triton", "--out", str(out), "--model-name", "e"])
    assert r.exit_code == 0, r.output
    assert "Triton model repository" in r.output and set(configs(out)) == {"e", "e_tokenizer", "e_model"}
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}

    r = run(cli, ["pack", str(embed_art), "--format", "triton", "--out", str(out)])
    assert r.exit_code == 2 and "already exists" in r.output
    r = run(cli, ["pack", str(embed_art), "--format", "onnx-zip", "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "unknown pack format" in r.output and not (tmp_path / "x").exists()
    r = run(cli, ["pack", str(embed_art), "--max-batch-size", "4", "--out", str(tmp_path / "p.tar.gz")])
    assert r.exit_code == 2 and "only with --format triton" in r.output

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    r = run(cli, ["pack", str(embed_art), "--format", "triton", "--out", str(foreign), "--force"])
    assert r.exit_code == 2 and (foreign / "notes.txt").read_text() == "keep me"

    torch_art = _rewritten(embed_art, tmp_path / "handmade-torch-backend", model={**load_manifest(embed_art)["model"], "backend": "torch"})
    r = run(cli, ["pack", str(torch_art), "--format", "triton", "--out", str(tmp_path / "t")])
    assert r.exit_code == 2 and "no Triton backend" in r.output and not (tmp_path / "t").exists()

    tampered = tmp_path / "tampered"
    shutil.copytree(embed_art, tampered)
    (tampered / "tokenizer" / "tokenizer.json").write_text("{}")
    r = run(cli, ["pack", str(tampered), "--format", "triton", "--out", str(tmp_path / "u")])
    assert r.exit_code == 2 and "size mismatch: tokenizer/tokenizer.json" in r.output and not (tmp_path / "u").exists()

    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # refusals wrote nothing
    r = run(cli, ["pack", str(embed_art), "--format", "triton", "--out", str(out), "--force", "--model-name", "f"])
    assert r.exit_code == 0 and set(configs(out)) == {"f", "f_tokenizer", "f_model"}  # our own repository: replaced
    assert not list(tmp_path.glob(".repo.*"))  # no staging left behind
    assert pack(embed_art, tmp_path / "d", format="triton").name == "d"
