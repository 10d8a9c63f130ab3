"""Commands that build: convert, distill, optimize, and the profiles they take (targets)."""

from __future__ import annotations

from pathlib import Path

import click

from bertexport.search.candidates import SEARCHABLE_BACKENDS
from bertexport.core.errors import GateFailed
from bertexport.cli.group import EXIT_CODES_HELP, TASK_CHOICE, _print_rows, _say, _threads_option, cli, emit_json, json_option
from bertexport.judging.gates import click_options as gate_options


@cli.command(epilog=EXIT_CODES_HELP)
@click.argument("model", default="builtin:all-MiniLM-L6-v2")
@click.option("--target", "-t", required=True, help="Target profile name (see `bertexport targets`) or path to a .toml profile.")
@click.option("--out", "-o", required=True, type=click.Path(path_type=Path), help="Artifact folder to create.")
@click.option("--task", type=TASK_CHOICE, help="Override the task detected from config.json.")
@click.option("--calib", type=click.Path(path_type=Path), help="Calibration text (.txt/.csv/.tsv/.jsonl); default: calib/ set.")
@click.option("--data", "--samples", "samples", type=click.Path(path_type=Path),
              help="Your texts (.txt/.csv/.tsv/.jsonl) to judge the profile's parity gate on, instead of the built-in "
                   "validation texts (calib/samples.txt + calib/validation_en.txt).")
@click.option("--text-column", help="Text column of --data and --calib (CSV/TSV/JSONL/JSON/Parquet).")
@_threads_option()
@click.option("--latency-runs", type=click.IntRange(min=0), default=None, help="Timed runs per side (0 skips timing); default from the profile.")
@click.option("--force", is_flag=True, help="Replace --out if it is a bertexport artifact (never a folder of other files).")
@click.option("--revision", help="Hub revision (branch, tag or commit) when MODEL is a hub id.")
@click.option("--allow-pickle", is_flag=True, help="Allow pytorch_model.bin (pickle) weights, which can run code when loaded.")
@click.option("--trust-remote-code", is_flag=True, help="Allow custom model code shipped with the checkpoint (auto_map, *.py).")
@click.option("--distill", "distill_layers", type=click.IntRange(min=1), help="First distill MODEL to a student with this many layers, then convert the student.")
@click.option("--distill-data", type=click.Path(path_type=Path), help="Transfer text for --distill (default: calib/).")
@click.option("--distill-epochs", type=click.IntRange(min=1), default=3, show_default=True, help="Training epochs for --distill.")
@click.option("--early-exit", "early_exit_data", type=click.Path(path_type=Path),
              help="Text classification: build an early-exit artifact, exit heads trained on these texts (labels used when "
                   "present) with the model frozen, run as ONNX segments (profiles without passes, e.g. ort-fp32).")
@click.option("--exit-layers", help="With --early-exit: layers to exit after, e.g. 2,4 (default: every second layer).")
@click.option("--exit-agreement", type=click.FloatRange(0.0, 1.0, min_open=True), default=0.99, show_default=True,
              help="With --early-exit: the threshold chosen is the smallest keeping this agreement with the full model on "
                   "held-out rows.")
@click.option("--exit-threshold", type=click.FloatRange(0.0, 1.0),
              help="With --early-exit: use this threshold instead of choosing one (1.0 never exits).")
