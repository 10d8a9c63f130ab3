"""Text sets: the built-in validation sentences and calibration text in ``calib/``, and the
one reader of users' text files (``TextFile``: .txt one per line, .csv/.tsv/.jsonl/.json/
.parquet with a text column and optional label and pair columns; streamed, positioned)."""

from __future__ import annotations

import csv
import functools
import json
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from bertexport.core.errors import UserError
from bertexport.core.resources import data_dir

TEXT_COLUMNS = ("text", "sentence", "review", "content")
LABEL_COLUMNS = ("label", "labels", "class", "fresh")


@dataclass
class TextSet:
    texts: list[str]
    labels: list | None = None
    pairs: list[str] | None = None  # second segment (text_pair) when the data has one
    source: str = ""
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count

    def describe(self) -> dict:
        return {"source": self.source, "count": len(self.texts), "skipped": self.skipped}


def builtin_samples() -> list[str]:
    """The 48 short sample sentences (``calib/samples.txt``): latency cells, quick checks."""
    return load_texts(data_dir("calib") / "samples.txt").texts


def builtin_validation() -> list[str]:
    """The built-in validation texts a profile's parity gate is judged on: the samples and
    ``calib/validation_en.txt`` (several hundred short and long English texts of many kinds
    — messages, news, reviews, questions, instructions, science, code talk; disjoint from
    the calibration text, so a build is never validated on what it was calibrated on)."""
    return builtin_samples() + load_texts(data_dir("calib") / "validation_en.txt").texts


def builtin_calibration(multilingual: bool = True) -> list[str]:
    folder = data_dir("calib")
    texts = load_texts(folder / "calibration_en.txt").texts
    if multilingual:
        texts += load_texts(folder / "calibration_multilingual.txt").texts
    return texts


def sample(texts: list[str], n: int | None, seed: int) -> list[str]:
    """``n`` texts drawn reproducibly (all of them, shuffled, when n is None or larger)."""
    rng = random.Random(seed)
    picked = list(texts)
    rng.shuffle(picked)
    return picked if n is None else picked[:n]


# ------------------------------------------------------------------ the one reader of text files
#
# Every command that reads a user's texts (run, bulk runs, validate, optimize, distill,
# convert's --samples/--calib, benchmark) reads them here, with one set of rules:
# - the format is the suffix's: .txt (one text per line; any other suffix too), .csv/.tsv (a
#   header row), .jsonl (one object per line), .json (an array of objects), .parquet;
# - the text column is the one named (--text-column), else the first of TEXT_COLUMNS present;
#   a label and a second-segment (pair) column likewise, when present;
# - a text is used as written (only the line end is not part of it); an empty or blank one
#   is skipped and counted, never an error;
# - anything else is refused (exit 2) with the file and line where it is: a line that is not
#   UTF-8 or holds NUL/control characters, broken JSON or CSV, a row with the wrong number of
#   fields, a missing or non-text text field, an unreadable Parquet file. Nothing is skipped
#   silently, so a row number means the same thing to every command.
# Files are streamed (bounded memory; a .json array is the exception), and every record
# carries its position, so a bulk run can read chunk N without reading chunks 0..N-1.

FORMATS = (".txt", ".csv", ".tsv", ".jsonl", ".json", ".parquet")  # any other suffix is read as .txt
PAIR_COLUMNS = ("text_pair", "sentence2", "text2")
_NOT_TEXT = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")  # NUL and control characters (tab and line ends are text)


def line_problem(raw: bytes) -> str | None:
    """Why one raw line is not text (None when it is)."""
    if b"\0" in raw:
        return "NUL bytes (a binary file?)"
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return f"not valid UTF-8 ({e.reason})"
    return "control characters" if _NOT_TEXT.search(line) else None


def _decoded(raw: bytes, where: str) -> str:
    """One line (with its end) as text; refused, saying where, when it is not text."""
    try:
        line = raw.decode("utf-8")
        if not _NOT_TEXT.search(line):
            return line
    except UnicodeDecodeError:
        pass
    problem = line_problem(raw)
    if problem.startswith("not valid UTF-8"):
        raise UserError(f"{where} is {problem}")
    raise UserError(f"{where} is not text: {problem}")


