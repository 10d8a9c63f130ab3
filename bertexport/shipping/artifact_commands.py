"""The library entries of the commands on artifacts as files — ``verify``, ``sign``, ``pack``,
``unpack``, ``inspect`` and ``cache`` — each taking its settings record
(``shipping.settings``) and calling the library that does the work (``core.manifest``,
``shipping.signing``, ``shipping.packing``, ``core.cache``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from bertexport.core.errors import UserError
from bertexport.shipping.settings import (CacheSettings, InspectSettings, PackSettings, SignSettings, UnpackSettings,
                                          VerifySettings)


@dataclass
class Verification:
    """What ``verify`` found: the problems (none: passed), and what was checked."""

    artifact: Path
    problems: list[str]
    files: int
    manifest_sha256: str | None
    status: str | None
    signed: bool  # the signature was checked against the trusted key (and held)

    @property
    def passed(self) -> bool:
        return not self.problems

    def payload(self) -> dict:
        """``verify --json``."""
        return {"artifact": str(self.artifact), "passed": self.passed, "problems": self.problems, "files": self.files,
                "manifest_sha256": self.manifest_sha256}


class VerificationFailed(UserError):
    """The artifact's files do not match its manifest (exit 2); ``verification`` says how."""

    def __init__(self, verification: Verification):
        self.verification = verification
        problems = verification.problems
        more = f" (+{len(problems) - 5} more)" if len(problems) > 5 else ""
        super().__init__(f"{verification.artifact} failed verification: {'; '.join(problems[:5])}{more}")


def verify_command(settings: VerifySettings) -> Verification:
    """Every file of the artifact against the manifest's checksums, the manifest's own digest,
    and with ``trusted_key`` its signature (a ``UserError`` when it does not hold); a
    ``VerificationFailed`` carrying the problems when a file does not match."""
    from bertexport.core.manifest import load_manifest, verify_files

    manifest = load_manifest(settings.artifact)
    problems = verify_files(settings.artifact, manifest)
    if settings.trusted_key and not problems:
        from bertexport.shipping.signing import verify_signature

        verify_signature(settings.artifact, settings.trusted_key)
    result = Verification(artifact=settings.artifact, problems=problems, files=len(manifest.get("files", {})),
                          manifest_sha256=manifest.get("manifest_sha256"), status=manifest.get("status"),
                          signed=bool(settings.trusted_key))
    if problems:
        raise VerificationFailed(result)
    return result


def sign_command(settings: SignSettings) -> Path:
    """Sign the artifact (``signing.sign``); returns the signature file."""
    from bertexport.shipping.signing import sign

    return sign(settings.artifact, settings.key, settings.password)


def pack_command(settings: PackSettings) -> Path:
    """The pack file (``.tar.gz``, its ``.sha256`` beside it) or the Triton repository folder."""
    from bertexport.shipping.packing import pack

    return pack(settings.artifact, settings.out, settings.force, format=settings.fmt, **settings.triton_options())


def unpack_command(settings: UnpackSettings) -> Path:
    """The artifact folder, unpacked safely and verified (and its signature checked)."""
    from bertexport.shipping.packing import unpack

    return unpack(settings.pack_file, settings.out, settings.force, settings.trusted_key)


def inspect_command(settings: InspectSettings) -> dict:
    """The summary of an artifact folder or pack (``packing.inspect``)."""
    from bertexport.shipping.packing import inspect

    return inspect(settings.path)


@dataclass
class CacheReport:
    """What ``cache`` did (cleared, or pruned: the entries removed) and what the cache holds after."""

    summary: dict
    cleared: bool = False
    pruned: list[Path] = field(default_factory=list)
    freed_bytes: int = 0


def cache_command(settings: CacheSettings) -> CacheReport:
    """``--clear`` empties the cache (it wins over ``--prune``); ``--prune`` removes orphaned
    work folders and entries unused for ``older_than`` days; then the cache's summary."""
    from bertexport.core.cache import cache_summary, clear_cache, prune_cache

    report = CacheReport(summary={})
    if settings.clear:
        report.cleared, report.freed_bytes = True, clear_cache()
    elif settings.prune:
        report.pruned, report.freed_bytes = prune_cache(older_than_days=settings.older_than)
    report.summary = cache_summary()
    return report
