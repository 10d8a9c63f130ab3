"""benchmark: report schema, outputs (JSON, Markdown, PNG) and bad inputs. No timing assertions."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from bertexport.benchmark import SCHEMA, benchmark, write_outputs
from bertexport.cli import cli
from bertexport.convert import convert
from bertexport.errors import UserError
from bertexport.compare import Gates
from tests.torchfree import ASSERT_TORCH_FREE, BLOCK_TORCH

TOP_KEYS = {"schema", "created", "bertexport_version", "model", "config", "environment", "candidates", "cells", "accuracy"}
RESULT_KEYS = {"latency", "throughput", "speedup"}
LATENCY_KEYS = {"count", "total", "mean", "stdev", "p50", "p90", "p95", "p99", "min", "max", "unit", "values"}


@pytest.fixture(scope="module")
def arts(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    ckpt = tiny("distilbert", "text-classification")
    a = convert(str(ckpt), "ort-fp32", root / "fp32", latency_runs=0).artifact
    b = convert(str(ckpt), "ort-int8", root / "int8", latency_runs=0,
                gates=Gates(min_cosine=0.9, min_agreement=0.5)).artifact
    data = root / "d.tsv"
    data.write_text("sentence\tlabel\n" + "\n".join(f"line {i} of text\t{['negative', 'neutral', 'positive'][i % 3]}" for i in range(12)))
    texts = root / "t.txt"
    texts.write_text("short one\na somewhat longer line of text for timing\nmid length line\n")
    return {"ckpt": ckpt, "a": a, "b": b, "data": data, "texts": texts, "root": root}


def test_report_schema_and_outputs(arts, tmp_path):
    rep = benchmark(None, [arts["a"], arts["b"]], batches=[1, 2], sequences=[16], texts=arts["texts"], data=arts["data"],
                    runs=5, warmup=1)
    assert set(rep) == TOP_KEYS and rep["schema"] == SCHEMA
    assert [c["name"] for c in rep["candidates"]] == ["pytorch", "fp32", "int8"]
    assert [(c["batch"], c["sequence"]) for c in rep["cells"]] == [(1, 16), (2, 16), (1, "real"), (2, "real")]
    for cell in rep["cells"]:
        for name, r in cell["results"].items():
            assert set(r) == RESULT_KEYS and set(r["latency"]) == LATENCY_KEYS
            assert r["latency"]["count"] == 5 and len(r["latency"]["values"]) == 5
    assert rep["config"]["threads"] == 1 and rep["config"]["interleaved"] is True
    assert {"cpu", "packages", "python"} <= set(rep["environment"])
    assert rep["accuracy"]["int8"]["decisions"] == 12 and "metric_drop" in rep["accuracy"]["int8"]
    paths = write_outputs(rep, tmp_path / "out")
    assert json.loads(paths["json"].read_text())["schema"] == SCHEMA
    assert "| pytorch | 1 | 16 |" in paths["markdown"].read_text()
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_benchmark(arts, tmp_path):
    r = CliRunner().invoke(cli, ["benchmark", str(arts["a"]), "--runs", "5", "--warmup", "1", "--seq", "8",
                                 "--out", str(tmp_path / "o")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "o" / "benchmark.json").is_file()


def test_bad_inputs(arts, tmp_path):
    from tests.tinymodels import build_checkpoint

    other = build_checkpoint("distilbert", "text-classification", tmp_path / "other", tmp_path / "tok", seed=1)
    with pytest.raises(UserError, match="too few"):
        benchmark(None, [arts["a"]], runs=2)
    with pytest.raises(UserError, match="at least one artifact"):
        benchmark(str(arts["ckpt"]), [])
    with pytest.raises(UserError, match="not the checkpoint"):
        benchmark(str(other), [arts["a"]], runs=5)
    r = CliRunner().invoke(cli, ["benchmark", str(arts["a"]), "--runs", "1"])
    assert r.exit_code == 2 and "x>=5" in r.output


def test_targets_are_converted_into_the_cache_and_reused(arts):
    first = benchmark(str(arts["ckpt"]), [], targets=["ort-fp32"], runs=5, warmup=1, sequences=[8])
    again = benchmark(str(arts["ckpt"]), [], targets=["ort-fp32"], runs=5, warmup=1, sequences=[8])
    assert [c["target"] for c in first["candidates"]] == [None, "ort-fp32"]
    assert first["candidates"][1]["artifact"] == again["candidates"][1]["artifact"]


def test_device_benchmark_without_torch_and_host_comparison(arts, tmp_path):
    """On a device (torch and transformers absent) the artifacts are timed alone, in the
    same report schema; --compare pairs the host's and the device's figures."""
    import subprocess
    import sys

    host = tmp_path / "host.json"
    r = CliRunner().invoke(cli, ["benchmark", str(arts["a"]), str(arts["b"]), "--seq", "16", "--runs", "5", "--json", str(host)])
    assert r.exit_code == 0, r.output
    device = tmp_path / "device.json"
    code = BLOCK_TORCH + f"""
from bertexport.cli import cli
try:
    cli(['benchmark', {str(arts['a'])!r}, {str(arts['b'])!r}, '--seq', '16', '--runs', '5', '--json', {str(device)!r}])
except SystemExit as e:
    assert e.code in (0, None), e.code
""" + ASSERT_TORCH_FREE
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    rep = json.loads(device.read_text())
    assert set(rep) == TOP_KEYS and rep["schema"] == SCHEMA
    assert [c["name"] for c in rep["candidates"]] == ["fp32", "int8"] and rep["config"]["reference"] == "fp32"
    r = CliRunner().invoke(cli, ["benchmark", "--compare", str(host), str(device), "--json", "-"])
    rows = json.loads(r.stdout)
    assert r.exit_code == 0 and {row["candidate"] for row in rows} == {"ort-fp32", "ort-int8"}
    assert all(row["host_p50_ms"] > 0 and row["device_p50_ms"] > 0 for row in rows)
    r = CliRunner().invoke(cli, ["benchmark", str(arts["a"]), "--no-reference", "--data", str(arts["data"])])
    assert r.exit_code == 2 and "PyTorch original" in r.stderr
