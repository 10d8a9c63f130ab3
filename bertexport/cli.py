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
@click.option("--distill", "distill_layers", type=int, help="First distill MODEL to a student with this many layers, then convert the student.")
@click.option("--distill-data", type=click.Path(path_type=Path), help="Transfer text for --distill (default: calib/).")
@click.option("--distill-epochs", type=int, default=3, show_default=True)
def convert(model, target, out, task, calib, samples, threads, latency_runs, force, revision, allow_pickle, trust_remote_code,
            distill_layers, distill_data, distill_epochs):
    """Compile MODEL (a folder, a hub id, or the built-in all-MiniLM-L6-v2) for a target."""
    from bertexport.convert import convert as run_convert
    from bertexport.progress import RichReporter

    reporter = RichReporter()
    if distill_layers:
        from bertexport.convert import distilled_student

        model = str(distilled_student(model, task, distill_layers, distill_data, distill_epochs, reporter))
    try:
        result = run_convert(model, target, out, task=task, calib=calib, samples=samples, force=force, threads=threads,
                             latency_runs=latency_runs, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code,
                             revision=revision, reporter=reporter)
    except GateFailed as e:
        if e.result is not None:
            _print_rows(e.result.rows, f"{e.result.artifact} (rejected)")
        raise
    _print_rows(result.rows, str(result.artifact))
    click.echo(f"PASSED: {result.artifact}")


