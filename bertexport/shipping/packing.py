"""One-file artifacts for shipping: ``pack`` writes ``NAME.tar.gz`` (manifest.json at its
root) and ``NAME.tar.gz.sha256``; ``unpack`` refuses absolute paths, ``..`` and links
that would leave the destination, then verifies the manifest's checksums; ``inspect``
summarises an artifact folder or a pack without unpacking it. Standard library only."""

from __future__ import annotations

import json
import os
import shutil
import tarfile
import zlib
from pathlib import Path, PurePosixPath

from bertexport.core.errors import UserError
from bertexport.core.hashing import sha256_file
from bertexport.core.interrupts import track, untrack
from bertexport.core.manifest import DIGEST_KEY, MANIFEST, SIGNATURE, load_manifest, manifest_digest, verify_files
from bertexport.core.orphans import sweep_orphans
from bertexport.core.staging import check_destination, swap_into_place

# what a damaged pack raises while being read: truncated (EOFError), not gzip
# (gzip.BadGzipFile, an OSError), bad deflate data (zlib.error), not a tar (TarError)
_DAMAGED = (tarfile.TarError, EOFError, zlib.error, OSError, ValueError)


PACK_FORMATS = ("tar.gz", "triton")


def pack(artifact: str | Path, out: str | Path | None = None, force: bool = False, format: str = "tar.gz", **options) -> Path:
    """``tar.gz``: one file for shipping (below); ``triton``: a Triton model repository folder
    (``bertexport.shipping.triton``; ``options`` go to it)."""
    if format not in PACK_FORMATS:
        raise UserError(f"unknown pack format {format!r}: choose {' or '.join(PACK_FORMATS)}")
    if format == "triton":
        from bertexport.shipping.triton import triton_repository

        folder = Path(artifact)
        target = Path(out) if out else folder.with_name(folder.name + "-triton")
        return Path(triton_repository(folder, target, force=force, **options)["path"])
    if options:
        raise UserError(f"{', '.join(sorted(options))}: only with --format triton")
    folder = Path(artifact)
    manifest = load_manifest(folder)
    problems = verify_files(folder, manifest)
    if problems:
        raise UserError(f"refusing to pack {folder}: {'; '.join(problems[:3])}")
    out = Path(out) if out else folder.with_name(folder.name + ".tar.gz")
    if not out.name.endswith(".tar.gz"):
        raise UserError(f"a pack is a .tar.gz file; got {out}")
    check_destination(out, force, [folder], "pack")
    sweep_orphans(out.parent)
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    track(tmp)
    try:
        with tarfile.open(tmp, "w:gz") as tar:
            tar.add(folder / MANIFEST, arcname=MANIFEST)  # first member: inspect reads it cheaply
            for rel in sorted(manifest["files"]):
                tar.add(folder / rel, arcname=rel)
            if (folder / SIGNATURE).is_file():  # the signature travels with the artifact
                tar.add(folder / SIGNATURE, arcname=SIGNATURE)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
        untrack(tmp)
    Path(str(out) + ".sha256").write_text(f"{sha256_file(out)}  {out.name}\n")
    return out


def _read_manifest_from_pack(path: Path) -> dict:
    try:
        with tarfile.open(path, "r:gz") as tar:
            first = tar.next()
            if first is None or first.name != MANIFEST or not first.isfile():
                raise UserError(f"{path} is not a bertexport pack (no {MANIFEST} at its start)")
            manifest = json.loads(tar.extractfile(first).read())
    except UserError:
        raise
    except _DAMAGED as e:
        raise UserError(f"{path} is not a readable pack (truncated, corrupt or not a .tar.gz: {e or type(e).__name__})") from e
    if not isinstance(manifest, dict):
        raise UserError(f"{path} has a corrupt {MANIFEST}")
    return manifest


def _verify_pack_members(path: Path, manifest: dict) -> list[str]:
    """Stream the whole pack (nothing written) and check every member against the
    manifest's file table: a truncated or altered pack is found without unpacking it."""
    import hashlib

    listed = dict(manifest.get("files", {}))
    problems = []
    try:
        with tarfile.open(path, "r:gz") as tar:
            for m in tar:
                if m.name in (MANIFEST, SIGNATURE) or not m.isfile():
                    continue
                meta = listed.pop(m.name, None)
                if meta is None:
                    problems.append(f"unlisted file: {m.name}")
                    continue
                h = hashlib.sha256()
                f = tar.extractfile(m)
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
                if h.hexdigest() != meta["sha256"]:
                    problems.append(f"checksum mismatch: {m.name}")
    except _DAMAGED as e:
        raise UserError(f"{path} is not a readable pack (truncated, corrupt or not a .tar.gz: {e or type(e).__name__})") from e
    problems += [f"missing file: {name}" for name in listed]
    return problems


