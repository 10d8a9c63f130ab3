"""sha256 of files and folders, streamed; and the one cache key every cache is named by."""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Iterable

_CHUNK = 1 << 20
KEY_LENGTH = 20  # hex digits of a cache key: 80 bits, no collision among any cache's entries


def cache_key(*parts, length: int = KEY_LENGTH) -> str:
    """The name of a cache entry made from ``parts``: sha256 of their JSON (keys sorted,
    anything JSON does not know written as ``str``), ``length`` hex digits. Whatever decides
    an entry's content must be among the parts; changing them only misses the cache."""
    raw = json.dumps(parts, sort_keys=True, default=str, ensure_ascii=False)
    return hashlib.sha256(raw.encode("utf-8")).hexdigest()[:length]


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def sha256_files(paths: Iterable[Path], root: Path) -> str:
    """One digest over several files: their relative names and contents, in name order."""
    h = hashlib.sha256()
    for p in sorted(paths, key=lambda q: q.relative_to(root).as_posix()):
        h.update(p.relative_to(root).as_posix().encode())
        h.update(b"\0")
        h.update(sha256_file(p).encode())
    return h.hexdigest()


@functools.lru_cache(maxsize=None)
def code_digest(root: Path | None = None) -> str:
    """A digest of bertexport's own code (every .py file under ``root``, default the installed
    package: relative names and contents): what a cached *decision* (a search's memo) must
    change with. The version alone does not change between commits, and a changed training
    or timing rule replayed an old search (seen 2026-12-04: a learning-rate cooldown)."""
    root = Path(root) if root is not None else Path(__file__).resolve().parents[1]
    return cache_key(sha256_files(root.rglob("*.py"), root))
