"""Text sets: the built-in validation sentences and calibration text in ``calib/``, and
loaders for user files (.txt one per line, .csv/.tsv with a named text column and an
optional label column, .jsonl with a text field)."""

from __future__ import annotations

import csv
import io
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

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
    """The validation sentences every convert checks parity on."""
    return load_texts(data_dir("calib") / "samples.txt").texts


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


_CONTROL = {c for c in range(32) if c not in (9, 10, 13)} | {127}
MAX_BAD_FRACTION = 0.05  # more bad lines than this (and more than 3): the file is not text


def line_problem(raw: bytes) -> str | None:
    """Why one raw line is not text (None when it is)."""
    if b"\0" in raw:
        return "NUL bytes (a binary file?)"
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return f"not valid UTF-8 ({e.reason})"
    if any(ord(ch) in _CONTROL for ch in line.lstrip("\ufeff")):
        return "control characters"
    return None


def _decode_lines(raw: bytes, path: Path) -> tuple[list[str], int]:
    """Lines of a text file. A few bad lines (not UTF-8, control characters) are skipped
    and counted; a file with NUL bytes or with many bad lines is binary and refused."""
    lines, bad, first_bad = [], 0, None
    raw_lines = raw.splitlines()
    for n, line in enumerate(raw_lines, 1):
        problem = line_problem(line)
        if problem is None:
            lines.append(line.decode("utf-8"))
            continue
        bad += 1
        first_bad = first_bad or (n, problem)
        if "NUL" in problem:
            raise UserError(f"{path} is not a text file: line {n} has {problem}")
    if bad > max(3, MAX_BAD_FRACTION * len(raw_lines)):
        n, problem = first_bad
        raise UserError(f"{path} is not a text file: {bad} of {len(raw_lines)} lines are not text "
                        f"(first: line {n}, {problem})")
    if lines and lines[0].startswith("\ufeff"):
        lines[0] = lines[0][1:]
    return lines, bad


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


def iter_text_lines(path: Path, chunk: int = 256):
    """A text file's non-empty lines in chunks, streamed (bounded memory); the first line
    that is not text is refused with its number."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path} is a folder; give a text file (one text per line)")
    if not path.is_file():
        raise UserError(f"file not found: {path}")
    def lines():
        with open(path, "rb") as f:
            for n, raw in enumerate(f, 1):
                raw = raw.rstrip(b"\r\n")
                problem = line_problem(raw)
                if problem:
                    raise UserError(f"{path}:{n} is not text: {problem}")
                line = raw.decode("utf-8").lstrip("\ufeff") if n == 1 else raw.decode("utf-8")
                if line.strip():
                    yield line

    yield from in_chunks(lines(), chunk)


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


def load_texts(path: str | Path, text_column: str | None = None, label_column: str | None = None,
               pair_column: str | None = None) -> TextSet:
    path = Path(path).expanduser()
    if path.is_dir():
        raise UserError(f"{path} is a folder; give a text file (.txt, .csv, .tsv or .jsonl)")
    if not path.is_file():
        raise UserError(f"text file not found: {path}")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read {path}: {e}") from e
    lines, bad = _decode_lines(raw, path)
    skipped = {"lines not text (non-UTF-8 or control characters)": bad} if bad else {}
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        ts = _load_table(lines, "\t" if suffix == ".tsv" else ",", path, text_column, label_column, pair_column)
    elif suffix == ".jsonl":
        ts = _load_jsonl(lines, path, text_column, label_column, pair_column)
    else:
        ts = TextSet([l.strip() for l in lines if l.strip()])
    ts.source = str(path)
    ts.skipped = skipped | ts.skipped
    if not ts.texts:
        raise UserError(f"{path} has no usable text" + (f" ({bad} lines that are not text skipped)" if bad else ""))
    return ts


def _pick(names: list[str], wanted: str | None, defaults: tuple[str, ...], what: str, path: Path, required: bool):
    if wanted:
        if wanted not in names:
            raise UserError(f"{path}: no column '{wanted}' (columns: {', '.join(names)})")
        return wanted
    for d in defaults:
        if d in names:
            return d
    if required:
        raise UserError(f"{path}: no {what} column among {', '.join(names)}; expected one of {', '.join(defaults)} "
                        f"(rename the column, or name it with --{what}-column where the command has that option)")
    return None


def _load_table(lines, delim, path, text_col, label_col, pair_col) -> TextSet:
    # strict: a broken quote is an error, not a field that swallows the rest of the file
    reader = csv.DictReader(io.StringIO("\n".join(lines)), delimiter=delim, strict=True)
    try:
        names = reader.fieldnames or []
    except csv.Error as e:
        raise UserError(f"{path}:{reader.line_num} is not valid CSV ({e})") from None
    if not names:
        raise UserError(f"{path} is empty")
    tcol = _pick(names, text_col, TEXT_COLUMNS, "text", path, True)
    lcol = _pick(names, label_col, LABEL_COLUMNS, "label", path, False)
    pcol = _pick(names, pair_col, ("text_pair", "sentence2", "text2"), "pair", path, False)
    return _rows(_checked_rows(reader, path), tcol, lcol, pcol)


def _checked_rows(reader: csv.DictReader, path: Path):
    """The rows of a CSV; a malformed one (broken quote, more fields than the header) is
    refused with its line number rather than read as shifted columns."""
    while True:
        line = reader.line_num + 1  # where the next record starts (after blank lines, a bit later)
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise UserError(f"{path}:{line} is not valid CSV ({e})") from None
        if None in row:  # DictReader's key for fields beyond the header
            raise UserError(f"{path}:{reader.line_num} has {len(reader.fieldnames) + len(row[None])} fields where the "
                            f"header has {len(reader.fieldnames)} (an unquoted delimiter or a broken quote?)")
        yield row


def _load_jsonl(lines, path, text_col, label_col, pair_col) -> TextSet:
    rows, bad = [], 0
    for line in lines:
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(obj, dict):
            rows.append(obj)
        else:
            bad += 1
    if not rows:
        raise UserError(f"{path} has no JSON objects")
    names = sorted({k for r in rows for k in r})
    tcol = _pick(names, text_col, TEXT_COLUMNS, "text", path, True)
    lcol = _pick(names, label_col, LABEL_COLUMNS, "label", path, False)
    pcol = _pick(names, pair_col, ("text_pair", "sentence2", "text2"), "pair", path, False)
    ts = _rows(rows, tcol, lcol, pcol)
    if bad:
        ts.skipped["invalid json lines"] = bad
    return ts


def _rows(rows, tcol, lcol, pcol) -> TextSet:
    texts, labels, pairs, empty = [], [], [], 0
    for r in rows:
        t = (r.get(tcol) or "")
        t = t.strip() if isinstance(t, str) else str(t)
        if not t:
            empty += 1
            continue
        texts.append(t)
        if lcol:
            labels.append(r.get(lcol))
        if pcol:
            pairs.append(str(r.get(pcol) or ""))
    ts = TextSet(texts, labels if lcol else None, pairs if pcol else None)
    if empty:
        ts.skipped["empty text"] = empty
    return ts
