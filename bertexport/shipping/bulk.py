"""Bulk inference over files: ``run ART --file IN --out OUT``.

The output depends only on the input. ONNX Runtime's dynamic int8 computes one activation
scale per tensor over the whole batch (padding included), so a text's result moves with
whoever shares its batch. Batches are therefore a function of the input alone: the usable
rows are cut into fixed chunks of ``CHUNK_ROWS`` (row ``n`` is in chunk ``n // CHUNK_ROWS``)
and the ``Predictor`` sorts a chunk's windows by length and runs them ``batch_size`` at a
time. One machine runs the chunks in order; a Ray cluster runs the same chunks through Ray
Data (``map_batches`` over an actor pool, one chunk per call, one ``Predictor`` per actor,
the artifact verified once per actor) and the driver writes them in chunk order; a resumed
run restarts at the last complete chunk and recomputes the partial one. Every row is
formatted by one function (``_chunk_lines``), so the file is byte-identical however it ran.

Bulk runs own their output. A sidecar ``.OUT.bulk.json`` beside it records the artifact
(manifest digest), the input (sha256), the result-shaping options and the state (running,
or complete with the output's sha256). ``--resume`` continues only an output whose sidecar
matches this artifact, input and options; ``--force`` replaces only an output that has a
sidecar (and, once complete, still has the digest written); anything else is refused with
the file left as it is.

Input: any file ``core.textdata.TextFile`` reads (.txt one text per line, .csv/.tsv/.jsonl/
.json/.parquet with a text column: ``text`` or the one named), by the same rules as every
other command; empty texts are skipped. The whole input is read and checked before a model
loads (a corrupt line is refused with its number); chunks are re-read from their positions. Output
rows: ``{"row": N, "text_prefix": ..., **result}`` as .jsonl, or as .parquet with the result
JSON-encoded in a ``result`` column (and the provenance record in the schema metadata).
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from bertexport.core.errors import UserError

OUTPUTS = (".jsonl", ".parquet")
CHUNK_ROWS = 256  # the unit of batching, of Ray work and of resume: part of the output's identity
PREFIX_CHARS = 40
SIDECAR_FORMAT = 1
RAY_CONNECT_TIMEOUT_S = 45  # an unreachable or incompatible cluster is refused within this
# the Predictor's result-shaping options, as the CLI defaults them (recorded in full in the sidecar)
PREDICTOR_DEFAULTS = {"stride": None, "max_length": None, "aggregation": "mean", "top_k": 1, "normalize": None,
                      "exit_threshold": None}


def _suffix(path: Path, allowed: tuple[str, ...], what: str) -> str:
    s = Path(path).suffix.lower()
    if s not in allowed:
        raise UserError(f"{what} {path}: use one of {', '.join(allowed)}")
    return s


def check_paths(inp: Path, out: Path) -> None:
    """Refuse, before any work, an input that is missing or an output that cannot be written
    (its folder missing or not writable: the output, its sidecar and partial rows go there)."""
    from bertexport.core.staging import check_writable

    inp, out = Path(inp), Path(out)
    _suffix(out, OUTPUTS, "output")
    if not inp.is_file():
        raise UserError(f"input not found: {inp}")
    if inp.resolve() == out.resolve():
        raise UserError("--out must differ from --file")
    if not out.resolve().parent.is_dir():
        raise UserError(f"folder not found for --out: {out.parent}")
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; give a .jsonl or .parquet file")
    check_writable(out.resolve().parent, 0, "--out file")


# ---------------------------------------------------------------- input


@dataclass
class InputScan:
    """The input, read once before any model loads: usable rows, and where each chunk starts."""

    path: Path
    text_column: str | None  # the column read (None: a text-per-line file)
    rows: int
    skipped: int  # empty texts
    starts: list  # the position of each chunk's first row (``textdata.Row.position``)
    sha256: str


def scan_input(path: Path, text_column: str | None = None) -> InputScan:
    """Read the whole input through ``textdata.TextFile`` (a record that is not text is
    refused with its line number) and note where every chunk starts."""
    from bertexport.core.hashing import sha256_file
    from bertexport.core.textdata import TextFile

    source = TextFile(path, text_column)
    rows = skipped = 0
    starts: list = []
    for row in source.rows():
        if row.text is None:
            skipped += 1
            continue
        if rows % CHUNK_ROWS == 0:
            starts.append(row.position)
        rows += 1
    if not rows:
        raise UserError(f"{path} has no usable rows" + (f" ({skipped} empty texts)" if skipped else " (it is empty)"))
    return InputScan(Path(path), source.text_column, rows, skipped, starts, sha256_file(path))


def _chunks_from(path: Path, text_column: str | None, start) -> Iterator[list[str]]:
    from bertexport.core.textdata import TextFile, in_chunks

    rows = TextFile(path, text_column).rows(tuple(start))
    return in_chunks((row.text for row in rows if row.text is not None), CHUNK_ROWS)


def read_chunk(path: Path, text_column: str | None, start) -> list[str]:
    """The usable texts of the chunk that starts at ``start`` (a position from ``scan_input``)."""
    return next(_chunks_from(path, text_column, start), [])


def iter_chunks(scan: InputScan, first: int = 0) -> Iterator[list[str]]:
    """Chunks ``first``, ``first + 1``, ... of the input, read in one pass (streamed)."""
    return _chunks_from(scan.path, scan.text_column, scan.starts[first]) if first < len(scan.starts) else iter(())


# ---------------------------------------------------------------- output ownership


def sidecar_path(out: Path) -> Path:
    out = Path(out)
    return out.with_name(f".{out.name}.bulk.json")


def _partial(out: Path) -> Path:
    """Rows in progress (always JSON lines, appended); a .parquet output is written from it at the end."""
    out = Path(out)
    return out if out.suffix.lower() == ".jsonl" else out.with_name(f".{out.name}.partial.jsonl")


def _read_sidecar(out: Path) -> dict | None:
    try:
        d = json.loads(sidecar_path(out).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    ok = isinstance(d, dict) and d.get("format") == SIDECAR_FORMAT and d.get("output") == Path(out).name
    return d if ok else None


def _write_sidecar(out: Path, record: dict) -> None:
    from bertexport.core.staging import write_text_atomic

    write_text_atomic(sidecar_path(out), json.dumps(record, indent=2, sort_keys=True) + "\n")


def _identity(record: dict) -> dict:
    """What decides the output's bytes (the same whether it ran here, on Ray or resumed)."""
    return {k: record[k] for k in ("format", "artifact_sha256", "input_sha256", "input_rows", "options")}


