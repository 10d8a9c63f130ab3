"""File digests and the one cache-key helper."""

from __future__ import annotations

import re
from pathlib import Path

from bertexport.core.hashing import KEY_LENGTH, cache_key, sha256_file, sha256_files

PACKAGE = Path(__file__).resolve().parent.parent / "bertexport"


def test_cache_key_is_stable_and_ignores_dict_order():
    a = cache_key("export", {"opset": 18, "task": "text-classification"}, [1, 2])
    assert a == cache_key("export", {"task": "text-classification", "opset": 18}, (1, 2))  # JSON: a tuple is a list
    assert len(a) == KEY_LENGTH and re.fullmatch(r"[0-9a-f]+", a)
    assert a == "878975393a6151b4dcba"  # a key never changes between runs or versions of Python (caches survive)


def test_cache_key_changes_with_any_part():
    base = cache_key("m", 18, {"x": 1}, None)
    others = {cache_key("m", 19, {"x": 1}, None), cache_key("m", 18, {"x": 2}, None), cache_key("m", 18, {"x": 1}),
              cache_key("m", 18, {"x": 1}, None, "variant"), cache_key(["m", 18, {"x": 1}, None])}
    assert base not in others and len(others) == 5
    assert cache_key(Path("/a/b")) == cache_key("/a/b")  # anything JSON does not know is written as str
    assert cache_key("café") != cache_key("cafe")


def test_no_module_names_a_cache_by_hand():
    """Every cache key comes from cache_key: no hand-truncated sha256 anywhere else."""
    hand_made = re.compile(r"hexdigest\(\)\s*\[")
    offenders = [str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
                 if p.name != "hashing.py" and hand_made.search(p.read_text(encoding="utf-8"))]
    assert offenders == []


def test_file_digests(tmp_path):
    (tmp_path / "a").write_bytes(b"one")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b").write_bytes(b"two")
    assert sha256_file(tmp_path / "a") == "7692c3ad3540bb803c020b3aee66cd8887123234ea0c6e7143c0add73ff431ed"
    files = [tmp_path / "sub" / "b", tmp_path / "a"]
    digest = sha256_files(files, tmp_path)
    assert digest == sha256_files(list(reversed(files)), tmp_path)  # name order, not the order given
    (tmp_path / "sub" / "b").write_bytes(b"three")
    assert sha256_files(files, tmp_path) != digest
