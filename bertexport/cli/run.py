"""The run command: texts through an artifact, interactive or bulk (streamed, resumable, Ray)."""

from __future__ import annotations

from pathlib import Path

import click

from bertexport.cli.group import EXIT_CODES_HELP, _threads_option, _trusted_key_option, cli, json_option


@cli.command("run", epilog=EXIT_CODES_HELP)
@click.argument("artifact", type=click.Path(path_type=Path))
@click.argument("texts", nargs=-1)
@click.option("--file", "file_", type=click.Path(path_type=Path),
              help="Read texts from a file (streamed): .txt one per line, or the text column of a .csv/.tsv/.jsonl/.json/"
                   ".parquet — the same texts with and without --out.")
@click.option("--text-column", help="With --file: the column (or JSON field) holding the texts (default: text, sentence, "
                                    "review or content, the first present).")
@click.option("--context", help="Question-answering: the context; TEXTS are the questions.")
@json_option("one result object per line (JSON lines; each has the input's index and a short prefix, not the whole text)")
@click.option("--top-k", type=click.IntRange(min=1), default=1, show_default=True, help="Labels (or tokens) to return per text (or mask).")
@click.option("--stride", type=click.IntRange(min=0), help="Tokens shared by consecutive windows of a long text (default: max_length/4).")
@click.option("--max-length", type=click.IntRange(min=8), help="Window length in tokens (default and maximum: the model's).")
@click.option("--aggregation", type=click.Choice(["mean", "max"]), default="mean", show_default=True,
              help="Classification of long texts: mean of window logits, or the most confident window.")
@click.option("--normalize/--no-normalize", default=None, help="Embeddings: L2-normalise (default: as the source model).")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True,
              help="Windows per inference call (bulk mode: part of the output's identity, as int8 results depend on batches).")
@_threads_option(default=None, help="Runtime threads (default: the runtime's own).")
@_trusted_key_option
@click.option("--out", "-o", "out_file", type=click.Path(path_type=Path),
              help="Bulk mode: write one row per input text of --file (.txt/.jsonl/.csv/.tsv/.parquet) to this .jsonl "
                   "or .parquet (byte-identical however it runs; provenance in .OUT.bulk.json beside it).")
@click.option("--resume", is_flag=True, help="Bulk mode: continue an interrupted run of the same artifact, input and options.")
@click.option("--force", is_flag=True, help="Bulk mode: replace an --out that bertexport wrote (never a file of your own).")
@click.option("--ray", "ray_address", is_flag=False, flag_value="local", default=None, metavar="[ADDRESS]",
              help="Bulk mode on a Ray cluster through Ray Data (ADDRESS of a running cluster, or a local one).")
@click.option("--workers", type=click.IntRange(min=1), default=2, show_default=True, help="With --ray: Predictor actors.")
def run_cmd(artifact, texts, file_, text_column, context, json_out, top_k, stride, max_length, aggregation, normalize, batch_size, threads,
            trusted_key, out_file, resume, force, ray_address, workers):
    """Run ARTIFACT on TEXTS (or --file) without torch: labels, embeddings, entities, answers, masks.

    With --out, a whole file is processed in bulk: streamed on this machine (resumable), or on
    a Ray cluster with --ray."""
    import json

    from bertexport.core.errors import UserError
    from bertexport.core.textdata import TextFile
    from bertexport.shipping.runtime import Artifact, Predictor

    if text_column and not file_:
        raise UserError("--text-column names a column of --file: give --file")
    if out_file or ray_address:
        if not file_ or texts or context is not None or json_out:
            raise UserError("bulk mode (--out/--ray) takes --file and --out only (no TEXTS, --context or --json)")
        if not out_file:
            raise UserError("--ray writes to --out: give --out out.jsonl or out.parquet")
        from bertexport.shipping import bulk
        from bertexport.core.errors import Interrupted

        options = dict(stride=stride, max_length=max_length, aggregation=aggregation, top_k=top_k, normalize=normalize)
        common = dict(batch_size=batch_size, trusted_key=trusted_key, resume=resume, force=force, predictor_options=options)
        try:
            if ray_address:
                stats = bulk.run_ray(artifact, file_, out_file, address=ray_address, workers=workers, threads=threads or 1,
                                     text_column=text_column, **common)
            else:
                stats = bulk.run_local(artifact, file_, out_file, threads=threads, text_column=text_column, **common)
        except (KeyboardInterrupt, Interrupted) as e:
            click.echo(f"interrupted: the rows written so far stay in {out_file}; the same command with --resume "
                       "continues it", err=True)
            raise click.exceptions.Exit(130 if isinstance(e, KeyboardInterrupt) else e.exit_code) from None
        skipped = f", {stats['skipped']} empty texts skipped" if stats["skipped"] else ""
        click.echo(f"PASSED: {stats['rows']} rows in {out_file} ({stats['new_rows']} new{skipped}, "
                   f"{stats['rows_per_second']:.1f} rows/s" + (f", {stats['workers']} Ray workers" if ray_address else "") + ")")
        return
    if not texts and not file_:
        raise UserError("give TEXTS or --file")
    source = TextFile(file_, text_column) if file_ else None  # format and columns checked before the model loads
    sink = None
    if json_out and json_out != "-":
        try:
            sink = open(json_out, "w", encoding="utf-8")
        except OSError as e:
            raise UserError(f"cannot write --json {json_out}: {e.strerror or e}") from None
    try:
        with Artifact(artifact, threads=threads, trusted_key=trusted_key) as art:
            for w in art.warnings:
                click.echo(f"warning: {w}", err=True)
            pred = Predictor(art, batch_size=batch_size, stride=stride, max_length=max_length, aggregation=aggregation,
                             top_k=top_k, normalize=normalize)
            index = 0
            for chunk in _text_chunks(texts, source, 256):
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


def _text_chunks(texts, source, size):
    """Texts in chunks, streaming a file (a ``textdata.TextFile``) so a huge one never sits in
    memory at once: the texts a bulk run (--out) of the same file reads, in the same order."""
    from bertexport.core.textdata import in_chunks

    if texts:
        yield list(texts)
    if source is not None:
        yield from in_chunks(source.texts(), size)


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
