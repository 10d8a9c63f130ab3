"""The record ``optimize`` leaves: the search report (``search.json``), its Markdown
(``search.md``) and its Pareto plot (``search.png``).

Every candidate carries a ``label`` saying what it is (recipe, precision, regions kept in
float, student shape) and a number shared by the Markdown table and the plot."""

from __future__ import annotations

import shlex
import time
from pathlib import Path

from bertexport import __version__
from bertexport.building.report import describe_build, interval_level, interval_of, read_json, student_shape, unique_labels, with_interval
from bertexport.search.replay import SAME_AS_BEFORE

SCHEMA = "bertexport.search/1"


def candidate_label(candidate: dict, folder: str | Path | None = None) -> str:
    """What a search candidate is, from its record (``Candidate.to_dict``) and, for a
    student, the shape of its build: ``ort-int8-avx2+float[4]``, ``ov-int8-f32 student L3-H384-A12-F1536``."""
    layers = candidate.get("student_layers")
    built = candidate.get("backend") not in (None, "-")
    name = candidate["recipe"] if built else ""
    if candidate.get("keep_float"):
        name += f"+float[{len(candidate['keep_float'])}]"
    if candidate.get("early_exit"):  # exit heads on this recipe's segments (``search.early_exit_candidate``)
        return "early exit + " + describe_build(name, candidate.get("precision") if built else None)
    if candidate.get("pruned"):  # the original after post-training pruning (``search.pruned``)
        return f"pruned {candidate['pruned']:g} MACs + " + describe_build(name, candidate.get("precision") if built else None)
    shape = candidate.get("student")  # the shape's name (L3-H256-A8-F768); older records: the depth only
    if layers and not shape:
        manifest = read_json(folder, "manifest.json") if folder else {}
        shape = (student_shape(manifest, folder) if manifest.get("distillation") else None) or (
            f"L{layers}" if layers > 0 else "half depth")
    return describe_build(name, candidate.get("precision") if built else None, shape)


def label_candidates(candidates: list[dict]) -> list[dict]:
    """Give every candidate record (``Trial.to_dict``) a distinct ``label``."""
    labels = unique_labels([candidate_label(c["candidate"], c.get("artifact")) for c in candidates],
                           [c.get("artifact") for c in candidates])
    for c, label in zip(candidates, labels):
        c["label"] = label
    return candidates


def build_report(ckpt, gates, search, ranking, final, winner, confirm, search_slice, confirm_slice, budget_s, elapsed,
                 threads, batch, sequence, features, backends) -> dict:
    from bertexport.core.envinfo import environment

    candidates = label_candidates([t.to_dict() for t in search.trials])
    return {
        "schema": SCHEMA,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "bertexport_version": __version__,
        "model": {"source": ckpt.source, "sha256": ckpt.sha256, "family": ckpt.family, "task": ckpt.task},
        "gate": gates.given(),
        "data": {"search": {"rows": len(search_slice.data.texts), "digest": search_slice.digest},
                 "confirm": {"rows": len(confirm_slice.data.texts), "digest": confirm_slice.digest}},
        "budget_seconds": budget_s, "elapsed_seconds": round(elapsed, 1),
        "cell": {"batch": batch, "sequence": sequence, "threads": threads},
        "machine": {"cpu_features": sorted(features), "backends": sorted(backends)},
        "region_ranking": ranking,
        "candidates": candidates,
        "final_timing": final,
        "winner": None if winner is None else {"name": winner.candidate.name, "candidate": winner.candidate.to_dict(),
                                               "search_metrics": winner.metrics, "confirm_metrics": confirm},
        "environment": environment(),
    }


def _fmt(v, spec="", none="-"):
    return none if v is None else format(v, spec)


def labels_by_name(report: dict) -> dict[str, str]:
    """Candidate name (``Candidate.name``, the key of ``final_timing`` and ``winner``) -> label."""
    out = {"pytorch": "pytorch fp32"}
    for c in report["candidates"]:
        out.setdefault(c["candidate"]["name"], c.get("label") or c["candidate"]["name"])
    return out


