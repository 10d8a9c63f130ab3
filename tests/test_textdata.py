import json

import pytest

from bertexport.core.errors import UserError
from bertexport.core.textdata import TextFile, builtin_calibration, builtin_samples, load_texts, sample


def test_builtin_sets():
    assert len(builtin_samples()) >= 40
    cal = builtin_calibration()
    assert len(cal) >= 200 and not set(cal) & set(builtin_samples())  # calibrate and validate on different text


def test_formats(tmp_path):
    (tmp_path / "a.txt").write_text("one\n\n two \r\n")
    ts = load_texts(tmp_path / "a.txt")  # a text as written, without its line end; a blank one skipped, counted
    assert ts.texts == ["one", " two "] and ts.labels is None and ts.skipped == {"empty text": 1}
    (tmp_path / "b.csv").write_text('review,fresh\n"good, really",1\nbad,0\n,1\n')
    ts = load_texts(tmp_path / "b.csv")
    assert ts.texts == ["good, really", "bad"] and ts.labels == ["1", "0"] and ts.skipped == {"empty text": 1}
    (tmp_path / "c.jsonl").write_text('{"text": "x", "label": "pos"}\n\n{"text": "y", "label": "neg"}\n')
    ts = load_texts(tmp_path / "c.jsonl")
    assert ts.texts == ["x", "y"] and ts.labels == ["pos", "neg"] and ts.skipped == {}


CORPUS = ["first text", 'with "quotes", a comma\tand a tab', "  indented, kept as written", "", "ünïcödé ✓", "last"]
LABELS = ["a", "b", "a", "b", "a", "b"]


def _every_format(folder, text="text", label="label", pair=None):
    """The same rows written in every format the reader takes."""
    import csv

    import pyarrow as pa
    import pyarrow.parquet as pq

    cols = {text: CORPUS, label: LABELS} | ({pair: [t.upper() for t in CORPUS]} if pair else {})
    records = [dict(zip(cols, values)) for values in zip(*cols.values())]
    (folder / "in.txt").write_text("\n".join(CORPUS) + "\n")
    (folder / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (folder / "in.json").write_text(json.dumps(records))
    for suffix, delimiter in ((".csv", ","), (".tsv", "\t")):
        with open(folder / f"in{suffix}", "w", newline="") as f:
            w = csv.DictWriter(f, list(cols), delimiter=delimiter)
            w.writeheader()
            w.writerows(records)
    pq.write_table(pa.table(cols), folder / "in.parquet", row_group_size=4)
    return ["txt", "jsonl", "json", "csv", "tsv", "parquet"]


def test_every_format_reads_the_same_rows(tmp_path):
    usable = [t for t in CORPUS if t]
    for kind in _every_format(tmp_path):
        ts = load_texts(tmp_path / f"in.{kind}")
        assert ts.texts == usable and ts.skipped == {"empty text": 1}, kind
        if kind != "txt":
            assert ts.labels == [lab for t, lab in zip(CORPUS, LABELS) if t], kind


def test_reading_resumes_at_any_rows_position(tmp_path):
    """What a bulk run relies on: a row's position read back gives the rest of the file."""
    for kind in _every_format(tmp_path):
        source = TextFile(tmp_path / f"in.{kind}")
        rows = list(source.rows())
        assert [r.text for r in rows] == [t or None for t in CORPUS], kind
        for i, row in enumerate(rows):
            position = json.loads(json.dumps(row.position))  # positions travel as JSON (to Ray workers)
            assert [r.text for r in TextFile(tmp_path / f"in.{kind}").rows(position)] == [r.text for r in rows[i:]], (kind, i)


def test_columns_are_chosen_by_name(tmp_path):
    for kind in _every_format(tmp_path, text="body", label="stars", pair="hypothesis"):
        if kind == "txt":
            with pytest.raises(UserError, match="one text per line and has no columns for --text-column"):
                TextFile(tmp_path / "in.txt", text_column="body")
            continue
        with pytest.raises(UserError, match="has no .text. (column|field)"):
            load_texts(tmp_path / f"in.{kind}")
        ts = load_texts(tmp_path / f"in.{kind}", text_column="body", label_column="stars", pair_column="hypothesis")
        usable = [i for i, t in enumerate(CORPUS) if t]
        assert ts.texts == [CORPUS[i] for i in usable], kind
        assert ts.labels == [LABELS[i] for i in usable] and ts.pairs == [CORPUS[i].upper() for i in usable], kind
        with pytest.raises(UserError, match="no (column|field) 'title'"):
            load_texts(tmp_path / f"in.{kind}", text_column="body", label_column="title")


def test_bad_inputs(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_texts(tmp_path / "missing.txt")
    (tmp_path / "e.txt").write_text("\n\n")
    with pytest.raises(UserError, match="no usable text"):
        load_texts(tmp_path / "e.txt")
    (tmp_path / "n.csv").write_text("a,b\n1,2\n")
    with pytest.raises(UserError, match="has no 'text' column"):
        load_texts(tmp_path / "n.csv")
    with pytest.raises(UserError, match="no column 'body'"):
        load_texts(tmp_path / "n.csv", text_column="body")


@pytest.mark.parametrize("name,content,says", [
    ("x.txt", b"fine\n\xff\xfe broken\nalso fine\n", "x.txt:2 is not valid UTF-8"),
    ("x.txt", b"fine\nbell \x07 here\n", "x.txt:2 is not text: control characters"),
    ("x.csv", b"text\nfine\nnul\x00\n", "x.csv:3 is not text: NUL bytes"),
    ("x.jsonl", b'{"text": "a"}\nnot json\n', "x.jsonl:2 is not valid JSON"),
    ("x.jsonl", b'{"text": "a"}\n{"body": "b"}\n', 'x.jsonl:2 has no "text" field (fields: body)'),
    ("x.jsonl", b'{"text": "a"}\n{"text": ["b"]}\n', 'x.jsonl:2: "text" must be a string, not list'),
    ("x.json", b'{"text": "a"}', "a .json input is an array of objects"),
    ("x.json", b'[{"text": "a"},\n {"text": }]', "x.json:2 is not valid JSON"),
    ("x.json", b'[{"text": "a"}, "b"]', "x.json item 2 is not a JSON object"),
])
def test_what_is_not_text_is_refused_with_its_line(tmp_path, name, content, says):
    """One rule for every command: nothing is skipped silently (only empty texts, counted)."""
    (tmp_path / name).write_bytes(content)
    with pytest.raises(UserError, match=says.replace("(", r"\(").replace(")", r"\)")):
        load_texts(tmp_path / name)


def test_sample_is_reproducible():
    data = [str(i) for i in range(100)]
    assert sample(data, 10, 1) == sample(data, 10, 1) != sample(data, 10, 2)


@pytest.mark.parametrize("content,says", [
    ('text,label\ngood,1\n"never closed,0\nbad,1\n', "b.csv:3 is not valid CSV (unexpected end of data)"),
    ('text,label\ngood,1\nnot, quoted,0\n', "b.csv:3 has 3 fields where the header has 2"),
    ('text,label\n"a"b,1\n', "b.csv:2 is not valid CSV"),
])
def test_corrupt_csv_is_refused_with_its_line(tmp_path, content, says):
    (tmp_path / "b.csv").write_text(content)
    with pytest.raises(UserError, match=says.replace("(", r"\(").replace(")", r"\)")):
        load_texts(tmp_path / "b.csv")