def _distill_options(f):
    for opt in reversed([
        click.option("--layers", type=int, help="Student layer count (every k-th teacher layer kept)."),
        click.option("--keep-layers", help="Explicit teacher layer indices to keep, e.g. 1,3,5."),
        click.option("--student", help="A student checkpoint sharing the teacher's tokenizer (instead of --layers)."),
        click.option("--data", "distill_data", type=click.Path(path_type=Path), help="Transfer text (.txt/.csv/.tsv/.jsonl; labels used when present); default: calib/."),
        click.option("--epochs", type=int, default=3, show_default=True),
        click.option("--batch-size", type=int, default=32, show_default=True),
        click.option("--lr", type=float, default=5e-5, show_default=True),
        click.option("--temperature", type=float, default=2.0, show_default=True),
        click.option("--seed", type=int, default=0, show_default=True),
        click.option("--distill-threads", type=int, default=1, show_default=True, help="Training threads."),
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


@cli.command()
@click.argument("teacher")
@click.option("--out", "-o", required=True, type=click.Path(path_type=Path), help="Student checkpoint folder to create.")
@click.option("--task", type=click.Choice(["feature-extraction", "text-classification", "token-classification",
                                          "question-answering", "fill-mask"]))
@_distill_options
@click.option("--resume", is_flag=True, help="Continue an interrupted run from its checkpoint.")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
def distill(teacher, out, task, layers, keep_layers, student, distill_data, epochs, batch_size, lr, temperature, seed,
            distill_threads, resume, force):
    """Distill TEACHER into a smaller student checkpoint (same family and tokenizer)."""
    from bertexport.distill import distill as run_distill
    from bertexport.progress import RichReporter

    cfg = _distill_config(layers, keep_layers, student, epochs, batch_size, lr, temperature, seed, distill_threads)
    result = run_distill(teacher, out, task=task, data=distill_data, config=cfg, resume=resume, force=force,
                         reporter=RichReporter())
    r = result.report
    click.echo(f"student: {result.student}")
    click.echo(f"  layers {r['teacher']['layers']} -> {r['student']['layers']}, parameters "
               f"{r['teacher']['parameters'] / 1e6:.1f}M -> {r['student']['parameters'] / 1e6:.1f}M")
    click.echo(f"  PyTorch latency {r['latency']['teacher_p50_ms']:.2f} -> {r['latency']['student_p50_ms']:.2f} ms "
               f"({r['latency']['speedup']['p50_ratio']:.2f}x); final eval: {r['final_eval']}")


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


@cli.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--data", type=click.Path(path_type=Path), help="Labelled data (.csv/.tsv/.jsonl: text[, text_pair], label) or plain text; default: calib/samples.txt.")
@click.option("--model", help="The PyTorch original (default: the checkpoint named in the manifest).")
@click.option("--max-accuracy-drop", type=float, help="Gate: accuracy may drop at most this many points.")
@click.option("--min-agreement", type=float, help="Gate: fraction of decisions equal to PyTorch's.")
@click.option("--min-cosine", type=float, help="Gate: minimum per-sample cosine to PyTorch's outputs.")
@click.option("--text-column", help="Text column name (CSV/TSV/JSONL).")
@click.option("--label-column", help="Label column name (CSV/TSV/JSONL).")
@click.option("--limit", type=int, help="Use only the first N rows.")
@click.option("--threads", type=int, default=1, show_default=True)
@click.option("--junit", type=click.Path(path_type=Path), help="Write a JUnit XML report for CI systems.")
@click.option("--json", "json_out", type=click.Path(path_type=Path), help="Write the result as JSON.")
@click.option("--force", is_flag=True, help="Compare even if --model is not the checkpoint the artifact was built from.")
def validate(artifact, data, model, max_accuracy_drop, min_agreement, min_cosine, text_column, label_column, limit,
             threads, junit, json_out, force):
    """Task accuracy and agreement of ARTIFACT vs its PyTorch original, with CI gates (exit 1 on failure)."""
    import json

    from bertexport.validate import Gates
    from bertexport.validate import validate as run_validate

    gates = Gates(max_accuracy_drop, min_agreement, min_cosine)
    try:
        result = run_validate(artifact, data, model=model, gates=gates, text_column=text_column, label_column=label_column,
                              limit=limit, threads=threads, force=force, junit=junit)
    except GateFailed as e:
        if json_out and e.result is not None:
            json_out.write_text(json.dumps(e.result.to_dict(), indent=2) + "\n")
        if e.result is not None:
            _print_metrics(e.result)
        raise
    if json_out:
        json_out.write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    _print_metrics(result)
    click.echo(f"PASSED: {artifact} ({', '.join(f'{k}={v}' for k, v in result.gates.items()) or 'no gates'})")


def _print_metrics(result):
    for k, v in result.metrics.items():
        click.echo(f"  {k:20s} {v:.4f}" if isinstance(v, float) else f"  {k:20s} {v}")


def _int_list(ctx, param, value):
    try:
        return [int(x) for x in value.split(",")] if value else []
    except ValueError as e:
        raise click.BadParameter("a comma-separated list of integers") from e


@cli.command()
@click.argument("model", required=False)
@click.argument("artifacts", nargs=-1, type=click.Path(path_type=Path))
@click.option("--target", "-t", "targets", multiple=True, help="Also convert MODEL for this profile (cached) and include it; repeatable.")
@click.option("--batch", "batches", default="1", callback=_int_list, show_default=True, help="Batch sizes, comma-separated.")
@click.option("--seq", "sequences", default="128", callback=_int_list, show_default=True, help="Sequence lengths, comma-separated.")
@click.option("--texts", type=click.Path(path_type=Path), help="Also time a 'real lengths' cell over this text file.")
@click.option("--data", type=click.Path(path_type=Path), help="Labelled data: adds accuracy per candidate.")
@click.option("--data-limit", type=int, help="Use only the first N rows of --data.")
@click.option("--runs", type=int, default=30, show_default=True, help="Timed runs per candidate per cell.")
@click.option("--warmup", type=int, default=5, show_default=True)
@click.option("--threads", type=int, default=1, show_default=True, help="Threads for every candidate (pinned, reported).")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), help="Folder for benchmark.json/.md/.png.")
@click.option("--force", is_flag=True, help="Compare artifacts built from different checkpoints.")
def benchmark(model, artifacts, targets, batches, sequences, texts, data, data_limit, runs, warmup, threads, out_dir, force):
    """Latency/throughput (and accuracy) of the PyTorch original and each ARTIFACT, interleaved.

    MODEL may be omitted when ARTIFACTS are given (the manifest names the checkpoint)."""
    from bertexport.benchmark import benchmark as run_benchmark
    from bertexport.benchmark import rows, write_outputs
    from bertexport.progress import RichReporter

    if model and Path(model).joinpath("manifest.json").is_file():  # first positional is an artifact
        artifacts, model = (Path(model), *artifacts), None
    report = run_benchmark(model, list(artifacts), targets=list(targets), batches=batches, sequences=sequences, texts=texts,
                           data=data, data_limit=data_limit, runs=runs, warmup=warmup, threads=threads, force=force,
                           reporter=RichReporter())
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{report['model']['source']} · {threads} thread(s) · {runs} interleaved runs")
    for col in ("candidate", "b", "seq", "p50 ms", "p90 ms", "p99 ms", "seq/s", "speedup", "acc %", "drop"):
        table.add_column(col)
    for r in rows(report):
        table.add_row(r["candidate"], str(r["batch"]), str(r["sequence"]), f"{r['p50_ms']:.2f}", f"{r['p90_ms']:.2f}",
                      f"{r['p99_ms']:.2f}", f"{r['throughput']:.1f}", f"{r['speedup']:.2f}x",
                      "-" if r["accuracy"] is None else f"{r['accuracy']:.2f}", "-" if r["drop"] is None else f"{r['drop']:+.2f}")
    Console().print(table)
    if out_dir:
        for kind, p in write_outputs(report, out_dir).items():
            click.echo(f"{kind}: {p}")