def _status(c: dict) -> str:
    return c["status"] + (" (within noise)" if c.get("within_noise") else "")


def held_out_figures(cm: dict) -> str:
    """The winner's held-out figures in one line: drop, agreement, lowest cosine (with intervals);
    for a labelled classifier the macro-F1 drop too (gated only with ``--max-macro-f1-drop``: on
    Reuters R8, 2026-12-05, the winners lost 0.3-0.6 points of accuracy and 13-15 of macro-F1, the
    rare topics)."""
    macro = ""
    if cm.get("macro_f1_reference") is not None and cm.get("macro_f1_candidate") is not None:
        points = 100 * (cm["macro_f1_reference"] - cm["macro_f1_candidate"])  # figures of older searches lack the drop
        macro = f" · macro-F1 drop {with_interval(cm | {'macro_f1_drop': points}, 'macro_f1_drop', '+.2f')} pts"
    return (f"drop {with_interval(cm, 'metric_drop', '+.2f')} pts{macro} · agreement {with_interval(cm, 'agreement')} · "
            f"cos min {_fmt(cm.get('cosine_min'), '.4f')} · {cm.get('samples', '?')} rows")


def held_out_caveat(report: dict, artifact: str | Path = "ARTIFACT") -> str | None:
    """What a winner's PASSED rests on when the held-out slice could not resolve its gate (the
    point estimate met it, the interval straddled it), and how to decide it: the artifact
    judged on more labelled rows against the original. None when the verdict was resolved.
    On a 5-topic news task, three winners that passed a 349-row slice within noise lost 1.3-1.9
    points on 4,925 untouched posts (docs/measurements.md)."""
    name = (report.get("winner") or {}).get("name")
    trial = next((c for c in report.get("candidates") or () if c["candidate"]["name"] == name and c["status"] == "passed"), {})
    notes = [n.removeprefix("confirm slice: ") for n in trial.get("noise") or () if n.startswith("confirm slice: ")]
    if not notes:
        return None
    gates = [f"--{k.replace('_', '-')} {v}" for k, v in (report.get("gate") or {}).items() if k != "confidence"]
    command = " ".join(["bertexport validate", shlex.quote(str(artifact)), "--model", shlex.quote(str(report["model"]["source"])),
                        "--force --data MORE.csv", *gates, "--confidence 0.95"])
    return f"held-out verdict within noise ({'; '.join(notes)}): judge it on more labelled rows with `{command}`"