@json_option("the manifest of the build")
@click.option("--sign-key", type=click.Path(path_type=Path), help="Sign the artifact with this private key (PEM) when it passes.")
def convert(model, target, out, task, calib, samples, text_column, threads, latency_runs, force, revision, allow_pickle, trust_remote_code,
            distill_layers, distill_data, distill_epochs, early_exit_data, exit_layers, exit_agreement, exit_threshold,
            json_out, sign_key):
    """Compile MODEL (a folder, a hub id, or the built-in all-MiniLM-L6-v2) for a target."""
    from bertexport.building.convert import convert as run_convert
    from bertexport.core.progress import RichReporter

    if sign_key:
        from bertexport.shipping.signing import _key, _library

        _key(sign_key, "private key")  # checked before any work
        _library()
    reporter = RichReporter()
    from functools import partial

    from bertexport.core.errors import UserError

    if early_exit_data is None and (exit_layers or exit_threshold is not None):
        raise UserError("--exit-layers and --exit-threshold go with --early-exit DATA")
    build = run_convert
    if early_exit_data is not None:
        from bertexport.students.early_exit import EarlyExitConfig, build_early_exit

        if distill_layers or calib:
            raise UserError("--early-exit builds the model as it is: it does not take --distill or --calib")
        try:
            layers = [int(x) for x in exit_layers.split(",")] if exit_layers else None
        except ValueError:
            raise UserError(f"--exit-layers takes layer numbers separated by commas (e.g. 2,4), not {exit_layers!r}") from None
        build = partial(build_early_exit, data=early_exit_data,
                        config=EarlyExitConfig(exit_layers=layers, agreement=exit_agreement, threshold=exit_threshold))
    try:
        result = build(model, target, out, task=task, calib=calib, samples=samples, text_column=text_column,
                             force=force, threads=threads,
                             latency_runs=latency_runs, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code,
                             revision=revision, reporter=reporter,
                             **({} if early_exit_data is not None else
                                dict(distill_layers=distill_layers, distill_data=distill_data, distill_epochs=distill_epochs)))
    except GateFailed as e:
        if e.result is not None:
            _print_rows(e.result.rows, f"{e.result.artifact} (rejected)")
            emit_json(json_out, e.result.manifest)
        raise
    _print_rows(result.rows, str(result.artifact))
    emit_json(json_out, result.manifest)
    if sign_key:
        from bertexport.shipping.signing import sign

        _say(json_out, f"signed: {sign(result.artifact, sign_key)}")
    for note in result.undecided:
        _say(json_out, f"  gate undecided: {note}")
    _say(json_out, f"PASSED: {result.artifact}" + (" (gate undecided on these texts: kept; judge it on your data with "
                                                  "--data)" if result.verdict == "undecided" else ""))


def _distill_options(f):
    for opt in reversed([
        click.option("--layers", type=click.IntRange(min=1), help="Student layer count (every k-th teacher layer kept)."),
        click.option("--keep-layers", help="Explicit teacher layer indices to keep, e.g. 1,3,5."),
        click.option("--student-init", "--student", "student", metavar="CHECKPOINT",
                     help="A pre-trained smaller checkpoint folder sharing the teacher's vocabulary (e.g. a general-distilled "
                          "MiniLM-L3 or a BERT miniature), distilled with the same losses and given the teacher's task head "
                          "(instead of --layers/--shape)."),
        click.option("--shape", help="Student shape sliced from the teacher, e.g. L3, L3-H256 or L3-H256-F1024 (L layers, "
                                     "H hidden size, F FFN size; missing parts are the teacher's)."),
        click.option("--alpha-hidden", type=click.FloatRange(min=0),
                     help="Weight of the hidden-state loss (each student layer vs its teacher layer; 0: off). Default: by "
                          "data size, 1.0 from 10000 training texts up, else off (per-layer losses overfit small data)."),
        click.option("--alpha-attention", type=click.FloatRange(min=0), default=1.0, show_default=True,
                     help="Weight of the Q/K/V self-attention relation loss (MiniLMv2, last layer; 0: off)."),
        click.option("--augment", type=click.IntRange(min=0), default=8, show_default=True,
                     help="Teacher-labelled variants per training text when the data has fewer than 5000 texts (0: none)."),
        click.option("--data", "distill_data", type=click.Path(path_type=Path), help="Transfer text (.txt/.csv/.tsv/.jsonl; labels used when present); default: calib/."),
        click.option("--epochs", type=click.IntRange(min=1),
                     help="A fixed count of training epochs, no early stop (default 3; not with --patience)."),
        click.option("--patience", type=click.IntRange(min=1),
                     help="Instead of --epochs: stop when held-out agreement with the teacher has not improved for this "
                          "many evaluations (2 per epoch), keeping the best state."),
        click.option("--max-epochs", type=click.IntRange(min=1),
                     help="With --patience: the most epochs (default 10)."),
        click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True, help="Training batch size."),
        click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=1e-4, show_default=True,
                     help="Peak learning rate (linear warmup, then linear decay to 0)."),
        click.option("--temperature", type=click.FloatRange(min=0, min_open=True), default=2.0, show_default=True,
                     help="Softmax temperature of the distillation loss."),
        click.option("--seed", type=int, default=0, show_default=True, help="Random seed (data split, order, init)."),
        click.option("--distill-threads", type=click.IntRange(min=1), default=1, show_default=True, help="Training threads."),
    ]):
        f = opt(f)
    return f