def _differences(mine: dict, record: dict) -> list[str]:
    said = []
    if mine.get("artifact_sha256") != record["artifact_sha256"]:
        said.append(f"another artifact (manifest {str(mine.get('artifact_sha256'))[:12]}, this one {record['artifact_sha256'][:12]})")
    if mine.get("input_sha256") != record["input_sha256"]:
        said.append(f"another input (sha256 {str(mine.get('input_sha256'))[:12]}, this one {record['input_sha256'][:12]})")
    old, new = mine.get("options") or {}, record["options"]
    changed = [f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    if changed:
        said.append(f"other options ({', '.join(changed)})")
    return said


def _rows_written(partial: Path) -> tuple[int, list[int]]:
    """Complete rows in a partial output and the byte offset after every whole chunk; a torn
    last line (a killed run) is not counted; any line bertexport did not write is refused."""
    rows, bounds, offset = 0, [0], 0
    with open(partial, "rb") as f:
        for line in f:
            if not line.endswith(b"\n"):
                break  # torn by a kill mid-write: recomputed
            if not (line.startswith(b'{"row": %d, ' % rows) and line.rstrip().endswith(b"}")):
                raise UserError(f"{partial}:{rows + 1} is not a row bertexport wrote; the file is left as it is")
            rows += 1
            offset += len(line)
            if rows % CHUNK_ROWS == 0:
                bounds.append(offset)
    return rows, bounds


@dataclass
class Claim:
    """What a run may do with --out: start at ``first_chunk``; ``truncate`` the partial output
    there (resume) or ``replace`` the old output (force); ``complete`` when nothing is left."""

    first_chunk: int = 0
    truncate: int | None = None
    replace: bool = False
    complete: bool = False


def check_output(out: Path, record: dict, resume: bool, force: bool) -> Claim:
    """Decide (touching nothing) whether this run may write ``out``."""
    from bertexport.core.hashing import sha256_file

    out, partial = Path(out), _partial(out)
    if resume and force:
        raise UserError("--resume continues an output and --force replaces it: give one of them")
    present = [p for p in dict.fromkeys([out, partial]) if p.exists()]
    mine = _read_sidecar(out)
    side = sidecar_path(out).name
    if mine is None and present:
        raise UserError(f"{present[0]} was not written by bertexport (no {side} beside it); it is left as it is: "
                        "choose another --out")
    if mine is not None and mine.get("state") == "complete" and out.exists() and sha256_file(out) != mine.get("output_sha256"):
        raise UserError(f"{out} changed since bertexport wrote it; it is left as it is: choose another --out")
    if not resume:
        if not present:
            return Claim()
        if not force:
            raise UserError(f"{out} already exists; --resume continues it, --force replaces it")
        if partial.exists() and mine.get("state") != "complete":
            _rows_written(partial)  # refuses a file that is no longer bertexport's rows
        return Claim(replace=True)
    if mine is None:
        raise UserError(f"nothing to resume: {out} does not exist")
    differs = _differences(mine, record)
    if differs:
        raise UserError(f"--resume: {out} was written for {'; '.join(differs)}; it is left as it is "
                        "(another --out, or --force to replace it)")
    if mine.get("state") == "complete" and out.exists():
        return Claim(complete=True)
    if not partial.exists():
        return Claim()
    rows, bounds = _rows_written(partial)
    if rows > record["input_rows"]:
        raise UserError(f"--resume: {partial} has {rows} rows, the input only {record['input_rows']}; it is left as it is")
    return Claim(first_chunk=rows // CHUNK_ROWS, truncate=bounds[rows // CHUNK_ROWS])


def _take(out: Path, claim: Claim, record: dict) -> None:
    """Act on a claim: replace or cut back the old output, then record this run in the sidecar."""
    partial = _partial(out)
    if claim.replace:
        Path(out).unlink(missing_ok=True)
        partial.unlink(missing_ok=True)
    if claim.truncate is not None:
        with open(partial, "r+b") as f:
            f.truncate(claim.truncate)
    _write_sidecar(out, {**_identity(record), "output": Path(out).name, "state": "running",
                         "written_by": record["written_by"], "artifact": record["artifact"], "input": record["input"]})


def _finish(out: Path, record: dict, rows: int) -> None:
    """A .parquet output is written (atomically) from the completed JSON lines; the sidecar
    says complete, with the output's digest."""
    from bertexport.core.hashing import sha256_file
    from bertexport.core.textdata import in_chunks

    out = Path(out)
    if out.suffix.lower() == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        partial = _partial(out)
        schema = pa.schema([("row", pa.int64()), ("text_prefix", pa.string()), ("result", pa.string())],
                           metadata={"bertexport.shipping.bulk": json.dumps(_identity(record), sort_keys=True)})
        tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
        try:
            with open(partial, encoding="utf-8") as f, pq.ParquetWriter(tmp, schema) as writer:
                for lines in in_chunks(f, 16 * CHUNK_ROWS):  # streamed: bounded memory
                    ids, prefixes, results = [], [], []
                    for line in lines:
                        d = json.loads(line)
                        ids.append(d.pop("row"))
                        prefixes.append(d.pop("text_prefix"))
                        results.append(json.dumps(d, ensure_ascii=False))
                    writer.write_table(pa.table([ids, prefixes, results], schema=schema))
            os.replace(tmp, out)
        finally:
            tmp.unlink(missing_ok=True)
        partial.unlink()
    _write_sidecar(out, {**(_read_sidecar(out) or {}), **_identity(record), "output": out.name, "state": "complete",
                         "rows": rows, "output_sha256": sha256_file(out)})


# ---------------------------------------------------------------- running


def _chunk_lines(first_row: int, texts: list[str], results: list[dict]) -> str:
    """The output lines of one chunk: the only place rows are formatted (shortest round-trip
    float repr, key order as computed), so every way of running writes the same bytes."""
    return "".join(json.dumps({"row": first_row + i, "text_prefix": t[:PREFIX_CHARS], **r}, ensure_ascii=False) + "\n"
                   for i, (t, r) in enumerate(zip(texts, results)))


@dataclass
class _Job:
    art: object  # the opened (verified, not yet activated) runtime.Artifact
    scan: InputScan
    record: dict
    claim: Claim

    @property
    def predictor_options(self) -> dict:
        return {k: self.record["options"][k] for k in PREDICTOR_DEFAULTS}


def _prepare(artifact, inp, out, *, batch_size, predictor_options, resume, force, threads, trusted_key,
             text_column=None) -> _Job:
    """Everything checked before a model loads or a cluster is contacted; nothing touched."""
    from bertexport import __version__
    from bertexport.core.manifest import DIGEST_KEY, manifest_digest
    from bertexport.shipping.runtime import Artifact, Predictor

    check_paths(inp, out)
    folder = Path(artifact)
    art = Artifact(folder, threads=threads, trusted_key=trusted_key)  # checksums and signature, no session yet
    manifest = art.manifest
    scan = scan_input(inp, text_column)
    unknown = set(predictor_options or {}) - set(PREDICTOR_DEFAULTS)
    if unknown:
        raise TypeError(f"unknown predictor options: {', '.join(sorted(unknown))}")
    predictor = {**PREDICTOR_DEFAULTS, **(predictor_options or {})}
    Predictor(art, batch_size=batch_size, **predictor)  # refuses bad options now, not on a worker after --out changed
    options = {"batch_size": int(batch_size), "chunk_rows": CHUNK_ROWS, "text_prefix_chars": PREFIX_CHARS,
               "text_column": scan.text_column, **predictor}
    record = {"format": SIDECAR_FORMAT, "written_by": f"bertexport {__version__} run --out",
              "artifact": str(folder), "artifact_sha256": manifest.get(DIGEST_KEY) or manifest_digest(manifest),
              "input": str(inp), "input_sha256": scan.sha256, "input_rows": scan.rows, "options": options}
    return _Job(art, scan, record, check_output(out, record, resume, force))


def _stats(job: _Job, new: int, seconds: float, **extra) -> dict:
    done = job.scan.rows if job.claim.complete else job.claim.first_chunk * CHUNK_ROWS
    return {"rows": job.scan.rows, "new_rows": new, "resumed_from": done,
            "skipped": job.scan.skipped, "seconds": seconds, "rows_per_second": new / seconds if seconds else 0.0, **extra}


def run_local(artifact, inp, out, *, batch_size: int = 16, threads: int | None = None, trusted_key=None,
              resume: bool = False, force: bool = False, log=None, predictor_options: dict | None = None,
              text_column: str | None = None) -> dict:
    """Stream ``inp`` through one Predictor into ``out``, chunk by chunk; returns counts and rows/s."""
    from bertexport.shipping.runtime import Predictor

    job = _prepare(artifact, inp, out, batch_size=batch_size, predictor_options=predictor_options, resume=resume, force=force,
                   threads=threads, trusted_key=trusted_key, text_column=text_column)
    if job.claim.complete:
        return _stats(job, 0, 0.0)
    t0, n = time.perf_counter(), 0
    with job.art as art:
        pred = Predictor(art, batch_size=batch_size, **job.predictor_options)
        _take(out, job.claim, job.record)
        with open(_partial(out), "a", encoding="utf-8") as sink:
            for k, texts in enumerate(iter_chunks(job.scan, job.claim.first_chunk), job.claim.first_chunk):
                sink.write(_chunk_lines(k * CHUNK_ROWS, texts, pred.predict(texts)))
                sink.flush()
                n += len(texts)
                if log:
                    log(f"{k * CHUNK_ROWS + len(texts)} of {job.scan.rows} rows")
    _finish(out, job.record, job.scan.rows)
    return _stats(job, n, time.perf_counter() - t0)


class _PredictActor:
    """One per Ray actor: verifies the artifact once, keeps one Predictor, and runs whole
    chunks (reading each from the input at the position the driver's scan found)."""

    def __init__(self, artifact: str, trusted_key: str | None, batch_size: int, threads: int | None, options: dict,
                 inp: str, text_column: str | None, input_sha256: str, fail_once: str | None = None):
        from bertexport.shipping.runtime import Artifact, Predictor

        self.art = Artifact(artifact, threads=threads, trusted_key=trusted_key)
        self.art.runner.activate()
        self.pred = Predictor(self.art, batch_size=batch_size, **options)
        self.inp, self.text_column, self.input_sha256, self.checked = Path(inp), text_column, input_sha256, False
        self.fail_once = fail_once  # tests: kill this worker process on its first batch, once

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        if self.fail_once and not os.path.exists(self.fail_once):
            Path(self.fail_once).write_text(str(os.getpid()))
            os._exit(1)  # as if the machine running this worker died mid-batch
        if not self.checked:  # the driver's scan and this worker must read the same bytes
            from bertexport.core.hashing import sha256_file

            if not self.inp.is_file() or sha256_file(self.inp) != self.input_sha256:
                raise UserError(f"a Ray worker cannot read the input the driver scanned ({self.inp}): give a path on "
                                "storage every node reads, and do not change the file during the run")
            self.checked = True
        chunks, lines = [], []
        for k, start, expected in zip(batch["chunk"], batch["start"], batch["rows"]):
            texts = read_chunk(self.inp, self.text_column, json.loads(str(start)))
            if len(texts) != int(expected):
                raise UserError(f"{self.inp} changed during the run (chunk {int(k)} has {len(texts)} rows, not {int(expected)})")
            chunks.append(int(k))
            lines.append(_chunk_lines(int(k) * CHUNK_ROWS, texts, self.pred.predict(texts)))
        return {"chunk": np.asarray(chunks, dtype=np.int64), "lines": np.asarray(lines, dtype=object)}


_PROBE = r"""
import json, sys
try:
    import ray
    ray.init(address=sys.argv[1], include_dashboard=False, log_to_driver=False, configure_logging=False,
             logging_level="ERROR")
    cpus = ray.cluster_resources().get("CPU", 0)
    ray.shutdown()
    print(json.dumps({"ok": True, "cpus": cpus}))
except BaseException as e:
    print(json.dumps({"ok": False, "error": f"{type(e).__name__}: {e}"}))
"""


def _ray_env() -> dict:
    """Ray's own connection timeouts, shortened so an unreachable cluster fails fast (its
    defaults retry for minutes and then end the process)."""
    return {"RAY_gcs_rpc_server_connect_timeout_s": "5", "RAY_gcs_rpc_server_reconnect_timeout_s": "20"}


def check_ray_address(address: str, timeout: float = RAY_CONNECT_TIMEOUT_S) -> None:
    """Refuse (exit 2, one line, within ``timeout`` s) a cluster that does not answer or that
    this driver cannot join (another Ray or Python version): a TCP check, then ``ray.init``
    in a child process, whose failure cannot end or hang this one."""
    import socket
    import subprocess
    import sys

    scheme, _, rest = address.rpartition("://")
    host, _, port = rest.rpartition(":")
    if not port.isdigit() and scheme == "ray":
        host, port = rest, "10001"
    if host and port.isdigit():
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=min(10.0, timeout)).close()
        except OSError as e:
            raise UserError(f"--ray {address}: no Ray cluster answers there ({e.strerror or e}); start one with "
                            "`ray start --head` or fix the address") from None
    try:
        done = subprocess.run([sys.executable, "-c", _PROBE, address], capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, **_ray_env()})
    except subprocess.TimeoutExpired:
        raise UserError(f"--ray {address}: the Ray cluster did not answer within {timeout:.0f} s") from None
    answer = next((json.loads(l) for l in reversed(done.stdout.splitlines()) if l.startswith("{")), None)
    if answer and answer.get("ok"):
        return
    if answer:
        why = answer["error"].strip().splitlines()[0]
    else:  # Ray's core ended the process: its last log line, without the log prefix
        why = re.sub(r"^\[[^\]]*\]\s*(\S+:\d+:\s*)?", "", (done.stderr.strip().splitlines() or ["no answer"])[-1])
        why = why.split(". ")[0]
    raise UserError(f"--ray {address}: cannot join this Ray cluster ({why[:300]})")


