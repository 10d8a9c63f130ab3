"""``benchmark``: latency, throughput, memory and (with labelled data) accuracy of the
PyTorch original and every artifact, side by side, in one interleaved run.

Every cell (batch x sequence) times all candidates round-robin so drift on a shared
machine hits them alike; threads are pinned and recorded; raw timings are kept in the
JSON report together with the environment.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from bertexport import __version__
from bertexport.envinfo import environment
from bertexport.errors import UserError
from bertexport.latency import speedup, time_interleaved
from bertexport.progress import Reporter

SCHEMA = "bertexport.benchmark/1"
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
        if not str(d.get("schema", "")).startswith("bertexport.benchmark/"):
            raise UserError("not a bertexport benchmark report (no bertexport.benchmark schema)")
        return cls(**{k: d[k] for k in ("model", "config", "environment", "candidates", "cells", "accuracy", "schema",
                                        "created", "bertexport_version") if k in d})


@dataclass
class Candidate:
    name: str
    kind: str  # pytorch | artifact
    runner: object
    size_bytes: int
    artifact: str | None = None
    target: str | None = None
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


def _unique(name: str, taken: set[str]) -> str:
    out, i = name, 2
    while out in taken:
        out, i = f"{name}#{i}", i + 1
    taken.add(out)
    return out


def build_targets(model: str, targets: list[str], threads: int, reporter: Reporter, *,
                  folder: str | Path | None = None, calib: str | Path | None = None) -> list[Path]:
    """Convert ``model`` for each target profile into ``folder`` (default: the cache),
    reusing builds already there; a build whose parity gate failed is benchmarked as its
    clearly named ``.rejected`` folder."""
    from bertexport.cache import cache_dir
    from bertexport.convert import convert
    from bertexport.errors import GateFailed

    root = Path(folder) if folder else cache_dir("bench-artifacts", hashlib.sha256(model.encode()).hexdigest()[:12])
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

    from bertexport.checkpoint import load_model, resolve_checkpoint
    from bertexport.compare import reference_runner
    from bertexport.compare import fixed_cell_feeds
    from bertexport.runtime import Artifact
    from bertexport.textdata import builtin_samples, load_texts

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
        taken: set[str] = set()
        cands = []
        if reference:
            rss0, t0 = _rss_mb(), time.perf_counter()
            torch_model = load_model(ckpt)
            torch_load = (time.perf_counter() - t0, None if rss0 is None else round(_rss_mb() - rss0, 1))
            cands.append(Candidate(_unique("pytorch", taken), "pytorch",
                                   reference_runner(ckpt, input_names, threads, torch_model=torch_model),
                                   sum(p.stat().st_size for p in ckpt.weight_files)))
        for a in opened:
            cands.append(Candidate(_unique(a.folder.name, taken), "artifact", a.runner, a.model_bytes,
                                   artifact=str(a.folder), target=a.name))
        for c in cands:
            _activate(c)
        if reference:
            cands[0].load_seconds, cands[0].rss_delta_mb = torch_load  # loading the weights is the PyTorch load

    encoder = opened[0].encoder
    sample_texts = builtin_samples()
    cells = []
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
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
        from bertexport.compare import compare_on_data, task_metrics
        from bertexport.textdata import label_ids

        ts = labelled
        if data_limit:
            ts.texts, ts.labels = ts.texts[:data_limit], (ts.labels[:data_limit] if ts.labels else None)
        labels = label_ids(ts.labels, opened[0].id2label) if ts.labels is not None and first["task"] == "text-classification" else None
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
        environment=env | {"load_avg_before": load_before,
                           "load_avg_after": os.getloadavg()[0] if hasattr(os, "getloadavg") else None},
        candidates=[{"name": c.name, "kind": c.kind, "artifact": c.artifact, "target": c.target,
                     "size_bytes": c.size_bytes, "load_seconds": c.load_seconds, "rss_delta_mb": c.rss_delta_mb}
                    for c in cands],
        cells=cells,
        accuracy=accuracy,
    ).to_dict()


def rows(report: dict) -> list[dict]:
    """Flat rows (one per cell x candidate) for tables."""
    out = []
    acc = report.get("accuracy") or {}
    for cell in report["cells"]:
        for name, r in cell["results"].items():
            lat = r["latency"]
            a = acc.get(name, {})
            out.append({
                "candidate": name, "batch": cell["batch"], "sequence": cell["sequence"],
                "p50_ms": lat["p50"] * 1e3, "p90_ms": lat["p90"] * 1e3, "p99_ms": lat["p99"] * 1e3,
                "stdev_ms": lat["stdev"] * 1e3, "throughput": r["throughput"],
                "speedup": r["speedup"]["p50_ratio"], "speedup_p10": r["speedup"]["round_ratio_p10"],
                "speedup_p90": r["speedup"]["round_ratio_p90"],
                "accuracy": a.get("metric_candidate"), "drop": a.get("metric_drop"),
                "agreement": a.get("agreement"), "cosine_min": a.get("cosine_min"),
            })
    return out


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def to_markdown(report: dict) -> str:
    env = report["environment"]
    cpu = env["cpu"]
    lines = [f"# bertexport benchmark: {report['model']['source']} ({report['model']['task']})", "",
             f"CPU: {cpu.get('model', '?')} · {cpu.get('cores')} cores · flags {', '.join(cpu.get('flags', []))} · "
             f"threads pinned: {report['config']['threads']} · {report['config']['runs']} interleaved runs per cell, "
             f"{report['config']['warmup']} warm-up · load avg before/after {env.get('load_avg_before')}/{env.get('load_avg_after')}", "",
             "| candidate | batch | seq | p50 ms | p90 ms | p99 ms | seq/s | speedup (p10-p90) | accuracy % | drop pts | agreement |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows(report):
        lines.append(f"| {r['candidate']} | {r['batch']} | {r['sequence']} | {r['p50_ms']:.2f} | {r['p90_ms']:.2f} | {r['p99_ms']:.2f} | "
                     f"{r['throughput']:.1f} | {r['speedup']:.2f}x ({r['speedup_p10']:.2f}-{r['speedup_p90']:.2f}) | "
                     f"{_fmt(r['accuracy'], '.2f')} | {_fmt(r['drop'], '+.2f')} | {_fmt(r['agreement'], '.4f')} |")
    lines += ["", "| candidate | size MB | load s | RSS +MB |", "|---|---|---|---|"]
    for c in report["candidates"]:
        lines.append(f"| {c['name']} | {c['size_bytes'] / 1e6:.1f} | {_fmt(c['load_seconds'], '.2f')} | {_fmt(c['rss_delta_mb'], '.1f')} |")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: str | Path) -> Path:
    """PNG: p50 latency per candidate with p10-p90 spread for each cell; accuracy vs latency
    when labelled data was given."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    acc = report.get("accuracy") or {}
    has_acc = any(v.get("metric_candidate") is not None for v in acc.values())
    fig, axes = plt.subplots(1, 2 if has_acc else 1, figsize=(12 if has_acc else 7, 4.5), squeeze=False)
    ax = axes[0][0]
    names = [c["name"] for c in report["candidates"]]
    width = 0.8 / max(len(report["cells"]), 1)
    for i, cell in enumerate(report["cells"]):
        vals = [np.asarray(cell["results"][n]["latency"]["values"]) * 1e3 for n in names]
        p50 = [np.percentile(v, 50) for v in vals]
        lo = [p - np.percentile(v, 10) for p, v in zip(p50, vals)]
        hi = [np.percentile(v, 90) - p for p, v in zip(p50, vals)]
        ax.bar(np.arange(len(names)) + i * width, p50, width, yerr=[lo, hi], capsize=3, label=f"b{cell['batch']}/s{cell['sequence']}")
    ax.set_xticks(np.arange(len(names)) + width * (len(report["cells"]) - 1) / 2)
    ax.set_xticklabels(names, rotation=20, ha="right")
    ax.set_ylabel("latency p50 (ms), bars p10-p90")
    ax.set_title(f"{report['model']['source']} · {report['config']['threads']} thread(s)")
    ax.legend()
    if has_acc:
        ax2 = axes[0][1]
        cell = report["cells"][0]
        for n in names:
            a = acc.get(n, {})
            y = a.get("metric_candidate")
            if y is not None:
                ax2.scatter(cell["results"][n]["latency"]["p50"] * 1e3, y)
                ax2.annotate(n, (cell["results"][n]["latency"]["p50"] * 1e3, y))
        ax2.set_xlabel(f"latency p50 (ms), b{cell['batch']}/s{cell['sequence']}")
        ax2.set_ylabel("accuracy (%)")
        ax2.set_title("accuracy vs latency")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def check_out_dir(out_dir: str | Path, force: bool = False) -> None:
    """Before measuring: ``out_dir`` may be created, or replaced when it is a benchmark folder and ``force``."""
    from bertexport.staging import check_destination, check_writable

    check_destination(Path(out_dir), force, [], "benchmark folder")
    check_writable(Path(out_dir), 10 << 20, "benchmark report")


def write_outputs(report: dict, out_dir: str | Path, force: bool = False) -> dict[str, Path]:
    """benchmark.json/.md/.png, published together (staged, then renamed into place)."""
    from bertexport.staging import StagedFolder

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
        targets = {c["name"]: c.get("target") or c["name"] for c in r.candidates}
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
