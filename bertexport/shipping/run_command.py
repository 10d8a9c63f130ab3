"""``bertexport run``'s library entry, taking its settings record (``shipping.settings.RunSettings``):
a whole file in bulk (``shipping.bulk``: streamed on this machine or on Ray), or texts through
one ``runtime.Predictor``, each result handed back as it comes."""

from __future__ import annotations

from typing import Callable, Iterator

from bertexport.core.errors import UserError
from bertexport.shipping.settings import RunSettings

TEXT_CHUNK = 256  # texts of a --file predicted at a time (a huge file never sits in memory)


def run_command(settings: RunSettings, on_result: Callable[[int, str, dict], None] | None = None, *,
                on_warning: Callable[[str], None] | None = None,
                on_ready: Callable[[], None] | None = None) -> dict | None:
    """Bulk mode (``settings.bulk``: ``--out``, ``--ray``): the whole ``--file`` into
    ``--out`` (``bulk.run_ray`` or ``bulk.run_local``); returns their counts and rows/s.

    Otherwise TEXTS, then the texts of ``--file``, through the artifact: each result goes to
    ``on_result(index, text, result)`` in input order; returns None. The input is checked
    (its format and text column) before the artifact loads, and ``on_ready()`` is called
    between the two (the place to open where the results go); the artifact's warnings go
    to ``on_warning``. ``--exit-threshold`` is refused for an artifact without early exits
    before anything else is read."""
    from bertexport.shipping.runtime import check_exit_threshold_applies

    check_exit_threshold_applies(settings.artifact, settings.exit_threshold)  # its manifest only: no model loads
    if settings.bulk:
        return _run_bulk(settings)
    from bertexport.core.textdata import TextFile
    from bertexport.shipping.runtime import Artifact, Predictor

    if not settings.texts and not settings.file_:
        raise UserError("give TEXTS or --file")
    source = TextFile(settings.file_, settings.text_column) if settings.file_ else None  # checked before the model loads
    if on_ready is not None:
        on_ready()
    with Artifact(settings.artifact, threads=settings.threads, trusted_key=settings.trusted_key) as art:
        for w in art.warnings:
            if on_warning is not None:
                on_warning(w)
        pred = Predictor(art, batch_size=settings.batch_size, **settings.predictor_options())
        index = 0
        for chunk in text_chunks(settings.texts, source, TEXT_CHUNK):
            pairs = [settings.context] * len(chunk) if settings.context is not None else None
            for text, res in zip(chunk, pred.predict(chunk, pairs)):
                if on_result is not None:
                    on_result(index, text, res)
                index += 1
    return None


def _run_bulk(settings: RunSettings) -> dict:
    from bertexport.shipping import bulk

    common = dict(batch_size=settings.batch_size, trusted_key=settings.trusted_key, resume=settings.resume,
                  force=settings.force, predictor_options=settings.predictor_options(), text_column=settings.text_column)
    if settings.ray_address:
        return bulk.run_ray(settings.artifact, settings.file_, settings.out_file, address=settings.ray_address,
                            workers=settings.workers, threads=settings.threads or 1, **common)
    return bulk.run_local(settings.artifact, settings.file_, settings.out_file, threads=settings.threads, **common)


def text_chunks(texts, source, size: int) -> Iterator[list[str]]:
    """Texts in chunks, streaming a file (a ``textdata.TextFile``) so a huge one never sits in
    memory at once: the texts a bulk run (--out) of the same file reads, in the same order."""
    from bertexport.core.textdata import in_chunks

    if texts:
        yield list(texts)
    if source is not None:
        yield from in_chunks(source.texts(), size)