def _distill_config(layers, keep_layers, student, shape, alpha_hidden, alpha_attention, augment, epochs, batch_size, lr,
                    temperature, seed, distill_threads, patience=None, max_epochs=None):
    from bertexport.core.errors import UserError
    from bertexport.students.distill_config import DistillConfig

    if patience is not None and epochs is not None:
        raise UserError("--epochs is a fixed count; with --patience the cap is --max-epochs")
    if max_epochs is not None and patience is None:
        raise UserError("--max-epochs caps training with --patience; without it give --epochs")

    keep = None
    if keep_layers:
        try:
            keep = [int(x) for x in keep_layers.split(",")]
        except ValueError as e:
            raise click.BadParameter("--keep-layers takes comma-separated integers") from e
    return DistillConfig(layers=layers, keep_layers=keep, student=student, shape=shape, alpha_hidden=alpha_hidden,
                         alpha_attention=alpha_attention, augment=augment, epochs=epochs or 3, patience=patience,
                         max_epochs=max_epochs or 10, batch_size=batch_size, lr=lr,
                         temperature=temperature, seed=seed, threads=distill_threads)


@cli.command(epilog=EXIT_CODES_HELP)
@click.argument("teacher")
@click.option("--out", "-o", required=True, type=click.Path(path_type=Path), help="Student checkpoint folder to create.")
@click.option("--task", type=TASK_CHOICE, help="Override the task detected from config.json.")
@_distill_options
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="Where training runs: auto takes the GPU when torch sees one; cuda without one is refused (exit 2).")
@click.option("--resume", is_flag=True, help="Continue an interrupted run from its checkpoint.")
@click.option("--prune", "prune_fraction", type=float, metavar="FRACTION",
              help="Instead of training: post-training pruning of a text classifier to this fraction of its MACs (e.g. "
                   "0.75; heads/FFN neurons by Fisher information on --data, least-squares tuned, no gradient training).")
@click.option("--force", is_flag=True, help="Replace --out if it is a bertexport student or pruned model (never a folder of other files).")
@json_option("the distillation (or pruning) report")
def distill(teacher, out, task, layers, keep_layers, student, shape, alpha_hidden, alpha_attention, augment, distill_data,
            epochs, patience, max_epochs, batch_size, lr, temperature, seed, distill_threads, device, resume, prune_fraction,
            force, json_out):
    """Distill TEACHER into a smaller student checkpoint (same family and tokenizer); with --prune, prune it instead."""
    from bertexport.students.distill import distill as run_distill
    from bertexport.core.progress import RichReporter

    if prune_fraction is not None:
        _prune(teacher, out, task, prune_fraction, distill_data, seed, distill_threads, force, json_out)
        return
    cfg = _distill_config(layers, keep_layers, student, shape, alpha_hidden, alpha_attention, augment, epochs, batch_size,
                          lr, temperature, seed, distill_threads, patience, max_epochs)
    cfg.device = device
    result = run_distill(teacher, out, task=task, data=distill_data, config=cfg, resume=resume, force=force,
                         reporter=RichReporter())
    r = result.report
    emit_json(json_out, r)
    _say(json_out, f"student: {result.student}")
    _say(json_out, f"  layers {r['teacher']['layers']} -> {r['student']['layers']}, parameters "
                   f"{r['teacher']['parameters'] / 1e6:.1f}M -> {r['student']['parameters'] / 1e6:.1f}M")
    _say(json_out, f"  PyTorch latency {r['latency']['teacher_p50_ms']:.2f} -> {r['latency']['student_p50_ms']:.2f} ms "
                   f"({r['latency']['speedup']['p50_ratio']:.2f}x); final eval: {r['final_eval']}")
    _say(json_out, f"  stopped by {r['stopped']} after {r['epochs_run']:g} epochs; kept the state of step {r['best_step']} "
                   f"(held-out score per evaluation in distill_report.json: evals)")
    _say(json_out, f"  trained on {r['device']['used']}" + (f" ({r['device']['name']})" if r["device"].get("name") else "")
                   + (f"; initialised from {r['student']['init']['name']}, head {r['student']['init']['head']}"
                      if r["student"].get("init") else ""))


