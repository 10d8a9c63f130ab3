"""The optimize report (search.md, search.png): candidates named by what they are, intervals
beside every agreement/drop, within-noise verdicts marked, every timed candidate plotted
(pruned ones in grey), the Pareto front drawn, a log latency axis, no overlapping numbers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bertexport.judging import stats
from bertexport.search.candidates import Candidate
from bertexport.judging.gates import Gates, judge
from bertexport.search.report import candidate_label, figure, held_out_caveat, label_candidates, pareto_front, to_markdown


def _drop(ref_right: int, cand_right: int, both: int, n: int) -> dict:
    """Task metrics of a candidate on ``n`` labelled rows, built from paired outcomes, with
    the interval computed by bertexport.judging.stats (nothing typed in)."""
    ref = np.zeros(n, bool)
    cand = np.zeros(n, bool)
    ref[:both] = cand[:both] = True
    ref[both:both + ref_right] = True
    cand[both + ref_right:both + ref_right + cand_right] = True
    iv = stats.accuracy_drop(ref, cand)
    agree = stats.agreement(ref == cand)
    return {"metric_drop": iv.estimate, "agreement": agree.estimate, "cosine_min": 0.99,
            "stats": {"metric_drop": iv.to_dict(), "agreement": agree.to_dict()}}


def _trial(cand: Candidate, status: str, latency, metrics=None, reason="", **extra) -> dict:
    return {"candidate": cand.to_dict(), "status": status, "reason": reason, "latency_ms": latency, "metrics": metrics or {},
            "confirm_metrics": {}, "artifact": None, "build_seconds": None, "cached": False} | extra


# recipes as optimize describes them (bertexport.search.candidates), written out so the test does not follow the list
OV = Candidate("ov-int8-f32", "openvino", "int8", [{"type": "openvino-convert"}, {"type": "nncf-quantize"}],
               {"inference_precision": "f32"}, anchor=True)
ORT = Candidate("ort-int8-avx2", "onnxruntime", "int8", [{"type": "ort-dynamic-quantize", "isa": "avx2"}], {})
OVW = Candidate("ov-int8w-f32", "openvino", "int8-weights", [{"type": "openvino-convert"}, {"type": "openvino-compress-weights"}],
                {"inference_precision": "f32"})
OVFP32 = Candidate("ov-fp32", "openvino", "fp32", [{"type": "openvino-convert"}], {"inference_precision": "f32"})


@pytest.fixture()
def report():
    ov, ort, ovw, ovfp32 = OV, ORT, OVW, OVFP32
    student = Candidate(ov.recipe, ov.backend, ov.precision, ov.passes, ov.runtime, student_layers=3)
    cands = label_candidates([
        _trial(ov, "failed", 20.0, _drop(4, 1, 100, 150), "metric_drop 2.00 > 1.0", within_noise=True),
        _trial(ort, "failed", 2.0, _drop(9, 0, 100, 150), "metric_drop 6.00 > 1.0"),
        _trial(ort.with_float(["ffn_output@0", "ffn_output@1"]), "passed", 2.5, _drop(1, 1, 100, 150), "meets the gate"),
        _trial(ort.with_float(["ffn_output@0"]), "failed", 2.5, _drop(1, 1, 100, 150), "met search, not held-out"),  # same point
        _trial(ovw, "pruned", 30.0, None, "slower (30.00 ms) than the best passing 2.50 ms"),
        _trial(ovfp32, "pruned", None, None, "predicted slower: fp32 activations vs the passing int8"),
        _trial(student, "failed", 1.1, _drop(3, 0, 100, 150), "metric_drop 2.00 > 1.0"),
    ])
    winner = cands[2]["candidate"]
    return {"model": {"source": "/models/news-topic", "task": "text-classification"},
            "gate": Gates(max_accuracy_drop=1.0).given(),
            "data": {"search": {"rows": 150}, "confirm": {"rows": 150}}, "budget_seconds": 1200, "elapsed_seconds": 61.0,
            "cell": {"batch": 1, "sequence": 128, "threads": 2}, "machine": {"cpu_features": ["avx2", "fma"], "backends": []},
            "region_ranking": None, "candidates": cands,
            "final_timing": {winner["name"]: {"p50_ms": 2.4, "p90_ms": 2.6, "vs_pytorch": 5.0, "vs_anchor": 8.1},
                             "pytorch": {"p50_ms": 12.0, "p90_ms": 13.0, "vs_pytorch": 1.0, "vs_anchor": None}},
            "winner": {"name": winner["name"], "candidate": winner, "search_metrics": cands[2]["metrics"],
                       "confirm_metrics": _drop(2, 1, 100, 150)}}


def test_pareto_front_by_hand():
    pts = [(1.0, 5.0), (2.0, 1.0), (3.0, 2.0), (4.0, 0.5), (2.0, 3.0)]
    assert pareto_front(pts, higher_is_better=False) == [(1.0, 5.0), (2.0, 1.0), (4.0, 0.5)]
    assert pareto_front(pts, higher_is_better=True) == [(1.0, 5.0)]


def test_candidate_labels_say_recipe_precision_float_regions_and_student_shape(tmp_path):
    ov, ort = OV, ORT
    assert candidate_label(ort.to_dict()) == "ort-int8-avx2"
    assert candidate_label(OVW.to_dict()) == "ov-int8w-f32 int8-weights"  # the precision, where the name does not say it
    assert candidate_label(ort.with_float(["a", "b", "c"]).to_dict()) == "ort-int8-avx2+float[3]"
    student = Candidate(ov.recipe, ov.backend, ov.precision, ov.passes, ov.runtime, student_layers=3).to_dict()
    assert candidate_label(student) == "ov-int8-f32 student L3"  # not built yet: its depth only
    build = tmp_path / "build"  # a student build: the shape comes from its checkpoint's config
    ckpt = tmp_path / "student-ckpt"
    build.mkdir()
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({"model_type": "bert", "num_hidden_layers": 3, "hidden_size": 384,
                                                  "num_attention_heads": 12, "intermediate_size": 1536}))
    (build / "manifest.json").write_text(json.dumps({"family": "bert", "source": {"path": str(ckpt)},
                                                     "distillation": {"student": {"layers": 3}}}))
    assert candidate_label(student, build) == "ov-int8-f32 student L3-H384-A12-F1536"
    skipped = Candidate("student3", "-", "-", [], {}, student_layers=3).to_dict()
    assert candidate_label(skipped) == "student L3"


def test_markdown_marks_within_noise_and_shows_intervals(report):
    md = to_markdown(report)
    rows = [line for line in md.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [r.split(" | ")[1] for r in rows] == [c["label"] for c in report["candidates"]]
    assert "| failed (within noise) |" in rows[0] and "within noise" not in rows[1]
    assert "*within noise*" in md
    for row, c in zip(rows, report["candidates"]):
        st = c["metrics"].get("stats", {}).get("metric_drop")
        if st:
            assert f"{st['estimate']:+.2f} [{st['low']:+.2f}, {st['high']:+.2f}]" in row
            ag = c["metrics"]["stats"]["agreement"]
            assert f"{ag['estimate']:.4f} [{ag['low']:.4f}, {ag['high']:.4f}]" in row
    cm = report["winner"]["confirm_metrics"]["stats"]["metric_drop"]
    assert f"held-out slice: drop {cm['estimate']:+.2f} [{cm['low']:+.2f}, {cm['high']:+.2f}]" in md
    assert f"winner: **{report['candidates'][2]['label']}**" in md
    assert f"| {report['candidates'][2]['label']} | 2.40 |" in md and "| pytorch fp32 | 12.00 |" in md


def test_a_winner_passed_within_noise_says_so_and_how_to_decide_it(report):
    """The winner's held-out verdict as the search records it (``session._judge``: the confirm
    slice judged by the point estimate; a straddling interval kept as noise): PASSED must not
    hide that the rows could not resolve the gate, and must say how to decide it."""
    assert held_out_caveat(report) is None and "within noise (" not in to_markdown(report)  # no noise recorded
    held_out = judge(report["winner"]["confirm_metrics"], Gates(max_accuracy_drop=1.0))
    assert held_out.status == "passed" and held_out.within_noise  # 150 rows: +0.67 [low, high] straddles 1.0
    need = held_out.verdicts[0].rows_needed
    assert need > 150 and f"about {need:,} rows would decide it" in held_out.within_noise[0]
    winner = report["candidates"][2]  # its trial record (``session.Trial.to_dict``)
    winner["noise"] = ["search slice: undecided: ..."] + [f"confirm slice: {n}" for n in held_out.within_noise]
    caveat = held_out_caveat(report, "/tmp/winner")
    assert caveat.startswith("held-out verdict within noise (accuracy drop 0.67 points") and f"about {need:,} rows" in caveat
    assert ("`bertexport validate /tmp/winner --model /models/news-topic --force --data MORE.csv "
            "--max-accuracy-drop 1.0 --confidence 0.95`") in caveat
    assert f"- **{held_out_caveat(report)}**" in to_markdown(report)
    # noise on the search slice alone (decided on the held-out slice): nothing to say
    winner["noise"] = ["search slice: undecided: ..."]
    assert held_out_caveat(report) is None


def test_plot_every_timed_candidate_front_log_axis_and_no_overlap(report):
    import matplotlib.pyplot as plt
    from matplotlib.text import Text

    fig = figure(report)
    ax, strip = fig.axes[:2]
    assert ax.get_xscale() == "log" and strip.get_xscale() == "log"
    cands = report["candidates"]
    # every timed candidate is in the key, by number; the one pruned by prediction (never timed) is counted, not drawn
    legend = fig.legends[0]
    timed = [(i, c) for i, c in enumerate(cands, 1) if c["latency_ms"] is not None]
    assert [t.get_text() for t in legend.get_texts()] == [c["label"] for _, c in timed]
    assert "1 more not timed" in legend.get_title().get_text()
    # the pruned one that was timed sits in the grey strip at its quick latency
    (pruned_x,) = [x for coll in strip.collections for x, _ in coll.get_offsets()]
    assert pruned_x == cands[4]["latency_ms"] and [t.get_text() for t in strip.texts] == ["5"]
    # the Pareto front through the evaluated points
    evaluated = [(c["latency_ms"], c["metrics"]["metric_drop"]) for c in cands if c["metrics"]]
    (front,) = [line for line in ax.get_lines() if line.get_color() == "tab:blue"]
    assert list(zip(front.get_xdata(), front.get_ydata())) == pareto_front(evaluated, higher_is_better=False)
    # numbers never overlap, even for the two candidates on the same point
    renderer = fig.canvas.get_renderer()
    boxes = [t.update_positions(renderer) or Text.get_window_extent(t, renderer) for t in ax.texts]  # the numbers, not their leader lines
    assert sorted(t.get_text() for t in ax.texts) == sorted(str(i) for i, c in enumerate(cands, 1) if c["metrics"])
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
    # the gated figure's interval is drawn as error bars
    assert any(len(c.get_segments()) for c in ax.collections if hasattr(c, "get_segments"))
    plt.close(fig)


def test_plot_with_a_student_grid_keeps_its_axes(report):
    """An optimize search with the student grid names 40+ candidates in the key: the figure
    grows with the key instead of squeezing the plot (it collapsed: constrained layout gave up
    with a warning and drew the axes a few pixels high)."""
    import warnings

    import matplotlib.pyplot as plt

    many = dict(report)
    students = [_trial(Candidate(OV.recipe, OV.backend, OV.precision, OV.passes, OV.runtime, student_layers=2 + k % 2),
                       "skipped", None, None, "budget", predicted_ms=1.0 + 0.1 * k, label=f"student shape {k}")
                for k in range(36)]
    many["candidates"] = report["candidates"] + students
    heights = {}
    for name, rep in (("few", report), ("many", many)):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # "constrained_layout not applied" is a UserWarning
            fig = figure(rep)
            fig.canvas.draw()
        ax = fig.axes[0]
        heights[name] = (ax.get_window_extent().height / fig.dpi, len(fig.legends[0].get_texts()))
        plt.close(fig)
    assert heights["many"][1] == heights["few"][1] + 36  # every student named in the key
    assert heights["many"][0] >= 0.9 * heights["few"][0] > 2.0  # inches of plot, not squeezed by the key


def test_real_search_report_labels_students_by_shape(keyword_model, tmp_path):
    """A real optimize run with a distilled student: every candidate labelled, distinct,
    the student by its real shape; search.md and search.png published with the artifact."""
    from bertexport.search.optimize import optimize
    from tests.tinymodels import keyword_sentence

    rng = np.random.default_rng(5)
    data = tmp_path / "kw.jsonl"
    with open(data, "w") as f:
        for _ in range(120):
            y = int(rng.integers(0, 2))
            f.write(json.dumps({"text": keyword_sentence(rng, int(rng.integers(4, 30)), "excellent" if y else None),
                                "label": ["absent", "present"][y]}) + "\n")
    res = optimize(str(keyword_model), data, tmp_path / "d", budget="5m", distill="1", distill_epochs=1,
                   backends={"onnxruntime"}, threads=1, gates=Gates(max_accuracy_drop=100.0))
    cands = res.report["candidates"]
    labels = [c["label"] for c in cands]
    assert len(set(labels)) == len(labels)
    built_students = [c for c in cands if c["candidate"]["student_layers"] and c["artifact"]]
    assert built_students
    for c in built_students:
        manifest = json.loads((Path(c["artifact"]) / "manifest.json").read_text())
        cfg = json.loads((Path(manifest["source"]["path"]) / "config.json").read_text())
        shape = f"L{cfg['num_hidden_layers']}-H{cfg['hidden_size']}-A{cfg['num_attention_heads']}-F{cfg['intermediate_size']}"
        assert cfg["num_hidden_layers"] == 1 and c["label"].endswith(f"student {shape}")
    md = (res.artifact / "search.md").read_text()
    assert all(f"| {label} |" in md for label in labels)
    assert (res.artifact / "search.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_learning_curve_marks_where_the_cooldown_began_and_the_state_kept():
    from bertexport.search.report import curves_markdown
    from bertexport.search.student_training import learning_curve

    training = {"initial_eval": {"score": 0.6}, "stopped": "plateau", "best_step": 30, "epochs_run": 2.0,
                "evals": [{"step": s, "epoch": s / 10, "score": v} for s, v in ((10, 0.9), (20, 0.89), (30, 0.93))],
                "schedule": {"cooldown": {"from_step": 20, "steps": 10, "lr_from": 1e-4}}}
    rec = {"shape": "L2-H384-A12-F768"} | learning_curve(training)
    assert rec["cooldown_from_step"] == 20
    line = curves_markdown([rec])[-1]
    assert line == "- L2-H384-A12-F768: stopped by plateau after 2 epochs — 0:0.600, 1:0.900, 2:0.890 |, 3:0.930*"
    assert learning_curve({"evals": []})["cooldown_from_step"] is None
    # a cooldown the time started between evaluations is marked after the last one before it; the annealed end kept
    timed = training | {"kept_step": 30, "schedule": {"cooldown": {"from_step": 24, "steps": 6, "lr_from": 1e-4}}}
    line = curves_markdown([{"shape": "L1-H384-A12-F1536"} | learning_curve(timed)])[-1]
    assert line.endswith("1:0.900, 2:0.890 |, 3:0.930*")


def test_held_out_figures_show_the_macro_f1_drop_of_a_classifier():
    from bertexport.search.report import held_out_figures

    cm = {"metric_drop": 0.28, "agreement": 0.99, "cosine_min": 0.78, "samples": 351,
          "macro_f1_reference": 0.9659, "macro_f1_candidate": 0.8363,
          "stats": {"macro_f1_drop": {"estimate": 12.96, "low": -2.67, "high": 16.01, "confidence": 0.95}}}
    # accuracy barely moved while the rare classes were lost: both are shown, the macro-F1 with its interval
    assert "drop +0.28 pts · macro-F1 drop +12.96 [-2.67, +16.01] pts · agreement" in held_out_figures(cm)
    no_interval = {k: v for k, v in cm.items() if k != "stats"}
    assert "macro-F1 drop +12.96 pts" in held_out_figures(no_interval)
    # an unlabelled or embedding model has no macro-F1: nothing is made up
    assert "macro-F1" not in held_out_figures({"metric_drop": 0.1, "agreement": 0.99, "samples": 10})
