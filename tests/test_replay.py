"""``search.replay``: a finished search run again with the same inputs, settings and budget is
replayed (the first run's winner and report, no model loaded, said so); anything that decides
the outcome changed, ``search_again``, or the chosen build gone or changed: searched again."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import pytest

from bertexport.core.manifest import load_manifest, verify_files
from bertexport.search.optimize import optimize
from bertexport.search.replay import load_memo, memo_file, memo_key
from tests.tinymodels import write_keyword_jsonl


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    return write_keyword_jsonl(tmp_path_factory.mktemp("data") / "kw.jsonl", seed=5, rows=500)


def test_the_key_holds_what_decides_the_outcome(tmp_path):
    ckpt_dir = tmp_path / "ckpt"
    ckpt_dir.mkdir()
    (ckpt_dir / "tokenizer.json").write_text("{}")
    text = tmp_path / "distill.txt"
    text.write_text("a\nb\n")
    (ckpt_dir / "model.safetensors").write_bytes(b"weights")
    ckpt = SimpleNamespace(sha256="w" * 64, path=ckpt_dir, weight_files=[ckpt_dir / "model.safetensors"])

    def key(**changes):
        parts = {"data": "d", "settings": {"budget_seconds": 60}, "files": {"distill_data": text, "calib": None}} | changes
        return memo_key(ckpt, parts["data"], parts["settings"], parts["files"], [])

    first = key()
    assert key() == first
    assert key(data="e") != first and key(settings={"budget_seconds": 61}) != first
    assert key(files={"distill_data": None, "calib": None}) != first
    text.write_text("a\nc\n")  # the same file name, other text
    assert key() != first
    second = key()
    (ckpt_dir / "tokenizer.json").write_text('{"x": 1}')  # the tokenizer is not in the weights' digest
    assert key() != second


def test_the_key_changes_with_bertexports_code_not_only_its_version(tmp_path, monkeypatch):
    """A changed rule (how students train, how builds are timed) must not replay an old search."""
    import bertexport.core.hashing as hashing

    code = tmp_path / "pkg"
    (code / "students").mkdir(parents=True)
    (code / "students" / "training.py").write_text("COOLDOWN = 0.0\n")
    before = hashing.code_digest(code)
    (code / "students" / "training.py").write_text("COOLDOWN = 0.2\n")
    hashing.code_digest.cache_clear()
    assert hashing.code_digest(code) != before
    assert len(hashing.code_digest()) == hashing.KEY_LENGTH  # the installed package's

    ckpt_dir = tmp_path / "ckpt"
    ckpt_dir.mkdir()
    ckpt = SimpleNamespace(sha256="w" * 64, path=ckpt_dir, weight_files=[])
    first = memo_key(ckpt, "d", {"budget_seconds": 60}, {}, [])
    monkeypatch.setattr(hashing, "code_digest", lambda: "other code")
    assert memo_key(ckpt, "d", {"budget_seconds": 60}, {}, []) != first


def test_a_finished_search_is_replayed_without_loading_the_model(keyword_model, labelled, tmp_path, monkeypatch):
    import bertexport.building.checkpoint as checkpoint
    from bertexport.core.cache import cache_dir

    first = optimize(str(keyword_model), labelled, tmp_path / "a", budget="4m", threads=1)

    class Loaded(Exception):
        pass

    def refuse(*a, **k):
        raise Loaded

    monkeypatch.setattr(checkpoint, "load_model", refuse)
    again = optimize(str(keyword_model), labelled, tmp_path / "b", budget="4m", threads=1)
    assert again.passed and again.report["replayed"]["search_created"] == first.report["created"]
    assert {k: v for k, v in again.report.items() if k != "replayed"} == json.loads(json.dumps(first.report, default=str))
    m1, m2 = load_manifest(first.artifact), load_manifest(again.artifact)
    assert verify_files(again.artifact, m2) == [] and m2["search"]["replayed"] == again.report["replayed"]
    model_files = {k: v for k, v in m1["files"].items() if not k.startswith("search.")}
    assert model_files and all(m2["files"][k] == v for k, v in model_files.items())  # the same model, byte for byte
    assert m2["target"] == m1["target"] and "replayed in" in (again.artifact / "search.md").read_text()
    for changed in ({"budget": "3m"}, {"search_again": True}):  # past the replay: the model loads
        with pytest.raises(Loaded):
            optimize(str(keyword_model), labelled, tmp_path / "c", **({"budget": "4m", "threads": 1} | changed))
    # the chosen build changed or evicted: searched again, saying why
    key = next(p.stem for p in cache_dir("searches").glob("*.json")
               if json.loads(p.read_text())["report"]["created"] == first.report["created"])
    raw = json.loads(memo_file(key).read_text())
    copy = tmp_path / "build"
    shutil.copytree(raw["build"], copy)
    memo_file(key).write_text(json.dumps(raw | {"build": str(copy)}))
    assert load_memo(key)[0] is not None
    weights = max((p for p in copy.rglob("*") if p.is_file() and p.name != "manifest.json"), key=lambda p: p.stat().st_size)
    weights.write_bytes(weights.read_bytes()[:-1])
    assert load_memo(key)[0] is None and "its chosen build changed" in load_memo(key)[1]
    shutil.rmtree(copy)
    assert load_memo(key) == (None, "its chosen build is no longer in the cache")
    with pytest.raises(Loaded):
        optimize(str(keyword_model), labelled, tmp_path / "c", budget="4m", threads=1)
