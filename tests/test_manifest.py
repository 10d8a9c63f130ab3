import json

import pytest

from bertexport.errors import UserError
from bertexport.manifest import load_manifest, verify_files, write_manifest


def _artifact(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model.onnx").write_bytes(b"graph" * 100)
    (tmp_path / "labels.json").write_text("{}")
    write_manifest(tmp_path, {"status": "passed"})
    return tmp_path


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
