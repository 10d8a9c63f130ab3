"""Artifacts are written atomically: an interrupted convert leaves nothing that looks complete."""

from __future__ import annotations

import pytest

import bertexport.building.convert as convert_mod
import json
from pathlib import Path

from bertexport.core.staging import StagedFolder, made_by_bertexport, protected_reason
from bertexport.core.errors import UserError


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
    (tmp_path / "bench" / "benchmark.json").write_text(json.dumps({"schema": "bertexport.judging.benchmark/1"}))
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


def _dead_pid() -> int:
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_orphans_of_dead_processes_are_swept_and_the_living_kept(tmp_path):
    import os

    from bertexport.core.orphans import sweep_orphans, sweep_work_orphans

    dead, me = _dead_pid(), os.getpid()
    for name in (f".art.partial-{dead}", f".art.old-{dead}", f".art.partial-{me}", "art"):
        (tmp_path / name).mkdir()
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "keep.txt").write_text("x")
    (tmp_path / f".art.unpack-{dead}").symlink_to(theirs)  # a link is removed, never followed
    assert sorted(p.name for p in sweep_orphans(tmp_path)) == sorted([f".art.partial-{dead}", f".art.old-{dead}",
                                                                       f".art.unpack-{dead}"])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f".art.partial-{me}", "art", "theirs"])
    assert (theirs / "keep.txt").read_text() == "x"
    work = tmp_path / "work"
    work.mkdir()
    for name in (f"{dead}-convert-abc", f"{me}-optimize-def", "notes"):
        (work / name).mkdir()
    assert [p.name for p in sweep_work_orphans(work)] == [f"{dead}-convert-abc"]
    assert sorted(p.name for p in work.iterdir()) == sorted([f"{me}-optimize-def", "notes"])


def test_cache_and_staging_do_not_import_each_other():
    """One owner for the shared piece (bertexport.core.orphans): cache imports neither staging nor
    anything that does; each of the three modules imports alone in a fresh interpreter."""
    import ast
    import subprocess
    import sys

    import bertexport

    def imported(module: str) -> set[str]:
        tree = ast.parse((Path(bertexport.__file__).parent / "core" / f"{module}.py").read_text())
        names = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        return names | {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}

    assert "bertexport.core.staging" not in imported("cache")  # not even lazily, inside a function
    assert not {"bertexport.core.staging", "bertexport.core.cache"} & imported("orphans")
    for module, absent in (("cache", "bertexport.core.staging"), ("orphans", "bertexport.core.cache"), ("staging", None)):
        code = f"import sys, bertexport.core.{module}; assert {absent!r} not in sys.modules"
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert p.returncode == 0, p.stderr
