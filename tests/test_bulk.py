"""Bulk inference: one machine (streamed, chunked, resumable) and a real local Ray instance
(2 CPUs on 127.0.0.1). The output file is byte-identical however it runs — here, with a
dynamic-int8 artifact whose results do depend on batch neighbours — and a bulk run refuses,
with exit 2, one line and the user's files byte-identical, every output and input it must
not touch or cannot read."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
from click.testing import CliRunner

from bertexport.shipping import bulk
from bertexport.cli import cli
from bertexport.judging.gates import Gates
from bertexport.building.convert import convert
from bertexport.building.profiles import parse_profile

# ONNX Runtime dynamic int8 with no fp32 fallback: activation scales per tensor over the
# whole batch, so a text's vector moves with its batch neighbours (checked below).
DYNAMIC_INT8 = parse_profile({"backend": "onnxruntime", "precision": "int8", "passes": [
    {"type": "ort-dynamic-quantize", "isa": "avx2", "per_channel": True}]}, "plain-int8")
ROWS = 1500  # six chunks of bulk.CHUNK_ROWS (the last one partial)


@pytest.fixture(scope="module")
def art(fp32_artifact):
    return fp32_artifact("bert", "text-classification").artifact  # shared: read only


@pytest.fixture(scope="module")
def int8_art(tiny, tmp_path_factory):
    # the gate only lets the build through (these tests need a batch-variant artifact, not an accurate
    # one): the tiny random model's int8 vectors reach cosine_min 0.889 on an AVX2-only CPU (2026-12-03)
    return convert(str(tiny("bert", "feature-extraction")), DYNAMIC_INT8, tmp_path_factory.mktemp("bulk8") / "art",
                   latency_runs=0, gates=Gates(min_cosine=0.5, min_agreement=0.5)).artifact


def _corpus(n):
    words = "the film was a quiet and remarkable study of grief with moments of light".split()
    lines = []
    for i in range(n):
        if i % 97 == 13:
            lines.append("   ")  # an empty text: skipped, not a row
        text = " ".join(words[(i % 7):(i % 7) + 3 + i % 9]) + f" number {i}"
        lines.append(text * (1 + (i % 23 == 0) * 12))  # a few long ones
    return lines


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    path = tmp_path_factory.mktemp("bulk-in") / "in.txt"
    path.write_text("\n".join(_corpus(ROWS)) + "\n")
    return path


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _run(*args):
    return CliRunner().invoke(cli, ["run", *map(str, args)])


def _refused(r, *needles):
    """Exit 2 with exactly one line on stderr, no traceback, saying what it must."""
    assert r.exit_code == 2, (r.exit_code, r.output, r.stderr)
    line = r.stderr.strip()
    assert line and "\n" not in line and "Traceback" not in r.output + r.stderr, r.stderr
    for needle in needles:
        assert needle in line, line
    return line


def _snapshot(folder):
    """Every file of a folder with its bytes (hidden ones too): compared before and after."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


# ---------------------------------------------------------------- byte-identical output


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray", reason="Ray tests need bertexport[ray]")
    assert os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") == "0"  # conftest: loopback only
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    assert ray.nodes()[0]["NodeManagerAddress"] == "127.0.0.1"
    yield ray
    ray.shutdown()


def test_the_int8_artifact_is_batch_variant(int8_art):
    """The test below has teeth: with this artifact a text's vector changes with its batch."""
    import numpy as np

    from bertexport.shipping.runtime import Artifact, Predictor

    sample = [t for t in _corpus(64) if t.strip()]
    with Artifact(int8_art) as a:
        pred = Predictor(a, batch_size=16)
        together = pred.predict(sample)
        alone = [pred.predict([t])[0] for t in sample]
    diff = max(np.abs(np.subtract(x["embedding"], y["embedding"])).max() for x, y in zip(together, alone))
    assert diff > 1e-4, diff


