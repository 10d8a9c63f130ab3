"""benchmark: report schema, outputs (JSON, Markdown, PNG) and bad inputs. No timing assertions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from bertexport.judging.benchmark import benchmark
from bertexport.judging.benchmark_report import SCHEMA, write_outputs
from bertexport.cli import cli
from bertexport.building.convert import convert
from bertexport.core.errors import UserError
from bertexport.judging.gates import Gates
from tests.torchfree import ASSERT_TORCH_FREE, BLOCK_TORCH

TOP_KEYS = {"schema", "created", "bertexport_version", "model", "config", "environment", "candidates", "cells", "accuracy"}
RESULT_KEYS = {"latency", "throughput", "speedup"}
LATENCY_KEYS = {"count", "total", "mean", "stdev", "p50", "p90", "p95", "p99", "min", "max", "unit", "values"}


@pytest.fixture(scope="module")
def arts(tiny, fp32_artifact, tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    ckpt = tiny("distilbert", "text-classification")
    a = fp32_artifact("distilbert", "text-classification").artifact  # shared: read only
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
    assert [c["name"] for c in rep["candidates"]] == ["pytorch fp32", "ort-fp32", "ort-int8"]  # what they are, not folders
    assert [(c["batch"], c["sequence"]) for c in rep["cells"]] == [(1, 16), (2, 16), (1, "real"), (2, "real")]
    for cell in rep["cells"]:
        for name, r in cell["results"].items():
            assert set(r) == RESULT_KEYS and set(r["latency"]) == LATENCY_KEYS
            assert r["latency"]["count"] == 5 and len(r["latency"]["values"]) == 5
    assert rep["config"]["threads"] == 1 and rep["config"]["interleaved"] is True
    assert {"cpu", "packages", "python"} <= set(rep["environment"])
    assert rep["accuracy"]["ort-int8"]["decisions"] == 12 and "metric_drop" in rep["accuracy"]["ort-int8"]
    paths = write_outputs(rep, tmp_path / "out")
    assert json.loads(paths["json"].read_text())["schema"] == SCHEMA
    assert "| 1 | pytorch fp32 | 1 | 16 |" in paths["markdown"].read_text()
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_benchmark(arts, tmp_path):
    r = CliRunner().invoke(cli, ["benchmark", str(arts["a"]), "--runs", "5", "--warmup", "1", "--seq", "8",
                                 "--out", str(tmp_path / "o")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "o" / "benchmark.json").is_file()


def test_turns_report_back_to_back_beside_the_first_call_after_a_switch(arts, tmp_path):
    """--turn 3: each cell keeps ``latency`` (a turn's first call, one per round) and adds ``steady``
    (the median of the turn's other calls, one per round) with its own speedup; the tables show
    both. Real ORT builds and PyTorch; no timing assertion."""
    from bertexport.judging.benchmark_report import console_tables, to_markdown

    r = CliRunner().invoke(cli, ["benchmark", str(arts["a"]), str(arts["b"]), "--runs", "5", "--warmup", "1", "--seq", "8",
                                 "--turn", "3", "--out", str(tmp_path / "o")])
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "o" / "benchmark.json").read_text())
    assert rep["config"]["turn"] == 3
    for name, res in rep["cells"][0]["results"].items():
        assert res["latency"]["count"] == 5 and res["steady"]["count"] == 5 and len(res["steady"]["values"]) == 5
        assert set(res["steady_speedup"]) == {"p50_ratio", "round_ratio_p10", "round_ratio_p90"}
    assert rep["cells"][0]["results"]["pytorch fp32"]["steady_speedup"]["p50_ratio"] == pytest.approx(1.0)
    md = to_markdown(rep)
    assert "in turns of 3 calls" in md and "back-to-back p50 ms" in md
    assert [c.header for c in console_tables(rep, 120)[1].columns][-2:] == ["b2b ms", "b2b x"]
    plain = benchmark(None, [arts["a"]], runs=5, warmup=1, sequences=[8])
    assert "steady" not in plain["cells"][0]["results"]["ort-fp32"] and "back-to-back" not in to_markdown(plain)
    bad = CliRunner().invoke(cli, ["benchmark", str(arts["a"]), "--turn", "0"])
    assert bad.exit_code == 2


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
    assert [c["name"] for c in rep["candidates"]] == ["ort-fp32", "ort-int8"] and rep["config"]["reference"] == "ort-fp32"
    r = CliRunner().invoke(cli, ["benchmark", "--compare", str(host), str(device), "--json", "-"])
    rows = json.loads(r.stdout)
    assert r.exit_code == 0 and {row["candidate"] for row in rows} == {"ort-fp32", "ort-int8"}
    assert all(row["host_p50_ms"] > 0 and row["device_p50_ms"] > 0 for row in rows)
    r = CliRunner().invoke(cli, ["benchmark", str(arts["a"]), "--no-reference", "--data", str(arts["data"])])
    assert r.exit_code == 2 and "PyTorch original" in r.stderr


# -- reports that can't be misread ----------------------------------------------------------------

@pytest.fixture(scope="module")
def lookalikes(arts):
    """Four artifacts in folders that share one long name prefix (what a user's `out-s...`
    folders look like): fp32, int8, a second copy of the int8 build, and a distilled
    1-layer student of the 2-layer checkpoint."""
    import shutil

    root = arts["root"] / "lookalikes"
    prefix = root / "out-student-distilbert-sst2"
    fp32 = convert(str(arts["ckpt"]), "ort-fp32", f"{prefix}-a", latency_runs=0).artifact
    int8 = convert(str(arts["ckpt"]), "ort-int8", f"{prefix}-b", latency_runs=0,
                   gates=Gates(min_cosine=0.9, min_agreement=0.5)).artifact
    copy = shutil.copytree(int8, f"{prefix}-c")
    transfer = root / "transfer.txt"
    transfer.write_text("\n".join(f"transfer sentence {i} about a film" for i in range(64)) + "\n")
    student = convert(str(arts["ckpt"]), "ort-fp32", f"{prefix}-d", latency_runs=0, distill_layers=1,
                      distill_data=transfer, distill_epochs=1).artifact
    rep = benchmark(None, [fp32, int8, copy, student], sequences=[8], data=arts["data"], runs=5, warmup=1, force=True)
    return {"report": rep, "student": student, "folders": [fp32, int8, copy, student]}


def _render(tables, width: int) -> str:
    import io

    from rich.console import Console

    buf = io.StringIO()
    console = Console(file=buf, width=width, color_system=None)
    for t in tables:
        console.print(t)
    return buf.getvalue()


def _expected_student_shape(student_artifact) -> str:
    """The shape read straight from the student checkpoint's config (DistilBERT key names)."""
    m = json.loads((student_artifact / "manifest.json").read_text())
    cfg = json.loads((Path(m["source"]["path"]) / "config.json").read_text())
    assert cfg["n_layers"] == 1  # distilled from 2 layers to 1
    return f"L{cfg['n_layers']}-H{cfg['dim']}-A{cfg['n_heads']}-F{cfg['hidden_dim']}"


def test_candidates_are_named_by_what_they_are(lookalikes):
    rep = lookalikes["report"]
    names = [c["name"] for c in rep["candidates"]]
    shape = _expected_student_shape(lookalikes["student"])
    assert names == ["pytorch fp32", "ort-fp32", "ort-int8 [out-student-distilbert-sst2-b]",
                     "ort-int8 [out-student-distilbert-sst2-c]", f"ort-fp32 student {shape}"]
    assert rep["candidates"][4]["student_shape"] == shape and rep["candidates"][2]["precision"] == "int8"
    assert set(rep["accuracy"]) == set(names) and all(set(cell["results"]) == set(names) for cell in rep["cells"])


@pytest.mark.parametrize("width", [80, 120])
def test_console_tables_keep_every_label_whole_at_width(lookalikes, width):
    from bertexport.judging.benchmark_report import console_tables

    rep = lookalikes["report"]
    out = _render(console_tables(rep, width), width)
    lines = out.splitlines()
    assert all(len(line) <= width for line in lines), max(lines, key=len)
    assert "…" not in out
    labels = [c["name"] for c in rep["candidates"]]
    assert len(set(labels)) == len(labels)
    key_rows = [line.split("│") for line in lines if line.count("│") == 5]  # the key table: #, candidate, folder, MB
    cells = [row[2].strip() for row in key_rows if row[1].strip()]
    assert cells == labels, out  # each label whole, on one line, in its own row
    assert "drop pts" in out and "agreement" in out


def test_console_tables_wrap_but_never_cut_in_a_narrow_terminal(lookalikes):
    from bertexport.judging.benchmark_report import console_tables

    rep = lookalikes["report"]
    out = _render(console_tables(rep, 44)[:1], 44)
    assert "…" not in out and all(len(line) <= 44 for line in out.splitlines())
    rows: dict[str, str] = {}
    current = None
    for line in out.splitlines():
        cells = line.split("│")[1:-1]
        if len(cells) < 2:
            continue
        if cells[0].strip():
            current = cells[0].strip()
            rows[current] = ""
        rows[current] += cells[1].strip()
    assert [rows[str(i)].replace(" ", "") for i in range(1, len(rep["candidates"]) + 1)] == \
        [c["name"].replace(" ", "") for c in rep["candidates"]]  # every label whole, only wrapped


def test_markdown_shows_intervals_and_two_decimal_load(lookalikes):
    import copy

    from bertexport.judging.benchmark_report import to_markdown

    rep = copy.deepcopy(lookalikes["report"])
    env = rep["environment"]
    assert env["load_avg_before"] == round(env["load_avg_before"], 2)  # recorded at the kernel's precision
    env["load_avg_before"], env["load_avg_after"] = 2.2978515625, 0.5
    md = to_markdown(rep)
    assert "load average before / after 2.30 / 0.50" in md and "2.2978" not in md
    label = "ort-int8 [out-student-distilbert-sst2-b]"
    m = rep["accuracy"][label]
    drop, agree = m["stats"]["metric_drop"], m["stats"]["agreement"]
    assert f"{drop['estimate']:+.2f} [{drop['low']:+.2f}, {drop['high']:+.2f}]" in md
    assert f"{agree['estimate']:.4f} [{agree['low']:.4f}, {agree['high']:.4f}]" in md
    assert f"{drop['rows']} rows, {drop['discordant']} discordant" in md
    for c in rep["candidates"]:
        assert f"| {c['name']} |" in md
    for v in rep["accuracy"].values():  # reports without intervals (older runs) still render, point estimates only
        v.pop("stats", None)
    md = to_markdown(rep)
    assert f"| {m['metric_drop']:+.2f} | {m['agreement']:.4f} |" in md


def test_plot_numbers_candidates_on_log_axes_without_overlap(lookalikes):
    from matplotlib.text import Text

    from bertexport.judging.benchmark_report import figure, plot

    rep = lookalikes["report"]
    fig = figure(rep)
    bars, scatter = fig.axes[:2]
    assert bars.get_yscale() == "log" and scatter.get_xscale() == "log"
    legend = fig.legends[0]
    assert [t.get_text() for t in legend.get_texts()] == [c["name"] for c in rep["candidates"]]
    assert [h.get_marker() for h in legend.legend_handles] == [f"${i}$" for i in range(1, len(rep["candidates"]) + 1)]
    assert [t.get_text() for t in bars.get_xticklabels()] == [str(i) for i in range(1, len(rep["candidates"]) + 1)]
    renderer = fig.canvas.get_renderer()
    numbers = [t for t in scatter.texts]
    assert sorted(t.get_text() for t in numbers) == sorted(str(i) for i in range(1, len(rep["candidates"]) + 1))
    boxes = [t.update_positions(renderer) or Text.get_window_extent(t, renderer) for t in numbers]  # the numbers, not their leader lines
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
    import matplotlib.pyplot as plt

    plt.close(fig)
    path = plot(rep, lookalikes["folders"][0].parent / "b.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_keeps_two_builds_of_one_profile_apart(lookalikes):
    from bertexport.judging.benchmark_report import compare_reports

    rep = lookalikes["report"]
    rows = compare_reports(rep, rep)
    assert sorted(r["candidate"] for r in rows) == sorted(c["name"] for c in rep["candidates"])
    assert all(r["ratio"] == 1.0 for r in rows)


def test_the_settings_record_resolves_what_to_time(tmp_path):
    """benchmark's record: the comma lists are typed (a bad part exits 2), a first positional
    with a manifest is an artifact, a missing artifact or a MODEL alone is refused before any work."""
    from bertexport.cli.settings import settings_from
    from bertexport.judging.benchmark import candidates_of
    from bertexport.judging.settings import BenchmarkSettings

    def record(**values):
        return settings_from(BenchmarkSettings, values, "benchmark")

    art = tmp_path / "art"
    art.mkdir()
    (art / "manifest.json").write_text("{}")
    assert candidates_of(record(model=str(art))) == (None, [art])
    assert candidates_of(record(model="m", targets=["ort-int8"])) == ("m", [])
    with pytest.raises(UserError, match="artifact not found"):
        candidates_of(record(model=str(art), artifacts=[tmp_path / "gone"]))
    with pytest.raises(UserError, match="nothing to compare"):
        candidates_of(record(model=str(tmp_path)))
    with pytest.raises(UserError, match="batches"):
        record(batches=[0])
    for bad in ("1,x", "0", "1,,2"):
        r = CliRunner().invoke(cli, ["benchmark", str(art), "--batch", bad])
        assert r.exit_code == 2 and "--batch" in r.output, r.output
    r = CliRunner().invoke(cli, ["benchmark", "--compare", str(art / "manifest.json")])
    assert r.exit_code == 2 and "requires 2 arguments" in r.output
