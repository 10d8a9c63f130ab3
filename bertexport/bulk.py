"""Bulk inference over files: ``run ART --file IN --out OUT``.

One machine: rows stream through the ``Predictor`` in chunks (bounded memory) and are
appended to the output, so an interrupted run resumes by counting the rows already
written (``--resume``). A Ray cluster (``--ray [ADDRESS]``): the same rows go through
Ray Data — ``map_batches`` over an actor pool, one ``Predictor`` per actor, the artifact
verified (checksums, and the signature with a trusted key) once per actor — with the
input order preserved, so the driver writes rows with the same ids as a single-machine
run. Ray restarts a worker that dies and re-runs its batch; nothing is lost or
duplicated because only the driver writes, in order.

Input: .txt (one text per line), .jsonl (a ``text`` field), .parquet (a ``text``
column); empty texts are skipped. Output rows: ``{"row": N, "text_prefix": ..., **result}``
as .jsonl, or as .parquet with the result JSON-encoded in a ``result`` column.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Iterator

from bertexport.errors import UserError

INPUTS = (".txt", ".jsonl", ".parquet")
OUTPUTS = (".jsonl", ".parquet")


def _suffix(path: Path, allowed: tuple[str, ...], what: str) -> str:
    s = Path(path).suffix.lower()
    if s not in allowed:
        raise UserError(f"{what} {path}: use one of {', '.join(allowed)}")
    return s


def check_paths(inp: Path, out: Path, resume: bool, force: bool) -> None:
    inp, out = Path(inp), Path(out)
    _suffix(inp, INPUTS, "input")
    _suffix(out, OUTPUTS, "output")
    if not inp.is_file():
        raise UserError(f"input not found: {inp}")
    if inp.resolve() == out.resolve():
        raise UserError("--out must differ from --file")
    partial = _partial(out)
    if out.exists() and not force and not resume:
        raise UserError(f"{out} already exists; --resume continues it, --force replaces it")
    if resume and not (out.exists() or partial.exists()):
        raise UserError(f"nothing to resume: {out} does not exist")
    if force and not resume:
        out.unlink(missing_ok=True)
        partial.unlink(missing_ok=True)


def _partial(out: Path) -> Path:
    """Rows in progress (always JSON lines, appended); a .parquet output is written from it at the end."""
    out = Path(out)
    return out if out.suffix.lower() == ".jsonl" else out.with_name(f".{out.name}.partial.jsonl")


def read_texts(path: Path, chunk: int = 256) -> Iterator[list[str]]:
    """Non-empty texts of the input, in chunks (streamed)."""
    path = Path(path)
    kind = _suffix(path, INPUTS, "input")
    if kind == ".txt":
        from bertexport.textdata import iter_text_lines

        yield from iter_text_lines(path, chunk)
    elif kind == ".jsonl":
        from bertexport.textdata import in_chunks

        def texts():
            with open(path, encoding="utf-8", errors="strict") as f:
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        text = json.loads(line).get("text")
                    except (ValueError, AttributeError) as e:
                        raise UserError(f"{path}:{n} is not a JSON object with a text field") from e
                    if isinstance(text, str) and text.strip():
                        yield text

        yield from in_chunks(texts(), chunk)
    else:
        import pyarrow.parquet as pq

        f = pq.ParquetFile(path)
        if "text" not in f.schema_arrow.names:
            raise UserError(f"{path} has no 'text' column (columns: {', '.join(f.schema_arrow.names)})")
        for batch in f.iter_batches(batch_size=chunk, columns=["text"]):
            texts = [t for t in batch.column("text").to_pylist() if isinstance(t, str) and t.strip()]
            if texts:
                yield texts


def _done_rows(out: Path) -> int:
    partial = _partial(out)
    if not partial.exists():
        return 0
    with open(partial, "rb") as f:
        return sum(1 for line in f if line.strip())


def _row(i: int, text: str, result: dict) -> str:
    return json.dumps({"row": i, "text_prefix": text[:40], **result}, ensure_ascii=False)


def _finish(out: Path) -> None:
    """A .parquet output is written (atomically) from the completed JSON lines."""
    out = Path(out)
    if out.suffix.lower() != ".parquet":
        return
    import pyarrow as pa
    import pyarrow.parquet as pq

    partial = _partial(out)
    rows, prefixes, results = [], [], []
    with open(partial, encoding="utf-8") as f:
        for line in f:
            d = json.loads(line)
            rows.append(d.pop("row"))
            prefixes.append(d.pop("text_prefix"))
            results.append(json.dumps(d, ensure_ascii=False))
    tmp = out.with_name(f".{out.name}.{os.getpid()}")
    pq.write_table(pa.table({"row": rows, "text_prefix": prefixes, "result": results}), tmp)
    os.replace(tmp, out)
    partial.unlink()


def run_local(artifact, inp, out, *, batch_size: int = 16, threads: int | None = None, trusted_key=None,
              resume: bool = False, force: bool = False, log=None, predictor_options: dict | None = None) -> dict:
    """Stream ``inp`` through one Predictor into ``out``; returns counts and rows/s."""
    from bertexport.runtime import Artifact, Predictor

    check_paths(inp, out, resume, force)
    done = _done_rows(out) if resume else 0
    t0, n = time.perf_counter(), 0
    with Artifact(artifact, threads=threads, trusted_key=trusted_key) as art, open(_partial(out), "a", encoding="utf-8") as sink:
        pred = Predictor(art, batch_size=batch_size, **(predictor_options or {}))
        row = 0
        for chunk in read_texts(inp):
            if row + len(chunk) <= done:  # already written by the interrupted run
                row += len(chunk)
                continue
            skip = max(0, done - row)
            results = pred.predict(chunk[skip:])
            for i, (text, res) in enumerate(zip(chunk[skip:], results)):
                sink.write(_row(row + skip + i, text, res) + "\n")
            sink.flush()
            n += len(results)
            row += len(chunk)
            if log:
                log(f"{row} rows")
    _finish(out)
    seconds = time.perf_counter() - t0
    return {"rows": done + n, "new_rows": n, "resumed_from": done, "seconds": seconds, "rows_per_second": n / seconds if seconds else 0.0}


class _PredictActor:
    """One per Ray actor: verifies the artifact once, keeps one Predictor."""

    def __init__(self, artifact: str, trusted_key: str | None, batch_size: int, threads: int | None, options: dict,
                 fail_once: str | None = None):
        from bertexport.runtime import Artifact, Predictor

        self.art = Artifact(artifact, threads=threads, trusted_key=trusted_key)
        self.art.runner.activate()
        self.pred = Predictor(self.art, batch_size=batch_size, **options)
        self.fail_once = fail_once  # tests: kill this worker process on its first batch, once

    def __call__(self, batch: dict) -> dict:
        if self.fail_once and not os.path.exists(self.fail_once):
            Path(self.fail_once).write_text(str(os.getpid()))
            os._exit(1)  # as if the machine running this worker died mid-batch
        texts = [str(t) for t in batch["text"]]
        results = self.pred.predict(texts)
        return {"text": texts, "result": [json.dumps(r, ensure_ascii=False) for r in results]}


def run_ray(artifact, inp, out, *, address: str | None = None, workers: int = 2, batch_size: int = 64,
            threads: int | None = 1, trusted_key=None, force: bool = False, log=None, predictor_options: dict | None = None,
            _fail_once: str | None = None) -> dict:
    """The same rows through Ray Data's ``map_batches`` over an actor pool; the driver writes
    the output in input order (row ids equal a single-machine run's)."""
    local = not address or address == "local"
    if local:  # a local instance serves this machine only: keep it on loopback (read at ray's import)
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    try:
        import ray
    except ImportError as e:
        raise UserError("--ray needs Ray Data: pip install 'bertexport[ray]'") from e
    from bertexport.runtime import Artifact

    check_paths(inp, out, False, force)
    Artifact(artifact, verify=True, trusted_key=trusted_key)  # refuse a bad artifact before starting a cluster job
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=None if local else address, include_dashboard=False, log_to_driver=False, configure_logging=False,
                 **({"num_cpus": max(workers, 1)} if local else {}))
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True  # row ids are assigned by the driver, in input order
        ctx.enable_progress_bars = log is not None
        kind = Path(inp).suffix.lower()
        # reading and filtering are light I/O: they take no CPU slot, so the actors (one
        # logical CPU each) can never starve them into a deadlock on a small cluster
        if kind == ".txt":
            ds = ray.data.read_text(str(inp), num_cpus=0)
        elif kind == ".jsonl":
            ds = ray.data.read_json(str(inp), lines=True, num_cpus=0).select_columns(["text"])
        else:
            ds = ray.data.read_parquet(str(inp), columns=["text"], num_cpus=0)
        ds = ds.filter(lambda r: isinstance(r["text"], str) and bool(r["text"].strip()), num_cpus=0)
        ds = ds.map_batches(_PredictActor, fn_constructor_args=(str(artifact), str(trusted_key) if trusted_key else None, batch_size,
                                                                threads, predictor_options or {}, _fail_once),
                            batch_size=batch_size, compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=1,
                            batch_format="numpy", max_restarts=-1, max_task_retries=-1)
        t0, n = time.perf_counter(), 0
        with open(_partial(out), "w", encoding="utf-8") as sink:
            for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
                for text, res in zip(batch["text"], batch["result"]):
                    sink.write(_row(n, str(text), json.loads(res)) + "\n")
                    n += 1
                if log:
                    log(f"{n} rows")
        seconds = time.perf_counter() - t0
    finally:
        if started_here:
            ray.shutdown()
    _finish(out)
    return {"rows": n, "new_rows": n, "resumed_from": 0, "seconds": seconds, "rows_per_second": n / seconds if seconds else 0.0,
            "workers": workers}
