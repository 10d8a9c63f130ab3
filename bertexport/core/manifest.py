"""``manifest.json``: what an artifact is, how it was built, and what it measured.

The manifest lists every file of the artifact with its sha256 and size, so a device can
refuse a tampered or truncated artifact before loading it. This module needs only the
standard library: the device runtime imports it without torch.
"""

from __future__ import annotations

import json
import os
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path

from bertexport.core.errors import UserError
from bertexport.core.hashing import sha256_file

SCHEMA_VERSION = 2  # 2: manifest_sha256 (a digest of the manifest body)
MANIFEST = "manifest.json"
SIGNATURE = "signature.sig"  # bertexport.shipping.signing: signs the manifest and every file, so it is not in the table
DIGEST_KEY = "manifest_sha256"


def manifest_digest(manifest: dict) -> str:
    """sha256 of the manifest's canonical JSON without its own digest field.

    It catches a manifest edited after the build (a raised cosine, a changed status, a
    file table patched to match a swapped model) by anyone who does not also recompute
    it; a deliberate forger who does is caught only by a signature (``bertexport sign``)
    or by comparing with the digest CI printed (``bertexport inspect``) when it built it."""
    import hashlib

    body = {k: v for k, v in manifest.items() if k != DIGEST_KEY}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":"), default=_jsonable).encode()).hexdigest()


SCHEMA_FILE = Path(__file__).with_name("manifest.schema.json")


@dataclass
class Manifest:
    """The typed manifest (``manifest.schema.json`` is the same contract for other languages).
    Sections are plain dicts; the schema says what each holds."""

    bertexport_version: str
    status: str  # passed | rejected
    created: str
    source: dict
    family: str
    task: str
    max_length: int
    model: dict
    tokenizer: str
    inputs: list
    outputs: list
    target: dict
    parity: dict
    sizes: dict
    versions: dict
    pooling: dict | None = None
    labels: str | None = None
    calibration: dict | None = None
    latency: dict | None = None
    distillation: dict | None = None
    search: dict | None = None
    batch_invariance: dict | None = None  # compare.batch_invariance: does an output depend on its batch?
    early_exit: dict | None = None  # students.early_exit: segments, exit layers, threshold (runtime.EarlyExitRunner)
    load_seconds: float | None = None
    threads: int | None = None
    environment: dict = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION
    files: dict = field(default_factory=dict)
    manifest_sha256: str | None = None

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: dict) -> "Manifest":
        names = {f.name for f in fields(cls)}
        missing = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING and f.name not in d]
        if missing:
            raise UserError(f"manifest is missing {', '.join(missing)}")
        return cls(**{k: v for k, v in d.items() if k in names})


def file_table(folder: Path) -> dict[str, dict]:
    table = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name not in (MANIFEST, SIGNATURE):
            table[p.relative_to(folder).as_posix()] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    return table


def write_manifest(folder: Path, manifest: dict | Manifest) -> dict:
    """Add the file table and write ``manifest.json`` (atomically, last)."""
    manifest = manifest.to_dict() if isinstance(manifest, Manifest) else dict(manifest)
    Manifest.from_dict(manifest)  # every required field is there
    manifest["schema_version"] = SCHEMA_VERSION
    manifest["files"] = file_table(folder)
    manifest.pop(DIGEST_KEY, None)
    manifest = json.loads(json.dumps(manifest, default=_jsonable))  # the digest covers exactly what is written
    manifest[DIGEST_KEY] = manifest_digest(manifest)
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False, default=_jsonable) + "\n")
    os.replace(tmp, folder / MANIFEST)
    return manifest


def _jsonable(o):
    if hasattr(o, "to_dict"):
        return o.to_dict()
    if isinstance(o, Path):
        return str(o)
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
    except ImportError:
        pass
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def load_manifest(folder: str | Path) -> dict:
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise UserError(f"{folder} is not a bertexport artifact (no {MANIFEST})")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is corrupt: {e}") from e
    if not isinstance(manifest, dict):
        raise UserError(f"{path} is corrupt: not a JSON object")
    version = manifest.get("schema_version")
    if not isinstance(version, int):
        raise UserError(f"{path} has no schema_version")
    if version > SCHEMA_VERSION:
        raise UserError(f"{path} uses manifest schema {version}, newer than this bertexport understands ({SCHEMA_VERSION}); upgrade bertexport")
    return manifest


def verify_files(folder: str | Path, manifest: dict | None = None) -> list[str]:
    """Problems found: missing, changed or unlisted files. Empty when the artifact is intact."""
    folder = Path(folder)
    manifest = manifest or load_manifest(folder)
    problems = []
    if manifest.get("schema_version", 1) >= 2 and manifest.get(DIGEST_KEY) != manifest_digest(manifest):
        problems.append(f"{MANIFEST} was edited after the build (its digest does not match its content)")
    listed = manifest.get("files", {})
    for rel, meta in listed.items():
        p = folder / rel
        if not p.is_file():
            problems.append(f"missing file: {rel}")
        elif p.stat().st_size != meta["bytes"]:
            problems.append(f"size mismatch: {rel} ({p.stat().st_size} bytes, manifest says {meta['bytes']})")
        elif sha256_file(p) != meta["sha256"]:
            problems.append(f"checksum mismatch: {rel}")
    for p in folder.rglob("*"):
        rel = p.relative_to(folder).as_posix()
        if p.is_file() and rel not in (MANIFEST, SIGNATURE) and rel not in listed:
            problems.append(f"unlisted file: {p.relative_to(folder).as_posix()}")
    return problems


def manifest_header(ckpt, passed: bool, max_length: int) -> dict:
    """The fields every artifact's manifest opens with: who built it, when, from which
    checkpoint (``ckpt``: building.checkpoint's resolved checkpoint), and its verdict."""
    import datetime

    from bertexport import __version__

    return {"bertexport_version": __version__,
            "status": "passed" if passed else "rejected",
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "source": ckpt.describe(), "family": ckpt.family, "task": ckpt.task, "max_length": max_length}