def _interrupted_run(art, texts, out):
    """A real run stopped with SIGINT once it has written its first chunk (or more)."""
    proc = subprocess.Popen([sys.executable, "-m", "bertexport", "run", str(art), "--file", str(texts), "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        if out.exists() and out.read_bytes().count(b"\n") >= bulk.CHUNK_ROWS:
            proc.send_signal(signal.SIGINT)
            break
        time.sleep(0.005)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "--resume continues it" in err and "Traceback" not in err, err
    written = out.read_bytes().count(b"\n")
    assert bulk.CHUNK_ROWS <= written < ROWS - 10  # really stopped mid-run
    return written


def test_output_is_byte_identical_local_ray_and_resumed(local_ray, int8_art, texts, tmp_path):
    local = tmp_path / "local.jsonl"
    r = _run(int8_art, "--file", texts, "--out", local)
    assert r.exit_code == 0, r.output + r.stderr
    rows = _rows(local)
    usable = [t for t in texts.read_text().splitlines() if t.strip()]
    assert len(rows) == len(usable) == ROWS and "empty texts skipped" in r.output
    assert [x["row"] for x in rows] == list(range(ROWS))
    assert [x["text_prefix"] for x in rows] == [t[:40] for t in usable]

    one = bulk.run_ray(int8_art, texts, tmp_path / "ray1.jsonl", workers=1)
    two = bulk.run_ray(int8_art, texts, tmp_path / "ray2.jsonl", workers=2)
    assert one["rows"] == two["rows"] == ROWS

    resumed = tmp_path / "resumed.jsonl"
    written = _interrupted_run(int8_art, texts, resumed)
    r = _run(int8_art, "--file", texts, "--out", resumed, "--resume")
    assert r.exit_code == 0, r.output + r.stderr
    kept = written // bulk.CHUNK_ROWS * bulk.CHUNK_ROWS
    assert f"({ROWS - kept} new" in r.output, r.output

    # killed mid-write: a torn line and a partial chunk; resumed on Ray from the chunk boundary
    torn = tmp_path / "torn.jsonl"
    torn.write_bytes(b"".join(local.read_bytes().splitlines(keepends=True)[:300]) + b'{"row": 300, "text_pr')
    side = json.loads((tmp_path / ".local.jsonl.bulk.json").read_text())
    (tmp_path / ".torn.jsonl.bulk.json").write_text(json.dumps({**side, "output": "torn.jsonl", "state": "running"}))
    again = bulk.run_ray(int8_art, texts, torn, workers=2, resume=True)
    assert again["resumed_from"] == bulk.CHUNK_ROWS and again["new_rows"] == ROWS - bulk.CHUNK_ROWS

    reference = local.read_bytes()
    for other in ("ray1.jsonl", "ray2.jsonl", "resumed.jsonl", "torn.jsonl"):
        assert (tmp_path / other).read_bytes() == reference, other
        assert _rows(tmp_path / other) == rows  # every value, not only the labels
    for name in ("ray1.jsonl", "ray2.jsonl", "resumed.jsonl", "torn.jsonl"):
        assert json.loads((tmp_path / f".{name}.bulk.json").read_text())["state"] == "complete"

    bulk.run_local(int8_art, texts, tmp_path / "local.parquet")  # a .parquet output too: the same bytes either way
    bulk.run_ray(int8_art, texts, tmp_path / "ray.parquet", workers=2)
    assert (tmp_path / "ray.parquet").read_bytes() == (tmp_path / "local.parquet").read_bytes()


def test_killed_ray_worker_loses_and_duplicates_nothing(local_ray, int8_art, texts, tmp_path):
    marker = tmp_path / "killed.pid"
    bulk.run_ray(int8_art, texts, tmp_path / "ray.jsonl", workers=2, _fail_once=str(marker))
    assert marker.is_file()  # a worker process really died mid-run (os._exit on its first batch)
    bulk.run_local(int8_art, texts, tmp_path / "local.jsonl")
    assert (tmp_path / "ray.jsonl").read_bytes() == (tmp_path / "local.jsonl").read_bytes()


def test_every_input_format_gives_the_same_rows(art, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    corpus = [t for t in _corpus(300) if t.strip()] + ['with "quotes", a comma\tand a tab']
    (tmp_path / "in.txt").write_text("\n".join(corpus) + "\n")
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(corpus)))
    with open(tmp_path / "in.csv", "w", newline="") as f:
        import csv

        w = csv.writer(f)
        w.writerow(["id", "text"])
        w.writerows(enumerate(corpus))
    pq.write_table(pa.table({"text": corpus, "id": list(range(len(corpus)))}), tmp_path / "in.parquet", row_group_size=100)
    for kind in ("txt", "jsonl", "csv", "parquet"):
        stats = bulk.run_local(art, tmp_path / f"in.{kind}", tmp_path / f"out-{kind}.jsonl")
        assert stats["rows"] == len(corpus)
    ref = (tmp_path / "out-txt.jsonl").read_bytes()
    assert all((tmp_path / f"out-{k}.jsonl").read_bytes() == ref for k in ("jsonl", "csv", "parquet"))

    stats = bulk.run_local(art, tmp_path / "in.parquet", tmp_path / "out.parquet")
    table = pq.read_table(tmp_path / "out.parquet")
    assert stats["rows"] == len(corpus) and table.column("row").to_pylist() == list(range(len(corpus)))
    assert [json.loads(x)["label"] for x in table.column("result").to_pylist()] == [x["label"] for x in _rows(tmp_path / "out-txt.jsonl")]
    meta = json.loads(table.schema.metadata[b"bertexport.shipping.bulk"])
    side = json.loads((tmp_path / ".out.parquet.bulk.json").read_text())
    assert meta["input_sha256"] == side["input_sha256"] and meta["artifact_sha256"] == side["artifact_sha256"]
    assert not (tmp_path / ".out.parquet.partial.jsonl").exists()


def test_run_reads_the_same_texts_with_and_without_out(art, tmp_path):
    """One reader: ``run --file x.csv`` streams the text column (not the CSV's raw lines), the
    same texts in the same order as ``run --file x.csv --out y.jsonl``; ``--text-column`` names
    another column in both modes."""
    import csv

    texts = ["a quiet and remarkable film", 'with "quotes", a comma, and more', "", "  kept as written", "the end"]
    with open(tmp_path / "x.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "text", "label", "body"])
        w.writerows((i, t, i % 2, f"body {i}") for i, t in enumerate(texts))
    usable = [t[:bulk.PREFIX_CHARS] for t in texts if t]
    for column, expected in ((None, usable), ("body", [f"body {i}" for i in range(len(texts))])):
        named = ["--text-column", column] if column else []
        r = _run(art, "--file", tmp_path / "x.csv", *named, "--json", tmp_path / "direct.jsonl")
        assert r.exit_code == 0, r.output + r.stderr
        r = _run(art, "--file", tmp_path / "x.csv", *named, "--out", tmp_path / f"bulk-{column}.jsonl")
        assert r.exit_code == 0, r.output + r.stderr
        direct, in_bulk = _rows(tmp_path / "direct.jsonl"), _rows(tmp_path / f"bulk-{column}.jsonl")
        assert [d["text_prefix"] for d in direct] == [b["text_prefix"] for b in in_bulk] == expected
        assert [d["label"] for d in direct] == [b["label"] for b in in_bulk]
        assert [d["score"] for d in direct] == pytest.approx([b["score"] for b in in_bulk], abs=1e-4)
        plain = _run(art, "--file", tmp_path / "x.csv", *named)  # the one-line-per-text output reads them too
        assert plain.exit_code == 0 and len(plain.output.strip().splitlines()) == len(expected)
    _refused(_run(art, "--file", tmp_path / "x.csv", "--text-column", "title"), "no column 'title' (columns: id, text, label, body)")
    _refused(_run(art, "--file", tmp_path / "x.csv", "--text-column", "title", "--out", tmp_path / "t.jsonl"), "no column 'title'")


def test_an_output_where_nothing_can_be_written_is_refused_before_work(art, texts, tmp_path):
    """Under /proc no file can be made: exit 2 before the model loads (once an internal error)."""
    _refused(_run(art, "--file", texts, "--out", "/proc/out.jsonl"), "cannot write the --out file under /proc")
    _refused(_run(art, "--file", texts, "--out", "/proc/out.parquet", "--ray"), "cannot write the --out file under /proc")
    _refused(_run(art, "good film", "--json", "/proc/out.json"), "cannot write --json /proc/out.json")
    done = subprocess.run([sys.executable, "-m", "bertexport", "run", str(art), "--file", str(texts), "--out", "/proc/out.jsonl"],
                          capture_output=True, text=True, timeout=300)  # the installed entry point, as a user runs it
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, (done.returncode, done.stderr)
    assert "cannot write the --out file under /proc" in done.stderr and "Traceback" not in done.stderr


# ---------------------------------------------------------------- who owns --out
# ---------------------------------------------------------------- who owns --out


def test_a_users_own_file_is_never_touched(art, texts, tmp_path):
    out = tmp_path / "results.jsonl"
    out.write_text('{"mine": 1}\n{"mine": 2}\n')
    before = _snapshot(tmp_path)
    _refused(_run(art, "--file", texts, "--out", out), "not written by bertexport")
    _refused(_run(art, "--file", texts, "--out", out, "--resume"), "not written by bertexport")
    _refused(_run(art, "--file", texts, "--out", out, "--force"), "not written by bertexport")
    assert _snapshot(tmp_path) == before
    pq_out = tmp_path / "mine.parquet"
    pq_out.write_bytes(b"PAR1 something of mine")
    before = _snapshot(tmp_path)
    _refused(_run(art, "--file", texts, "--out", pq_out, "--force"), "not written by bertexport")
    assert _snapshot(tmp_path) == before


def test_resume_continues_only_the_same_artifact_input_and_options(art, int8_art, texts, tmp_path):
    out = tmp_path / "out.jsonl"
    assert _run(art, "--file", texts, "--out", out).exit_code == 0
    other_input = tmp_path / "other.txt"
    other_input.write_text(texts.read_text() + "one more line\n")
    before = _snapshot(tmp_path)
    _refused(_run(int8_art, "--file", texts, "--out", out, "--resume"), "another artifact", "left as it is")
    _refused(_run(art, "--file", other_input, "--out", out, "--resume"), "another input", "left as it is")
    _refused(_run(art, "--file", texts, "--out", out, "--resume", "--batch-size", "8"), "batch_size 16 -> 8")
    _refused(_run(art, "--file", texts, "--out", out), "--resume continues it, --force replaces it")
    _refused(_run(art, "--file", texts, "--out", out, "--resume", "--force"), "give one of them")
    assert _snapshot(tmp_path) == before
    r = _run(art, "--file", texts, "--out", out, "--resume")  # the same run, complete: nothing to do
    assert r.exit_code == 0 and "(0 new" in r.output and _snapshot(tmp_path) == before

    with open(out, "a") as f:  # the user edits the finished output: it is no longer only bertexport's
        f.write('{"note": "mine"}\n')
    before = _snapshot(tmp_path)
    _refused(_run(art, "--file", texts, "--out", out, "--force"), "changed since bertexport wrote it")
    assert _snapshot(tmp_path) == before


def test_force_replaces_bertexports_own_output(art, texts, tmp_path):
    out = tmp_path / "out.jsonl"
    assert _run(art, "--file", texts, "--out", out, "--batch-size", "8").exit_code == 0
    r = _run(art, "--file", texts, "--out", out, "--force")
    assert r.exit_code == 0, r.output + r.stderr
    assert json.loads((tmp_path / ".out.jsonl.bulk.json").read_text())["options"]["batch_size"] == 16
    assert len(_rows(out)) == ROWS


def test_a_partial_output_that_is_not_bertexports_rows_is_refused(art, texts, tmp_path):
    out = tmp_path / "out.jsonl"
    assert _run(art, "--file", texts, "--out", out).exit_code == 0
    side = tmp_path / ".out.jsonl.bulk.json"
    side.write_text(json.dumps({**json.loads(side.read_text()), "state": "running"}))
    out.write_bytes(b"".join(out.read_bytes().splitlines(keepends=True)[:10]) + b'{"row": 99, "mine": true}\n')
    before = _snapshot(tmp_path)
    _refused(_run(art, "--file", texts, "--out", out, "--resume"), "out.jsonl:11 is not a row bertexport wrote")
    _refused(_run(art, "--file", texts, "--out", out, "--force"), "is not a row bertexport wrote")
    assert _snapshot(tmp_path) == before


# ---------------------------------------------------------------- inputs


def _write(path, content):
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def _corrupt_parquet(path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": [f"row {i}" for i in range(50)]}), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # cut short, as an interrupted copy
    return path


BAD_INPUTS = {
    "no-text-field.jsonl": ('{"body": "a"}\n{"body": "b"}\n', "no-text-field.jsonl:1 has no \"text\" field (fields: body)"),
    "only-empty.jsonl": ('{"text": ""}\n{"text": "  "}\n{"text": null}\n', "has no usable rows (3 empty texts)"),
    "blank.txt": ("\n  \n\n", "has no usable rows"),
    "empty.txt": ("", "has no usable rows (it is empty)"),
    "bad-json.jsonl": ('{"text": "a"}\n{"text": "b"}\n{"text": "c"\n', "bad-json.jsonl:3 is not valid JSON"),
    "not-object.jsonl": ('{"text": "a"}\n["b"]\n', "not-object.jsonl:2 is not a JSON object"),
    "number.jsonl": ('{"text": "a"}\n{"text": 7}\n', "number.jsonl:2: \"text\" must be a string, not int"),
    "latin1.jsonl": (b'{"text": "a"}\n{"text": "caf\xe9"}\n', "latin1.jsonl:2 is not valid UTF-8"),
    "binary.txt": (b"fine\nbad\x00line\n", "binary.txt:2 is not text"),
    "quote.csv": ('id,text\n1,fine\n2,"never closed\n3,more\n', "quote.csv:3 is not valid CSV"),
    "fields.csv": ("id,text\n1,fine\n2,a, b and c\n", "fields.csv:3 has 3 fields where the header has 2"),
    "no-text.csv": ("id,body\n1,x\n", "has no 'text' column (columns: id, body)"),
    "garbage.parquet": (b"this is not parquet at all" * 10, "garbage.parquet is not a readable Parquet file"),
    "cut.parquet": (_corrupt_parquet, "cut.parquet is not a readable Parquet file"),
    "ints.parquet": (None, "column 'text' holds int64, not text"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_inputs_are_refused_with_one_line(art, tmp_path, name):
    import pyarrow as pa
    import pyarrow.parquet as pq

    content, says = BAD_INPUTS[name]
    inp = tmp_path / name
    if callable(content):
        content(inp)
    elif content is None:
        pq.write_table(pa.table({"text": [1, 2, 3]}), inp)
    else:
        _write(inp, content)
    before = _snapshot(tmp_path)
    _refused(_run(art, "--file", inp, "--out", tmp_path / "out.jsonl"), says)
    assert _snapshot(tmp_path) == before  # no output, no sidecar, the input as it was


# ---------------------------------------------------------------- Ray clusters that can't serve


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_ray_address_is_refused_fast(art, texts, tmp_path):
    t0 = time.monotonic()
    _refused(_run(art, "--file", texts, "--out", tmp_path / "o.jsonl", "--ray", f"127.0.0.1:{_free_port()}"),
             "no Ray cluster answers there")
    assert time.monotonic() - t0 < 60
    assert list(tmp_path.iterdir()) == []


def test_something_that_is_not_ray_is_refused_within_a_minute(art, texts, tmp_path):
    """A port that accepts connections but speaks no Ray: refused by the child-process probe
    (Ray's own client would retry for minutes and then end the whole process)."""
    pytest.importorskip("ray")
    server = socket.create_server(("127.0.0.1", 0))
    held = []
    stop = threading.Event()

    def accept():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                pass

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        t0 = time.monotonic()
        _refused(_run(art, "--file", texts, "--out", tmp_path / "o.jsonl", "--ray", f"127.0.0.1:{server.getsockname()[1]}"),
                 "cannot join this Ray cluster")
        assert time.monotonic() - t0 < 60
    finally:
        stop.set()
        thread.join()
        for c in held:
            c.close()
        server.close()
    assert list(tmp_path.iterdir()) == []
