"""Bulk inference: one machine (streamed, resumable by output row count) and a real local
Ray instance (2 CPUs on 127.0.0.1): Ray's output equals the single-machine output row
for row, and a worker killed mid-run loses and duplicates nothing."""

from __future__ import annotations

import json
import os

import pytest
from click.testing import CliRunner

from bertexport import bulk
from bertexport.cli import cli
from bertexport.convert import convert


@pytest.fixture(scope="module")
def art(tiny, tmp_path_factory):
    return convert(str(tiny("bert", "text-classification")), "ort-fp32", tmp_path_factory.mktemp("bulk") / "art",
                   latency_runs=0).artifact


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    path = tmp_path_factory.mktemp("bulk-in") / "in.txt"
    words = "the film was a quiet and remarkable study of grief with moments of light".split()
    path.write_text("\n".join(" ".join(words[(i % 7):(i % 7) + 3 + i % 9]) + f" number {i}" for i in range(300)) + "\n")
    return path


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _same(a, b):
    assert [r["row"] for r in a] == [r["row"] for r in b] == list(range(len(a)))
    assert [r["text_prefix"] for r in a] == [r["text_prefix"] for r in b]
    assert [r["label"] for r in a] == [r["label"] for r in b]
    assert all(abs(x["score"] - y["score"]) < 1e-4 for x, y in zip(a, b))  # batch padding differs, not answers


def test_single_machine_streams_and_resumes(art, texts, tmp_path):
    full = tmp_path / "full.jsonl"
    r = CliRunner().invoke(cli, ["run", str(art), "--file", str(texts), "--out", str(full)])
    assert r.exit_code == 0 and "300 rows" in r.output, r.output
    rows = _rows(full)
    assert len(rows) == 300 and rows[5]["text_prefix"] == texts.read_text().splitlines()[5][:40]
    cut = tmp_path / "cut.jsonl"  # as if the run had been killed after 100 rows
    cut.write_text("\n".join(full.read_text().splitlines()[:100]) + "\n")
    r = CliRunner().invoke(cli, ["run", str(art), "--file", str(texts), "--out", str(cut), "--resume"])
    assert r.exit_code == 0 and "200 new" in r.output, r.output
    _same(_rows(cut), rows)
    r = CliRunner().invoke(cli, ["run", str(art), "--file", str(texts), "--out", str(full)])
    assert r.exit_code == 2 and "--resume continues it" in r.stderr


def test_parquet_in_and_out(art, texts, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    inp = tmp_path / "in.parquet"
    pq.write_table(pa.table({"text": texts.read_text().splitlines(), "id": list(range(300))}), inp)
    stats = bulk.run_local(art, inp, tmp_path / "out.parquet")
    table = pq.read_table(tmp_path / "out.parquet").to_pylist()
    assert stats["rows"] == 300 and [t["row"] for t in table] == list(range(300))
    assert json.loads(table[0]["result"])["label"] and not (tmp_path / ".out.parquet.partial.jsonl").exists()


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray", reason="Ray tests need bertexport[ray]")
    assert os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") == "0"  # conftest: loopback only
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    assert ray.nodes()[0]["NodeManagerAddress"] == "127.0.0.1"
    yield ray
    ray.shutdown()


def test_ray_output_equals_single_machine_output(local_ray, art, texts, tmp_path):
    local = bulk.run_local(art, texts, tmp_path / "local.jsonl")
    remote = bulk.run_ray(art, texts, tmp_path / "ray.jsonl", workers=2, batch_size=32)
    assert local["rows"] == remote["rows"] == 300
    _same(_rows(tmp_path / "ray.jsonl"), _rows(tmp_path / "local.jsonl"))


def test_killed_ray_worker_loses_and_duplicates_nothing(local_ray, art, texts, tmp_path):
    marker = tmp_path / "killed.pid"
    bulk.run_ray(art, texts, tmp_path / "ray.jsonl", workers=2, batch_size=32, _fail_once=str(marker))
    assert marker.is_file()  # a worker process really died mid-run (os._exit on its first batch)
    bulk.run_local(art, texts, tmp_path / "local.jsonl")
    _same(_rows(tmp_path / "ray.jsonl"), _rows(tmp_path / "local.jsonl"))
