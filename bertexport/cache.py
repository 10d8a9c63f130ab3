"""The cache folder: exported ONNX graphs, benchmark models and results live here,
never in the repository. ``BERTEXPORT_CACHE`` overrides the location."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    root = os.environ.get("BERTEXPORT_CACHE")
    base = Path(root) if root else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "bertexport"
    path = base.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
