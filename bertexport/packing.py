"""One-file artifacts for shipping: ``pack`` writes ``NAME.tar.gz`` (manifest.json at its
root) and ``NAME.tar.gz.sha256``; ``unpack`` refuses absolute paths, ``..`` and links
that would leave the destination, then verifies the manifest's checksums; ``inspect``
summarises an artifact folder or a pack without unpacking it. Standard library only."""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
from pathlib import Path, PurePosixPath

from bertexport.errors import UserError
from bertexport.hashing import sha256_file
from bertexport.manifest import MANIFEST, load_manifest, verify_files


def pack(artifact: str | Path, out: str | Path | None = None, force: bool = False) -> Path:
    folder = Path(artifact)
    manifest = load_manifest(folder)
    problems = verify_files(folder, manifest)
    if problems:
        raise UserError(f"refusing to pack {folder}: {'; '.join(problems[:3])}")
    out = Path(out) if out else folder.with_name(folder.name + ".tar.gz")
    if out.exists() and not force:
        raise UserError(f"{out} already exists; pass --force to replace it")
    tmp = out.with_name(out.name + ".partial")
    with tarfile.open(tmp, "w:gz") as tar:
        tar.add(folder / MANIFEST, arcname=MANIFEST)  # first member: inspect reads it cheaply
        for rel in sorted(manifest["files"]):
            tar.add(folder / rel, arcname=rel)
    os.replace(tmp, out)
    Path(str(out) + ".sha256").write_text(f"{sha256_file(out)}  {out.name}\n")
    return out


def _read_manifest_from_pack(path: Path) -> dict:
    with tarfile.open(path, "r:gz") as tar:
        try:
            member = tar.getmember(MANIFEST)
        except KeyError as e:
            raise UserError(f"{path} is not a bertexport pack (no {MANIFEST} at its root)") from e
        return json.loads(tar.extractfile(member).read())


def _check_pack_checksum(path: Path) -> bool | None:
    side = Path(str(path) + ".sha256")
    if not side.is_file():
        return None
    expected = side.read_text().split()[0]
    return expected == sha256_file(path)


def unpack(pack_path: str | Path, dest: str | Path, force: bool = False) -> Path:
    pack_path, dest = Path(pack_path), Path(dest)
    if not pack_path.is_file():
        raise UserError(f"pack not found: {pack_path}")
    if _check_pack_checksum(pack_path) is False:
        raise UserError(f"{pack_path} does not match its .sha256 file: corrupted or tampered")
    if dest.exists() and not force:
        raise UserError(f"{dest} already exists; pass --force to replace it")
    staging = dest.with_name(f".{dest.name}.unpack-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        with tarfile.open(pack_path, "r:gz") as tar:
            for m in tar.getmembers():
                p = PurePosixPath(m.name)
                if p.is_absolute() or ".." in p.parts:
                    raise UserError(f"refusing {pack_path}: member {m.name!r} would be written outside the folder")
                if m.issym() or m.islnk():
                    target = PurePosixPath(m.linkname)
                    if target.is_absolute() or ".." in (p.parent / target).parts:
                        raise UserError(f"refusing {pack_path}: link {m.name!r} -> {m.linkname!r} leaves the folder")
                if not (m.isfile() or m.isdir() or m.issym() or m.islnk()):
                    raise UserError(f"refusing {pack_path}: member {m.name!r} is a device or fifo")
            tar.extractall(staging, filter="data")  # the stdlib's own guard as a second line
        problems = verify_files(staging)
        if problems:
            raise UserError(f"{pack_path} failed its checksums after unpacking: {'; '.join(problems[:3])}")
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(staging, dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dest


def inspect(path: str | Path) -> dict:
    """A summary of an artifact folder or pack: model, task, target, inputs, build-time
    parity and latency, versions."""
    path = Path(path)
    if path.is_dir():
        manifest, checksum_ok = load_manifest(path), not verify_files(path)
    elif path.is_file():
        try:
            manifest = _read_manifest_from_pack(path)
        except (tarfile.TarError, OSError, json.JSONDecodeError) as e:
            raise UserError(f"{path} is not a readable pack: {e}") from e
        checksum_ok = _check_pack_checksum(path)
    else:
        raise UserError(f"not found: {path}")
    lat = manifest.get("latency") or {}
    checks = manifest.get("parity", {}).get("checks", {})
    return {
        "path": str(path),
        "status": manifest.get("status"),
        "checksums_ok": checksum_ok,
        "source": manifest["source"]["source"],
        "checkpoint_sha256": manifest["source"]["sha256"],
        "family": manifest["family"],
        "task": manifest["task"],
        "max_length": manifest["max_length"],
        "target": manifest["target"]["name"],
        "backend": manifest["target"]["backend"],
        "precision": manifest["target"]["precision"],
        "inputs": [f"{i['name']}:{i['dtype']}{i['shape']}" for i in manifest["inputs"]],
        "outputs": [f"{o['name']}:{o['dtype']}{o['shape']}" for o in manifest["outputs"]],
        "parity": {k: {"cosine_min": v["cosine_min"], "max_abs_diff": v["max_abs_diff"], "top1_agreement": v.get("top1_agreement")}
                   for k, v in checks.items()},
        "latency_p50_ms": {"pytorch": lat["pytorch"]["p50"] * 1e3, "artifact": lat["artifact"]["p50"] * 1e3} if lat else None,
        "versions": manifest.get("versions", {}),
        "created": manifest.get("created"),
    }