def in_chunks(items, size: int):
    """Lists of up to ``size`` items from any iterable (streamed)."""
    buf = []
    for item in items:
        buf.append(item)
        if len(buf) == size:
            yield buf
            buf = []
    if buf:
        yield buf


@dataclass(frozen=True)
class Row:
    """One record of a text file."""

    position: tuple  # where it starts: ``TextFile.rows(start=position)`` reads on from here (JSON-safe)
    text: str | None  # None: an empty or blank text (skipped by every command, and counted)
    label: object = None
    pair: str | None = None


def _blank(value) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


class TextFile:
    """A user's text file, opened for streaming. Opening checks what can be checked without
    reading it through (it exists, its format, its columns) and picks the columns; ``rows``
    reads it, refusing the first record that is not text with its line number."""

    def __init__(self, path: str | Path, text_column: str | None = None, label_column: str | None = None,
                 pair_column: str | None = None):
        path = Path(path).expanduser()
        if path.is_dir():
            raise UserError(f"{path} is a folder; give a text file ({', '.join(FORMATS)})")
        if not path.is_file():
            raise UserError(f"text file not found: {path}")
        if not os.access(path, os.R_OK):
            raise UserError(f"cannot read {path}: permission denied")
        self.path = path
        suffix = path.suffix.lower()
        self.kind = suffix if suffix in FORMATS else ".txt"
        self._json: list | None = None
        self._body: tuple | None = None  # where the records start (after a CSV header)
        wanted = {"text": text_column, "label": label_column, "pair": pair_column}
        if self.kind == ".txt":
            given = [f"--{k}-column" for k, v in wanted.items() if v]
            if given:
                raise UserError(f"{path} is read as one text per line and has no columns for {' and '.join(given)} "
                                "(columns need a .csv, .tsv, .jsonl, .json or .parquet file)")
            self.columns = dict.fromkeys(wanted)
            return
        names, where, field_word = self._names()
        self.columns = {
            "text": _pick(names, text_column, TEXT_COLUMNS, "text", where, field_word, required=True),
            "label": _pick(names, label_column, LABEL_COLUMNS, "label", where, field_word),
            "pair": _pick(names, pair_column, PAIR_COLUMNS, "pair", where, field_word),
        }
        if self.kind == ".parquet":
            self._check_parquet_types()

    @property
    def text_column(self) -> str | None:
        return self.columns["text"]

    # -- columns

    def _names(self) -> tuple[list[str], str, str]:
        """The column (or field) names, where they were read, and what a column is called there."""
        if self.kind in (".csv", ".tsv"):
            for _, _, header, after in self._csv_rows(None):
                names = [h.strip() for h in header]
                if names:
                    self._header, self._body = names, after
                    return names, str(self.path), "column"
            raise UserError(f"{self.path} is empty (a {self.kind} input needs a header row naming its columns)")
        if self.kind == ".jsonl":
            for _, n, line, _ in self._lines(None):
                if line.strip():
                    obj = self._object(line, f"{self.path}:{n}")
                    return [str(k) for k in obj], f"{self.path}:{n}", "field"
            raise UserError(f"{self.path} has no JSON objects (it is empty)")
        if self.kind == ".json":
            items = self._json_items()
            if not items:
                raise UserError(f"{self.path} is an empty array")
            return [str(k) for k in items[0]], f"{self.path} item 1", "field"
        return self._parquet().schema_arrow.names, str(self.path), "column"

    # -- reading

    def rows(self, start: tuple | list | None = None) -> Iterator[Row]:
        """Every record from ``start`` (a ``Row.position``; the first record when None) on."""
        start = tuple(start) if start is not None else None
        if self.kind == ".parquet":
            return self._parquet_rows(start)
        if self.kind == ".json":
            return self._json_rows(start)
        if self.kind in (".csv", ".tsv"):
            return self._table_rows(start)
        return self._line_rows(start)

    def texts(self) -> Iterator[str]:
        """The usable texts, in order (empty ones skipped)."""
        return (row.text for row in self.rows() if row.text is not None)

    def _lines(self, start):
        """(byte offset, line number, decoded line with its end, offset after it) from ``start``."""
        offset, number = start or (0, 1)
        with open(self.path, "rb") as f:
            f.seek(offset)
            for raw in f:
                line = _decoded(raw, f"{self.path}:{number}")
                yield offset, number, line.lstrip("\ufeff") if offset == 0 else line, offset + len(raw)
                offset += len(raw)
                number += 1

    def _line_rows(self, start):
        jsonl = self.kind == ".jsonl"
        for offset, n, line, _ in self._lines(start):
            line = line.rstrip("\r\n")
            if not jsonl:
                yield Row((offset, n), None if _blank(line) else line)
            elif line.strip():  # a blank line is no record
                yield self._record(self._object(line, f"{self.path}:{n}"), (offset, n), f"{self.path}:{n}")

    def _object(self, line: str, where: str) -> dict:
        try:
            obj = json.loads(line)
        except ValueError as e:
            raise UserError(f"{where} is not valid JSON ({getattr(e, 'msg', e)})") from None
        if not isinstance(obj, dict):
            raise UserError(f"{where} is not a JSON object (one object per record, with a text field)")
        return obj

    def _record(self, obj: dict, position: tuple, where: str) -> Row:
        col, lcol, pcol = self.columns["text"], self.columns["label"], self.columns["pair"]
        if col not in obj:
            raise UserError(f"{where} has no \"{col}\" field (fields: {', '.join(map(str, list(obj)[:8])) or 'none'})")
        text, pair = obj[col], obj.get(pcol) if pcol else None
        for name, value in ((col, text), (pcol, pair)):
            if value is not None and not isinstance(value, str):
                raise UserError(f"{where}: \"{name}\" must be a string, not {type(value).__name__}")
        return Row(position, None if _blank(text) else text, obj.get(lcol) if lcol else None, pair)

    def _json_items(self) -> list:
        if self._json is None:
            raw = self.path.read_bytes()
            problem = line_problem(raw.replace(b"\n", b" ").replace(b"\r", b" ").replace(b"\t", b" "))
            if problem:
                raise UserError(f"{self.path} is not text: {problem}")
            try:
                data = json.loads(raw.decode("utf-8").lstrip("\ufeff"))
            except ValueError as e:
                where = f"{self.path}:{e.lineno}" if hasattr(e, "lineno") else str(self.path)
                raise UserError(f"{where} is not valid JSON ({getattr(e, 'msg', e)})") from None
            if not isinstance(data, list):
                raise UserError(f"{self.path}: a .json input is an array of objects (or give .jsonl, one object per line)")
            for i, item in enumerate(data, 1):
                if not isinstance(item, dict):
                    raise UserError(f"{self.path} item {i} is not a JSON object")
            self._json = data
        return self._json

    def _json_rows(self, start):
        first = start[0] if start else 0
        for i, obj in enumerate(self._json_items()[first:], first):
            yield self._record(obj, (i,), f"{self.path} item {i + 1}")

    def _csv_rows(self, start):
        """(position, line number, fields, position after it) of each CSV record from ``start``;
        a malformed one is refused with the number of the line it starts on."""
        after = [start or (0, 1)]  # where the next unread line starts

        def lines():
            for _, n, line, end in self._lines(after[0]):
                after[0] = (end, n + 1)
                yield line

        reader = csv.reader(lines(), delimiter="\t" if self.kind == ".tsv" else ",", strict=True)
        while True:
            pos = after[0]
            try:
                fields = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                raise UserError(f"{self.path}:{pos[1]} is not valid CSV ({e})") from None
            yield pos, pos[1], fields, after[0]

    def _table_rows(self, start):
        index = {name: self._header.index(c) for name, c in self.columns.items() if c}
        for pos, n, fields, _ in self._csv_rows(start or self._body):
            if not fields:
                continue  # a blank line
            if len(fields) != len(self._header):
                raise UserError(f"{self.path}:{n} has {len(fields)} fields where the header has {len(self._header)} "
                                "(an unquoted delimiter or a broken quote?)")
            text = fields[index["text"]]
            yield Row(pos, None if _blank(text) else text, fields[index["label"]] if "label" in index else None,
                      fields[index["pair"]] if "pair" in index else None)

    def _parquet(self):
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            return pq.ParquetFile(self.path)
        except (pa.ArrowException, OSError, ValueError) as e:
            raise self._unreadable(e) from None

    def _unreadable(self, e) -> UserError:
        return UserError(f"{self.path} is not a readable Parquet file ({(str(e).strip().splitlines() or [type(e).__name__])[0]})")

    def _check_parquet_types(self) -> None:
        import pyarrow as pa

        schema = self._parquet().schema_arrow
        for col in (self.columns["text"], self.columns["pair"]):
            kind = schema.field(col).type if col else None
            if col and not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)):
                raise UserError(f"{self.path}: column '{col}' holds {kind}, not text")

    def _parquet_rows(self, start):
        import pyarrow as pa

        group0, row0 = start or (0, 0)
        stat = os.stat(self.path)
        columns = tuple(c for c in (self.columns["text"], self.columns["label"], self.columns["pair"]))
        for group in range(group0, self._parquet().num_row_groups):
            try:
                values = _parquet_group(str(self.path), stat.st_size, stat.st_mtime_ns, group, columns)
            except (pa.ArrowException, OSError, ValueError) as e:
                raise self._unreadable(e) from None
            texts, labels, pairs = values
            for j in range(row0 if group == group0 else 0, len(texts)):
                yield Row((group, j), None if _blank(texts[j]) else texts[j], labels[j] if labels else None,
                          pairs[j] if pairs else None)


