"""Commands on artifacts as files: verify, sign, pack, unpack, inspect, and the cache."""

from __future__ import annotations

from pathlib import Path

import click

from bertexport.cli.group import EXIT_CODES_HELP, _say, cli, emit_json, json_option
from bertexport.cli.settings import options_from, settings_from
from bertexport.shipping.settings import (CacheSettings, InspectSettings, PackSettings, SignSettings, UnpackSettings,
                                          VerifySettings)


@cli.command(epilog=EXIT_CODES_HELP)
@options_from(VerifySettings)
@json_option("the verification result")
def verify(json_out, **values):
    """Check an artifact: every file against the manifest's checksums, the manifest's own digest,
    and with --trusted-key its signature."""
    from bertexport.shipping.artifact_commands import VerificationFailed, verify_command

    try:
        result = verify_command(settings_from(VerifySettings, values, "verify"))
    except VerificationFailed as e:
        emit_json(json_out, e.verification.payload())
        raise
    emit_json(json_out, result.payload())
    signed = " and its signature by the trusted key" if result.signed else ""
    _say(json_out, f"PASSED: {result.artifact}: {result.files} files, the manifest{signed} verified (status {result.status})")


@cli.command("sign", epilog=EXIT_CODES_HELP)
@options_from(SignSettings)
def sign_cmd(**values):
    """Sign ARTIFACT (OpenSSF model-signing, key-pair mode): devices then accept it only with the matching public key."""
    from bertexport.shipping.artifact_commands import sign_command

    click.echo(f"signed: {sign_command(settings_from(SignSettings, values, 'sign'))}")


@cli.command("pack", epilog=EXIT_CODES_HELP)
@options_from(PackSettings)
def pack_cmd(**values):
    """Pack ARTIFACT into one .tar.gz (+ .sha256) for shipping, or with --format triton into a Triton model repository."""
    from bertexport.shipping.artifact_commands import pack_command

    settings = settings_from(PackSettings, values, "pack")
    p = pack_command(settings)
    if settings.fmt == "triton":
        click.echo(f"Triton model repository: {p} (ensemble '{settings.model_name or Path(settings.artifact).resolve().name}'; "
                   f"tritonserver --model-repository {p})")
        return
    click.echo(f"packed: {p} ({p.stat().st_size / 1e6:.1f} MB); checksum: {p}.sha256")


@cli.command("unpack", epilog=EXIT_CODES_HELP)
@options_from(UnpackSettings)
def unpack_cmd(**values):
    """Unpack a pack safely (no path traversal, no links out) and verify its checksums (and signature)."""
    from bertexport.shipping.artifact_commands import unpack_command

    click.echo(f"PASSED: unpacked and verified {unpack_command(settings_from(UnpackSettings, values, 'unpack'))}")


@cli.command("inspect", epilog=EXIT_CODES_HELP)
@options_from(InspectSettings)
@json_option("the summary")
def inspect_cmd(json_out, **values):
    """Summarise an artifact folder or pack: model, task, target, inputs, parity, latency, versions."""
    from bertexport.shipping.artifact_commands import inspect_command
    from bertexport.shipping.packing import inspect_rows

    settings = settings_from(InspectSettings, values, "inspect")
    info = inspect_command(settings)
    emit_json(json_out, info)
    if json_out == "-":
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=str(settings.path), show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    for k, v in inspect_rows(info):
        table.add_row(k, v)
    Console().print(table)


@cli.command("cache", epilog=EXIT_CODES_HELP)
@options_from(CacheSettings)
@json_option("the cache listing")
def cache_cmd(json_out, **values):
    """Show what the cache holds (exports, students, work folders, logs...) and its size; prune it."""
    from bertexport.shipping.artifact_commands import cache_command

    settings = settings_from(CacheSettings, values, "cache")
    report = cache_command(settings)
    if report.cleared:
        _say(json_out, f"cleared the cache: {report.freed_bytes / 1e6:.1f} MB freed")
    elif settings.prune:
        n = len(report.pruned)
        _say(json_out, f"pruned {n} entr{'y' if n == 1 else 'ies'}: {report.freed_bytes / 1e6:.1f} MB freed")
    info = report.summary
    emit_json(json_out, info)
    _say(json_out, f"cache: {info['root']} ({info['bytes'] / 1e6:.1f} MB)")
    for kind, v in info["kinds"].items():
        _say(json_out, f"  {kind:16s} {v['entries']:5d} entries {v['bytes'] / 1e6:10.1f} MB")
