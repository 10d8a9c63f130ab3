"""The command line: parses, calls the library, prints. No logic of its own.

Exit codes (the same for every command):
  0   passed
  1   a quality gate failed (and only that)
  2   bad input, or an environment that cannot serve the request
  3   internal error (a bug): one line, the traceback goes to a log file in the cache
  130 interrupted (Ctrl-C), 143 terminated (SIGTERM); staging and work folders are removed
"""

from __future__ import annotations

import errno
import os
import signal
import sys
from pathlib import Path

import click

from bertexport import __version__
from bertexport.errors import BertExportError, GateFailed, Interrupted

EXIT_CODES_HELP = ("Exit codes: 0 passed; 1 a quality gate failed; 2 bad input or an environment that cannot "
                   "serve the request; 3 internal error (traceback in a log file); 130/143 interrupted.")
_ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT, errno.EMFILE}
TASK_CHOICE = click.Choice(["feature-extraction", "text-classification", "token-classification",
                            "question-answering", "fill-mask"])  # == tasks.TASKS (tested; the CLI stays import-light)


def _debug() -> bool:
    return os.environ.get("BERTEXPORT_DEBUG", "") not in ("", "0")


def write_crash_log(exc: BaseException) -> Path:
    """The full traceback of an internal error, with the command and versions, in the cache."""
    import datetime as dt
    import tempfile
    import traceback

    from bertexport.envinfo import package_versions

    text = (f"bertexport {__version__} internal error\ncommand: {' '.join(sys.argv)}\n"
            f"versions: {package_versions()}\n\n" + "".join(traceback.format_exception(exc)))
    name = f"crash-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    try:
        from bertexport.cache import cache_dir

        path = cache_dir("logs") / name
        path.write_text(text)
    except OSError:
        path = Path(tempfile.gettempdir()) / name
        path.write_text(text)
    return path


