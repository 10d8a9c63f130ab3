"""Commands that judge artifacts: validate (CI gates) and benchmark (side-by-side latency and accuracy)."""

from __future__ import annotations

from bertexport.core.errors import GateFailed
from bertexport.cli.group import EXIT_CODES_HELP, _say, cli, emit_json, json_option
from bertexport.cli.settings import options_from, settings_from
from bertexport.judging.settings import BenchmarkSettings, ValidateSettings


@cli.command(epilog=EXIT_CODES_HELP)
@options_from(ValidateSettings)
@json_option("the result")
def validate(json_out, **values):
    """Task accuracy and agreement of ARTIFACT vs its PyTorch original, with CI gates (exit 1 on failure)."""
    from bertexport.judging.validate import validate_command

    settings = settings_from(ValidateSettings, values, "validate")
    try:
        result = validate_command(settings)
    except GateFailed as e:
        if e.result is not None:
            emit_json(json_out, e.result.to_dict())
            _print_metrics(e.result, json_out)
        raise
    emit_json(json_out, result.to_dict())
    _print_metrics(result, json_out)
    if result.gates:
        _say(json_out, f"PASSED: {settings.artifact} ({', '.join(f'{k}={v}' for k, v in result.gates.items())})")
    else:
        _say(json_out, f"REPORTED (no gate): {settings.artifact}")


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


@cli.command(epilog=EXIT_CODES_HELP)
@options_from(BenchmarkSettings)
@json_option("the report")
def benchmark(json_out, **values):
    """Latency/throughput (and accuracy) of the PyTorch original and each ARTIFACT, interleaved.

    MODEL may be omitted when ARTIFACTS are given (the manifest names the checkpoint). Without
    PyTorch (a device), the artifacts are timed alone in the same report schema."""
    from rich.console import Console

    from bertexport.core.progress import RichReporter
    from bertexport.judging.benchmark import benchmark_command
    from bertexport.judging.benchmark_report import comparison_table, console_tables

    outcome = benchmark_command(settings_from(BenchmarkSettings, values, "benchmark"), RichReporter())
    if outcome.comparison is not None:
        emit_json(json_out, outcome.comparison.rows)
        if json_out != "-":
            Console().print(comparison_table(outcome.comparison))
        return
    console = Console(stderr=json_out == "-")
    for table in console_tables(outcome.report, console.width):
        console.print(table)
    emit_json(json_out, outcome.report)
    for kind, p in outcome.written.items():
        _say(json_out, f"{kind}: {p}")
