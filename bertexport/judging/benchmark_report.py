"""The benchmark report: the record ``benchmark`` returns (``BenchmarkReport``, schema
``SCHEMA``) and everything that reads one — its rows, the Markdown and terminal tables, the
plot, the published folder (benchmark.json/.md/.png), and two reports side by side
(``benchmark --compare``). Candidates appear by one number with a key of full names."""

from __future__ import annotations

import datetime as _dt
import json
from dataclasses import dataclass, field
from pathlib import Path

from bertexport import __version__
from bertexport.building.report import interval_level, interval_note, interval_of, with_interval
from bertexport.core.errors import UserError
from bertexport.judging.gates import GATES

SCHEMA = "bertexport.judging.benchmark/1"


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
                # timed in turns (``benchmark(turn=...)``): back-to-back calls beside the first after a switch
                "steady_p50_ms": r["steady"]["p50"] * 1e3 if "steady" in r else None,
                "steady_speedup": r["steady_speedup"]["p50_ratio"] if "steady" in r else None,
            })
    return out


def _in_turns(report: dict) -> bool:
    return (report["config"].get("turn") or 1) > 1


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
    turns = _in_turns(report)
    if turns:
        lines += ["", f"Timed in turns of {report['config']['turn']} calls per candidate: p50 to speedup read the turn's "
                      "first call (after another candidate ran: a sporadic request); back-to-back, the median of its other "
                      "calls (a busy server)."]
    lines += ["", "| # | candidate | batch | seq | p50 ms | p90 ms | p99 ms | seq/s | speedup (p10-p90) |"
              + (" back-to-back p50 ms | back-to-back speedup |" if turns else ""),
              "|---|---|---|---|---|---|---|---|---|" + ("---|---|" if turns else "")]
    for r in rows(report):
        lines.append(f"| {r['key']} | {r['candidate']} | {r['batch']} | {r['sequence']} | {r['p50_ms']:.2f} | {r['p90_ms']:.2f} | "
                     f"{r['p99_ms']:.2f} | {r['throughput']:.1f} | {r['speedup']:.2f}x ({r['speedup_p10']:.2f}-{r['speedup_p90']:.2f}) |"
                     + (f" {r['steady_p50_ms']:.2f} | {r['steady_speedup']:.2f}x |" if turns else ""))
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
    turns = _in_turns(report)
    lat = Table(title="latency (by candidate #)" + (f"; turns of {report['config']['turn']} calls: p50 after a switch, "
                                                    "b2b = back-to-back" if turns else ""), title_justify="left")
    for col in ("#", "b", "seq", "p50 ms", "p90 ms", "p99 ms", "seq/s", "speedup (p10-p90)") + (("b2b ms", "b2b x") if turns else ()):
        lat.add_column(col, justify="right", overflow="fold")
    for r in rows(report):
        lat.add_row(str(r["key"]), str(r["batch"]), str(r["sequence"]), f"{r['p50_ms']:.2f}", f"{r['p90_ms']:.2f}",
                    f"{r['p99_ms']:.2f}", f"{r['throughput']:.1f}",
                    f"{r['speedup']:.2f}x ({r['speedup_p10']:.2f}-{r['speedup_p90']:.2f})",
                    *((f"{r['steady_p50_ms']:.2f}", f"{r['steady_speedup']:.2f}x") if turns else ()))
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

    from bertexport.core.plots import key, key_height, log_latency_axis, place_numbers, pyplot

    plt = pyplot()
    acc = report.get("accuracy") or {}
    has_acc = any(v.get("metric_candidate") is not None for v in acc.values())
    fig, axes = plt.subplots(1, 2 if has_acc else 1, figsize=(12 if has_acc else 7, 3.6 + key_height(len(report["candidates"]))),
                             squeeze=False, layout="constrained")
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
