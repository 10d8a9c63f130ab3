"""Commands on artifacts as files: verify, sign, pack, unpack, inspect, and the cache."""

from __future__ import annotations

from pathlib import Path

import click

from bertexport.cli.group import EXIT_CODES_HELP, _say, _trusted_key_option, cli, emit_json, json_option


@cli.command(epilog=EXIT_CODES_HELP)
@click.argument("artifact", type=click.Path(path_type=Path))
@_trusted_key_option
@json_option("the verification result")
def verify(artifact, trusted_key, json_out):
    """Check an artifact: every file against the manifest's checksums, the manifest's own digest,
    and with --trusted-key its signature."""
    from bertexport.core.manifest import load_manifest, verify_files

    manifest = load_manifest(artifact)
    problems = verify_files(artifact, manifest)
    if trusted_key and not problems:
        from bertexport.shipping.signing import verify_signature

        verify_signature(artifact, trusted_key)
    emit_json(json_out, {"artifact": str(artifact), "passed": not problems, "problems": problems,
                         "files": len(manifest.get("files", {})), "manifest_sha256": manifest.get("manifest_sha256")})
    if problems:
        from bertexport.core.errors import UserError

        more = f" (+{len(problems) - 5} more)" if len(problems) > 5 else ""
        raise UserError(f"{artifact} failed verification: {'; '.join(problems[:5])}{more}")
    signed = " and its signature by the trusted key" if trusted_key else ""
    _say(json_out, f"PASSED: {artifact}: {len(manifest['files'])} files, the manifest{signed} verified (status {manifest.get('status')})")


@cli.command("sign", epilog=EXIT_CODES_HELP)
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--key", "key", required=True, type=click.Path(path_type=Path), help="Private key (PEM, elliptic curve, e.g. P-256).")
@click.option("--password", envvar="BERTEXPORT_KEY_PASSWORD", help="Password of the private key (also BERTEXPORT_KEY_PASSWORD).")
def sign_cmd(artifact, key, password):
    """Sign ARTIFACT (OpenSSF model-signing, key-pair mode): devices then accept it only with the matching public key."""
    from bertexport.shipping.signing import sign

    click.echo(f"signed: {sign(artifact, key, password)}")


@cli.command("pack", epilog=EXIT_CODES_HELP)
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--out", "-o", type=click.Path(path_type=Path),
              help="Pack file (default: ARTIFACT.tar.gz); with --format triton the repository folder (default: ARTIFACT-triton).")
@click.option("--force", is_flag=True, help="Replace --out if it is a bertexport pack (never another file).")
@click.option("--format", "fmt", default="tar.gz", show_default=True, metavar="[tar.gz|triton]",
              help="tar.gz: one file for shipping; triton: an NVIDIA Triton model repository (model + Python-backend "
                   "tokenizer + ensemble; not served on this machine).")
@click.option("--max-batch-size", type=click.IntRange(min=1), default=None,
              help="With --format triton: max_batch_size of the models (default 32; a TensorRT engine's largest batch).")
@click.option("--model-name", help="With --format triton: the ensemble's name clients call (default: the artifact folder's name).")
def pack_cmd(artifact, out, force, fmt, max_batch_size, model_name):
    """Pack ARTIFACT into one .tar.gz (+ .sha256) for shipping, or with --format triton into a Triton model repository."""
    from bertexport.shipping.packing import pack

    options = {k: v for k, v in (("max_batch_size", max_batch_size), ("model_name", model_name)) if v is not None}
    p = pack(artifact, out, force, format=fmt, **options)
    if fmt == "triton":
        click.echo(f"Triton model repository: {p} (ensemble '{model_name or Path(artifact).resolve().name}'; "
                   f"tritonserver --model-repository {p})")
        return
    click.echo(f"packed: {p} ({p.stat().st_size / 1e6:.1f} MB); checksum: {p}.sha256")


@cli.command("unpack", epilog=EXIT_CODES_HELP)
@click.argument("pack_file", type=click.Path(path_type=Path))
@click.option("--out", "-o", required=True, type=click.Path(path_type=Path), help="Artifact folder to create.")
@click.option("--force", is_flag=True, help="Replace --out if it is a bertexport artifact (never a folder of other files).")
@_trusted_key_option
def unpack_cmd(pack_file, out, force, trusted_key):
    """Unpack a pack safely (no path traversal, no links out) and verify its checksums (and signature)."""
    from bertexport.shipping.packing import unpack

    click.echo(f"PASSED: unpacked and verified {unpack(pack_file, out, force, trusted_key)}")


@cli.command("inspect", epilog=EXIT_CODES_HELP)
@click.argument("path", type=click.Path(path_type=Path))
@json_option("the summary")
def inspect_cmd(path, json_out):
    """Summarise an artifact folder or pack: model, task, target, inputs, parity, latency, versions."""
    from bertexport.shipping.packing import inspect, inspect_rows

    info = inspect(path)
    emit_json(json_out, info)
    if json_out == "-":
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=str(path), show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    for k, v in inspect_rows(info):
        table.add_row(k, v)
    Console().print(table)


@cli.command("cache", epilog=EXIT_CODES_HELP)
@click.option("--prune", is_flag=True, help="Remove orphaned work folders and entries not used for --older-than days.")
@click.option("--older-than", type=click.IntRange(min=0), default=30, show_default=True, help="Days; with --prune.")
@click.option("--clear", is_flag=True, help="Remove everything in the cache.")
@json_option("the cache listing")
def cache_cmd(prune, older_than, clear, json_out):
    """Show what the cache holds (exports, students, work folders, logs...) and its size; prune it."""
    from bertexport.core.cache import cache_summary, clear_cache, prune_cache

    if clear:
        freed = clear_cache()
        _say(json_out, f"cleared the cache: {freed / 1e6:.1f} MB freed")
    elif prune:
        removed, freed = prune_cache(older_than_days=older_than)
        _say(json_out, f"pruned {len(removed)} entr{'y' if len(removed) == 1 else 'ies'}: {freed / 1e6:.1f} MB freed")
    info = cache_summary()
    emit_json(json_out, info)
    _say(json_out, f"cache: {info['root']} ({info['bytes'] / 1e6:.1f} MB)")
    for kind, v in info["kinds"].items():
        _say(json_out, f"  {kind:16s} {v['entries']:5d} entries {v['bytes'] / 1e6:10.1f} MB")
