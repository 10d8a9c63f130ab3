"""``benchmark``: latency, throughput, memory and (with labelled data) accuracy of the
PyTorch original and every artifact, side by side, in one interleaved run.

Every cell (batch x sequence) times all candidates round-robin so drift on a shared
machine hits them alike; threads are pinned and recorded; raw timings are kept in the
JSON report together with the environment. Candidates are named by what they are (profile
or recipe, precision, student shape; ``bertexport.building.report.artifact_label``), never by their
folder, and every table and plot refers to them by one number with a key of full names.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from bertexport import __version__
from bertexport.core.envinfo import environment
from bertexport.core.errors import UserError
from bertexport.core.hashing import cache_key
from bertexport.judging.gates import GATES
from bertexport.judging.latency import speedup, time_interleaved
from bertexport.judging.settings import BenchmarkSettings
from bertexport.core.progress import Reporter
from bertexport.building.report import (artifact_label, interval_level, interval_note, interval_of, student_shape, unique_labels,
                               with_interval)

SCHEMA = "bertexport.judging.benchmark/1"
MIN_RUNS = 5


@dataclass
class BenchmarkReport:
    """What ``benchmark`` measured (after optimum-benchmark's report): the model, the
    settings, the environment (CPU, flags, versions, load), each candidate, one entry per
    cell with every candidate's Latency record and speedup, and accuracy when data was given.
    ``to_dict`` is the JSON written as benchmark.json (schema ``SCHEMA``)."""

    model: dict
    config: dict
    environment: dict
    candidates: list[dict]
    cells: list[dict]
    accuracy: dict | None = None
    schema: str = SCHEMA
    created: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    bertexport_version: str = __version__

    def to_dict(self) -> dict:
        return {f: getattr(self, f) for f in ("schema", "created", "bertexport_version", "model", "config", "environment",
                                              "candidates", "cells", "accuracy")}

    @classmethod
    def from_dict(cls, d: dict) -> "BenchmarkReport":
        if not str(d.get("schema", "")).startswith("bertexport.judging.benchmark/"):
            raise UserError("not a bertexport benchmark report (no bertexport.judging.benchmark schema)")
        return cls(**{k: d[k] for k in ("model", "config", "environment", "candidates", "cells", "accuracy", "schema",
                                        "created", "bertexport_version") if k in d})


@dataclass
class Candidate:
    name: str  # what it is (``bertexport.building.report.artifact_label``), unique in the report
    kind: str  # pytorch | artifact
    runner: object
    size_bytes: int
    artifact: str | None = None
    target: str | None = None
    precision: str | None = None
    student_shape: str | None = None
    load_seconds: float | None = None
    rss_delta_mb: float | None = None


def _rss_mb() -> float | None:
    try:
        import psutil

        return psutil.Process().memory_info().rss / 1e6
    except ImportError:
        return None


def _activate(c: Candidate) -> None:
    before = _rss_mb()
    c.runner.activate()
    c.load_seconds = c.runner.load_seconds
    after = _rss_mb()
    c.rss_delta_mb = None if before is None else round(after - before, 1)


def _load_avg() -> float | None:
    """The 1-minute load average to 2 decimals (the kernel's own precision)."""
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def build_targets(model: str, targets: list[str], threads: int, reporter: Reporter, *,
                  folder: str | Path | None = None, calib: str | Path | None = None) -> list[Path]:
    """Convert ``model`` for each target profile into ``folder`` (default: the cache),
    reusing builds already there; a build whose parity gate failed is benchmarked as its
    clearly named ``.rejected`` folder."""
    from bertexport.core.cache import cache_dir
    from bertexport.building.convert import convert
    from bertexport.core.errors import GateFailed

    root = Path(folder) if folder else cache_dir("bench-artifacts", cache_key(model))
    out = []
    for t in targets:
        art = root / Path(t).stem
        rejected = art.with_name(art.name + ".rejected")
        if not (art / "manifest.json").is_file() and (rejected / "manifest.json").is_file():
            art = rejected
        elif not (art / "manifest.json").is_file():
            with reporter.step(f"convert for {t}"):
                try:
                    convert(model, t, art, calib=calib, force=True, threads=threads, latency_runs=0)
                except GateFailed as e:  # benchmark it anyway, clearly labelled
                    reporter.log(f"{t}: parity gate failed ({e}); benchmarking the rejected build")
                    art = e.result.artifact
        out.append(art)
    return out


def benchmark(
    model: str | None = None,
    artifacts: list[str | Path] = (),
    *,
    targets: list[str] = (),
    batches: list[int] = (1,),
    sequences: list[int] = (128,),
    texts: str | Path | None = None,
    data: str | Path | None = None,
    data_limit: int | None = None,
    runs: int = 30,
    warmup: int = 5,
    threads: int = 1,
    seed: int = 0,
    force: bool = False,
    reference: bool | None = None,
    trusted_key: str | Path | None = None,
    reporter: Reporter | None = None,
) -> dict:
    """Returns the JSON-able report (see ``SCHEMA``).

    ``reference``: time the PyTorch original too (speedups are against it). ``None`` means
    "when PyTorch is installed": on a device (the torch-free runtime install) the artifacts
    are timed alone, speedups against the first artifact, in the same report schema."""
    import importlib.util

    from bertexport.building.checkpoint import load_model, resolve_checkpoint
    from bertexport.judging.compare import reference_runner
    from bertexport.judging.compare import fixed_cell_feeds
    from bertexport.shipping.runtime import Artifact
    from bertexport.core.textdata import builtin_samples, load_texts

    reporter = reporter or Reporter()
    if runs < MIN_RUNS:
        raise UserError(f"--runs {runs} is too few for percentiles; use at least {MIN_RUNS} (100+ for a meaningful p99)")
    if threads < 1 or any(b < 1 for b in batches) or any(s < 1 for s in sequences):
        raise UserError("threads, batch sizes and sequence lengths must be >= 1")
    if not artifacts and not targets:
        raise UserError("name at least one artifact or --target to compare with PyTorch")
    has_torch = importlib.util.find_spec("torch") is not None and importlib.util.find_spec("transformers") is not None
    if reference is None:
        reference = has_torch
        if not has_torch:
            reporter.log("PyTorch is not installed: timing the artifacts alone (device mode)")
    elif reference and not has_torch:
        raise UserError("timing the PyTorch original needs the compile extra (torch, transformers); "
                        "on a device, benchmark the artifacts alone (--no-reference)")
    if not reference and (data or targets):
        raise UserError("--data and --target need the PyTorch original (the build machine); on a device, time artifacts only")
    if targets:
        if model is None:
            raise UserError("--target needs MODEL")
        artifacts = list(artifacts) + build_targets(model, list(targets), threads, reporter)

    real = load_texts(texts).texts if texts else None  # text inputs are checked before anything loads
    labelled = load_texts(data) if data else None
    opened = [Artifact(a, threads=threads, allow_rejected=True, trusted_key=trusted_key) for a in artifacts]
    first = opened[0].manifest
    for a in opened[1:]:
        if a.manifest["source"]["sha256"] != first["source"]["sha256"] and not force:
            raise UserError(f"{a.folder} was built from a different checkpoint than {opened[0].folder}; pass --force to compare anyway")
        if a.task != opened[0].task:
            raise UserError(f"{a.folder} serves {a.task}, {opened[0].folder} serves {opened[0].task}")
    src = model or first["source"]["path"]
    model_info = {"source": first["source"]["source"], "sha256": first["source"]["sha256"], "family": first["family"],
                  "task": first["task"]}
    if reference:
        ckpt = resolve_checkpoint(src, first["task"], allow_pickle=first["source"].get("weights_format") == "pickle",
                                  trust_remote_code=bool(first["source"].get("trust_remote_code")))
        if ckpt.sha256 != first["source"]["sha256"] and not force:
            raise UserError(f"{src} is not the checkpoint the artifacts were built from (sha256 differs); pass --force to compare anyway")
        model_info = {"source": src, "sha256": ckpt.sha256, "family": ckpt.family, "task": ckpt.task}

    with reporter.step("load PyTorch original and artifacts" if reference else "load artifacts"):
        input_names = [i["name"] for i in first["inputs"]]
        labels = unique_labels((["pytorch fp32"] if reference else []) + [artifact_label(a.manifest, a.folder) for a in opened],
                               ([None] if reference else []) + [a.folder for a in opened])
        cands = []
        if reference:
            rss0, t0 = _rss_mb(), time.perf_counter()
            torch_model = load_model(ckpt)
            torch_load = (time.perf_counter() - t0, None if rss0 is None else round(_rss_mb() - rss0, 1))
            cands.append(Candidate(labels.pop(0), "pytorch",
                                   reference_runner(ckpt, input_names, threads, torch_model=torch_model),
                                   sum(p.stat().st_size for p in ckpt.weight_files), precision="fp32"))
        for a, label in zip(opened, labels):
            cands.append(Candidate(label, "artifact", a.runner, a.model_bytes, artifact=str(a.folder), target=a.name,
                                   precision=a.manifest["target"].get("precision"),
                                   student_shape=student_shape(a.manifest, a.folder)))
        for c in cands:
            _activate(c)
        if reference:
            cands[0].load_seconds, cands[0].rss_delta_mb = torch_load  # loading the weights is the PyTorch load

    encoder = opened[0].encoder
    sample_texts = builtin_samples()
    cells = []
    load_before = _load_avg()
    grid = [(b, s) for b in batches for s in sequences] + ([(b, "real") for b in batches] if real else [])
    for b, s in grid:
        if s == "real":  # cycle through the file's texts, each batch padded to its longest
            batches_feeds = [encoder.encode(real[i:i + b]) for i in range(0, len(real), b)]
        else:
            batches_feeds = [fixed_cell_feeds(encoder.encode, sample_texts, b, s)]
        calls = {}
        for c in cands:
            counter = {"i": 0}

            def call(c=c, counter=counter):
                feeds = batches_feeds[counter["i"] % len(batches_feeds)]
                counter["i"] += 1
                return c.runner.infer(feeds)

            calls[c.name] = call
        with reporter.step(f"time b{b}/s{s}: {len(cands)} candidates x {runs} interleaved runs"):
            timed = time_interleaved(calls, runs=runs, warmup=warmup)
        seq_len = s if s != "real" else float(sum(int(f["attention_mask"].sum()) for f in batches_feeds) / sum(len(f["input_ids"]) for f in batches_feeds))
        ref = timed[cands[0].name]
        results = {}
        for c in cands:
            lat = timed[c.name]
            results[c.name] = {"latency": lat.to_dict(with_values=True), "throughput": lat.throughput(b),
                               "speedup": speedup(ref, lat)}
        cells.append({"batch": b, "sequence": s, "mean_real_tokens": seq_len if s == "real" else None, "results": results})

    accuracy = None
    if data:
        from bertexport.judging.compare import compare_on_data, task_labels, task_metrics

        ts = labelled
        if data_limit:
            ts.texts, ts.labels = ts.texts[:data_limit], (ts.labels[:data_limit] if ts.labels else None)
        labels = task_labels(ts, first["task"], opened[0].id2label)  # classes, or groups for retrieval precision
        accuracy = {}
        reference_outputs: dict = {}  # the PyTorch original runs once, shared by all artifacts
        with reporter.step(f"accuracy on {len(ts.texts)} labelled texts"):
            for a in opened:
                accuracy[next(c.name for c in cands if c.artifact == str(a.folder))] = task_metrics(
                    compare_on_data(a, cands[0].runner, a.encoder.encode, ts, a.task, reference_cache=reference_outputs), labels)
        accuracy[cands[0].name] = ({"metric_candidate": next(iter(accuracy.values())).get("metric_reference")}
                                   if labels is not None else {})

    for c in cands:
        c.runner.deactivate()
    env = environment()
    return BenchmarkReport(
        model=model_info,
        config={"batches": list(batches), "sequences": list(sequences), "real_texts": str(texts) if texts else None,
                "runs": runs, "warmup": warmup, "threads": threads, "seed": seed, "interleaved": True,
                "reference": "pytorch" if reference else cands[0].name},
        environment=env | {"load_avg_before": load_before, "load_avg_after": _load_avg()},
        candidates=[{"name": c.name, "kind": c.kind, "artifact": c.artifact, "target": c.target, "precision": c.precision,
                     "student_shape": c.student_shape, "size_bytes": c.size_bytes, "load_seconds": c.load_seconds,
                     "rss_delta_mb": c.rss_delta_mb}
                    for c in cands],
        cells=cells,
        accuracy=accuracy,
    ).to_dict()


def rows(report: dict) -> list[dict]:
    """Flat latency rows (one per cell x candidate) for tables; ``key`` is the candidate's
    number in the key table (``candidate_rows``)."""
    keys = {c["name"]: i for i, c in enumerate(report["candidates"], 1)}
    out = []
    acc = report.get("accuracy") or {}
    for cell in report["cells"]:
        for name, r in cell["results"].items():
            lat = r["latency"]
            a = acc.get(name, {})
            out.append({
                "key": keys.get(name), "candidate": name, "batch": cell["batch"], "sequence": cell["sequence"],
                "p50_ms": lat["p50"] * 1e3, "p90_ms": lat["p90"] * 1e3, "p99_ms": lat["p99"] * 1e3,
                "stdev_ms": lat["stdev"] * 1e3, "throughput": r["throughput"],
                "speedup": r["speedup"]["p50_ratio"], "speedup_p10": r["speedup"]["round_ratio_p10"],
                "speedup_p90": r["speedup"]["round_ratio_p90"],
                "accuracy": a.get("metric_candidate"), "drop": a.get("metric_drop"),
                "agreement": a.get("agreement"), "cosine_min": a.get("cosine_min"),
            })
    return out


def candidate_rows(report: dict) -> list[dict]:
    """One row per candidate: its number, full label and what it is, and its accuracy
    figures (with intervals when the metrics carry them) as text."""
    acc = report.get("accuracy") or {}
    out = []
    for i, c in enumerate(report["candidates"], 1):
        m = acc.get(c["name"]) or {}
        out.append({
            "key": i, "candidate": c["name"], "kind": c["kind"],
            "folder": Path(c["artifact"]).name if c.get("artifact") else "-",
            "size_mb": c["size_bytes"] / 1e6, "load_s": c.get("load_seconds"), "rss_mb": c.get("rss_delta_mb"),
            "accuracy": _fmt(m.get("metric_candidate"), ".2f"),
            # figures shown in their gate's format (the gate registry)
            "drop": with_interval(m, GATES["max_accuracy_drop"].metric, "+" + GATES["max_accuracy_drop"].fmt),
            "agreement": with_interval(m, GATES["min_agreement"].metric, GATES["min_agreement"].fmt),
            "macro_f1": _fmt(m.get("macro_f1_candidate"), ".4f"),
            "rows": _fmt(m.get("decisions") if m.get("decisions") is not None else m.get("samples"), "d"),
            "note": interval_note(m, "metric_drop", " pts") or interval_note(m, "agreement"),
            "metrics": m,
        })
    return out


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def _has_accuracy(report: dict) -> bool:
    return any(v for v in (report.get("accuracy") or {}).values())


def _metric_name(report: dict) -> str:
    """The task metric on the labelled data (accuracy, retrieval precision@5, ...)."""
    return next((v["metric_name"] for v in (report.get("accuracy") or {}).values() if v and v.get("metric_name")), "accuracy")


def _load(env: dict) -> str:
    return f"{_fmt(env.get('load_avg_before'), '.2f')} / {_fmt(env.get('load_avg_after'), '.2f')}"


def to_markdown(report: dict) -> str:
    env = report["environment"]
    cpu = env["cpu"]
    cands = candidate_rows(report)
    level = interval_level(*[c["metrics"] for c in cands])
    lines = [f"# bertexport benchmark: {report['model']['source']} ({report['model']['task']})", "",
             f"CPU: {cpu.get('model', '?')} · {cpu.get('cores')} cores · flags {', '.join(cpu.get('flags', [])) or 'none'} · "
             f"threads pinned: {report['config']['threads']} · {report['config']['runs']} interleaved runs per cell, "
             f"{report['config']['warmup']} warm-up · load average before / after {_load(env)}", "",
             "Candidates (the numbers are the plot's):", "",
             "| # | candidate | kind | folder | size MB | load s | RSS +MB |", "|---|---|---|---|---|---|---|"]
    for c in cands:
        lines.append(f"| {c['key']} | {c['candidate']} | {c['kind']} | {c['folder']} | {c['size_mb']:.1f} | "
                     f"{_fmt(c['load_s'], '.2f')} | {_fmt(c['rss_mb'], '.1f')} |")
    lines += ["", "| # | candidate | batch | seq | p50 ms | p90 ms | p99 ms | seq/s | speedup (p10-p90) |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in rows(report):
        lines.append(f"| {r['key']} | {r['candidate']} | {r['batch']} | {r['sequence']} | {r['p50_ms']:.2f} | {r['p90_ms']:.2f} | "
                     f"{r['p99_ms']:.2f} | {r['throughput']:.1f} | {r['speedup']:.2f}x ({r['speedup_p10']:.2f}-{r['speedup_p90']:.2f}) |")
    if _has_accuracy(report):
        metric = _metric_name(report)
        lines += ["", f"Task metric ({metric}) on the labelled data; brackets: {level} interval of the paired difference to "
                      "the original (same rows, see the README).", "",
                  f"| # | candidate | {metric} % | drop pts [{level}] | agreement [{level}] | macro-F1 | rows | interval rests on |",
                  "|---|---|---|---|---|---|---|---|"]
        for c in cands:
            lines.append(f"| {c['key']} | {c['candidate']} | {c['accuracy']} | {c['drop']} | {c['agreement']} | {c['macro_f1']} | "
                         f"{c['rows']} | {c['note'] or '-'} |")
    return "\n".join(lines) + "\n"


def console_tables(report: dict, width: int = 80) -> list:
    """The tables ``benchmark`` prints (rich) for a terminal ``width`` columns wide: a key of
    candidates with their full labels, then latency and accuracy by number. A label stays
    on one line whenever the terminal can hold it, else it wraps; it is never cut."""
    from rich.table import Table
    from rich.text import Text

    cands = candidate_rows(report)
    longest = max(len(c["candidate"]) for c in cands)
    one_line = longest + 22 <= width  # '#', size and borders need ~22 columns
    key = Table(title=Text(f"{report['model']['source']} · {report['config']['threads']} thread(s) · "
                           f"{report['config']['runs']} interleaved runs · load avg {_load(report['environment'])}"),
                title_justify="left")
    key.add_column("#", justify="right")
    key.add_column("candidate", no_wrap=one_line, min_width=longest if one_line else None, overflow="fold")
    key.add_column("folder", overflow="fold")
    key.add_column("MB", justify="right")
    for c in cands:  # Text, not markup: a label's "[folder]" is not a style
        key.add_row(str(c["key"]), Text(c["candidate"]), Text(c["folder"]), f"{c['size_mb']:.1f}")
    lat = Table(title="latency (by candidate #)", title_justify="left")
    for col in ("#", "b", "seq", "p50 ms", "p90 ms", "p99 ms", "seq/s", "speedup (p10-p90)"):
        lat.add_column(col, justify="right", overflow="fold")
    for r in rows(report):
        lat.add_row(str(r["key"]), str(r["batch"]), str(r["sequence"]), f"{r['p50_ms']:.2f}", f"{r['p90_ms']:.2f}",
                    f"{r['p99_ms']:.2f}", f"{r['throughput']:.1f}",
                    f"{r['speedup']:.2f}x ({r['speedup_p10']:.2f}-{r['speedup_p90']:.2f})")
    tables = [key, lat]
    if _has_accuracy(report):
        level = interval_level(*[c["metrics"] for c in cands])
        acc = Table(title=f"{_metric_name(report)} (by candidate #; brackets: {level} paired interval)", title_justify="left")
        for col in ("#", "%", "drop pts", "agreement", "rows"):
            acc.add_column(col, justify="right", overflow="fold")
        for c in cands:
            acc.add_row(str(c["key"]), c["accuracy"], Text(c["drop"]), Text(c["agreement"]), c["rows"])
        tables.append(acc)
    return tables


def figure(report: dict):
    """The benchmark plot: p50 latency per candidate and cell (p10-p90 bars) on a log axis;
    with labelled data, accuracy vs latency (log axis, bars: the paired interval). Every
    candidate is a number; the key under the plot names it in full."""
    import numpy as np

    from bertexport.core.plots import key, log_latency_axis, place_numbers, pyplot

    plt = pyplot()
    acc = report.get("accuracy") or {}
    has_acc = any(v.get("metric_candidate") is not None for v in acc.values())
    fig, axes = plt.subplots(1, 2 if has_acc else 1, figsize=(12 if has_acc else 7, 4.8), squeeze=False, layout="constrained")
    ax = axes[0][0]
    names = [c["name"] for c in report["candidates"]]
    colours = [plt.get_cmap("tab10")(i % 10) for i in range(len(names))]
    width = 0.8 / max(len(report["cells"]), 1)
    for i, cell in enumerate(report["cells"]):
        vals = [np.asarray(cell["results"][n]["latency"]["values"]) * 1e3 for n in names]
        p50 = [np.percentile(v, 50) for v in vals]
        lo = [p - np.percentile(v, 10) for p, v in zip(p50, vals)]
        hi = [np.percentile(v, 90) - p for p, v in zip(p50, vals)]
        ax.bar(np.arange(len(names)) + i * width, p50, width, yerr=[lo, hi], capsize=3, label=f"b{cell['batch']}/s{cell['sequence']}")
    ax.set_xticks(np.arange(len(names)) + width * (len(report["cells"]) - 1) / 2)
    ax.set_xticklabels([str(i) for i in range(1, len(names) + 1)])
    ax.set_xlabel("candidate # (key below)")
    log_latency_axis(ax, "y", "latency p50 (ms), bars p10-p90")
    ax.set_title(f"{Path(str(report['model']['source'])).name} · {report['config']['threads']} thread(s)", fontsize=10)
    ax.legend(fontsize=8, title="cell", title_fontsize=8)
    if has_acc:
        ax2 = axes[0][1]
        cell = report["cells"][0]
        points = []
        for i, n in enumerate(names, 1):
            a = acc.get(n, {})
            y = a.get("metric_candidate")
            if y is None:
                continue
            x = cell["results"][n]["latency"]["p50"] * 1e3
            st = interval_of(a, "metric_drop")  # accuracy = reference - drop: its paired interval
            yerr = None if st is None else [[max(st["high"] - a["metric_drop"], 0.0)], [max(a["metric_drop"] - st["low"], 0.0)]]
            ax2.errorbar(x, y, yerr=yerr, fmt="o", color=colours[i - 1], capsize=3, markersize=6, zorder=3)
            points.append((x, y, i, colours[i - 1]))
        log_latency_axis(ax2, "x", f"latency p50 (ms), b{cell['batch']}/s{cell['sequence']}")
        metric = _metric_name(report)
        ax2.set_ylabel(f"{metric} (%)")
        level = interval_level(*acc.values())
        ax2.set_title(f"{metric} vs latency (bars: {level} interval of the paired difference to the original)", fontsize=9)
        ax2.margins(x=0.15, y=0.15)
    key(fig, [(i, n, colours[i - 1]) for i, n in enumerate(names, 1)])
    if has_acc:
        place_numbers(ax2, points)
    return fig


def plot(report: dict, path: str | Path) -> Path:
    """benchmark.png (see ``figure``)."""
    from bertexport.core.plots import save

    return save(figure(report), path)


def check_out_dir(out_dir: str | Path, force: bool = False) -> None:
    """Before measuring: ``out_dir`` may be created, or replaced when it is a benchmark folder and ``force``."""
    from bertexport.core.staging import check_destination, check_writable

    check_destination(Path(out_dir), force, [], "benchmark folder")
    check_writable(Path(out_dir), 10 << 20, "benchmark report")


def write_outputs(report: dict, out_dir: str | Path, force: bool = False) -> dict[str, Path]:
    """benchmark.json/.md/.png, published together (staged, then renamed into place)."""
    from bertexport.core.staging import StagedFolder

    names = {"json": "benchmark.json", "markdown": "benchmark.md", "plot": "benchmark.png"}
    with StagedFolder(Path(out_dir), force, what="benchmark folder") as staged:
        (staged.staging / names["json"]).write_text(json.dumps(report, indent=1) + "\n")
        (staged.staging / names["markdown"]).write_text(to_markdown(report))
        try:
            plot(report, staged.staging / names["plot"])
        except ImportError:
            names.pop("plot")
        out = staged.publish()
    return {k: out / v for k, v in names.items()}


def compare_reports(a: dict, b: dict, labels: tuple[str, str] = ("host", "device")) -> list[dict]:
    """Rows pairing the same artifact (by target) and cell in two reports — e.g. the build
    host's and a device's — with the device/host p50 ratio. Ratios inside one report are
    interleaved; across reports they are not, so read them as a coarse machine factor."""
    ra, rb = BenchmarkReport.from_dict(a), BenchmarkReport.from_dict(b)

    def by_key(r: BenchmarkReport) -> dict:
        # reports that name candidates by what they are pair by that name (two builds of one
        # profile stay apart); older ones, named by folder, pair by profile
        targets = {c["name"]: c["name"] if "precision" in c else (c.get("target") or c["name"]) for c in r.candidates}
        return {(targets[name], cell["batch"], str(cell["sequence"])): res["latency"]["p50"] * 1e3
                for cell in r.cells for name, res in cell["results"].items()}

    ka, kb = by_key(ra), by_key(rb)
    rows = []
    for key in sorted(set(ka) & set(kb)):
        rows.append({"candidate": key[0], "batch": key[1], "sequence": key[2], f"{labels[0]}_p50_ms": ka[key],
                     f"{labels[1]}_p50_ms": kb[key], "ratio": kb[key] / ka[key]})
    if not rows:
        raise UserError("the two reports share no candidate and cell to compare")
    return rows


# -- the command ------------------------------------------------------------------------------

@dataclass
class ReportComparison:
    """Two benchmark reports side by side (``--compare HOST.json DEVICE.json``): the reports
    and the rows pairing their candidates and cells (``compare_reports``)."""

    host: dict
    device: dict
    rows: list[dict]

    def title(self) -> str:
        def side(r: dict) -> str:
            return f"{r.get('environment', {}).get('cpu', {}).get('model', '?')} · {r['config']['threads']} thread(s)"

        return f"host: {side(self.host)}   vs   device: {side(self.device)}"


def read_report(path: str | Path) -> dict:
    """A benchmark.json (``UserError``, exit 2, when it cannot be read)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read benchmark report {path}: {e}") from e


def compare_report_files(host: str | Path, device: str | Path) -> ReportComparison:
    """The reports in two benchmark.json files side by side (see ``compare_reports``)."""
    a, b = read_report(host), read_report(device)
    return ReportComparison(a, b, compare_reports(a, b))


def comparison_table(comparison: ReportComparison):
    """The table ``benchmark --compare`` prints (rich)."""
    from rich.table import Table

    table = Table(title=comparison.title())
    for col in ("candidate", "b", "seq", "host p50 ms", "device p50 ms", "device / host"):
        table.add_column(col)
    for r in comparison.rows:
        table.add_row(r["candidate"], str(r["batch"]), r["sequence"], f"{r['host_p50_ms']:.2f}", f"{r['device_p50_ms']:.2f}",
                      f"{r['ratio']:.2f}x")
    return table


@dataclass
class BenchmarkOutcome:
    """What ``benchmark_command`` did: a benchmark run (``report``, and the files ``written``
    to ``out_dir`` by kind) or, with ``compare_files``, two reports side by side
    (``comparison``)."""

    report: dict | None = None
    written: dict[str, Path] = field(default_factory=dict)
    comparison: ReportComparison | None = None


def candidates_of(settings: BenchmarkSettings) -> tuple[str | None, list[Path]]:
    """MODEL and the artifacts to time: a first positional that is an artifact (it has a
    manifest.json) is one; every artifact must exist, and a MODEL alone needs a --target."""
    model, artifacts = settings.model, list(settings.artifacts)
    if model and Path(model).joinpath("manifest.json").is_file():
        model, artifacts = None, [Path(settings.model), *artifacts]
    for a in artifacts:
        if not Path(a).exists():
            raise UserError(f"artifact not found: {a}")
    if model and not artifacts and not settings.targets:
        raise UserError(f"{model} is not an artifact (no manifest.json), and no --target was given: nothing to compare")
    return model, artifacts


def benchmark_command(settings: BenchmarkSettings, reporter: Reporter | None = None) -> BenchmarkOutcome:
    """``bertexport benchmark`` as a library call: with ``compare_files``, the two reports
    side by side; else the candidates resolved (``candidates_of``), ``out_dir`` checked
    before anything is measured, ``benchmark`` run and its files written to ``out_dir``.
    Raises like ``benchmark``."""
    s = settings
    if s.compare_files:
        return BenchmarkOutcome(comparison=compare_report_files(*s.compare_files))
    model, artifacts = candidates_of(s)
    if s.out_dir:
        check_out_dir(s.out_dir, s.force)
    report = benchmark(model, artifacts, targets=list(s.targets), batches=list(s.batches), sequences=list(s.sequences),
                       texts=s.texts, data=s.data, data_limit=s.data_limit, runs=s.runs, warmup=s.warmup,
                       threads=s.threads, force=s.force, reference=s.reference, trusted_key=s.trusted_key,
                       reporter=reporter)
    written = write_outputs(report, s.out_dir, force=s.force) if s.out_dir else {}
    return BenchmarkOutcome(report=report, written=written)
