"""Atomic artifact folders: everything is written into a hidden staging folder next to
the destination and renamed into place only when complete, so a killed or failed build
never leaves a folder that looks finished. A build whose gates failed is published as
``<out>.rejected`` (for inspection), never as ``<out>``."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from bertexport.errors import UserError

REJECTED_SUFFIX = ".rejected"


def check_destination(out: Path, force: bool) -> None:
    if out.exists() and not force:
        raise UserError(f"output folder {out} already exists; pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise UserError(f"output path {out} exists and is not a folder")
    for parent in out.parents:  # missing parents are created; a file in the way is an error
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"cannot create {out}: {parent} is not a folder")
            break


class StagedFolder:
    def __init__(self, out: Path, force: bool = False):
        self.out = Path(out).resolve()
        self.force = force
        check_destination(self.out, force)
        self.staging = self.out.parent / f".{self.out.name}.partial-{os.getpid()}"
        self.published: Path | None = None

    def __enter__(self) -> "StagedFolder":
        if self.staging.exists():
            shutil.rmtree(self.staging)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.staging.mkdir(parents=True)
        return self

    def publish(self, passed: bool) -> Path:
        dest = self.out if passed else self.out.with_name(self.out.name + REJECTED_SUFFIX)
        old = None
        if dest.exists():
            if dest == self.out and not self.force:
                raise UserError(f"output folder {dest} appeared while building; not replacing it")
            old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
            os.replace(dest, old)
        os.replace(self.staging, dest)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        if passed:  # a stale rejected build of the same name would only confuse
            shutil.rmtree(self.out.with_name(self.out.name + REJECTED_SUFFIX), ignore_errors=True)
        self.published = dest
        return dest

    def __exit__(self, exc_type, exc, tb):
        if self.staging.exists():
            shutil.rmtree(self.staging, ignore_errors=True)
        return False