def to_markdown(report: dict) -> str:
    w = report["winner"]
    names = labels_by_name(report)
    metrics = [c["metrics"] for c in report["candidates"]]
    level = interval_level(*metrics)
    lines = [f"# bertexport optimize: {report['model']['source']} ({report['model']['task']})", "",
             f"- gate: {report['gate']} · search slice {report['data']['search']['rows']} rows, "
             f"held-out confirm slice {report['data']['confirm']['rows']} rows",
             f"- cell b{report['cell']['batch']}/s{report['cell']['sequence']}, {report['cell']['threads']} thread(s) · "
             f"CPU features {', '.join(report['machine']['cpu_features']) or 'none'} · "
             f"elapsed {report['elapsed_seconds']} s of {report['budget_seconds']:.0f} s",
             f"- winner: **{names.get(w['name'], w['name'])}**" if w else "- winner: **none** (no candidate met the gate)",
             *([f"- replayed in {report['replayed']['seconds']} s: this search ran on {report['replayed']['memo_created']} with "
                f"{SAME_AS_BEFORE}; every figure here is from that run "
                "(`--search-again` searches again)"] if report.get("replayed") else [])]
    if w and w.get("confirm_metrics"):
        cm = w["confirm_metrics"]
        lines.append(f"- winner on the held-out slice: {held_out_figures(cm)} (brackets: {interval_level(cm)} interval)")
    caveat = held_out_caveat(report)
    if caveat:
        lines.append(f"- **{caveat}**")
    lines.append("")
    if report["final_timing"]:
        lines += ["Interleaved timing (one run):", "", "| candidate | p50 ms | p90 ms | vs PyTorch | vs anchor |", "|---|---|---|---|---|"]
        for n, f in sorted(report["final_timing"].items(), key=lambda kv: kv[1]["p50_ms"]):
            lines.append(f"| {names.get(n, n)} | {f['p50_ms']:.2f} | {f['p90_ms']:.2f} | {f['vs_pytorch']:.2f}x | "
                         f"{_fmt(f['vs_anchor'], '.2f')}{'x' if f['vs_anchor'] is not None else ''} |")
        lines.append("")
    lines += [f"Every candidate (the numbers are the plot's; brackets: {level} interval of the paired difference "
              "to the original on the search slice):", "",
              f"| # | candidate | status | quick p50 ms | drop pts [{level}] | agreement [{level}] | cos min | reason |",
              "|---|---|---|---|---|---|---|---|"]
    for i, c in enumerate(report["candidates"], 1):
        m = c["metrics"] or {}
        quick = _fmt(c["latency_ms"], ".2f") if c.get("latency_ms") is not None or c.get("predicted_ms") is None else (
            f"~{c['predicted_ms']:.2f} (predicted)")
        lines.append(f"| {i} | {c.get('label') or c['candidate']['name']} | {_status(c)} | {quick} | "
                     f"{with_interval(m, 'metric_drop', '+.2f')} | {with_interval(m, 'agreement')} | "
                     f"{_fmt(m.get('cosine_min'), '.4f')} | {c['reason']} |")
    if any(c.get("within_noise") for c in report["candidates"]):
        lines += ["", "*within noise*: the data could not resolve this decision — the difference it rests on is inside "
                      "the interval of what the slice's rows can tell apart."]
    if report.get("pruning"):
        lines += ["", *pruning_markdown(report["pruning"])]
    if report.get("early_exit"):
        lines += ["", *early_exit_markdown(report["early_exit"])]
    if report.get("students"):
        lines += ["", *students_markdown(report)]
    if report.get("region_ranking"):
        lines += ["", "Regions ranked by harm when quantized alone (1 - mean cosine to the original):", ""]
        lines += [f"- {r['region']}: {_fmt(r['harm'], '.5f', 'not measured (budget)')}" for r in report["region_ranking"][:12]]
    return "\n".join(lines) + "\n"


def pruning_markdown(pruning: dict) -> list[str]:
    """The post-training pruned originals (``optimize --prune``), most aggressive budget first:
    the shape each budget gave, its measured MAC fraction, agreement with the original on the
    pruning's own held-out part of the search slice, and whether least-squares tuning was kept."""
    if pruning.get("skipped"):
        return [f"Post-training pruning (--prune {pruning.get('asked')}): skipped — {pruning['skipped']}"]
    lines = ["Post-training pruning of the original (no training; masks and tuning from the search slice; agreement: "
             "on the pruning's held-out part of it; the gate verdicts are the candidates' above):", "",
             "| MAC budget | shape | MAC fraction | agreement | tuning | prune s | status | reason |",
             "|---|---|---|---|---|---|---|---|"]
    for r in pruning.get("records", []):
        tuned = "-" if r.get("tuned") is None else ("kept" if r["tuned"] else "dropped")
        cached = " (cached)" if r.get("cached") else ""
        lines.append(f"| {r['mac_budget']:g} | {r.get('shape') or '-'} | {_fmt(r.get('mac_fraction'), '.3f')} | "
                     f"{_fmt(r.get('agreement'), '.3f')} | {tuned} | {_fmt(r.get('seconds'), '.1f')} | "
                     f"{r['status']}{cached} | {r.get('reason', '')} |")
    return lines


