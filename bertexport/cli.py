"""The command line: parses, calls the library, prints. No logic of its own."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from bertexport import __version__
from bertexport.errors import BertExportError, GateFailed


class _Group(click.Group):
    """Maps library errors to one line on stderr and their exit code (2 input, 1 gate)."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except GateFailed as e:
            click.echo(f"FAILED: {e}", err=True)
            ctx.exit(e.exit_code)
        except BertExportError as e:
            click.echo(f"error: {e}", err=True)
            ctx.exit(e.exit_code)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="bertexport")
def cli():
    """Compile BERT-family checkpoints into fast, verified deployment artifacts."""


def _print_rows(rows, title):
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for col in ("metric", "PyTorch original", "artifact"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["metric"], r["original"], r["artifact"])
    Console().print(table)


@cli.command()
@click.argument("model", default="builtin:all-MiniLM-L6-v2")
@click.option("--target", "-t", required=True, help="Target profile name (see `bertexport targets`) or path to a .toml profile.")
@click.option("--out", "-o", required=True, type=click.Path(path_type=Path), help="Artifact folder to create.")
@click.option("--task", type=click.Choice(["feature-extraction", "text-classification", "token-classification",
                                          "question-answering", "fill-mask"]), help="Override the task detected from config.json.")
@click.option("--calib", type=click.Path(path_type=Path), help="Calibration text (.txt/.csv/.tsv/.jsonl); default: calib/ set.")
@click.option("--samples", type=click.Path(path_type=Path), help="Validation sentences; default: calib/samples.txt.")
@click.option("--threads", type=int, default=1, show_default=True, help="Threads for PyTorch and the artifact during validation and timing.")
@click.option("--latency-runs", type=int, default=None, help="Timed runs per side (0 skips timing); default from the profile.")
@click.option("--force", is_flag=True, help="Replace the output folder if it exists.")
@click.option("--revision", help="Hub revision (branch, tag or commit) when MODEL is a hub id.")
@click.option("--allow-pickle", is_flag=True, help="Allow pytorch_model.bin (pickle) weights, which can run code when loaded.")
@click.option("--trust-remote-code", is_flag=True, help="Allow custom model code from the checkpoint.")
def convert(model, target, out, task, calib, samples, threads, latency_runs, force, revision, allow_pickle, trust_remote_code):
    """Compile MODEL (a folder, a hub id, or the built-in all-MiniLM-L6-v2) for a target."""
    from bertexport.convert import convert as run_convert
    from bertexport.progress import RichReporter

    try:
        result = run_convert(model, target, out, task=task, calib=calib, samples=samples, force=force, threads=threads,
                             latency_runs=latency_runs, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code,
                             revision=revision, reporter=RichReporter())
    except GateFailed as e:
        if e.result is not None:
            _print_rows(e.result.rows, f"{e.result.artifact} (rejected)")
        raise
    _print_rows(result.rows, str(result.artifact))
    click.echo(f"PASSED: {result.artifact}")


@cli.command()
def targets():
    """List the built-in target profiles."""
    from bertexport.profiles import list_profiles, load_profile

    for name, path in list_profiles().items():
        p = load_profile(path)
        click.echo(f"{name:24s} {p.backend:12s} {p.description}")


@cli.command()
@click.argument("artifact", type=click.Path(path_type=Path))
def verify(artifact):
    """Check an artifact's files against its manifest checksums."""
    from bertexport.manifest import load_manifest, verify_files

    manifest = load_manifest(artifact)
    problems = verify_files(artifact, manifest)
    if problems:
        for p in problems:
            click.echo(p, err=True)
        click.echo(f"FAILED: {artifact}: {len(problems)} problem(s)", err=True)
        sys.exit(1)
    click.echo(f"PASSED: {artifact}: {len(manifest['files'])} files verified (status {manifest.get('status')})")


def main():
    cli(prog_name="bertexport")


if __name__ == "__main__":
    main()
