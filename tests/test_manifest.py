import json
from pathlib import Path

import pytest

from bertexport.core.errors import UserError
from bertexport.core.manifest import load_manifest, verify_files, write_manifest


def _artifact(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model.onnx").write_bytes(b"graph" * 100)
    (tmp_path / "labels.json").write_text("{}")
    write_manifest(tmp_path, MINIMAL)
    return tmp_path


MINIMAL = {"bertexport_version": "test", "status": "passed", "created": "2026-01-01T00:00:00+00:00",
           "source": {"source": "x", "path": "x", "sha256": "0" * 64}, "family": "bert", "task": "feature-extraction",
           "max_length": 8, "model": {"path": "model/model.onnx", "format": "onnx", "backend": "onnxruntime"},
           "tokenizer": "tokenizer", "inputs": [{"name": "input_ids", "dtype": "int64", "shape": ["b", "s"]}],
           "outputs": [{"name": "last_hidden_state", "dtype": "float32", "shape": ["b", "s", 4]}],
           "target": {"name": "t", "backend": "onnxruntime", "precision": "fp32", "runtime": {}, "passes": []},
           "parity": {"gates": {}, "checks": {}, "passed": True, "failures": []}, "sizes": {"model_bytes": 1}, "versions": {}}


def test_checksums_verify(tmp_path):
    art = _artifact(tmp_path)
    m = load_manifest(art)
    assert set(m["files"]) == {"model/model.onnx", "labels.json"}
    assert verify_files(art) == []


def test_tampered_truncated_and_extra_files_are_found(tmp_path):
    art = _artifact(tmp_path)
    p = art / "model" / "model.onnx"
    p.write_bytes(b"graph" * 99 + b"GRAPH")
    assert verify_files(art) == ["checksum mismatch: model/model.onnx"]
    p.write_bytes(b"graph")
    assert "size mismatch" in verify_files(art)[0]
    (art / "extra.bin").write_bytes(b"x")
    assert "unlisted file: extra.bin" in verify_files(art)


def test_newer_schema_refused(tmp_path):
    art = _artifact(tmp_path)
    m = json.loads((art / "manifest.json").read_text())
    m["schema_version"] = 99
    (art / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(UserError, match="newer"):
        load_manifest(art)


@pytest.mark.after_all
def test_every_artifact_the_suite_built_matches_the_published_schema(tmp_path_factory):
    """The JSON Schema ships in the package; every manifest written during this session
    (convert, optimize, unpack, the cache's builds) validates against it."""
    import os

    import jsonschema

    from bertexport.core.manifest import SCHEMA_FILE, Manifest

    schema = json.loads(SCHEMA_FILE.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    roots = [tmp_path_factory.getbasetemp(), Path(os.environ["BERTEXPORT_CACHE"])]
    manifests = [p for r in roots for p in r.rglob("manifest.json") if not any(x.startswith(".") for x in p.parts[-3:-1])]
    validator = jsonschema.Draft202012Validator(schema)
    bad, checked = {}, 0
    for p in manifests:
        m = json.loads(p.read_text())
        if m.get("schema_version", 1) < 2 or not m.get("bertexport_version") or "manifest_sha256" not in m:
            continue  # hand-made fixtures of other tests (tampering, old versions)
        if any(x.startswith("handmade-") for x in p.parts):
            continue  # other tests' deliberately invalid manifests (e.g. a backend no runtime has)
        checked += 1
        errors = [e.message for e in validator.iter_errors(m)]
        if errors:
            bad[str(p)] = errors[:3]
        Manifest.from_dict(m)
        if m.get("parity", {}).get("checks") and not m.get("batch_invariance"):
            bad[str(p)] = ["no batch_invariance figures"]  # every build measures it (issue 16)
    assert checked >= 1 and not bad, (checked, bad)


def test_incomplete_manifest_is_refused(tmp_path):
    with pytest.raises(UserError, match="missing"):
        write_manifest(tmp_path, {"status": "passed"})