def early_exit_markdown(section: dict) -> list[str]:
    """The early-exit candidate (``optimize --early-exit``): its threshold (chosen on the search
    slice), agreement with its own full model on the search slice, where rows leave, its mean
    row latency on the latency cell with the row p90 and the worst case (no row exits), and the
    gate's figures on the held-out confirm slice (the verdict is the candidate's row above)."""
    if section.get("skipped"):
        return [f"Early exit (--early-exit {section.get('asked')}): skipped — {section['skipped']}"]
    lines = [f"Early exit (--early-exit {section.get('asked')}; heads trained and threshold chosen on the search slice, "
             f"agreement target {section['agreement_target']:.4f}):", ""]
    if section.get("threshold") is None:
        return lines + [f"- {section.get('candidate') or 'no build'}: {section['status']} — {section['reason']}"]
    sl, lat, conf = section.get("search_slice") or {}, section.get("latency") or {}, section.get("confirm") or {}
    refused = "".join(f"; {r['recipe']} refused: {r['reason']}" for r in section.get("refused_targets", []))
    cell = lat.get("cell") or {}
    lines += [f"- {section['candidate']} (segments built on {section['target']}{refused}){' (cached)' if section.get('cached') else ''}",
              f"- threshold **{section['threshold']:.6g}**: agreement with its full model "
              f"{_fmt(sl.get('agreement_with_full_model'), '.4f')} on the {sl.get('rows', '-')} search-slice rows, "
              f"{_fmt(sl.get('mean_layers'), '.2f')} layers per row on average; rows leaving after each layer: "
              + ", ".join(f"{k}: {v}" for k, v in (sl.get("exits") or {}).items()),
              f"- latency per row on the cell b{cell.get('batch')}/s{cell.get('sequence')}, {cell.get('threads')} thread(s): "
              f"mean {_fmt(lat.get('mean_ms'), '.2f')} ms (each exit path timed interleaved, weighted by the rows taking it), "
              f"p90 {_fmt(lat.get('p90_ms'), '.2f')} ms, worst case (no row exits) {_fmt(lat.get('worst_ms'), '.2f')} ms",
              f"- held-out confirm slice: agreement with the original {_fmt(conf.get('agreement'), '.4f')}, drop "
              f"{_fmt(conf.get('metric_drop'), '+.2f')} pts · {section['status']}: {section['reason']}"]
    return lines


def students_markdown(report: dict) -> list[str]:
    """The students, in the order tried (bisection over the predicted latency): shape, the cost model's prediction (measured on
    this machine at random init, or predicted from the measured shapes), the quick latency
    measured on the trained student, and its training time."""
    cm = report.get("cost_model") or {}
    fit = cm.get("fit") or {}
    lines = [f"Students, in the order tried (cost model: {cm.get('recipe', '?')} vs the teacher on {cm.get('reference', '?')}, "
             f"random init, fit {fit.get('model', '-')} over {fit.get('points', 0)} point(s)"
             + (f"; measuring failed: {cm['error']}" if cm.get("error") else "") + "):", "",
             "| shape | status | predicted ratio | predicted ms | measured ms | train s | reason |", "|---|---|---|---|---|---|---|"]
    for r in report["students"]:
        cached = " (cached)" if r.get("cached") else ""
        lines.append(f"| {r['shape']} | {r['status']}{cached} | {r['predicted_ratio']:.2f} ({r['prediction']}) | "
                     f"{_fmt(r.get('predicted_ms'), '.2f')} | {_fmt(r.get('measured_ms'), '.2f')} | "
                     f"{_fmt(r.get('train_seconds'), '.0f')} | {r.get('reason', '')} |")
    return lines + curves_markdown(report["students"])