@cli.command("run")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.argument("texts", nargs=-1)
@click.option("--file", "file_", type=click.Path(path_type=Path), help="Read texts from a file, one per line (streamed).")
@click.option("--context", help="Question-answering: the context; TEXTS are the questions.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.option("--top-k", type=int, default=1, show_default=True)
@click.option("--stride", type=int, help="Tokens shared by consecutive windows of a long text (default: max_length/4).")
@click.option("--max-length", type=int, help="Window length in tokens (default and maximum: the model's).")
@click.option("--aggregation", type=click.Choice(["mean", "max"]), default="mean", show_default=True,
              help="Classification of long texts: mean of window logits, or the most confident window.")
@click.option("--normalize/--no-normalize", default=None, help="Embeddings: L2-normalise (default: as the source model).")
@click.option("--batch-size", type=int, default=16, show_default=True)
@click.option("--threads", type=int, default=None, help="Runtime threads (default: the runtime's own).")
def run_cmd(artifact, texts, file_, context, as_json, top_k, stride, max_length, aggregation, normalize, batch_size, threads):
    """Run ARTIFACT on TEXTS (or --file) without torch: labels, embeddings, entities, answers, masks."""
    import json

    from bertexport.errors import UserError
    from bertexport.runtime import Artifact, Predictor

    if not texts and not file_:
        raise UserError("give TEXTS or --file")
    if batch_size < 1:
        raise UserError("--batch-size must be >= 1")
    with Artifact(artifact, threads=threads) as art:
        pred = Predictor(art, batch_size=batch_size, stride=stride, max_length=max_length, aggregation=aggregation,
                         top_k=top_k, normalize=normalize)
        for chunk in _text_chunks(texts, file_, 256):
            pairs = [context] * len(chunk) if context is not None else None
            for text, res in zip(chunk, pred.predict(chunk, pairs)):
                if as_json:
                    click.echo(json.dumps({"text": text, **res}, ensure_ascii=False))
                else:
                    click.echo(_one_line(text, res))


def _text_chunks(texts, file_, size):
    """Texts in chunks, streaming a file so a huge one never sits in memory at once."""
    from bertexport.errors import UserError

    if texts:
        yield list(texts)
    if file_:
        if not file_.is_file():
            raise UserError(f"file not found: {file_}")
        chunk = []
        with open(file_, "rb") as f:
            for n, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8").rstrip("\r\n")
                except UnicodeDecodeError as e:
                    raise UserError(f"{file_}:{n} is not valid UTF-8 ({e.reason})") from e
                if line.strip():
                    chunk.append(line)
                if len(chunk) == size:
                    yield chunk
                    chunk = []
        if chunk:
            yield chunk


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


@cli.command("pack")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--out", "-o", type=click.Path(path_type=Path), help="Pack file (default: ARTIFACT.tar.gz).")
@click.option("--force", is_flag=True)
def pack_cmd(artifact, out, force):
    """Pack ARTIFACT into one .tar.gz (+ .sha256) for shipping."""
    from bertexport.packing import pack

    p = pack(artifact, out, force)
    click.echo(f"packed: {p} ({p.stat().st_size / 1e6:.1f} MB); checksum: {p}.sha256")


@cli.command("unpack")
@click.argument("pack_file", type=click.Path(path_type=Path))
@click.option("--out", "-o", required=True, type=click.Path(path_type=Path))
@click.option("--force", is_flag=True)
def unpack_cmd(pack_file, out, force):
    """Unpack a pack safely (no path traversal, no links out) and verify its checksums."""
    from bertexport.packing import unpack

    click.echo(f"PASSED: unpacked and verified {unpack(pack_file, out, force)}")


@cli.command("inspect")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True)
def inspect_cmd(path, as_json):
    """Summarise an artifact folder or pack: model, task, target, inputs, parity, latency, versions."""
    import json

    from bertexport.packing import inspect

    info = inspect(path)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    for k, v in info.items():
        if isinstance(v, dict):
            v = ", ".join(f"{a}={b:.4g}" if isinstance(b, float) else f"{a}={b}" for a, b in v.items())
        elif isinstance(v, list):
            v = "; ".join(v)
        click.echo(f"{k:18s} {v}")


def main():
    cli(prog_name="bertexport")


if __name__ == "__main__":
    main()
