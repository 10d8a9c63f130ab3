"""A finished search replayed: ``optimize`` run again with the same inputs returns the first
run's result in seconds, and says so.

A search's outcome depends on its budget as much as on its inputs: what a budget-stopped
search trained, and how far, is a decision of the clock. Run again from the step caches
alone (builds, evaluations, students), it would see time left where the first run had none
and spend it (train its students on), so the same command would give another artifact, and
take the budget again. The memo makes the rerun what CI expects: the same artifact, in
seconds. A larger ``--budget`` (or ``--search-again``) searches again, and the step caches
make what was done before cheap.

The memo's key holds everything that decides the outcome: the checkpoint (its digest over
config and weights, and every other top-level file: the tokenizer), the data, the
distillation and calibration text, each ``--student-init`` checkpoint, every setting (the
budget too), the machine (CPU model and features, package versions: ``cost_model.machine_key``)
and bertexport's version and code (``core.hashing.code_digest``: a change to how it trains or
times searches again). It is written after the artifact is published (a search that
ended with no winner too: its rerun fails the same way); it is used only while the chosen
build is still in the build cache and intact (its file table), else the search runs again.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from pathlib import Path

MEMO_VERSION = "search-memo/1"
# what a replayed search had the same as its first run (``memo_key``), as the CLI and search.md say it
SAME_AS_BEFORE = "the same model, data, settings, budget, machine, versions and bertexport code"


def folder_digest(folder: str | Path, skip=()) -> str:
    """A digest of a checkpoint folder's top-level files (names, sizes and contents), but
    ``skip`` (files another digest already covers: the checkpoint's weights)."""
    from bertexport.core.hashing import cache_key, sha256_file

    folder, skip = Path(folder), {Path(p).resolve() for p in skip}
    return cache_key([(p.name, p.stat().st_size, sha256_file(p)) for p in sorted(folder.iterdir())
                      if p.is_file() and p.resolve() not in skip])


def memo_key(ckpt, data_digest: str, settings: dict, files: dict[str, str | Path | None], inits: list[Path]) -> str:
    """The key of a search's memo (see the module doc): ``settings`` every option that decides
    the outcome, ``files`` the text files it reads (None: not given)."""
    from bertexport import __version__
    from bertexport.core.hashing import cache_key, code_digest, sha256_file
    from bertexport.search.cost_model import machine_key

    # the weights are in ckpt.sha256: hashed once (a BERT-base is 440 MB)
    return cache_key(MEMO_VERSION, __version__, code_digest(), ckpt.sha256, folder_digest(ckpt.path, ckpt.weight_files), data_digest,
                     settings,
                     {k: None if v is None else sha256_file(v) for k, v in files.items()},
                     [folder_digest(p) for p in inits], machine_key())


@dataclass
class Memo:
    """A finished search: its report, the build it published, under what name and runtime
    settings, and whether it passed."""

    report: dict
    build: Path
    name: str
    runtime: dict
    passed: bool
    created: str


def memo_file(key: str) -> Path:
    from bertexport.core.cache import cache_dir

    return cache_dir("searches") / f"{key}.json"


def save_memo(key: str, report: dict, build: str | Path, name: str, runtime: dict | None, passed: bool) -> Path:
    from bertexport.core.staging import write_text_atomic

    path = memo_file(key)
    write_text_atomic(path, json.dumps({"memo": MEMO_VERSION, "created": dt.datetime.now(dt.timezone.utc).isoformat(
        timespec="seconds"), "report": report, "build": str(build), "name": name, "runtime": runtime or {},
        "passed": passed}, default=str))
    return path


def load_memo(key: str) -> tuple[Memo | None, str | None]:
    """The memo of ``key`` (None when there is none) and, when one is there but cannot be
    replayed, why (its build evicted from the cache or changed; an unreadable memo)."""
    from bertexport.core.manifest import verify_files

    path = memo_file(key)
    if not path.is_file():
        return None, None
    try:
        raw = json.loads(path.read_text())
        memo = Memo(report=raw["report"], build=Path(raw["build"]), name=raw["name"], runtime=raw["runtime"],
                    passed=bool(raw["passed"]), created=raw["created"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        return None, f"its memo is unreadable ({type(e).__name__})"
    if not memo.build.is_dir():
        return None, "its chosen build is no longer in the cache"
    try:
        problems = verify_files(memo.build)
    except Exception as e:  # a manifest gone or unreadable: search again
        problems = [f"{type(e).__name__}: {e}"]
    if problems:
        return None, f"its chosen build changed ({problems[0]})"
    return memo, None