def curves_markdown(students: list[dict]) -> list[str]:
    """Each trained student's learning curve (``search.student_training.learning_curve``): held-out
    agreement with the teacher (cosine for embedding models) at each evaluation, as
    epoch:score, the kept state starred, and why training stopped."""
    trained = [r for r in students if r.get("curve")]
    if not trained:
        return []
    lines = ["", "Learning curves (held-out agreement with the teacher per evaluation, epoch:score; epoch 0 is before "
                 "training; * the state kept; | the learning rate's cooldown began, at a plateau or near the time's end):", ""]
    for r in trained:
        start = r.get("cooldown_from_step")  # a time-started cooldown begins between evaluations: marked after the last before it
        mark = max((c["step"] for c in r["curve"] if c["step"] <= start), default=None) if start is not None else None
        points = ", ".join(f"{c['epoch']:g}:{c['score']:.3f}{'*' if c['step'] == r.get('kept_step', r.get('best_step')) else ''}"
                           f"{' |' if c['step'] == mark else ''}" for c in r["curve"])
        resumed = f", resumed at step {r['resumed_from_step']}" if r.get("resumed_from_step") else ""
        lines.append(f"- {r['shape']}{' (cached)' if r.get('cached') else ''}: stopped by {r.get('stopped') or '?'} after "
                     f"{_fmt(r.get('epochs_run'), 'g')} epochs{resumed} — {points}")
    return lines


def gated_metric(report: dict) -> tuple[str, str, float | None, bool]:
    """(metrics key, axis label, gate limit, higher is better) of the figure the gate judged:
    the first gate of the report in the registry's order (``bertexport.judging.gates``)."""
    from bertexport.judging.gates import GATES

    spec = next((s for n, s in GATES.items() if n in report["gate"]), GATES["min_cosine"])
    unit = f"{spec.unit}; " if spec.unit else ""
    better = "higher" if spec.direction == "min" else "lower"
    return (spec.metric, f"{spec.what} ({unit}{better} is better) vs the original", report["gate"].get(spec.name),
            spec.direction == "min")


def pareto_front(points: list[tuple[float, float]], higher_is_better: bool) -> list[tuple[float, float]]:
    """The points no other point beats on both latency (lower) and the metric."""
    front: list[tuple[float, float]] = []
    for x, y in sorted(points, key=lambda p: (p[0], -p[1] if higher_is_better else p[1])):
        if not front or (y > front[-1][1] if higher_is_better else y < front[-1][1]):
            front.append((x, y))
    return front


_COLOURS = {"passed": "tab:green", "failed": "tab:red"}