# distill options that train: none of them goes with --prune (which trains nothing)
_TRAINING_OPTIONS = ("layers", "keep_layers", "student", "shape", "alpha_hidden", "alpha_attention", "augment", "epochs",
                     "patience", "max_epochs", "batch_size", "lr", "temperature", "device", "resume")


def _prune(teacher, out, task, fraction, data, seed, threads, force, json_out):
    """``distill --prune``: checked (training options, --data) before the library checks the rest."""
    from click.core import ParameterSource

    from bertexport.core.errors import UserError
    from bertexport.students.pruning import check_budget, prune_data

    ctx = click.get_current_context()
    given = [p.opts[0] for p in ctx.command.params if p.name in _TRAINING_OPTIONS
             and ctx.get_parameter_source(p.name) not in (None, ParameterSource.DEFAULT)]
    if given:
        raise UserError(f"--prune trains nothing: it does not go with {', '.join(given)}")
    check_budget(fraction)
    if data is None:
        raise UserError("--prune needs --data: your task's texts (.txt/.csv/.tsv/.jsonl; labels used when present), "
                        "on which heads and neurons are ranked")
    r = prune_data(teacher, data, out, mac_budget=fraction, task=task, force=force, seed=seed, threads=threads)
    emit_json(json_out, r.to_dict())
    _say(json_out, f"pruned: {r.out}")
    _say(json_out, f"  {r.teacher['name']} -> {r.student['name']}: {r.mac_fraction:.2f} of the encoder MACs "
                   f"(budget {r.mac_budget:g}, at {r.seq_len} tokens); least-squares tuning "
                   f"{'kept' if r.tuned else 'dropped (did not lower the KL)'}")
    accuracy = (f"; accuracy {r.accuracy['teacher']:.3f} -> {r.accuracy['pruned']:.3f}" if r.accuracy else "")
    _say(json_out, f"  agreement with the teacher on {r.held_out} held-out texts: {r.agreement:.3f}{accuracy} "
                   f"({r.calibration_seconds + r.seconds:.0f} s)")


@cli.command(epilog=EXIT_CODES_HELP)
@click.argument("model", default="builtin:all-MiniLM-L6-v2")
@click.option("--data", type=click.Path(path_type=Path), help="Your task data (.csv/.tsv/.jsonl with a text and, for classification, a label column; or .txt); default: calib/ text, unlabelled.")
@click.option("--out", "-o", required=True, type=click.Path(path_type=Path), help="Artifact folder to create (the winner).")
@click.option("--task", type=TASK_CHOICE, help="Override the task detected from config.json.")
@gate_options("max_accuracy_drop", "min_agreement", "min_cosine", "confidence", defaults=True,
              help={"confidence": "Decides the held-out verdict."})
@click.option("--batch-invariant", is_flag=True, help="Keep only candidates whose outputs do not depend on their batch neighbours (measured at build).")
@click.option("--budget", default="20m", show_default=True, help="Time budget for the search, e.g. 90s, 20m, 1h.")
@click.option("--distill", help="Also search students: 'auto' (a depth x width grid ordered by a latency cost model measured "
                                "here), layer counts (e.g. 3,4: full width), or shapes (e.g. L3-H256-F1024,L2; missing parts "
                                "are the teacher's).")