@functools.lru_cache(maxsize=2)
def _parquet_group(path: str, size: int, mtime_ns: int, group: int, columns: tuple) -> tuple:
    """The columns (text, label, pair; None for one not read) of one row group, kept: a Ray
    actor reads every N-th chunk, mostly of the group it read last, so each group is decoded
    once per actor, not once per chunk."""
    import pyarrow.parquet as pq

    table = pq.ParquetFile(path).read_row_group(group, columns=[c for c in dict.fromkeys(columns) if c])
    return tuple(table.column(c).to_pylist() if c else None for c in columns)


def _pick(names: list[str], wanted: str | None, defaults: tuple[str, ...], what: str, where: str, field_word: str,
          required: bool = False) -> str | None:
    if wanted:
        if wanted not in names:
            raise UserError(f"{where}: no {field_word} '{wanted}' ({field_word}s: {', '.join(names) or 'none'})")
        return wanted
    found = next((d for d in defaults if d in names), None)
    if found is None and required:
        quote = '"' if field_word == "field" else "'"
        raise UserError(f"{where} has no {quote}{defaults[0]}{quote} {field_word} ({field_word}s: {', '.join(names) or 'none'}); "
                        f"name the {what} {field_word} with --{what}-column (also looked for: {', '.join(defaults[1:])})")
    return found


