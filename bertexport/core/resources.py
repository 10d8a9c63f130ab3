"""Where the repo-level data folders (``targets/``, ``calib/``) are found.

In a checkout (editable install) they sit beside the package; in a wheel they are
packaged under ``bertexport/_data/``.
"""

from __future__ import annotations

from pathlib import Path

_PKG = Path(__file__).resolve().parent.parent  # the bertexport package


def data_dir(name: str) -> Path:
    for candidate in (_PKG.parent / name, _PKG / "_data" / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"bertexport data folder '{name}' is missing from this installation")
