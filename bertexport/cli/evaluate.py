"""Commands that judge artifacts: validate (CI gates) and benchmark (side-by-side latency and accuracy)."""

from __future__ import annotations

from pathlib import Path

import click

from bertexport.core.errors import GateFailed
from bertexport.cli.group import EXIT_CODES_HELP, _say, _threads_option, _trusted_key_option, cli, emit_json, json_option
from bertexport.judging.gates import click_options as gate_options


@cli.command(epilog=EXIT_CODES_HELP)
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--data", type=click.Path(path_type=Path), help="Labelled data (.csv/.tsv/.jsonl: text[, text_pair], label) or plain text; default: calib/samples.txt.")
@click.option("--model", help="The PyTorch original (default: the checkpoint named in the manifest).")
@gate_options("max_accuracy_drop", "min_agreement", "min_cosine", "confidence")
@click.option("--report-only", is_flag=True, help="No gate: measure and report only (exit 0 unless the input is bad).")
@click.option("--text-column", help="Text column name (CSV/TSV/JSONL).")
@click.option("--label-column", help="Label column name (CSV/TSV/JSONL).")
@click.option("--limit", type=click.IntRange(min=1), help="Use only the first N rows.")
@_threads_option()
@click.option("--junit", type=click.Path(path_type=Path), help="Write a JUnit XML report for CI systems.")
@json_option("the result")
@click.option("--force", is_flag=True, help="Compare even if --model is not the checkpoint the artifact was built from.")
@_trusted_key_option
def validate(artifact, data, model, max_accuracy_drop, min_agreement, min_cosine, confidence, report_only, text_column,
             label_column, limit, threads, junit, json_out, force, trusted_key):
    """Task accuracy and agreement of ARTIFACT vs its PyTorch original, with CI gates (exit 1 on failure)."""
    from bertexport.core.errors import UserError
    from bertexport.judging.gates import Gates
    from bertexport.judging.validate import validate as run_validate

    gates = Gates(min_cosine=min_cosine, min_agreement=min_agreement, max_accuracy_drop=max_accuracy_drop,
                  confidence=confidence)
    if not gates.any() and not report_only:
        raise UserError("no gate given: pass --max-accuracy-drop, --min-agreement and/or --min-cosine "
                        "(or --report-only to measure without a gate)")
    try:
        result = run_validate(artifact, data, model=model, gates=gates, text_column=text_column, label_column=label_column,
                              limit=limit, threads=threads, force=force, junit=junit, trusted_key=trusted_key)
    except GateFailed as e:
        if e.result is not None:
            emit_json(json_out, e.result.to_dict())
            _print_metrics(e.result, json_out)
        raise
    emit_json(json_out, result.to_dict())
    _print_metrics(result, json_out)
    if result.gates:
        _say(json_out, f"PASSED: {artifact} ({', '.join(f'{k}={v}' for k, v in result.gates.items())})")
    else:
        _say(json_out, f"REPORTED (no gate): {artifact}")


def _print_metrics(result, json_out=None):
    from bertexport.judging.stats import describe

    intervals = result.metrics.get("stats") or {}
    for k, v in result.metrics.items():
        if k == "stats" or isinstance(v, dict):
            continue
        if k in intervals:
            _say(json_out, f"  {k:20s} {describe(intervals[k])}")
        else:
            _say(json_out, f"  {k:20s} {v:.4f}" if isinstance(v, float) else f"  {k:20s} {v}")
    for note in getattr(result, "within_noise", []):
        _say(json_out, f"  note: {note}")


def _int_list(ctx, param, value):
    try:
        out = [int(x) for x in value.split(",")] if value else []
    except ValueError as e:
        raise click.BadParameter("a comma-separated list of integers") from e
    if any(v < 1 for v in out):
        raise click.BadParameter("every value must be >= 1")
    return out