def load_texts(path: str | Path, text_column: str | None = None, label_column: str | None = None,
               pair_column: str | None = None) -> TextSet:
    """A whole file's usable texts, with their labels and pairs when it has those columns."""
    tf = TextFile(path, text_column, label_column, pair_column)
    texts, labels, pairs, empty = [], [], [], 0
    for row in tf.rows():
        if row.text is None:
            empty += 1
            continue
        texts.append(row.text)
        labels.append(row.label)
        pairs.append(row.pair or "")
    if not texts:
        raise UserError(f"{tf.path} has no usable text" + (f" ({empty} empty texts)" if empty else " (it is empty)"))
    return TextSet(texts, labels if tf.columns["label"] else None, pairs if tf.columns["pair"] else None, str(tf.path),
                   {"empty text": empty} if empty else {})


def label_ids(labels: list, id2label: dict[int, str] | None):
    """Map data labels to the model's ids: by name first, then by index; anything else is an error."""
    import numpy as np

    if not id2label:
        raise UserError("the model has no labels, so labelled accuracy cannot be computed")
    by_name = {str(v).lower(): k for k, v in id2label.items()}
    ids, unknown = [], set()
    for raw in labels:
        s = str(raw).strip()
        if s.lower() in by_name:
            ids.append(by_name[s.lower()])
        elif s.lstrip("-").isdigit() and int(s) in id2label:
            ids.append(int(s))
        else:
            unknown.add(s)
    if unknown:
        raise UserError(f"labels not known to the model: {', '.join(sorted(unknown)[:10])}; "
                        f"model labels: {', '.join(f'{k}={v}' for k, v in sorted(id2label.items()))}")
    return np.asarray(ids)