def _check_pack_checksum(path: Path) -> bool | None:
    side = Path(str(path) + ".sha256")
    if not side.is_file():
        return None
    expected = side.read_text().split()[0]
    return expected == sha256_file(path)


def unpack(pack_path: str | Path, dest: str | Path, force: bool = False, trusted_key: str | Path | None = None) -> Path:
    pack_path, dest = Path(pack_path), Path(dest)
    if not pack_path.is_file():
        raise UserError(f"pack not found: {pack_path}")
    if _check_pack_checksum(pack_path) is False:
        raise UserError(f"{pack_path} does not match its .sha256 file: corrupted or tampered")
    check_destination(dest, force, [], "artifact folder")
    dest = dest.expanduser().resolve()
    dest.parent.mkdir(parents=True, exist_ok=True)
    sweep_orphans(dest.parent)
    staging = dest.with_name(f".{dest.name}.unpack-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        _extract(pack_path, staging)
        problems = verify_files(staging)
        if problems:
            raise UserError(f"{pack_path} failed its checksums after unpacking: {'; '.join(problems[:3])}")
        if trusted_key:
            from bertexport.shipping.signing import verify_signature

            verify_signature(staging, trusted_key)
        swap_into_place(staging, dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dest


def _extract(pack_path: Path, staging: Path) -> None:
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
    except UserError:
        raise
    except OSError as e:
        if e.errno is not None:  # disk full, read-only...: the environment, reported as such by the CLI
            raise
        raise UserError(f"{pack_path} is not a readable pack (truncated, corrupt or not a .tar.gz: {e})") from e
    except _DAMAGED as e:
        raise UserError(f"{pack_path} is not a readable pack (truncated, corrupt or not a .tar.gz: {e or type(e).__name__})") from e


def inspect(path: str | Path) -> dict:
    """A summary of an artifact folder or pack: model, task, target, inputs, build-time
    parity and latency, versions."""
    path = Path(path)
    if path.is_dir():
        manifest = load_manifest(path)
        checksum_ok = not verify_files(path, manifest)
    elif path.is_file():
        manifest = _read_manifest_from_pack(path)
        checksum_ok = _check_pack_checksum(path) is not False and not _verify_pack_members(path, manifest)
    else:
        raise UserError(f"not found: {path}")
    lat = manifest.get("latency") or {}
    checks = manifest.get("parity", {}).get("checks", {})
    digest = manifest.get(DIGEST_KEY)
    return {
        "path": str(path),
        "status": manifest.get("status"),
        "checksums_ok": checksum_ok,
        "manifest_sha256": digest,
        "manifest_digest_ok": None if digest is None else digest == manifest_digest(manifest),
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
        "parity": {k: {"cosine_min": v["cosine_min"], "max_abs_diff": v["max_abs_diff"], "agreement": v.get("agreement", v.get("top1_agreement"))}
                   for k, v in checks.items()},
        "latency_p50_ms": {"pytorch": lat["pytorch"]["p50"] * 1e3, "artifact": lat["artifact"]["p50"] * 1e3} if lat else None,
        "versions": manifest.get("versions", {}),
        "created": manifest.get("created"),
    }


def inspect_rows(info: dict) -> list[tuple[str, str]]:
    """``inspect``'s summary as (field, value) rows for a table."""
    def ok(v):
        return {True: "ok", False: "FAILED", None: "not checked (no .sha256 beside the pack)"}[v]

    rows = [("status", str(info["status"])), ("checksums", ok(info["checksums_ok"])),
            ("manifest digest", f"{info['manifest_sha256'] or '-'} ({ok(info['manifest_digest_ok']) if info['manifest_sha256'] else 'none: built by an older bertexport'})"),
            ("source", f"{info['source']} (sha256 {info['checkpoint_sha256'][:16]}…)"),
            ("family / task", f"{info['family']} / {info['task']} (max length {info['max_length']})"),
            ("target", f"{info['target']} · {info['backend']} · {info['precision']}"),
            ("inputs", ", ".join(info["inputs"])), ("outputs", ", ".join(info["outputs"]))]
    for name, c in (info.get("parity") or {}).items():
        text = f"cos min {c['cosine_min']:.5f} · max abs diff {c['max_abs_diff']:.3g}"
        if c.get("agreement") is not None:
            text += f" · top-1 {c['agreement'] * 100:.1f}%"
        rows.append((f"parity {name}", text))
    lat = info.get("latency_p50_ms")
    if lat:
        rows.append(("latency p50 (build machine)", f"PyTorch {lat['pytorch']:.2f} ms · artifact {lat['artifact']:.2f} ms "
                                                  f"({lat['pytorch'] / lat['artifact']:.2f}x)"))
    rows.append(("versions", ", ".join(f"{k} {v}" for k, v in (info.get("versions") or {}).items())))
    rows.append(("created", str(info.get("created"))))
    return rows