@cli.command(epilog=EXIT_CODES_HELP)
@click.argument("model", required=False)
@click.argument("artifacts", nargs=-1, type=click.Path(path_type=Path))
@click.option("--target", "-t", "targets", multiple=True, help="Also convert MODEL for this profile (cached) and include it; repeatable.")
@click.option("--batch", "batches", default="1", callback=_int_list, show_default=True, help="Batch sizes, comma-separated.")
@click.option("--seq", "sequences", default="128", callback=_int_list, show_default=True, help="Sequence lengths, comma-separated.")
@click.option("--texts", type=click.Path(path_type=Path), help="Also time a 'real lengths' cell over this text file.")
@click.option("--data", type=click.Path(path_type=Path), help="Labelled data: adds accuracy per candidate.")
@click.option("--data-limit", type=click.IntRange(min=1), help="Use only the first N rows of --data.")
@click.option("--runs", type=click.IntRange(min=5), default=30, show_default=True, help="Timed runs per candidate per cell (>= 5).")
@click.option("--warmup", type=click.IntRange(min=0), default=5, show_default=True, help="Untimed warm-up runs per candidate per cell.")
@_threads_option(help="Threads for every candidate (pinned, reported).")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), help="Folder for benchmark.json/.md/.png.")
@json_option("the report")
@click.option("--force", is_flag=True, help="Compare artifacts built from different checkpoints; replace an existing --out benchmark folder.")
@click.option("--reference/--no-reference", default=None,
              help="Time the PyTorch original too (default: when PyTorch is installed; a device times the artifacts alone).")
@click.option("--compare", "compare_files", nargs=2, type=click.Path(path_type=Path), metavar="HOST.json DEVICE.json",
              help="Print two benchmark reports side by side (e.g. the build host's and a device's) and exit.")
@_trusted_key_option
def benchmark(model, artifacts, targets, batches, sequences, texts, data, data_limit, runs, warmup, threads, out_dir, json_out,
              force, reference, compare_files, trusted_key):
    """Latency/throughput (and accuracy) of the PyTorch original and each ARTIFACT, interleaved.

    MODEL may be omitted when ARTIFACTS are given (the manifest names the checkpoint). Without
    PyTorch (a device), the artifacts are timed alone in the same report schema."""
    from bertexport.judging.benchmark import benchmark as run_benchmark
    from bertexport.judging.benchmark import check_out_dir, console_tables, write_outputs
    from bertexport.core.progress import RichReporter

    if compare_files:
        _compare_reports(*compare_files, json_out)
        return
    if model and Path(model).joinpath("manifest.json").is_file():  # first positional is an artifact
        artifacts, model = (Path(model), *artifacts), None
    for a in artifacts:
        if not Path(a).exists():
            from bertexport.core.errors import UserError

            raise UserError(f"artifact not found: {a}")
    if model and not artifacts and not targets:
        from bertexport.core.errors import UserError

        raise UserError(f"{model} is not an artifact (no manifest.json), and no --target was given: nothing to compare")
    if out_dir:
        check_out_dir(out_dir, force)
    report = run_benchmark(model, list(artifacts), targets=list(targets), batches=batches, sequences=sequences, texts=texts,
                           data=data, data_limit=data_limit, runs=runs, warmup=warmup, threads=threads, force=force,
                           reference=reference, trusted_key=trusted_key, reporter=RichReporter())
    from rich.console import Console

    console = Console(stderr=json_out == "-")
    for table in console_tables(report, console.width):
        console.print(table)
    emit_json(json_out, report)
    if out_dir:
        for kind, p in write_outputs(report, out_dir, force=force).items():
            _say(json_out, f"{kind}: {p}")


def _compare_reports(host: Path, device: Path, json_out) -> None:
    import json

    from bertexport.judging.benchmark import compare_reports
    from bertexport.core.errors import UserError

    def read(p):
        try:
            return json.loads(Path(p).read_text())
        except (OSError, ValueError) as e:
            raise UserError(f"cannot read benchmark report {p}: {e}") from e

    a, b = read(host), read(device)
    rows = compare_reports(a, b)
    emit_json(json_out, rows)
    if json_out == "-":
        return
    from rich.console import Console
    from rich.table import Table

    cpu = lambda r: r.get("environment", {}).get("cpu", {})  # noqa: E731
    table = Table(title=f"host: {cpu(a).get('model', '?')} · {a['config']['threads']} thread(s)   vs   "
                        f"device: {cpu(b).get('model', '?')} · {b['config']['threads']} thread(s)")
    for col in ("candidate", "b", "seq", "host p50 ms", "device p50 ms", "device / host"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["candidate"], str(r["batch"]), r["sequence"], f"{r['host_p50_ms']:.2f}", f"{r['device_p50_ms']:.2f}",
                      f"{r['ratio']:.2f}x")
    Console().print(table)
