"""Artifacts are written atomically: an interrupted convert leaves nothing that looks complete."""

from __future__ import annotations

import pytest

import bertexport.convert as convert_mod
from bertexport.artifact import StagedFolder
from bertexport.errors import UserError


def test_interrupted_convert_leaves_no_folder(tiny, tmp_path, monkeypatch):
    def boom(*a, **k):
        raise KeyboardInterrupt  # as if the user pressed Ctrl-C during validation

    monkeypatch.setattr(convert_mod, "compare_runners", boom)
    with pytest.raises(KeyboardInterrupt):
        convert_mod.convert(str(tiny("bert")), "ort-fp32", tmp_path / "out", latency_runs=0)
    assert list(tmp_path.iterdir()) == []


def test_staged_folder_publish_and_refuse(tmp_path):
    out = tmp_path / "a"
    with StagedFolder(out) as s:
        (s.staging / "f").write_text("1")
        s.publish(True)
    assert (out / "f").read_text() == "1"
    with pytest.raises(UserError):
        StagedFolder(out)
    with StagedFolder(out, force=True) as s:
        (s.staging / "g").write_text("2")
        s.publish(True)
    assert sorted(p.name for p in out.iterdir()) == ["g"]
    assert [p.name for p in tmp_path.iterdir()] == ["a"]


def test_missing_parents_are_created_but_not_through_a_file(tmp_path):
    with StagedFolder(tmp_path / "a" / "b" / "c") as s:
        s.publish(True)
    assert (tmp_path / "a" / "b" / "c").is_dir()
    (tmp_path / "f").write_text("x")
    with pytest.raises(UserError, match="is not a folder"):
        StagedFolder(tmp_path / "f" / "out")
