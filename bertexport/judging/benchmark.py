"""``benchmark``: latency, throughput, memory and (with labelled data) accuracy of the
PyTorch original and every artifact, side by side, in one interleaved run.

Every cell (batch x sequence) times all candidates in interleaved rounds so drift on a
shared machine hits them alike, each following every other about equally often
(``latency.round_orders``); threads are pinned and recorded; raw timings are kept in the
JSON report together with the environment. Candidates are named by what they are (profile
or recipe, precision, student shape; ``bertexport.building.report.artifact_label``), never by their
folder; the report and its tables are ``bertexport.judging.benchmark_report``'s.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from bertexport.building.report import artifact_label, student_shape, unique_labels
from bertexport.core.envinfo import environment
from bertexport.core.errors import UserError
from bertexport.core.hashing import cache_key
from bertexport.core.progress import Reporter
from bertexport.judging.benchmark_report import (BenchmarkReport, ReportComparison, check_out_dir, compare_report_files,
                                                 write_outputs)
from bertexport.judging.latency import speedup, time_interleaved, time_turns
from bertexport.judging.settings import BenchmarkSettings

MIN_RUNS = 5


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
    turn: int = 1,
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
    are timed alone, speedups against the first artifact, in the same report schema.

    ``turn``: calls per candidate in each interleaved round. With 1 every call follows another
    candidate's (balanced rounds). With more, a cell's ``latency`` is each turn's first call (the
    same regime: after another model had the cores, as a sporadic request meets it) and
    ``steady`` the median of the turn's other calls (back-to-back requests, a busy server),
    with its own ``steady_speedup`` (``latency.time_turns``). A fixed wake-up cost per call
    weighs more on a small model, so the two regimes can rank a student's gain differently."""
    import importlib.util

    from bertexport.building.checkpoint import load_model, resolve_checkpoint
    from bertexport.judging.compare import reference_runner
    from bertexport.judging.compare import fixed_cell_feeds
    from bertexport.shipping.runtime import Artifact
    from bertexport.core.textdata import builtin_samples, load_texts

    reporter = reporter or Reporter()
    if runs < MIN_RUNS:
        raise UserError(f"--runs {runs} is too few for percentiles; use at least {MIN_RUNS} (100+ for a meaningful p99)")
    if threads < 1 or turn < 1 or any(b < 1 for b in batches) or any(s < 1 for s in sequences):
        raise UserError("threads, --turn, batch sizes and sequence lengths must be >= 1")
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
        with reporter.step(f"time b{b}/s{s}: {len(cands)} candidates x {runs} interleaved runs"
                           + (f" in turns of {turn} calls" if turn > 1 else "")):
            if turn > 1:
                turns = time_turns(calls, runs=runs, turn=turn, warmup=warmup)
                timed, steady = {k: v["switch"] for k, v in turns.items()}, {k: v["steady"] for k, v in turns.items()}
            else:
                timed, steady = time_interleaved(calls, runs=runs, warmup=warmup), None
        seq_len = s if s != "real" else float(sum(int(f["attention_mask"].sum()) for f in batches_feeds) / sum(len(f["input_ids"]) for f in batches_feeds))
        ref = timed[cands[0].name]
        results = {}
        for c in cands:
            lat = timed[c.name]
            results[c.name] = {"latency": lat.to_dict(with_values=True), "throughput": lat.throughput(b),
                               "speedup": speedup(ref, lat)}
            if steady:
                results[c.name] |= {"steady": steady[c.name].to_dict(with_values=True),
                                    "steady_throughput": steady[c.name].throughput(b),
                                    "steady_speedup": speedup(steady[cands[0].name], steady[c.name])}
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
                "runs": runs, "warmup": warmup, "turn": turn, "threads": threads, "seed": seed, "interleaved": True,
                "reference": "pytorch" if reference else cands[0].name},
        environment=env | {"load_avg_before": load_before, "load_avg_after": _load_avg()},
        candidates=[{"name": c.name, "kind": c.kind, "artifact": c.artifact, "target": c.target, "precision": c.precision,
                     "student_shape": c.student_shape, "size_bytes": c.size_bytes, "load_seconds": c.load_seconds,
                     "rss_delta_mb": c.rss_delta_mb}
                    for c in cands],
        cells=cells,
        accuracy=accuracy,
    ).to_dict()


# -- the command ------------------------------------------------------------------------------

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
                       texts=s.texts, data=s.data, data_limit=s.data_limit, runs=s.runs, warmup=s.warmup, turn=s.turn,
                       threads=s.threads, force=s.force, reference=s.reference, trusted_key=s.trusted_key,
                       reporter=reporter)
    written = write_outputs(report, s.out_dir, force=s.force) if s.out_dir else {}
    return BenchmarkOutcome(report=report, written=written)