def figure(report: dict):
    """search.png: quick latency (log axis) vs the gated metric for every evaluated
    candidate (bars: its interval), the Pareto front, the gate line and the winner;
    below, candidates timed but pruned before evaluation, in grey at their quick latency,
    and students never built (hopeless, skipped) as hollow diamonds at their predicted latency.
    Candidates are numbers (the Markdown table's); the key under the plot names them."""
    from matplotlib.lines import Line2D

    from bertexport.core.plots import key, key_height, log_latency_axis, place_numbers, pyplot

    plt = pyplot()
    metric, axis_label, limit, higher = gated_metric(report)
    win = (report["winner"] or {}).get("name")
    evaluated, timed_only, predicted = [], [], []
    for i, c in enumerate(report["candidates"], 1):
        m = c["metrics"] or {}
        if c["latency_ms"] is None:
            if c.get("predicted_ms") is not None:  # a student never built (hopeless, skipped): its predicted latency
                predicted.append((i, c))
            continue
        (evaluated if m.get(metric) is not None else timed_only).append((i, c))
    keyed = len(evaluated) + len(timed_only) + len(predicted)
    fig, (ax, strip) = plt.subplots(2, 1, figsize=(8, 4.4 + key_height(keyed)), sharex=True, height_ratios=(5, 1),
                                    layout="constrained")
    entries, points = [], []
    for i, c in evaluated:
        m = c["metrics"]
        x, y = c["latency_ms"], m[metric]
        colour = "0.55" if c["status"] == "pruned" else _COLOURS.get(c["status"], "0.55")
        st = interval_of(m, metric)
        yerr = None if st is None else [[max(y - st["low"], 0.0)], [max(st["high"] - y, 0.0)]]
        is_win = c["candidate"]["name"] == win
        ax.errorbar(x, y, yerr=yerr, fmt="*" if is_win else "o", markersize=13 if is_win else 6, color=colour, capsize=3,
                    zorder=4 if is_win else 3)
        if c.get("within_noise"):
            ax.scatter(x, y, s=190, facecolors="none", edgecolors="tab:orange", linewidths=1.5, zorder=4)
        points.append((x, y, i, colour))
        entries.append((i, c.get("label") or c["candidate"]["name"], colour))
    front = pareto_front([(p[0], p[1]) for p in points], higher)
    if front:
        ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="tab:blue", linewidth=1, alpha=0.7, zorder=2)
    if limit is not None:
        ax.axhline(limit, color="k", linestyle="--", linewidth=1, zorder=1)
    for i, c in timed_only:
        strip.scatter(c["latency_ms"], 0, color="0.55", s=30, zorder=3)
        entries.append((i, c.get("label") or c["candidate"]["name"], "0.55"))
    for i, c in predicted:
        strip.scatter(c["predicted_ms"], 0, facecolors="none", edgecolors="0.55", marker="D", s=30, zorder=3)
        entries.append((i, (c.get("label") or c["candidate"]["name"]) + " (predicted latency)", "0.55"))
    if not timed_only and not predicted:
        strip.text(0.5, 0.5, "none", transform=strip.transAxes, ha="center", va="center", fontsize=7, color="0.4")
    strip.set_yticks([])
    strip.set_ylim(-1, 1.5)
    strip.set_ylabel("not\nevaluated", fontsize=7, rotation=0, ha="right", va="center")
    ax.set_ylabel(axis_label)
    log_latency_axis(strip, "x", f"quick latency p50 (ms), b{report['cell']['batch']}/s{report['cell']['sequence']}, "
                                 f"{report['cell']['threads']} thread(s)")
    ax.margins(x=0.12, y=0.15)
    ax.set_title(f"optimize: {Path(str(report['model']['source'])).name}", fontsize=10)
    status = [Line2D([], [], marker="o", linestyle="None", color=_COLOURS["passed"], label="passed"),
              Line2D([], [], marker="o", linestyle="None", color=_COLOURS["failed"], label="failed"),
              Line2D([], [], marker="o", linestyle="None", color="0.55", label="pruned"),
              Line2D([], [], marker="*", linestyle="None", color="k", markersize=11, label="winner"),
              Line2D([], [], color="tab:blue", label="Pareto front")]
    if limit is not None:
        status.append(Line2D([], [], color="k", linestyle="--", label=f"gate {limit}"))
    if predicted:
        status.append(Line2D([], [], marker="D", linestyle="None", markerfacecolor="none", markeredgecolor="0.55",
                             label="predicted latency (never built)"))
    if any(c.get("within_noise") for _, c in evaluated):
        status.append(Line2D([], [], marker="o", linestyle="None", markerfacecolor="none", markeredgecolor="tab:orange",
                             markersize=11, label="within noise"))
    ax.legend(handles=status, fontsize=7, loc="best")
    not_timed = len(report["candidates"]) - len(evaluated) - len(timed_only) - len(predicted)
    if entries:
        key(fig, sorted(entries), title="candidates" + (f" ({not_timed} more not timed — pruned by prediction, skipped "
                                                        "or not built: see search.md)" if not_timed else ""))
    place_numbers(ax, points)
    place_numbers(strip, [(c["latency_ms"], 0, i, "0.4") for i, c in timed_only]
                  + [(c["predicted_ms"], 0, i, "0.4") for i, c in predicted])
    return fig


def plot(report: dict, path: Path) -> Path:
    """search.png (see ``figure``)."""
    from bertexport.core.plots import save

    return save(figure(report), path)