def _user_error_in(e: BaseException) -> UserError | None:
    """A UserError raised in a Ray worker, found inside the exceptions Ray wraps it in."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, UserError):
            return e
        e = getattr(e, "cause", None) or e.__cause__ or e.__context__
    return None


def run_ray(artifact, inp, out, *, address: str | None = None, workers: int = 2, batch_size: int = 16,
            threads: int | None = 1, trusted_key=None, resume: bool = False, force: bool = False, log=None,
            predictor_options: dict | None = None, text_column: str | None = None, _fail_once: str | None = None) -> dict:
    """The same chunks through Ray Data's ``map_batches`` over an actor pool (one chunk per
    call); the driver writes them in chunk order, so the file equals a single-machine run's."""
    local = not address or address == "local"
    if local:  # a local instance serves this machine only: keep it on loopback (read at ray's import)
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    try:
        import ray
    except ImportError as e:
        raise UserError("--ray needs Ray Data: pip install 'bertexport[ray]'") from e
    job = _prepare(artifact, inp, out, batch_size=batch_size, predictor_options=predictor_options, resume=resume, force=force,
                   threads=threads, trusted_key=trusted_key, text_column=text_column)
    if job.claim.complete:
        return _stats(job, 0, 0.0, workers=workers)
    if not local:
        check_ray_address(address)
    started_here = not ray.is_initialized()
    if started_here:
        for k, v in _ray_env().items():
            os.environ.setdefault(k, v)
        ray.init(address=None if local else address, include_dashboard=False, log_to_driver=False, configure_logging=False,
                 **({"num_cpus": max(workers, 1)} if local else {}))
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True  # chunks come back in input order
        ctx.enable_progress_bars = log is not None
        first, rows = job.claim.first_chunk, job.scan.rows
        items = [{"chunk": k, "start": json.dumps(list(job.scan.starts[k])), "rows": min(CHUNK_ROWS, rows - k * CHUNK_ROWS)}
                 for k in range(first, len(job.scan.starts))]
        ds = ray.data.from_items(items).map_batches(
            _PredictActor, batch_size=1, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=1,
            fn_constructor_args=(str(artifact), str(trusted_key) if trusted_key else None, batch_size, threads,
                                 job.predictor_options, str(Path(inp).resolve()), job.scan.text_column, job.scan.sha256,
                                 _fail_once),
            max_restarts=-1, max_task_retries=-1)
        _take(out, job.claim, job.record)
        t0, n, expected = time.perf_counter(), 0, first
        with open(_partial(out), "a", encoding="utf-8") as sink:
            try:
                for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
                    for k, lines in zip(batch["chunk"], batch["lines"]):
                        if int(k) != expected:  # preserve_order is what makes the file right: never trust it blindly
                            raise RuntimeError(f"Ray returned chunk {int(k)} where chunk {expected} was due")
                        sink.write(str(lines))
                        sink.flush()
                        n += min(CHUNK_ROWS, rows - expected * CHUNK_ROWS)
                        expected += 1
                    if log:
                        log(f"{min(expected * CHUNK_ROWS, rows)} of {rows} rows")
            except Exception as e:
                user = _user_error_in(e)
                if user is None:
                    raise
                raise UserError(str(user)) from None
        if expected != len(job.scan.starts):
            raise RuntimeError(f"Ray returned {expected - first} of {len(job.scan.starts) - first} chunks")
        seconds = time.perf_counter() - t0
    finally:
        if started_here:
            ray.shutdown()
    _finish(out, job.record, rows)
    return _stats(job, n, seconds, workers=workers)
