"""Where bertexport writes, and what it may replace.

Every output (artifact, rejected build, student, pack, benchmark or search folder) is
written into a hidden staging folder beside its destination and renamed into place only
when complete, so a killed or failed run never leaves something that looks finished.
``--force`` replaces only what bertexport made (recognised by its own manifest or
report), never the source checkpoint, a folder that contains it or lies inside it, the
working directory, the home folder, ``/``, or any other folder of someone's files.
Work folders in the cache carry their owner's pid, so one orphaned by ``kill -9`` is
removed by the next run.
"""

from __future__ import annotations

import json
import os
import shutil
import tarfile
import tempfile
from pathlib import Path

from bertexport.core.cache import cache_dir
from bertexport.core.errors import UserError
from bertexport.core.interrupts import track, untrack
from bertexport.core.orphans import sweep_orphans, sweep_work_orphans

REJECTED_SUFFIX = ".rejected"


# -- what bertexport made -----------------------------------------------------------

def _json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def made_by_bertexport(path: Path) -> str | None:
    """What bertexport output ``path`` is (``artifact``, ``student``, ``pruned``,
    ``benchmark``, ``search``, ``pack``), or None when it is not one of ours."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        m = _json(path / "manifest.json")
        if m and "bertexport_version" in m and "files" in m:
            return "artifact"
        d = _json(path / "distill_report.json")
        if d and "teacher" in d and "student" in d:
            return "student"
        p = _json(path / "prune_report.json")  # bertexport.students.pruning.REPORT_NAME
        if p and "teacher" in p and "student" in p and "mac_fraction" in p:
            return "pruned"
        b = _json(path / "benchmark.json")
        if b and str(b.get("schema", "")).startswith("bertexport.judging.benchmark"):
            return "benchmark"
        return None
    if path.is_file() and path.name.endswith(".tar.gz"):
        try:
            with tarfile.open(path, "r:gz") as tar:
                first = tar.next()
                return "pack" if first is not None and first.name == "manifest.json" else None
        except (tarfile.TarError, OSError, EOFError):
            return None
    return None


def _inside(a: Path, b: Path) -> bool:
    """``a`` is ``b`` or lies inside it."""
    try:
        a.relative_to(b)
        return True
    except ValueError:
        return False


def protected_reason(out: Path, protect: list[Path] = ()) -> str | None:
    """Why ``out`` may never be replaced, or None."""
    out = out.resolve()
    if out == Path(out.anchor):
        return "it is the filesystem root"
    if out == Path.home().resolve():
        return "it is your home folder"
    if _inside(Path.cwd().resolve(), out):
        return "it is (or contains) the working directory"
    for p in protect:
        p = Path(p).resolve()
        if _inside(p, out):
            return f"it is (or contains) the source checkpoint {p}"
        if _inside(out, p):
            return f"it lies inside the source checkpoint {p}"
    return None


def check_destination(out: Path, force: bool, protect: list[Path] = (), what: str = "output folder") -> None:
    """Refuse (exit 2) before any work when ``out`` cannot or may not be written."""
    out = Path(out).expanduser()
    reason = protected_reason(out, protect)
    if reason:  # a missing `out` can only be inside the source: also refused (it is theirs)
        raise UserError(f"refusing to write {what} {out}: {reason}")
    exists = out.exists() or out.is_symlink()
    if exists:
        if not force:
            raise UserError(f"{what} {out} already exists; pass --force to replace it (only something bertexport made is replaced)")
        if out.is_symlink():
            raise UserError(f"refusing to replace {out}: it is a symbolic link")
        if out.is_dir() and any(out.iterdir()) and made_by_bertexport(out) is None:
            raise UserError(f"refusing to replace {out}: it is a folder of files bertexport did not make "
                            "(no bertexport manifest or report in it); choose another --out")
        if out.is_file() and made_by_bertexport(out) is None:
            raise UserError(f"refusing to replace {out}: it is a file bertexport did not make; choose another --out")
    for parent in out.parents:  # missing parents are created; a file in the way is an error
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"cannot create {out}: {parent} is not a folder")
            break


def check_writable(out: Path, need_bytes: int = 0, what: str = "output") -> None:
    """The nearest existing folder above ``out`` accepts a file and has ``need_bytes``
    free: a read-only, full or special filesystem is refused before any work."""
    out = Path(out).expanduser().resolve()
    base = next((p for p in [out, *out.parents] if p.exists()), Path(out.anchor))
    if base == out and not out.is_dir():
        base = out.parent
    try:
        fd, probe = tempfile.mkstemp(prefix=".bertexport-probe-", dir=base)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"cannot write the {what} under {base}: {e.strerror or e} (choose a writable location)") from e
    if need_bytes:
        free = shutil.disk_usage(base).free
        if free < need_bytes:
            raise UserError(f"not enough free space for the {what} under {base}: {free / 1e6:.0f} MB free, "
                            f"about {need_bytes / 1e6:.0f} MB needed")


# -- work folders -------------------------------------------------------------------------

class WorkFolder:
    """A temporary folder in the cache's ``work/``, named after this process so that an
    orphan (``kill -9``) is recognised and removed by the next run; removed on exit."""

    def __init__(self, prefix: str = "job"):
        root = cache_dir("work")
        sweep_work_orphans(root)
        self.path = Path(tempfile.mkdtemp(prefix=f"{os.getpid()}-{prefix}-", dir=root))
        track(self.path)

    def __enter__(self) -> Path:
        return self.path

    def __exit__(self, *exc):
        shutil.rmtree(self.path, ignore_errors=True)
        untrack(self.path)
        return False


# -- staged publication ------------------------------------------------------------------

def write_text_atomic(path: Path, text: str) -> None:
    """``path`` written whole or not at all: a temporary file beside it (named by pid, so two
    processes never share one) renamed over it; a kill mid-write leaves the previous file."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def swap_into_place(staging: Path, dest: Path) -> None:
    """Rename a complete ``staging`` folder to ``dest``; an existing ``dest`` (already checked
    replaceable by the caller) is moved aside first and removed only after, so ``dest`` is
    always either the old folder or the new one, never half of each."""
    old = None
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        os.replace(dest, old)
    os.replace(staging, dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


class StagedFolder:
    """Write into ``.NAME.partial-PID`` beside ``out``; ``publish`` renames it into place
    (the old output, if any, is removed only after the new one is complete)."""

    def __init__(self, out: Path, force: bool = False, protect: list[Path] = (), what: str = "output folder"):
        self.out = Path(out).expanduser().resolve()
        self.force = force
        self.protect = list(protect)
        check_destination(self.out, force, self.protect, what)
        rejected = self.rejected_path
        if rejected.exists() and made_by_bertexport(rejected) is None:
            raise UserError(f"refusing to use {self.out}: {rejected} exists and is not a bertexport build")
        self.staging = self.out.parent / f".{self.out.name}.partial-{os.getpid()}"
        self.published: Path | None = None

    @property
    def rejected_path(self) -> Path:
        return self.out.with_name(self.out.name + REJECTED_SUFFIX)

    def __enter__(self) -> "StagedFolder":
        self.out.parent.mkdir(parents=True, exist_ok=True)
        sweep_orphans(self.out.parent)
        if self.staging.exists():
            shutil.rmtree(self.staging)
        track(self.staging)
        self.staging.mkdir(parents=True)
        return self

    def publish(self, passed: bool = True) -> Path:
        dest = self.out if passed else self.rejected_path
        if dest.exists():
            if dest == self.out and not self.force:
                raise UserError(f"output folder {dest} appeared while building; not replacing it")
            if dest.is_dir() and any(dest.iterdir()) and made_by_bertexport(dest) is None:
                raise UserError(f"refusing to replace {dest}: it is not something bertexport made")
        swap_into_place(self.staging, dest)
        rejected = self.rejected_path
        if passed and rejected.exists() and made_by_bertexport(rejected):  # a stale rejected build would only confuse
            shutil.rmtree(rejected, ignore_errors=True)
        self.published = dest
        return dest

    def __exit__(self, exc_type, exc, tb):
        if self.staging.exists():
            shutil.rmtree(self.staging, ignore_errors=True)
        untrack(self.staging)
        return False
