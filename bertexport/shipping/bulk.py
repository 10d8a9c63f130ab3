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

Input: .txt (one text per line), .jsonl (objects with a ``text`` field), .csv/.tsv (a
``text`` column), .parquet (a ``text`` column); empty texts are skipped. The whole input is
read and checked before a model loads (a corrupt line is refused with its number). Output
rows: ``{"row": N, "text_prefix": ..., **result}`` as .jsonl, or as .parquet with the result
JSON-encoded in a ``result`` column (and the provenance record in the schema metadata).
"""

from __future__ import annotations

import csv
import functools
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from bertexport.core.errors import UserError

INPUTS = (".txt", ".jsonl", ".csv", ".tsv", ".parquet")
OUTPUTS = (".jsonl", ".parquet")
CHUNK_ROWS = 256  # the unit of batching, of Ray work and of resume: part of the output's identity
PREFIX_CHARS = 40
SIDECAR_FORMAT = 1
RAY_CONNECT_TIMEOUT_S = 45  # an unreachable or incompatible cluster is refused within this
# the Predictor's result-shaping options, as the CLI defaults them (recorded in full in the sidecar)
PREDICTOR_DEFAULTS = {"stride": None, "max_length": None, "aggregation": "mean", "top_k": 1, "normalize": None}


def _suffix(path: Path, allowed: tuple[str, ...], what: str) -> str:
    s = Path(path).suffix.lower()
    if s not in allowed:
        raise UserError(f"{what} {path}: use one of {', '.join(allowed)}")
    return s


def check_paths(inp: Path, out: Path) -> None:
    inp, out = Path(inp), Path(out)
    _suffix(inp, INPUTS, "input")
    _suffix(out, OUTPUTS, "output")
    if not inp.is_file():
        raise UserError(f"input not found: {inp}")
    if inp.resolve() == out.resolve():
        raise UserError("--out must differ from --file")
    if not out.resolve().parent.is_dir():
        raise UserError(f"folder not found for --out: {out.parent}")
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; give a .jsonl or .parquet file")


# ---------------------------------------------------------------- input


@dataclass
class InputScan:
    """The input, read once before any model loads: usable rows, and where each chunk starts."""

    path: Path
    kind: str
    rows: int
    skipped: int  # empty texts
    starts: list  # the position of each chunk's first row (see ``_records``)
    sha256: str


def scan_input(path: Path) -> InputScan:
    from bertexport.core.hashing import sha256_file

    path = Path(path)
    kind = _suffix(path, INPUTS, "input")
    rows = skipped = 0
    starts: list = []
    for pos, text in _records(path, kind):
        if text is None:
            skipped += 1
            continue
        if rows % CHUNK_ROWS == 0:
            starts.append(pos)
        rows += 1
    if not rows:
        raise UserError(f"{path} has no usable rows" + (f" ({skipped} empty texts)" if skipped else " (it is empty)"))
    return InputScan(path, kind, rows, skipped, starts, sha256_file(path))


def _chunks_from(path: Path, kind: str, start) -> Iterator[list[str]]:
    from bertexport.core.textdata import in_chunks

    return in_chunks((t for _, t in _records(Path(path), kind, tuple(start)) if t is not None), CHUNK_ROWS)


def read_chunk(path: Path, kind: str, start) -> list[str]:
    """The usable texts of the chunk that starts at ``start`` (a position from ``scan_input``)."""
    return next(_chunks_from(path, kind, start), [])


def iter_chunks(scan: InputScan, first: int = 0) -> Iterator[list[str]]:
    """Chunks ``first``, ``first + 1``, ... of the input, read in one pass (streamed)."""
    return _chunks_from(scan.path, scan.kind, scan.starts[first]) if first < len(scan.starts) else iter(())


def _records(path: Path, kind: str, start: tuple | None = None) -> Iterator[tuple[tuple, str | None]]:
    """(position, text) for every record from ``start`` on; text is None for an empty one.
    A position can be passed back as ``start`` (and travels to Ray workers as JSON)."""
    if kind == ".parquet":
        return _parquet_records(path, start)
    if kind in (".csv", ".tsv"):
        return _csv_records(path, "\t" if kind == ".tsv" else ",", start)
    return _line_records(path, kind == ".jsonl", start)


def _raw_lines(path: Path, start: tuple | None):
    """(byte offset, line number, line, offset after it) of a file's lines from ``start``, each
    decoded as UTF-8 (keeping its line end); a line that is not UTF-8 is refused with its number."""
    offset, number = start or (0, 1)
    with open(path, "rb") as f:
        f.seek(offset)
        for raw in f:
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise UserError(f"{path}:{number} is not valid UTF-8 ({e.reason})") from None
            yield offset, number, line.lstrip("\ufeff") if offset == 0 else line, offset + len(raw)
            offset += len(raw)
            number += 1


def _line_records(path: Path, jsonl: bool, start):
    from bertexport.core.textdata import line_problem

    for offset, n, line, _ in _raw_lines(path, start):
        line = line.rstrip("\r\n")
        if not jsonl:
            problem = line_problem(line.encode("utf-8"))
            if problem:
                raise UserError(f"{path}:{n} is not text: {problem}")
            yield (offset, n), (line if line.strip() else None)
            continue
        if not line.strip():
            continue  # a blank line is no record
        try:
            obj = json.loads(line)
        except ValueError as e:
            raise UserError(f"{path}:{n} is not valid JSON ({getattr(e, 'msg', e)})") from None
        if not isinstance(obj, dict):
            raise UserError(f"{path}:{n} is not a JSON object (each line needs a \"text\" field)")
        if "text" not in obj:
            raise UserError(f"{path}:{n} has no \"text\" field (fields: {', '.join(map(str, list(obj)[:8])) or 'none'})")
        text = obj["text"]
        if text is not None and not isinstance(text, str):
            raise UserError(f"{path}:{n}: \"text\" must be a string, not {type(text).__name__}")
        yield (offset, n), (text if text and text.strip() else None)


def _csv_rows(path: Path, delimiter: str, start):
    """(position, fields) of each CSV record from ``start``; a malformed one is refused with
    the number of the line it starts on."""
    after = [start or (0, 1)]  # where the next unread line starts

    def lines():
        for _, n, line, end in _raw_lines(path, after[0]):
            after[0] = (end, n + 1)
            yield line

    reader = csv.reader(lines(), delimiter=delimiter, strict=True)
    while True:
        pos = after[0]
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise UserError(f"{path}:{pos[1]} is not valid CSV ({e})") from None
        yield pos, row


def _csv_records(path: Path, delimiter: str, start):
    rows = _csv_rows(path, delimiter, None)
    pos, header = next(rows, (None, []))
    header = [h.strip() for h in header]
    if not header:
        raise UserError(f"{path} has no header row (a CSV input needs a 'text' column)")
    if "text" not in header:
        raise UserError(f"{path} has no 'text' column (columns: {', '.join(header)})")
    col = header.index("text")
    if start is not None:
        rows.close()
        rows = _csv_rows(path, delimiter, tuple(start))
    for pos, row in rows:
        if not row:
            continue  # a blank line
        if len(row) != len(header):
            raise UserError(f"{path}:{pos[1]} has {len(row)} fields where the header has {len(header)} "
                            "(an unquoted delimiter or a broken quote?)")
        yield pos, (row[col] if row[col].strip() else None)


def _parquet_records(path: Path, start):
    import pyarrow as pa
    import pyarrow.parquet as pq

    def refused(e):
        return UserError(f"{path} is not a readable Parquet file ({(str(e).strip().splitlines() or [type(e).__name__])[0]})")

    try:
        f = pq.ParquetFile(path)
        schema = f.schema_arrow
    except (pa.ArrowException, OSError, ValueError) as e:
        raise refused(e) from None
    if "text" not in schema.names:
        raise UserError(f"{path} has no 'text' column (columns: {', '.join(schema.names)})")
    kind = schema.field("text").type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)):
        raise UserError(f"{path}: column 'text' holds {kind}, not text")
    group0, row0 = start or (0, 0)
    stat = os.stat(path)
    for group in range(group0, f.num_row_groups):
        try:
            texts = _parquet_group(str(path), stat.st_size, stat.st_mtime_ns, group)
        except (pa.ArrowException, OSError, ValueError) as e:
            raise refused(e) from None
        for j in range(row0 if group == group0 else 0, len(texts)):
            t = texts[j]
            yield (group, j), (t if t and t.strip() else None)


@functools.lru_cache(maxsize=2)
def _parquet_group(path: str, size: int, mtime_ns: int, group: int) -> list:
    """The texts of one row group, kept: a Ray actor reads every N-th chunk, mostly of the
    group it read last, so each group is decoded once per actor, not once per chunk."""
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).read_row_group(group, columns=["text"]).column("text").to_pylist()


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
    path = sidecar_path(out)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


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


def _prepare(artifact, inp, out, *, batch_size, predictor_options, resume, force, threads, trusted_key) -> _Job:
    """Everything checked before a model loads or a cluster is contacted; nothing touched."""
    from bertexport import __version__
    from bertexport.core.manifest import DIGEST_KEY, manifest_digest
    from bertexport.shipping.runtime import Artifact, Predictor

    check_paths(inp, out)
    folder = Path(artifact)
    art = Artifact(folder, threads=threads, trusted_key=trusted_key)  # checksums and signature, no session yet
    manifest = art.manifest
    scan = scan_input(inp)
    unknown = set(predictor_options or {}) - set(PREDICTOR_DEFAULTS)
    if unknown:
        raise TypeError(f"unknown predictor options: {', '.join(sorted(unknown))}")
    predictor = {**PREDICTOR_DEFAULTS, **(predictor_options or {})}
    Predictor(art, batch_size=batch_size, **predictor)  # refuses bad options now, not on a worker after --out changed
    options = {"batch_size": int(batch_size), "chunk_rows": CHUNK_ROWS, "text_prefix_chars": PREFIX_CHARS, **predictor}
    record = {"format": SIDECAR_FORMAT, "written_by": f"bertexport {__version__} run --out",
              "artifact": str(folder), "artifact_sha256": manifest.get(DIGEST_KEY) or manifest_digest(manifest),
              "input": str(inp), "input_sha256": scan.sha256, "input_rows": scan.rows, "options": options}
    return _Job(art, scan, record, check_output(out, record, resume, force))


def _stats(job: _Job, new: int, seconds: float, **extra) -> dict:
    done = job.scan.rows if job.claim.complete else job.claim.first_chunk * CHUNK_ROWS
    return {"rows": job.scan.rows, "new_rows": new, "resumed_from": done,
            "skipped": job.scan.skipped, "seconds": seconds, "rows_per_second": new / seconds if seconds else 0.0, **extra}


def run_local(artifact, inp, out, *, batch_size: int = 16, threads: int | None = None, trusted_key=None,
              resume: bool = False, force: bool = False, log=None, predictor_options: dict | None = None) -> dict:
    """Stream ``inp`` through one Predictor into ``out``, chunk by chunk; returns counts and rows/s."""
    from bertexport.shipping.runtime import Predictor

    job = _prepare(artifact, inp, out, batch_size=batch_size, predictor_options=predictor_options, resume=resume, force=force,
                   threads=threads, trusted_key=trusted_key)
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
                 inp: str, kind: str, input_sha256: str, fail_once: str | None = None):
        from bertexport.shipping.runtime import Artifact, Predictor

        self.art = Artifact(artifact, threads=threads, trusted_key=trusted_key)
        self.art.runner.activate()
        self.pred = Predictor(self.art, batch_size=batch_size, **options)
        self.inp, self.kind, self.input_sha256, self.checked = Path(inp), kind, input_sha256, False
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
            texts = read_chunk(self.inp, self.kind, json.loads(str(start)))
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
            predictor_options: dict | None = None, _fail_once: str | None = None) -> dict:
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
                   threads=threads, trusted_key=trusted_key)
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
                                 job.predictor_options, str(Path(inp).resolve()), job.scan.kind, job.scan.sha256,
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
