import pytest

from bertexport.core.errors import UserError
from bertexport.core.textdata import builtin_calibration, builtin_samples, load_texts, sample


def test_builtin_sets():
    assert len(builtin_samples()) >= 40
    cal = builtin_calibration()
    assert len(cal) >= 200 and not set(cal) & set(builtin_samples())  # calibrate and validate on different text


def test_formats(tmp_path):
    (tmp_path / "a.txt").write_text("one\n\n two \n")
    assert load_texts(tmp_path / "a.txt").texts == ["one", "two"]
    (tmp_path / "b.csv").write_text('review,fresh\n"good, really",1\nbad,0\n,1\n')
    ts = load_texts(tmp_path / "b.csv")
    assert ts.texts == ["good, really", "bad"] and ts.labels == ["1", "0"] and ts.skipped == {"empty text": 1}
    (tmp_path / "c.jsonl").write_text('{"text": "x", "label": "pos"}\nnot json\n{"text": "y", "label": "neg"}\n')
    ts = load_texts(tmp_path / "c.jsonl")
    assert ts.texts == ["x", "y"] and ts.labels == ["pos", "neg"] and ts.skipped == {"invalid json lines": 1}


def test_bad_inputs(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_texts(tmp_path / "missing.txt")
    (tmp_path / "e.txt").write_text("\n\n")
    with pytest.raises(UserError, match="no usable text"):
        load_texts(tmp_path / "e.txt")
    (tmp_path / "n.csv").write_text("a,b\n1,2\n")
    with pytest.raises(UserError, match="no text column"):
        load_texts(tmp_path / "n.csv")
    with pytest.raises(UserError, match="no column 'body'"):
        load_texts(tmp_path / "n.csv", text_column="body")


def test_non_utf8_lines_are_skipped_and_counted(tmp_path):
    (tmp_path / "x.txt").write_bytes(b"fine\n\xff\xfe broken\nalso fine\n")
    ts = load_texts(tmp_path / "x.txt")
    assert ts.texts == ["fine", "also fine"] and ts.skipped == {"lines not text (non-UTF-8 or control characters)": 1}


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