@click.option("--distill-epochs", type=click.IntRange(min=1),
              help="A fixed count of training epochs per student; default: each trains until held-out agreement with "
                   "the teacher stops improving (3 evaluations, 2 per epoch; at most 10 epochs; never past the budget).")
@click.option("--distill-data", type=click.Path(path_type=Path), help="Training text for students, e.g. your training set (default: the search slice).")
@click.option("--student-init", "student_init", multiple=True, metavar="CHECKPOINT",
              help="Also a student from this pre-trained smaller checkpoint folder sharing the teacher's vocabulary "
                   "(repeatable; e.g. a general-distilled MiniLM-L3): distilled like the others, named init:<folder> L<n>-H<n>.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="Where students train: auto takes the GPU when torch sees one; cuda without one is refused (exit 2).")
@click.option("--prune", help="Also try the original after post-training pruning (text classification; no training, "
                              "minutes): 'auto' (0.6, 0.75, 0.85 of its MACs; skipped with a reason for other models), "
                              "fractions (e.g. 0.6,0.75), or 'off' (the default).")
@click.option("--calib", type=click.Path(path_type=Path), help="Calibration text for int8 recipes (default: calib/ set).")
@click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True, help="Batch size of the latency cell the search minimises.")
@click.option("--seq", "sequence", type=click.IntRange(min=1), default=128, show_default=True, help="Sequence length of the latency cell.")
@click.option("--threads", type=click.IntRange(min=1), help="Threads for every candidate (pinned, reported); default: all cores.")
@click.option("--backend", "backends", multiple=True, type=click.Choice(list(SEARCHABLE_BACKENDS)),
              help="Search only this backend (repeatable), e.g. the runtime your device has; default: every installed one.")
@click.option("--text-column", help="Text column name (CSV/TSV/JSONL).")
@click.option("--label-column", help="Label column name (CSV/TSV/JSONL).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the search/confirm split.")
@click.option("--force", is_flag=True, help="Replace --out if it is a bertexport artifact (never a folder of other files).")
@click.option("--trust-remote-code", is_flag=True, help="Allow custom model code shipped with the checkpoint (auto_map, *.py).")
@json_option("the search report")
def optimize(model, data, out, task, max_accuracy_drop, min_agreement, min_cosine, confidence, batch_invariant, budget, distill,
             distill_epochs, distill_data, prune, calib, batch, sequence, threads, backends, text_column, label_column, seed, force,
             trust_remote_code, student_init, device, json_out):
    """Find the fastest artifact that keeps your task accuracy: backends, precisions, per-region float fallbacks, students."""
    from bertexport.judging.gates import Gates
    from bertexport.search.optimize import optimize as run_optimize
    from bertexport.core.progress import RichReporter

    gates = Gates(min_cosine=min_cosine, min_agreement=min_agreement, max_accuracy_drop=max_accuracy_drop, confidence=confidence)
    try:
        result = run_optimize(model, data, out, task=task, gates=gates, budget=budget, distill=distill, batch_invariant=batch_invariant,
                              distill_epochs=distill_epochs, distill_data=distill_data, prune=prune, threads=threads, batch=batch, sequence=sequence, calib=calib,
                              text_column=text_column, label_column=label_column, seed=seed, force=force,
                              trust_remote_code=trust_remote_code, backends=set(backends) or None,
                              student_init=list(student_init), device=device, reporter=RichReporter())
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
                   + f"; held-out: {w['confirm_metrics']}")
    _say(json_out, f"PASSED: {result.artifact} (search table: {result.artifact / 'search.md'})")


@cli.command()
@click.option("--describe", "describe_name", metavar="NAME", help="Describe one profile or pass: its settings and options.")
def targets(describe_name):
    """List the built-in target profiles (and, with --describe, a profile's or a pass's options)."""
    from bertexport.building.profiles import list_profiles, load_profile

    if describe_name:
        from bertexport.building.describe import describe_text

        click.echo(describe_text(describe_name))
        return
    for name, path in list_profiles().items():
        p = load_profile(path)
        click.echo(f"{name:24s} {p.backend:12s} {p.description}")