class _Group(click.Group):
    """Maps every outcome to the exit-code contract above, with one line on stderr."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except GateFailed as e:
            click.echo(f"FAILED: {e}", err=True)
            ctx.exit(e.exit_code)
        except BertExportError as e:
            click.echo(f"error: {e}", err=True)
            ctx.exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted — nothing written (staging and work folders removed)", err=True)
            ctx.exit(130)
        except Interrupted as e:
            click.echo(f"{e} — nothing written (staging and work folders removed)", err=True)
            ctx.exit(e.exit_code)
        except MemoryError:
            click.echo("error: out of memory; use a smaller batch, fewer texts or a machine with more memory", err=True)
            ctx.exit(2)
        except OSError as e:
            if e.errno not in _ENVIRONMENT_ERRNOS:
                self._internal(ctx, e)
            where = f" {e.filename}" if e.filename else ""
            click.echo(f"error: cannot write{where}: {e.strerror or e} (a read-only, full or protected location?)", err=True)
            ctx.exit(2)
        except Exception as e:  # a bug: one line, the traceback in a log file
            self._internal(ctx, e)

    @staticmethod
    def _internal(ctx, e: BaseException):
        if _debug():
            import traceback

            traceback.print_exception(e)
        try:
            log = write_crash_log(e)
            where = f"; full traceback in {log}"
        except OSError:
            where = ""
        click.echo(f"internal error (a bug in bertexport, please report it): {type(e).__name__}: "
                   f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}{where}", err=True)
        ctx.exit(3)


def _set_debug(ctx, param, value):
    if value:
        os.environ["BERTEXPORT_DEBUG"] = "1"
    return value


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]}, epilog=EXIT_CODES_HELP)
@click.version_option(__version__, prog_name="bertexport")
@click.option("--debug", is_flag=True, expose_value=False, is_eager=True, callback=_set_debug,
              help="Print the traceback of internal errors (also BERTEXPORT_DEBUG=1).")
def cli():
    """Compile BERT-family checkpoints into fast, verified deployment artifacts."""


def json_option(what: str):
    """``--json PATH|-``: the same meaning on every command (``-`` is standard output)."""
    return click.option("--json", "json_out", metavar="PATH|-", help=f"Write {what} as JSON to PATH, or to standard output with '-'.")


def emit_json(target: str | None, payload) -> None:
    import json

    if not target:
        return
    text = json.dumps(payload, indent=2, ensure_ascii=False, default=str) + "\n"
    if target == "-":
        click.echo(text, nl=False)
    else:
        Path(target).write_text(text)


def _say(json_out, message: str) -> None:
    """Human lines go to stderr when JSON goes to stdout."""
    click.echo(message, err=json_out == "-")


def _print_rows(rows, title):
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for col in ("metric", "PyTorch original", "artifact"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["metric"], r["original"], r["artifact"])
    Console(stderr=True).print(table)


def _threads_option(default=1, help="Threads for PyTorch and the artifact (pinned, reported)."):
    return click.option("--threads", type=click.IntRange(min=1), default=default, show_default=default is not None, help=help)


@cli.command(epilog=EXIT_CODES_HELP)
@click.argument("model", default="builtin:all-MiniLM-L6-v2")
@click.option("--target", "-t", required=True, help="Target profile name (see `bertexport targets`) or path to a .toml profile.")
@click.option("--out", "-o", required=True, type=click.Path(path_type=Path), help="Artifact folder to create.")
@click.option("--task", type=TASK_CHOICE, help="Override the task detected from config.json.")
@click.option("--calib", type=click.Path(path_type=Path), help="Calibration text (.txt/.csv/.tsv/.jsonl); default: calib/ set.")
@click.option("--samples", type=click.Path(path_type=Path), help="Validation sentences; default: calib/samples.txt.")
@_threads_option()
@click.option("--latency-runs", type=click.IntRange(min=0), default=None, help="Timed runs per side (0 skips timing); default from the profile.")
@click.option("--force", is_flag=True, help="Replace --out if it is a bertexport artifact (never a folder of other files).")
@click.option("--revision", help="Hub revision (branch, tag or commit) when MODEL is a hub id.")
@click.option("--allow-pickle", is_flag=True, help="Allow pytorch_model.bin (pickle) weights, which can run code when loaded.")
@click.option("--trust-remote-code", is_flag=True, help="Allow custom model code shipped with the checkpoint (auto_map, *.py).")
@click.option("--distill", "distill_layers", type=click.IntRange(min=1), help="First distill MODEL to a student with this many layers, then convert the student.")
@click.option("--distill-data", type=click.Path(path_type=Path), help="Transfer text for --distill (default: calib/).")
@click.option("--distill-epochs", type=click.IntRange(min=1), default=3, show_default=True, help="Training epochs for --distill.")
@json_option("the manifest of the build")
@click.option("--sign-key", type=click.Path(path_type=Path), help="Sign the artifact with this private key (PEM) when it passes.")
def convert(model, target, out, task, calib, samples, threads, latency_runs, force, revision, allow_pickle, trust_remote_code,
            distill_layers, distill_data, distill_epochs, json_out, sign_key):
    """Compile MODEL (a folder, a hub id, or the built-in all-MiniLM-L6-v2) for a target."""
    from bertexport.convert import convert as run_convert
    from bertexport.progress import RichReporter

    if sign_key:
        from bertexport.signing import _key, _library

        _key(sign_key, "private key")  # checked before any work
        _library()
    reporter = RichReporter()
    try:
        result = run_convert(model, target, out, task=task, calib=calib, samples=samples, force=force, threads=threads,
                             latency_runs=latency_runs, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code,
                             revision=revision, reporter=reporter, distill_layers=distill_layers,
                             distill_data=distill_data, distill_epochs=distill_epochs)
    except GateFailed as e:
        if e.result is not None:
            _print_rows(e.result.rows, f"{e.result.artifact} (rejected)")
            emit_json(json_out, e.result.manifest)
        raise
    _print_rows(result.rows, str(result.artifact))
    emit_json(json_out, result.manifest)
    if sign_key:
        from bertexport.signing import sign

        _say(json_out, f"signed: {sign(result.artifact, sign_key)}")
    _say(json_out, f"PASSED: {result.artifact}")


def _distill_options(f):
    for opt in reversed([
        click.option("--layers", type=click.IntRange(min=1), help="Student layer count (every k-th teacher layer kept)."),
        click.option("--keep-layers", help="Explicit teacher layer indices to keep, e.g. 1,3,5."),
        click.option("--student", help="A student checkpoint sharing the teacher's tokenizer (instead of --layers)."),
        click.option("--data", "distill_data", type=click.Path(path_type=Path), help="Transfer text (.txt/.csv/.tsv/.jsonl; labels used when present); default: calib/."),
        click.option("--epochs", type=click.IntRange(min=1), default=3, show_default=True, help="Training epochs."),
        click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True, help="Training batch size."),
        click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=5e-5, show_default=True, help="Learning rate."),
        click.option("--temperature", type=click.FloatRange(min=0, min_open=True), default=2.0, show_default=True,
                     help="Softmax temperature of the distillation loss."),
        click.option("--seed", type=int, default=0, show_default=True, help="Random seed (data split, order, init)."),
        click.option("--distill-threads", type=click.IntRange(min=1), default=1, show_default=True, help="Training threads."),
    ]):
        f = opt(f)
    return f


def _distill_config(layers, keep_layers, student, epochs, batch_size, lr, temperature, seed, distill_threads):
    from bertexport.distill import DistillConfig

    keep = None
    if keep_layers:
        try:
            keep = [int(x) for x in keep_layers.split(",")]
        except ValueError as e:
            raise click.BadParameter("--keep-layers takes comma-separated integers") from e
    return DistillConfig(layers=layers, keep_layers=keep, student=student, epochs=epochs, batch_size=batch_size, lr=lr,
                         temperature=temperature, seed=seed, threads=distill_threads)


@cli.command(epilog=EXIT_CODES_HELP)
@click.argument("teacher")
@click.option("--out", "-o", required=True, type=click.Path(path_type=Path), help="Student checkpoint folder to create.")
@click.option("--task", type=TASK_CHOICE, help="Override the task detected from config.json.")
@_distill_options
@click.option("--resume", is_flag=True, help="Continue an interrupted run from its checkpoint.")
@click.option("--force", is_flag=True, help="Replace --out if it is a bertexport student (never a folder of other files).")
@json_option("the distillation report")
def distill(teacher, out, task, layers, keep_layers, student, distill_data, epochs, batch_size, lr, temperature, seed,
            distill_threads, resume, force, json_out):
    """Distill TEACHER into a smaller student checkpoint (same family and tokenizer)."""
    from bertexport.distill import distill as run_distill
    from bertexport.progress import RichReporter

    cfg = _distill_config(layers, keep_layers, student, epochs, batch_size, lr, temperature, seed, distill_threads)
    result = run_distill(teacher, out, task=task, data=distill_data, config=cfg, resume=resume, force=force,
                         reporter=RichReporter())
    r = result.report
    emit_json(json_out, r)
    _say(json_out, f"student: {result.student}")
    _say(json_out, f"  layers {r['teacher']['layers']} -> {r['student']['layers']}, parameters "
                   f"{r['teacher']['parameters'] / 1e6:.1f}M -> {r['student']['parameters'] / 1e6:.1f}M")
    _say(json_out, f"  PyTorch latency {r['latency']['teacher_p50_ms']:.2f} -> {r['latency']['student_p50_ms']:.2f} ms "
                   f"({r['latency']['speedup']['p50_ratio']:.2f}x); final eval: {r['final_eval']}")


@cli.command(epilog=EXIT_CODES_HELP)
@click.argument("model", default="builtin:all-MiniLM-L6-v2")
@click.option("--data", type=click.Path(path_type=Path), help="Your task data (.csv/.tsv/.jsonl with a text and, for classification, a label column; or .txt); default: calib/ text, unlabelled.")
@click.option("--out", "-o", required=True, type=click.Path(path_type=Path), help="Artifact folder to create (the winner).")
@click.option("--task", type=TASK_CHOICE, help="Override the task detected from config.json.")
@click.option("--max-accuracy-drop", type=click.FloatRange(min=0), help="Gate: accuracy may drop at most this many points (labelled classification data). Default with labels: 1.0.")
@click.option("--min-agreement", type=click.FloatRange(0, 1), help="Gate: fraction of decisions equal to PyTorch's (embeddings: top-5 retrieval agreement). Default without labels: 0.98.")
@click.option("--min-cosine", type=click.FloatRange(0, 1, min_open=True), help="Gate: minimum per-sample cosine to PyTorch's outputs.")
@click.option("--budget", default="20m", show_default=True, help="Time budget for the search, e.g. 90s, 20m, 1h.")
@click.option("--distill", help="Also try layer-drop students with these layer counts (e.g. 3,4), or 'auto' (half the layers).")
@click.option("--distill-epochs", type=click.IntRange(min=1), default=2, show_default=True, help="Training epochs per student.")
@click.option("--distill-data", type=click.Path(path_type=Path), help="Training text for students, e.g. your training set (default: the search slice).")
@click.option("--calib", type=click.Path(path_type=Path), help="Calibration text for int8 recipes (default: calib/ set).")
@click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True, help="Batch size of the latency cell the search minimises.")
@click.option("--seq", "sequence", type=click.IntRange(min=1), default=128, show_default=True, help="Sequence length of the latency cell.")
@click.option("--threads", type=click.IntRange(min=1), help="Threads for every candidate (pinned, reported); default: all cores.")
@click.option("--text-column", help="Text column name (CSV/TSV/JSONL).")
@click.option("--label-column", help="Label column name (CSV/TSV/JSONL).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the search/confirm split.")
@click.option("--force", is_flag=True, help="Replace --out if it is a bertexport artifact (never a folder of other files).")
@click.option("--trust-remote-code", is_flag=True, help="Allow custom model code shipped with the checkpoint (auto_map, *.py).")
@json_option("the search report")
def optimize(model, data, out, task, max_accuracy_drop, min_agreement, min_cosine, budget, distill, distill_epochs, distill_data, calib, batch,
             sequence, threads, text_column, label_column, seed, force, trust_remote_code, json_out):
    """Find the fastest artifact that keeps your task accuracy: backends, precisions, per-region float fallbacks, students."""
    from bertexport.compare import Gates
    from bertexport.optimize import optimize as run_optimize
    from bertexport.progress import RichReporter

    gates = Gates(min_cosine=min_cosine, min_agreement=min_agreement, max_accuracy_drop=max_accuracy_drop)
    try:
        result = run_optimize(model, data, out, task=task, gates=gates if gates.any() else None, budget=budget, distill=distill,
                              distill_epochs=distill_epochs, distill_data=distill_data, threads=threads, batch=batch, sequence=sequence, calib=calib,
                              text_column=text_column, label_column=label_column, seed=seed, force=force,
                              trust_remote_code=trust_remote_code, reporter=RichReporter())
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
    from bertexport.profiles import list_profiles, load_profile

    if describe_name:
        from bertexport.describe import describe_text

        click.echo(describe_text(describe_name))
        return
    for name, path in list_profiles().items():
        p = load_profile(path)
        click.echo(f"{name:24s} {p.backend:12s} {p.description}")


def _trusted_key_option(f):
    return click.option("--trusted-key", type=click.Path(path_type=Path), envvar="BERTEXPORT_TRUSTED_KEY",
                        help="Public key (PEM) the artifact must be signed with (also BERTEXPORT_TRUSTED_KEY).")(f)


@cli.command(epilog=EXIT_CODES_HELP)
@click.argument("artifact", type=click.Path(path_type=Path))
@_trusted_key_option
@json_option("the verification result")
def verify(artifact, trusted_key, json_out):
    """Check an artifact: every file against the manifest's checksums, the manifest's own digest,
    and with --trusted-key its signature."""
    from bertexport.manifest import load_manifest, verify_files

    manifest = load_manifest(artifact)
    problems = verify_files(artifact, manifest)
    if trusted_key and not problems:
        from bertexport.signing import verify_signature

        verify_signature(artifact, trusted_key)
    emit_json(json_out, {"artifact": str(artifact), "passed": not problems, "problems": problems,
                         "files": len(manifest.get("files", {})), "manifest_sha256": manifest.get("manifest_sha256")})
    if problems:
        from bertexport.errors import UserError

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
    from bertexport.signing import sign

    click.echo(f"signed: {sign(artifact, key, password)}")


@cli.command(epilog=EXIT_CODES_HELP)
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--data", type=click.Path(path_type=Path), help="Labelled data (.csv/.tsv/.jsonl: text[, text_pair], label) or plain text; default: calib/samples.txt.")
@click.option("--model", help="The PyTorch original (default: the checkpoint named in the manifest).")
@click.option("--max-accuracy-drop", type=click.FloatRange(min=0), help="Gate: accuracy may drop at most this many points.")
@click.option("--min-agreement", type=click.FloatRange(0, 1), help="Gate: fraction of decisions equal to PyTorch's.")
@click.option("--min-cosine", type=click.FloatRange(0, 1, min_open=True), help="Gate: minimum per-sample cosine to PyTorch's outputs.")
@click.option("--report-only", is_flag=True, help="No gate: measure and report only (exit 0 unless the input is bad).")
@click.option("--text-column", help="Text column name (CSV/TSV/JSONL).")
@click.option("--label-column", help="Label column name (CSV/TSV/JSONL).")
@click.option("--limit", type=click.IntRange(min=1), help="Use only the first N rows.")
@_threads_option()
@click.option("--junit", type=click.Path(path_type=Path), help="Write a JUnit XML report for CI systems.")
@json_option("the result")
@click.option("--force", is_flag=True, help="Compare even if --model is not the checkpoint the artifact was built from.")
@_trusted_key_option
def validate(artifact, data, model, max_accuracy_drop, min_agreement, min_cosine, report_only, text_column, label_column,
             limit, threads, junit, json_out, force, trusted_key):
    """Task accuracy and agreement of ARTIFACT vs its PyTorch original, with CI gates (exit 1 on failure)."""
    from bertexport.errors import UserError
    from bertexport.compare import Gates
    from bertexport.validate import validate as run_validate

    gates = Gates(min_cosine=min_cosine, min_agreement=min_agreement, max_accuracy_drop=max_accuracy_drop)
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
    for k, v in result.metrics.items():
        _say(json_out, f"  {k:20s} {v:.4f}" if isinstance(v, float) else f"  {k:20s} {v}")


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
    from bertexport.benchmark import benchmark as run_benchmark
    from bertexport.benchmark import check_out_dir, rows, write_outputs
    from bertexport.progress import RichReporter

    if compare_files:
        _compare_reports(*compare_files, json_out)
        return
    if model and Path(model).joinpath("manifest.json").is_file():  # first positional is an artifact
        artifacts, model = (Path(model), *artifacts), None
    for a in artifacts:
        if not Path(a).exists():
            from bertexport.errors import UserError

            raise UserError(f"artifact not found: {a}")
    if model and not artifacts and not targets:
        from bertexport.errors import UserError

        raise UserError(f"{model} is not an artifact (no manifest.json), and no --target was given: nothing to compare")
    if out_dir:
        check_out_dir(out_dir, force)
    report = run_benchmark(model, list(artifacts), targets=list(targets), batches=batches, sequences=sequences, texts=texts,
                           data=data, data_limit=data_limit, runs=runs, warmup=warmup, threads=threads, force=force,
                           reference=reference, trusted_key=trusted_key, reporter=RichReporter())
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{report['model']['source']} · {threads} thread(s) · {runs} interleaved runs")
    for col in ("candidate", "b", "seq", "p50 ms", "p90 ms", "p99 ms", "seq/s", "speedup", "acc %", "drop"):
        table.add_column(col)
    for r in rows(report):
        table.add_row(r["candidate"], str(r["batch"]), str(r["sequence"]), f"{r['p50_ms']:.2f}", f"{r['p90_ms']:.2f}",
                      f"{r['p99_ms']:.2f}", f"{r['throughput']:.1f}", f"{r['speedup']:.2f}x",
                      "-" if r["accuracy"] is None else f"{r['accuracy']:.2f}", "-" if r["drop"] is None else f"{r['drop']:+.2f}")
    Console(stderr=json_out == "-").print(table)
    emit_json(json_out, report)
    if out_dir:
        for kind, p in write_outputs(report, out_dir, force=force).items():
            _say(json_out, f"{kind}: {p}")


def _compare_reports(host: Path, device: Path, json_out) -> None:
    import json

    from bertexport.benchmark import compare_reports
    from bertexport.errors import UserError

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


@cli.command("run", epilog=EXIT_CODES_HELP)
@click.argument("artifact", type=click.Path(path_type=Path))
@click.argument("texts", nargs=-1)
@click.option("--file", "file_", type=click.Path(path_type=Path), help="Read texts from a file, one per line (streamed).")
@click.option("--context", help="Question-answering: the context; TEXTS are the questions.")
@json_option("one result object per line (JSON lines; each has the input's index and a short prefix, not the whole text)")
@click.option("--top-k", type=click.IntRange(min=1), default=1, show_default=True, help="Labels (or tokens) to return per text (or mask).")
@click.option("--stride", type=click.IntRange(min=0), help="Tokens shared by consecutive windows of a long text (default: max_length/4).")
@click.option("--max-length", type=click.IntRange(min=8), help="Window length in tokens (default and maximum: the model's).")
@click.option("--aggregation", type=click.Choice(["mean", "max"]), default="mean", show_default=True,
              help="Classification of long texts: mean of window logits, or the most confident window.")
@click.option("--normalize/--no-normalize", default=None, help="Embeddings: L2-normalise (default: as the source model).")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True, help="Windows per inference call.")
@_threads_option(default=None, help="Runtime threads (default: the runtime's own).")
@_trusted_key_option
@click.option("--out", "-o", "out_file", type=click.Path(path_type=Path),
              help="Bulk mode: write one row per input text of --file (.txt/.jsonl/.parquet) to this .jsonl or .parquet.")
@click.option("--resume", is_flag=True, help="Bulk mode: continue an interrupted run after the rows already in --out.")
@click.option("--force", is_flag=True, help="Bulk mode: replace --out if it exists.")
@click.option("--ray", "ray_address", is_flag=False, flag_value="local", default=None, metavar="[ADDRESS]",
              help="Bulk mode on a Ray cluster through Ray Data (ADDRESS of a running cluster, or a local one).")
@click.option("--workers", type=click.IntRange(min=1), default=2, show_default=True, help="With --ray: Predictor actors.")
def run_cmd(artifact, texts, file_, context, json_out, top_k, stride, max_length, aggregation, normalize, batch_size, threads,
            trusted_key, out_file, resume, force, ray_address, workers):
    """Run ARTIFACT on TEXTS (or --file) without torch: labels, embeddings, entities, answers, masks.

    With --out, a whole file is processed in bulk: streamed on this machine (resumable), or on
    a Ray cluster with --ray."""
    import json

    from bertexport.errors import UserError
    from bertexport.runtime import Artifact, Predictor

    if out_file or ray_address:
        if not file_ or texts or context is not None or json_out:
            raise UserError("bulk mode (--out/--ray) takes --file and --out only (no TEXTS, --context or --json)")
        if not out_file:
            raise UserError("--ray writes to --out: give --out out.jsonl or out.parquet")
        from bertexport import bulk

        options = dict(stride=stride, max_length=max_length, aggregation=aggregation, top_k=top_k, normalize=normalize)
        if ray_address:
            if resume:
                raise UserError("--resume is for single-machine runs; a Ray run rewrites --out")
            stats = bulk.run_ray(artifact, file_, out_file, address=ray_address, workers=workers, batch_size=max(batch_size, 32),
                                 threads=threads or 1, trusted_key=trusted_key, force=force, predictor_options=options)
        else:
            stats = bulk.run_local(artifact, file_, out_file, batch_size=batch_size, threads=threads, trusted_key=trusted_key,
                                   resume=resume, force=force, predictor_options=options)
        click.echo(f"PASSED: {stats['rows']} rows in {out_file} ({stats['new_rows']} new, {stats['rows_per_second']:.1f} rows/s"
                   + (f", {stats['workers']} Ray workers" if ray_address else "") + ")")
        return
    if not texts and not file_:
        raise UserError("give TEXTS or --file")
    sink = None
    if json_out and json_out != "-":
        sink = open(json_out, "w", encoding="utf-8")
    try:
        with Artifact(artifact, threads=threads, trusted_key=trusted_key) as art:
            for w in art.warnings:
                click.echo(f"warning: {w}", err=True)
            pred = Predictor(art, batch_size=batch_size, stride=stride, max_length=max_length, aggregation=aggregation,
                             top_k=top_k, normalize=normalize)
            index = 0
            for chunk in _text_chunks(texts, file_, 256):
                pairs = [context] * len(chunk) if context is not None else None
                for text, res in zip(chunk, pred.predict(chunk, pairs)):
                    if json_out:
                        line = json.dumps({"index": index, "text_prefix": text[:40], **res}, ensure_ascii=False)
                        click.echo(line) if sink is None else sink.write(line + "\n")
                    else:
                        click.echo(_one_line(text, res))
                    index += 1
    finally:
        if sink is not None:
            sink.close()


def _text_chunks(texts, file_, size):
    """Texts in chunks, streaming a file so a huge one never sits in memory at once."""
    from bertexport.textdata import iter_text_lines

    if texts:
        yield list(texts)
    if file_:
        yield from iter_text_lines(file_, size)


def _one_line(text, res):
    short = text if len(text) <= 60 else text[:57] + "..."
    if "label" in res:
        return f"{res['label']}\t{res['score']:.4f}\t{short}"
    if "embedding" in res:
        v = res["embedding"]
        return f"[{', '.join(f'{x:.4f}' for x in v[:4])}, ...] ({len(v)} dims)\t{short}"
    if "entities" in res:
        return "; ".join(f"{e['word']}:{e['entity']}@{e['start']}-{e['end']}" for e in res["entities"]) or "(no entities)"
    if "answer" in res:
        return f"{res['answer']!r}\t{res['score']:.4f}\t{short}"
    return "; ".join(" | ".join(f"{t['token']}:{t['score']:.3f}" for t in m["tokens"]) for m in res["masks"]) or "(no mask)"


@cli.command("pack", epilog=EXIT_CODES_HELP)
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--out", "-o", type=click.Path(path_type=Path), help="Pack file (default: ARTIFACT.tar.gz).")
@click.option("--force", is_flag=True, help="Replace --out if it is a bertexport pack (never another file).")
def pack_cmd(artifact, out, force):
    """Pack ARTIFACT into one .tar.gz (+ .sha256) for shipping."""
    from bertexport.packing import pack

    p = pack(artifact, out, force)
    click.echo(f"packed: {p} ({p.stat().st_size / 1e6:.1f} MB); checksum: {p}.sha256")


@cli.command("unpack", epilog=EXIT_CODES_HELP)
@click.argument("pack_file", type=click.Path(path_type=Path))
@click.option("--out", "-o", required=True, type=click.Path(path_type=Path), help="Artifact folder to create.")
@click.option("--force", is_flag=True, help="Replace --out if it is a bertexport artifact (never a folder of other files).")
@_trusted_key_option
def unpack_cmd(pack_file, out, force, trusted_key):
    """Unpack a pack safely (no path traversal, no links out) and verify its checksums (and signature)."""
    from bertexport.packing import unpack

    click.echo(f"PASSED: unpacked and verified {unpack(pack_file, out, force, trusted_key)}")


@cli.command("inspect", epilog=EXIT_CODES_HELP)
@click.argument("path", type=click.Path(path_type=Path))
@json_option("the summary")
def inspect_cmd(path, json_out):
    """Summarise an artifact folder or pack: model, task, target, inputs, parity, latency, versions."""
    from bertexport.packing import inspect, inspect_rows

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
    from bertexport.cache import cache_summary, clear_cache, prune_cache

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


def _install_signal_handlers() -> None:
    """SIGINT -> KeyboardInterrupt (130), SIGTERM -> Interrupted (143): both unwind through
    every ``with`` block, so staging and work folders are removed. A second signal while
    cleaning up is ignored so the cleanup finishes."""

    def on_signal(signum, frame):
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise Interrupted(signum)

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)


def main():
    _install_signal_handlers()
    cli(prog_name="bertexport")


if __name__ == "__main__":
    main()
