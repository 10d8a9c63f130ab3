"""Artifacts are written atomically: an interrupted convert leaves nothing that looks complete."""

from __future__ import annotations

import pytest

import bertexport.convert as convert_mod
import json
from pathlib import Path

from bertexport.staging import StagedFolder, made_by_bertexport, protected_reason
from bertexport.errors import UserError


def test_interrupted_convert_leaves_no_folder(tiny, tmp_path, monkeypatch):
    def boom(*a, **k):
        raise KeyboardInterrupt  # as if the user pressed Ctrl-C during validation

    monkeypatch.setattr(convert_mod, "parity_checks", boom)
    with pytest.raises(KeyboardInterrupt):
        convert_mod.convert(str(tiny("bert")), "ort-fp32", tmp_path / "out", latency_runs=0)
    assert list(tmp_path.iterdir()) == []


def _artifact_manifest(folder):
    (folder / "manifest.json").write_text(json.dumps({"bertexport_version": "0", "files": {}}))


def test_staged_folder_publish_and_refuse(tmp_path):
    out = tmp_path / "a"
    with StagedFolder(out) as s:
        (s.staging / "f").write_text("1")
        _artifact_manifest(s.staging)
        s.publish(True)
    assert (out / "f").read_text() == "1"
    with pytest.raises(UserError, match="already exists"):
        StagedFolder(out)
    with StagedFolder(out, force=True) as s:
        (s.staging / "g").write_text("2")
        s.publish(True)
    assert sorted(p.name for p in out.iterdir()) == ["g"]
    assert [p.name for p in tmp_path.iterdir()] == ["a"]
    with pytest.raises(UserError, match="did not make"):  # "a" no longer holds a bertexport manifest
        StagedFolder(out, force=True)


def test_what_bertexport_made_is_recognised(tmp_path):
    (tmp_path / "art").mkdir()
    _artifact_manifest(tmp_path / "art")
    (tmp_path / "student").mkdir()
    (tmp_path / "student" / "distill_report.json").write_text(json.dumps({"teacher": {}, "student": {}}))
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "benchmark.json").write_text(json.dumps({"schema": "bertexport.benchmark/1"}))
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "manifest.json").write_text(json.dumps({"name": "someone else's"}))
    assert [made_by_bertexport(tmp_path / n) for n in ("art", "student", "bench", "theirs")] == \
        ["artifact", "student", "benchmark", None]


def test_protected_places(tmp_path, monkeypatch):
    src = tmp_path / "models" / "ckpt"
    src.mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert "source checkpoint" in protected_reason(src, [src])
    assert "source checkpoint" in protected_reason(tmp_path / "models", [src])
    assert "inside the source" in protected_reason(src / "out", [src])
    assert "working directory" in protected_reason(tmp_path)
    assert "root" in protected_reason(Path("/"))
    assert "home" in protected_reason(Path.home())
    assert protected_reason(tmp_path / "elsewhere", [src]) is None


def test_missing_parents_are_created_but_not_through_a_file(tmp_path):
    with StagedFolder(tmp_path / "a" / "b" / "c") as s:
        s.publish(True)
    assert (tmp_path / "a" / "b" / "c").is_dir()
    (tmp_path / "f").write_text("x")
    with pytest.raises(UserError, match="is not a folder"):
        StagedFolder(tmp_path / "f" / "out")
