"""Commands that build: convert, distill, optimize, and the profiles they take (targets)."""

from __future__ import annotations

import click

from bertexport.core.errors import GateFailed
from bertexport.cli.group import EXIT_CODES_HELP, _print_rows, _say, cli, emit_json, json_option
from bertexport.building.settings import ConvertSettings, TargetsSettings
from bertexport.search.settings import OptimizeSettings
from bertexport.students.settings import DistillSettings
from bertexport.cli.settings import options_from, settings_from


@cli.command(epilog=EXIT_CODES_HELP)
@options_from(ConvertSettings)
@json_option("the manifest of the build")
def convert(json_out, **values):
    """Compile MODEL (a folder, a hub id, or the built-in all-MiniLM-L6-v2) for a target."""
    from bertexport.building.convert_command import convert_command
    from bertexport.core.progress import RichReporter

    try:
        result = convert_command(settings_from(ConvertSettings, values, "convert"), RichReporter())
    except GateFailed as e:
        if e.result is not None:
            _print_rows(e.result.rows, f"{e.result.artifact} (rejected)")
            emit_json(json_out, e.result.manifest)
        raise
    _print_rows(result.rows, str(result.artifact))
    emit_json(json_out, result.manifest)
    if result.signature:
        _say(json_out, f"signed: {result.signature}")
    for note in result.undecided:
        _say(json_out, f"  gate undecided: {note}")
    _say(json_out, f"PASSED: {result.artifact}" + (" (gate undecided on these texts: kept; judge it on your data with "
                                                  "--data)" if result.verdict == "undecided" else ""))


@cli.command(epilog=EXIT_CODES_HELP)
@options_from(DistillSettings)
@json_option("the distillation (or pruning) report")
def distill(json_out, **values):
    """Distill TEACHER into a smaller student checkpoint (same family and tokenizer); with --prune, prune it instead."""
    from bertexport.students.distill import distill_command
    from bertexport.students.distill_report import kept_note
    from bertexport.core.progress import RichReporter

    settings = settings_from(DistillSettings, values, "distill")
    result = distill_command(settings, RichReporter())
    if settings.prune_fraction is not None:
        _print_pruned(result, json_out)
        return
    r = result.report
    emit_json(json_out, r)
    _say(json_out, f"student: {result.student}")
    _say(json_out, f"  layers {r['teacher']['layers']} -> {r['student']['layers']}, parameters "
                   f"{r['teacher']['parameters'] / 1e6:.1f}M -> {r['student']['parameters'] / 1e6:.1f}M")
    _say(json_out, f"  PyTorch latency {r['latency']['teacher_p50_ms']:.2f} -> {r['latency']['student_p50_ms']:.2f} ms "
                   f"({r['latency']['speedup']['p50_ratio']:.2f}x); final eval: {r['final_eval']}")
    _say(json_out, f"  stopped by {r['stopped']} after {r['epochs_run']:g} epochs; kept the state of step {r['kept_step']}"
                   + kept_note(r) + " (held-out score per evaluation in distill_report.json: evals)")
    _say(json_out, f"  trained on {r['device']['used']}" + (f" ({r['device']['name']})" if r["device"].get("name") else "")
                   + (f"; initialised from {r['student']['init']['name']}, head {r['student']['init']['head']}"
                      if r["student"].get("init") else ""))


def _print_pruned(r, json_out):
    """``distill --prune``'s summary (``r``: the ``PruneResult``)."""
    emit_json(json_out, r.to_dict())
    _say(json_out, f"pruned: {r.out}")
    _say(json_out, f"  {r.teacher['name']} -> {r.student['name']}: {r.mac_fraction:.2f} of the encoder MACs "
                   f"(budget {r.mac_budget:g}, at {r.seq_len} tokens); least-squares tuning "
                   f"{'kept' if r.tuned else 'dropped (did not lower the KL)'}")
    accuracy = (f"; accuracy {r.accuracy['teacher']:.3f} -> {r.accuracy['pruned']:.3f}" if r.accuracy else "")
    _say(json_out, f"  agreement with the teacher on {r.held_out} held-out texts: {r.agreement:.3f}{accuracy} "
                   f"({r.calibration_seconds + r.seconds:.0f} s)")


@cli.command(epilog=EXIT_CODES_HELP)
@options_from(OptimizeSettings)
@json_option("the search report")
def optimize(json_out, **values):
    """Find the fastest artifact that keeps your task accuracy: backends, precisions, per-region float fallbacks, students."""
    from bertexport.search.optimize import optimize_command
    from bertexport.search.report import held_out_caveat, held_out_figures
    from bertexport.core.progress import RichReporter

    try:
        result = optimize_command(settings_from(OptimizeSettings, values, "optimize"), RichReporter())
    except GateFailed as e:
        if e.result is not None:
            emit_json(json_out, e.result.report)
            _say(json_out, f"search table: {e.result.artifact / 'search.md'}")
        raise
    emit_json(json_out, result.report)
    w = result.report["winner"]
    timing = result.report["final_timing"].get(w["name"], {})
    _say(json_out, f"winner: {w['name']} — {timing.get('p50_ms', 0):.2f} ms p50, {timing.get('vs_pytorch', 0):.2f}x PyTorch"
                   + (f", {timing['vs_anchor']:.2f}x the anchor" if timing.get("vs_anchor") else "")
                   + f"; held-out: {held_out_figures(w['confirm_metrics'] or {})}")
    caveat = held_out_caveat(result.report, result.artifact)
    _say(json_out, f"PASSED: {result.artifact} (search table: {result.artifact / 'search.md'})"
                   + (f"\n  {caveat}" if caveat else ""))


@cli.command()
@options_from(TargetsSettings)
def targets(**values):
    """List the built-in target profiles (and, with --describe, a profile's or a pass's options)."""
    from bertexport.building.profiles import list_profiles, load_profile

    describe_name = settings_from(TargetsSettings, values, "targets").describe_name
    if describe_name:
        from bertexport.building.describe import describe_text

        click.echo(describe_text(describe_name))
        return
    for name, path in list_profiles().items():
        p = load_profile(path)
        click.echo(f"{name:24s} {p.backend:12s} {p.description}")
