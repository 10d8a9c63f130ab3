"""The cache folder: exported ONNX graphs, sensitivity scans, distilled students, builds
made for benchmarks and searches, work folders and crash logs live here, never in the
repository. ``BERTEXPORT_CACHE`` overrides the location. ``bertexport cache`` lists it,
prunes it (orphaned work folders, entries unused for N days) or clears it; only the
folders bertexport creates are ever touched, whatever the location points at."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from bertexport.core.orphans import pid_alive, sweep_work_orphans, work_owner

# every top-level folder bertexport makes in the cache, with what it holds
KINDS = {
    "exports": "ONNX exports (by checkpoint hash, task, opset, versions)",
    "sensitivity": "int8 sensitivity scans (by export hash, calibration, pass config)",
    "students": "distilled students",
    "builds": "candidate builds of `optimize` searches",
    "costs": "student-shape latencies measured on this machine (optimize's cost model)",
    "bench-artifacts": "artifacts built by `benchmark --target`",
    "bench": "data and models of the bench/ scripts",
    "tensorrt": "TensorRT timing caches",
    "work": "work folders of running commands",
    "logs": "crash logs of internal errors",
}


def cache_root() -> Path:
    root = os.environ.get("BERTEXPORT_CACHE")
    return Path(root) if root else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "bertexport"


def cache_dir(*parts: str) -> Path:
    path = cache_root().joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _size(p: Path) -> int:
    if p.is_symlink():
        return 0
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file() and not f.is_symlink())


def _last_used(p: Path) -> float:
    try:
        return max([p.stat().st_mtime] + [f.stat().st_mtime for f in p.rglob("*")] if p.is_dir() else [p.stat().st_mtime])
    except OSError:
        return 0.0


def cache_summary() -> dict:
    root = cache_root()
    kinds = {}
    for kind, what in KINDS.items():
        folder = root / kind
        entries = list(folder.iterdir()) if folder.is_dir() else []
        kinds[kind] = {"what": what, "entries": len(entries), "bytes": sum(_size(e) for e in entries)}
    return {"root": str(root), "bytes": sum(v["bytes"] for v in kinds.values()), "kinds": kinds}


def prune_cache(older_than_days: float = 30) -> tuple[list[Path], int]:
    """Remove orphaned work folders (their process is gone) and entries not used for
    ``older_than_days``. Work folders of running processes are kept."""
    root = cache_root()
    removed, freed = [], 0
    work = root / "work"
    if work.is_dir():
        sizes = {p: _size(p) for p in work.iterdir()}
        for p in sweep_work_orphans(work):
            removed.append(p)
            freed += sizes.get(p, 0)
    cutoff = time.time() - older_than_days * 86400
    for kind in KINDS:
        if kind == "work" or not (root / kind).is_dir():
            continue
        for entry in list((root / kind).iterdir()):
            if _last_used(entry) < cutoff:
                size = _size(entry)
                shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
                removed.append(entry)
                freed += size
    return removed, freed


def clear_cache() -> int:
    """Remove every entry of every cache folder bertexport makes (nothing else under the root)."""
    root = cache_root()
    freed = 0
    for kind in KINDS:
        folder = root / kind
        if not folder.is_dir():
            continue
        for entry in list(folder.iterdir()):
            owner = work_owner(entry)
            if kind == "work" and owner is not None and pid_alive(owner):
                continue  # a running command's work folder
            freed += _size(entry)
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
    return freed
