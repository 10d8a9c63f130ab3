"""The run command: texts through an artifact, interactive or bulk (streamed, resumable, Ray)."""

from __future__ import annotations

import click

from bertexport.cli.group import EXIT_CODES_HELP, cli, json_option
from bertexport.cli.settings import options_from, settings_from
from bertexport.shipping.settings import BULK_ONLY, RunSettings


@cli.command("run", epilog=EXIT_CODES_HELP)
@options_from(RunSettings)
@json_option("one result object per line (JSON lines; each has the input's index and a short prefix, not the whole text)")
def run_cmd(json_out, **values):
    """Run ARTIFACT on TEXTS (or --file) without torch: labels, embeddings, entities, answers, masks.

    With --out, a whole file is processed in bulk: streamed on this machine (resumable), or on
    a Ray cluster with --ray."""
    import json

    from bertexport.core.errors import Interrupted, UserError
    from bertexport.shipping.run_command import run_command

    settings = settings_from(RunSettings, values, "run")
    if settings.bulk:
        if json_out:  # --json is the CLI's own option: its part of the bulk rule (RunSettings.validate) is here
            raise UserError(BULK_ONLY)
        try:
            stats = run_command(settings)
        except (KeyboardInterrupt, Interrupted) as e:
            click.echo(f"interrupted: the rows written so far stay in {settings.out_file}; the same command with --resume "
                       "continues it", err=True)
            raise click.exceptions.Exit(130 if isinstance(e, KeyboardInterrupt) else e.exit_code) from None
        skipped = f", {stats['skipped']} empty texts skipped" if stats["skipped"] else ""
        click.echo(f"PASSED: {stats['rows']} rows in {settings.out_file} ({stats['new_rows']} new{skipped}, "
                   f"{stats['rows_per_second']:.1f} rows/s"
                   + (f", {stats['workers']} Ray workers" if settings.ray_address else "") + ")")
        return
    sink = None

    def open_sink():  # once the input is checked, before the model loads
        nonlocal sink
        if json_out and json_out != "-":
            try:
                sink = open(json_out, "w", encoding="utf-8")
            except OSError as e:
                raise UserError(f"cannot write --json {json_out}: {e.strerror or e}") from None

    def show(index, text, res):
        if json_out:
            line = json.dumps({"index": index, "text_prefix": text[:40], **res}, ensure_ascii=False)
            click.echo(line) if sink is None else sink.write(line + "\n")
        else:
            click.echo(_one_line(text, res))

    try:
        run_command(settings, show, on_warning=lambda w: click.echo(f"warning: {w}", err=True), on_ready=open_sink)
    finally:
        if sink is not None:
            sink.close()


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
