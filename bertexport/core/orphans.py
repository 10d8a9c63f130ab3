"""Files and folders named after the process that owns them, and their removal once that
process is gone (``kill -9`` leaves them behind; the next run sweeps them).

Two namings carry an owner's pid: staging folders beside an output
(``.NAME.partial-PID``, ``.NAME.old-PID``, ``.NAME.unpack-PID``; see ``bertexport.core.staging``)
and work folders in the cache (``PID-prefix-...``; see ``bertexport.core.cache``). Both modules
use this one; it imports neither.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

_STAGING = re.compile(r"^\.(?P<name>.+)\.(?:partial|old|unpack)-(?P<pid>\d+)$")


def pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def work_owner(path: Path) -> int | None:
    """The pid a cache work folder (``PID-prefix-...``) belongs to, or None."""
    head = Path(path).name.split("-", 1)[0]
    return int(head) if head.isdigit() else None


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


def sweep_orphans(folder: Path) -> list[Path]:
    """Remove staging/old/unpack folders (and files) in ``folder`` whose owning process is gone."""
    removed = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return removed
    for p in entries:
        m = _STAGING.match(p.name)
        if m and not pid_alive(int(m.group("pid"))):
            _remove(p)
            removed.append(p)
    return removed


def sweep_work_orphans(work_root: Path) -> list[Path]:
    """Remove cache work folders (named ``PID-...``) whose owning process is gone."""
    removed = []
    for p in Path(work_root).glob("*"):
        pid = work_owner(p)
        if pid is not None and not pid_alive(pid):
            _remove(p)
            removed.append(p)
    return removed
