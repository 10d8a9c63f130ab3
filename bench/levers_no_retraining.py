"""Issue 24, "the lever table again": what post-training pruning and early exit (no gradient
training of the body) contribute on Rotten Tomatoes, against the best anchor, in one run.

Rows (the teacher is bench/rotten_tomatoes.py's MiniLM classifier, fine-tuned --epochs on the
training split, cached):
  teacher, OpenVINO + NNCF int8 anchor (optimize_targets.anchor_ir: NNCF's documented BERT recipe)
  teacher, ORT anchor int8 (ort_anchor.ort_anchor: Olive's recipe, onnxruntime's own API)
  teacher, the best bertexport int8 recipe (--recipe, or auto: the faster at b1+b8 of the machine's
           first ORT fused int8 and first OpenVINO int8 recipes, timed on the teacher first)
  teacher, ort-fp32 (what the early-exit artifact is built from)
  teacher pruned without retraining to each --budgets fraction of its MACs
           (bertexport.students.pruning: calibrate once on --prune-samples training texts with
           their labels, prune_calibrated per budget), each with the same int8 recipe
  with --distill-pruned: each pruned checkpoint distilled from the teacher on the training split
           (students.distill with --student-init PRUNED: patience on held-out agreement), the same
           int8 recipe — the "pruned + distilled" lever; with --skip each again with first-token skipping
  with --layer-drop N: N of the teacher's layers at full width, distilled ("distillation alone")
  with --init-student DIR: a pre-trained smaller checkpoint (bench/pretrained_l3.py), distilled
  early exit (--exit MODEL@TARGET, repeatable; default the teacher with ort-fp32 segments; heads
           trained on --exit-data training texts, the threshold chosen by the library on its
           held-out 30 %), at that threshold and with no row exiting (the worst case)

Every row: accuracy on the test split (movies unseen in training) with the paired interval of
its drop vs the PyTorch teacher, agreement with the teacher, artifact bytes, p50 at b1/s128 and
b8/s128 (fixed cells, one interleaved run per cell, threads pinned), and per-row latency over
--latency-rows test rows (batch 1, each row at its own length, every contestant interleaved on
each row, p50 of --row-runs per row; mean and p90 over the rows). "x best anchor" divides the
faster anchor's figure by the row's, naming that anchor.

Usage: flock /tmp/bench.lock python bench/levers_no_retraining.py [--threads 2] [--runs 30]
         [--budgets 0.75,0.6] [--prune-samples 2048] [--exit-data 2000] [--latency-rows 500]
Results: <cache>/bench/levers-nr/results.json and results.md; nothing is written to the repo.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

from bertexport.core.cache import cache_dir  # noqa: E402

NNCF, ORT = "NNCF anchor", "ORT anchor"


def pruned_checkpoints(teacher: Path, texts: list[str], labels: list[int], budgets: list[float], samples: int,
                       threads: int, folder: Path) -> dict[float, tuple[Path, dict]]:
    """Each budget's pruned checkpoint (cached), with its PruneResult as a dict; one calibration."""
    out, todo = {}, []
    for b in budgets:
        d = folder / f"pruned-{b}-{samples}"
        out[b] = (d, json.loads((d / "prune_report.json").read_text())) if (d / "prune_report.json").is_file() else None
        todo += [] if out[b] else [b]
    if todo:
        import torch

        from bertexport.building.checkpoint import load_model, load_tokenizer, resolve_checkpoint
        from bertexport.students.pruning import calibrate, prune_calibrated

        torch.set_num_threads(threads)
        ckpt = resolve_checkpoint(str(teacher))
        model, tok = load_model(ckpt), load_tokenizer(ckpt)
        t0 = time.time()
        cal = calibrate(model, tok, texts, labels, samples=samples)
        print(f"pruning calibration: {time.time() - t0:.0f} s", flush=True)
        for b in todo:
            pruned, res = prune_calibrated(model, cal, b)
            d = folder / f"pruned-{b}-{samples}"
            tmp = d.with_name(d.name + ".tmp")
            pruned.save_pretrained(tmp, safe_serialization=True)
            tok.save_pretrained(tmp)
            report = res.to_dict()
            (tmp / "prune_report.json").write_text(json.dumps(report, indent=1, default=str))
            tmp.rename(d)
            out[b] = (d, report)
            print(f"pruned to {b}: {res.student['name'] if isinstance(res.student, dict) else res.student} "
                  f"({res.seconds:.0f} s)", flush=True)
    return out


def distilled_student(teacher: Path, name: str, train_csv: Path, args, folder: Path, **student) -> tuple[Path, dict]:
    """A student distilled from the teacher on the training split (cached by ``name``), with its report:
    ``student=PATH`` starts from a checkpoint (a pruned teacher, a pre-trained small model: --student-init),
    ``layers=N`` from N of the teacher's own layers (full width: "distillation alone")."""
    from bertexport.students.distill import distill
    from bertexport.students.distill_config import DistillConfig

    out = folder / f"{name}-distilled-p{args.distill_patience}-e{args.distill_max_epochs}"
    if not (out / "distill_report.json").is_file():
        t0 = time.time()
        distill(str(teacher), out, data=train_csv, force=True,
                config=DistillConfig(**student, patience=args.distill_patience, max_epochs=args.distill_max_epochs,
                                     threads=args.threads))
        print(f"distilled {name}: {time.time() - t0:.0f} s", flush=True)
    report = json.loads((out / "distill_report.json").read_text())
    report.setdefault("seconds", report.get("train_seconds"))
    return out, report


def with_skip(recipe):
    """The recipe with first-token skipping first (the last layer on the first token only: text classification)."""
    import dataclasses

    return dataclasses.replace(recipe, recipe=recipe.recipe + "+skip",
                               passes=[{"type": "first-token-skip"}] + [dict(p) for p in recipe.passes])


def per_row_latency(calls_for, texts: list[str], encode, runs: int) -> dict[str, dict]:
    """Per-row p50 (batch 1, own length), every contestant interleaved on each row; mean/p90 over rows."""
    from bertexport.judging.latency import Latency, time_interleaved

    per: dict[str, list[float]] = {}
    for text in texts:
        feeds = encode([text])
        for k, t in time_interleaved(calls_for(feeds), runs=runs, warmup=1).items():
            per.setdefault(k, []).append(t.p50)
    return {k: {"mean_ms": Latency.from_values(v).mean * 1e3, "p90_ms": Latency.from_values(v).p90 * 1e3} for k, v in per.items()}


def vs_best_anchor(figures: dict[str, float]) -> tuple[str, float]:
    name = min((NNCF, ORT), key=lambda n: figures[n])
    return name, figures[name]


class NncfAnchorRunner:
    """The NNCF anchor IR (OpenVINO CPU, latency hint, threads pinned) behind the runner interface
    compare_on_data and the timers use."""

    def __init__(self, xml: Path, threads: int):
        import openvino as ov

        core = ov.Core()
        self.model = core.compile_model(core.read_model(str(xml)), "CPU",
                                        {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": str(threads)})
        self.req = self.model.create_infer_request()

    def infer(self, feeds):
        return {"logits": np.asarray(next(iter(self.req.infer(dict(feeds)).values())))}


def accuracy_rows(runners: dict, reference, encode, ts, task: str, labels, out: dict) -> None:
    """Each runner's task metric on ``ts`` vs the PyTorch reference, with the paired interval of its drop, into ``out``."""
    from bertexport.judging.compare import compare_on_data, task_metrics

    cache: dict = {}
    with reference:
        for k, r in runners.items():
            m = task_metrics(compare_on_data(r, reference, encode, ts, task, reference_cache=cache), labels)
            out[k] |= {f: m.get(f) for f in ("metric_reference", "metric_candidate", "metric_drop", "agreement", "samples")}
            out[k]["drop_interval"] = (m.get("stats") or {}).get("metric_drop")
            macro = ""
            if m.get("macro_f1_drop") is not None:  # classification: rare classes the accuracy hides
                out[k] |= {f: m[f] for f in ("macro_f1_reference", "macro_f1_candidate", "macro_f1_drop")}
                out[k]["macro_f1_drop_interval"] = (m.get("stats") or {}).get("macro_f1_drop")
                macro = f", macro-F1 drop {m['macro_f1_drop']:+.2f}"
            print(f"{k}: {m['metric_candidate']:.2f} % (drop {m['metric_drop']:+.2f}{macro}, agreement {m['agreement']:.4f})",
                  flush=True)


TURN = 4  # calls per contestant's turn in the second timing: the first after a switch, the rest back-to-back


def timed_in_turns(calls: dict, runs: int) -> dict:
    """The contestants timed in turns of ``TURN`` calls (``time_turns``), both regimes per
    contestant, each read against the faster anchor in it (which can differ between the
    regimes): ``switch`` (a turn's first call, after another model ran: a sporadic request) and
    ``steady`` (the turn's other calls: back-to-back requests)."""
    from bertexport.judging.latency import speedup, time_turns

    timed = time_turns(calls, runs=runs, turn=TURN)
    out = {}
    for regime in ("switch", "steady"):
        best, best_s = vs_best_anchor({n: t[regime].p50 for n, t in timed.items()})
        for n, t in timed.items():
            lo, hi = (speedup(timed[best][regime], t[regime])[k] for k in ("round_ratio_p10", "round_ratio_p90"))
            out.setdefault(n, {})[regime] = {"p50_ms": t[regime].p50 * 1e3, "x_best_anchor": best_s / t[regime].p50,
                                             "best_anchor": best, "x_best_anchor_rounds_p10_p90": [lo, hi]}
    return out


def fixed_cells(runners: dict, encode, runs: int, out: dict, results: dict) -> None:
    """p50/p90 at b1/s128 and b8/s128, every runner interleaved in one run per cell, x the best anchor, into ``out``."""
    from bertexport.core.textdata import builtin_samples
    from bertexport.judging.compare import fixed_cell_feeds
    from bertexport.judging.latency import time_interleaved

    for b in (1, 8):
        feeds = fixed_cell_feeds(encode, builtin_samples(), b, 128)
        load0 = os.getloadavg()[0]
        calls = {k: (lambda r=r: r.infer(feeds)) for k, r in runners.items()}
        timed = time_interleaved(calls, runs=runs, warmup=5)
        best, best_s = vs_best_anchor({k: t.p50 for k, t in timed.items()})
        turns = timed_in_turns(calls, runs)
        for k, t in timed.items():
            out[k][f"b{b}/s128"] = {"p50_ms": t.p50 * 1e3, "p90_ms": t.p90 * 1e3, "x_best_anchor": best_s / t.p50,
                                    "best_anchor": best, "turns": turns[k]}
        results[f"load_avg_b{b}"] = [load0, os.getloadavg()[0]]


def per_row_cells(runners: dict, texts: list[str], encode, runs: int, out: dict) -> dict:
    """Per-row latency (``per_row_latency``) x the best anchor into ``out``; returns the run's record."""
    load0 = os.getloadavg()[0]
    per = per_row_latency(lambda feeds: {k: (lambda r=r: r.infer(feeds)) for k, r in runners.items()}, texts, encode, runs)
    best, best_ms = vs_best_anchor({k: v["mean_ms"] for k, v in per.items()})
    for k, v in per.items():
        out[k]["per_row_b1"] = v | {"x_best_anchor": best_ms / v["mean_ms"], "best_anchor": best}
    return {"rows": len(texts), "runs_per_row": runs, "load_avg": [load0, os.getloadavg()[0]]}


def stage_clock():
    """A run's stage timer: ``(stages, stage, t_start)``; ``stage(name, t0)`` records the seconds
    since ``t0`` in ``stages`` and prints them with the time since the run started."""
    t_start, stages = time.time(), {}

    def stage(name: str, t0: float) -> None:
        stages[name] = round(time.time() - t0, 1)
        print(f"[{time.time() - t_start:6.0f} s] {name}: {stages[name]:.0f} s", flush=True)

    return stages, stage, t_start


def measure_contestants(judged: dict, timed: dict, *, ckpt, exported, torch_model, encode, test_csv, sample: list[str],
                        args, out: dict, results: dict, stage, sizes: dict) -> None:
    """One measuring run: each of ``judged``'s accuracy on the test file vs the PyTorch teacher
    (``accuracy_rows``), ``sizes`` (label -> bytes), then ``timed``'s fixed cells and per-row latency
    on ``sample`` (``results["per_row"]``), each stage timed by ``stage``."""
    from bertexport.core.textdata import load_texts
    from bertexport.judging.compare import reference_runner, task_labels

    t0 = time.time()
    ts = load_texts(test_csv)
    labels = task_labels(ts, ckpt.task, ckpt.id2label)
    reference = reference_runner(ckpt, exported.input_names, args.threads, torch_model=torch_model)
    accuracy_rows(judged, reference, encode, ts, ckpt.task, labels, out)
    for k, size in sizes.items():
        out[k]["bytes"] = size
    stage("accuracy on the test rows", t0)
    t0 = time.time()
    fixed_cells(timed, encode, args.runs, out, results)
    stage("fixed cells", t0)
    t0 = time.time()
    results["per_row"] = per_row_cells(timed, sample, encode, args.row_runs, out)
    stage("per-row latency", t0)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--runs", type=int, default=30, help="interleaved rounds per fixed cell")
    ap.add_argument("--epochs", type=int, default=1, help="the teacher's fine-tuning epochs (cached)")
    ap.add_argument("--recipe", default="auto", help="the int8 recipe of the teacher and the pruned rows")
    ap.add_argument("--budgets", default="0.75,0.6", help="MAC fractions of the pruned rows")
    ap.add_argument("--prune-samples", type=int, default=2048, help="calibration texts (a further 20 %% held out)")
    ap.add_argument("--exit-data", type=int, default=2000, help="training texts for the exit heads (30 %% held out)")
    ap.add_argument("--test-limit", type=int, default=None, help="accuracy on the first N test rows (default: all)")
    ap.add_argument("--latency-rows", type=int, default=500, help="test rows for the per-row latency")
    ap.add_argument("--row-runs", type=int, default=3, help="timed runs per row and contestant")
    ap.add_argument("--distill-pruned", action="store_true",
                    help="add 'pruned + distilled' rows: each pruned checkpoint distilled from the teacher on the "
                         "training split (distill --student-init PRUNED, until held-out agreement plateaus)")
    ap.add_argument("--distill-budgets", help="with --distill-pruned: only these budgets (default: all)")
    ap.add_argument("--distill-patience", type=int, default=3, help="held-out evaluations without gain (2 per epoch)")
    ap.add_argument("--distill-max-epochs", type=int, default=4)
    ap.add_argument("--skip", action="store_true",
                    help="add each distilled row again with first-token skipping (the last layer on [CLS] only)")
    ap.add_argument("--layer-drop", type=int, action="append", default=[],
                    help="add a 'distillation alone' row: N of the teacher's layers at full width, distilled (repeatable)")
    ap.add_argument("--init-student", action="append", default=[],
                    help="add a 'pre-trained init' row: this smaller checkpoint (the teacher's vocabulary) distilled (repeatable)")
    ap.add_argument("--exit", action="append", default=[], metavar="MODEL@TARGET",
                    help="an early-exit row (repeatable; default teacher@ort-fp32): MODEL is 'teacher' or a distilled "
                         "budget (e.g. 0.35: the pruned + distilled checkpoint), TARGET a profile or a recipe name "
                         "('int8': the run's int8 recipe)")
    ap.add_argument("--prepare-only", action="store_true", help="train and build (cached), measure nothing")
    args = ap.parse_args(argv)
    budgets = [float(b) for b in args.budgets.split(",") if b]


    from bertexport.backends.onnxruntime.runner import OrtRunner
    from bertexport.building.checkpoint import load_model, resolve_checkpoint
    from bertexport.building.export import export_onnx
    from bertexport.core.envinfo import cpu_features, environment
    from bertexport.core.errors import GateFailed
    from bertexport.core.textdata import builtin_samples, label_ids
    from bertexport.judging.compare import fixed_cell_feeds
    from bertexport.judging.latency import time_interleaved
    from bertexport.search.candidates import candidate_recipes
    from bertexport.shipping.runtime import Artifact
    from bertexport.students.early_exit import build_early_exit
    from optimize_targets import anchor_ir, artifact_bytes
    from ort_anchor import ort_anchor
    from rotten_tomatoes import rotten_tomatoes_rows, split_by_movie, train_classifier, write_csv
    from student_levers import build as levers_build

    rejected: list[str] = []

    def build(*a):  # a build a gate rejected is still measured (kept as <out>.rejected), and said so
        try:
            return levers_build(*a)
        except GateFailed as e:
            rejected.append(f"{a[2]}: {'; '.join(e.failures)[:200]}")
            return Path(e.result.artifact)

    started, (stages, stage, t_start) = dt.datetime.now(dt.timezone.utc), stage_clock()

    folder = cache_dir("bench", "levers-nr")
    rt = cache_dir("bench", "rotten-tomatoes")
    train, test = split_by_movie(rotten_tomatoes_rows())
    test = test[: args.test_limit] if args.test_limit else test
    test_csv, train_csv = write_csv(test, folder / "test.csv"), write_csv(train, rt / "train.csv")
    t0 = time.time()
    teacher = train_classifier(train, rt / f"minilm-sentiment-{args.epochs}ep", args.epochs, None, threads=args.threads)
    stage("teacher (fine-tune or cache)", t0)
    ckpt = resolve_checkpoint(str(teacher))

    # -- builds --------------------------------------------------------------------------------
    t0 = time.time()
    torch_model = load_model(ckpt)
    exported = export_onnx(ckpt, torch_model, 18)
    ort_anchor_path, ort_anchor_info = ort_anchor(exported.path, ckpt.config, folder)
    nncf_xml = anchor_ir(teacher, rt, [r["text"] for r in train])
    stage("anchors", t0)
    recipes = {c.recipe: c for c in candidate_recipes(cpu_features(), {"onnxruntime", "openvino"})}
    t0 = time.time()
    fp32 = build(teacher, recipes["ort-fp32"], "teacher-ort-fp32", train_csv, args.threads, folder)
    if args.recipe == "auto":
        tried = [next(c for c in recipes.values() if c.backend == "onnxruntime" and c.int8),
                 next(c for c in recipes.values() if c.backend == "openvino" and c.int8)]
    else:
        tried = [recipes[args.recipe]]
    int8 = {c.recipe: build(teacher, c, f"teacher-{c.recipe}", train_csv, args.threads, folder) for c in tried}
    stage("teacher builds", t0)
    selection = None
    if len(int8) > 1:  # the faster on the teacher (geometric mean of b1 and b8), one short interleaved run
        arts = {k: Artifact(p, threads=args.threads, allow_rejected=True) for k, p in int8.items()}
        for a in arts.values():
            a.runner.activate()
        score = {k: 1.0 for k in arts}
        for b in (1, 8):
            feeds = fixed_cell_feeds(next(iter(arts.values())).encoder.encode, builtin_samples(), b, 128)
            for k, t in time_interleaved({k: (lambda a=a: a.infer(feeds)) for k, a in arts.items()}, runs=15, warmup=3).items():
                score[k] *= t.p50 * 1e3
        for a in arts.values():
            a.runner.deactivate()
        selection = {k: v ** 0.5 for k, v in score.items()}
        recipe = recipes[min(selection, key=selection.get)]
        print(f"int8 recipe: {recipe.recipe} (geometric mean b1/b8 ms {selection})", flush=True)
    else:
        recipe = tried[0]

    t0 = time.time()
    rng = random.Random(2)
    pool = rng.sample(train, min(len(train), int(args.prune_samples * 1.25) + args.exit_data))
    prune_rows, exit_rows = pool[: int(args.prune_samples * 1.25)], pool[int(args.prune_samples * 1.25):]
    pruned = pruned_checkpoints(teacher, [r["text"] for r in prune_rows],
                                list(label_ids([r["category"] for r in prune_rows], ckpt.id2label)),
                                budgets, args.prune_samples, args.threads, folder)
    stage("pruning", t0)
    t0 = time.time()
    pruned_arts = {b: build(d, recipe, f"pruned-{b}-{args.prune_samples}-{recipe.recipe}", train_csv, args.threads, folder)
                   for b, (d, _) in pruned.items()}
    stage("pruned builds", t0)
    distilled_arts, distilled = {}, {}
    if args.distill_pruned:
        t0 = time.time()
        wanted = [float(x) for x in args.distill_budgets.split(",")] if args.distill_budgets else list(pruned)
        for b, (d, _) in pruned.items():
            if b not in wanted:
                continue
            distilled[b] = distilled_student(teacher, d.name, train_csv, args, folder, student=str(d))
            distilled_arts[b] = build(distilled[b][0], recipe, f"{distilled[b][0].name}-{recipe.recipe}", train_csv,
                                      args.threads, folder)
        stage("pruned + distilled (train or cache) and builds", t0)
    others: dict[str, tuple[Path, dict]] = {}  # "distillation alone" and "pre-trained init" rows
    t0 = time.time()
    for n in args.layer_drop:
        d, rep = distilled_student(teacher, f"layer-drop-L{n}", train_csv, args, folder, layers=n)
        others[f"distillation alone: {n} of the teacher's layers (full width) + distilled ({rep['epochs_run']:g} epochs)"] = (d, rep)
    for init in args.init_student:
        d, rep = distilled_student(teacher, f"init-{Path(init).name}", train_csv, args, folder, student=init)
        others[f"pre-trained init {Path(init).name} + distilled ({rep['epochs_run']:g} epochs)"] = (d, rep)
    other_arts = {k: build(d, recipe, f"{d.name}-{recipe.recipe}", train_csv, args.threads, folder) for k, (d, _) in others.items()}
    if others:
        stage("distillation alone / pre-trained init (train or cache) and builds", t0)
    skipped: dict[str, Path] = {}
    if args.skip:
        t0 = time.time()
        skip = with_skip(recipe)
        for b, (d, rep) in distilled.items():
            skipped[f"teacher pruned to {b} MACs + distilled ({rep['epochs_run']:g} epochs), {skip.recipe}"] = build(
                d, skip, f"{d.name}-{skip.recipe}", train_csv, args.threads, folder)
        for k, (d, _) in others.items():
            skipped[f"{k}, {skip.recipe}"] = build(d, skip, f"{d.name}-{skip.recipe}", train_csv, args.threads, folder)
        stage("first-token-skip builds", t0)
    t0 = time.time()
    early: dict[str, tuple[Path, dict]] = {}  # "MODEL@TARGET" -> (artifact, its manifest's early_exit)
    for spec in args.exit or ["teacher@ort-fp32"]:
        name, _, target = spec.partition("@")
        target = recipe.recipe if target == "int8" else (target or "ort-fp32")
        exit_model = teacher if name == "teacher" else distilled[float(name)][0]
        exit_dir = folder / ("early-exit" + ("" if name == "teacher" else f"-on-{exit_model.name}")
                             + ("" if target == "ort-fp32" else f"-{target}") + f"-{args.exit_data}")
        if not (exit_dir / "manifest.json").is_file():
            try:
                build_early_exit(str(exit_model), recipes[target].profile() if target in recipes else target, exit_dir,
                                 write_csv(exit_rows, folder / "exit-data.csv"), force=True, threads=args.threads,
                                 latency_runs=0)
            except GateFailed as e:
                rejected.append(f"early exit {spec}: {'; '.join(e.failures)[:200]}")
                exit_dir = Path(e.result.artifact)
        early[f"{name}@{target}"] = (exit_dir, json.loads((exit_dir / "manifest.json").read_text())["early_exit"])
    stage("early-exit build", t0)
    if args.prepare_only:
        print("--prepare-only: trained and built, nothing measured", flush=True)
        return

    # -- contestants ---------------------------------------------------------------------------
    label_of = {"fp32": "teacher, ort-fp32 (fp32)", "int8": f"teacher, {recipe.recipe}"}
    rows: dict[str, object] = {}
    paths: dict[str, Path | None] = {NNCF: None, ORT: None}
    nncf_runner = NncfAnchorRunner(nncf_xml, args.threads)
    nncf_model = nncf_runner.model
    rows[NNCF], rows[ORT] = nncf_runner, OrtRunner(ort_anchor_path, threads=args.threads)
    opened = {label_of["int8"]: int8[recipe.recipe], label_of["fp32"]: fp32}
    opened |= {f"teacher pruned to {b} MACs ({pruned[b][1]['student']['name']}), {recipe.recipe}": p for b, p in pruned_arts.items()}
    opened |= {f"teacher pruned to {b} MACs + distilled ({distilled[b][1]['epochs_run']:g} epochs), {recipe.recipe}": p
               for b, p in distilled_arts.items()}
    opened |= {f"{k}, {recipe.recipe}": p for k, p in other_arts.items()} | skipped
    for k, p in opened.items():
        rows[k], paths[k] = Artifact(p, threads=args.threads, allow_rejected=True), p
    exit_rows_of: dict[str, tuple[str, str]] = {}
    for spec, (exit_dir, ee) in early.items():
        name, _, target = spec.partition("@")
        on = "" if name == "teacher" else f" on pruned {name} + distilled"
        ee_at = f"early exit{on} ({target}), threshold {ee['threshold']:.4g}"
        ee_worst = f"early exit{on} ({target}), no row exits (worst case)"
        rows[ee_at] = Artifact(exit_dir, threads=args.threads, allow_rejected=True)
        rows[ee_worst] = Artifact(exit_dir, threads=args.threads, allow_rejected=True, exit_threshold=1.0)
        paths[ee_at] = paths[ee_worst] = exit_dir
        exit_rows_of[spec] = (ee_at, ee_worst)
    runner_of = {k: (r.runner if isinstance(r, Artifact) else r) for k, r in rows.items()}
    for k, r in runner_of.items():
        if hasattr(r, "activate"):
            r.activate()
    encode = rows[label_of["int8"]].encoder.encode
    results = {"date": started.isoformat(timespec="seconds"), "command": " ".join(["levers_no_retraining.py"] + (argv or sys.argv[1:])),
               "environment": environment(), "cpu_features": sorted(cpu_features()), "threads": args.threads,
               "recipe": recipe.recipe, "recipe_selection_ms": selection, "ort_anchor": ort_anchor_info,
               "nncf_precision_hint": str(nncf_model.get_property("INFERENCE_PRECISION_HINT")),
               "pruning": {str(b): {k: r[k] for k in ("student", "mac_fraction", "tuned", "agreement", "agreement_untuned",
                                                    "accuracy", "samples", "held_out", "seq_len", "seconds",
                                                    "calibration_seconds") if k in r} for b, (_, r) in pruned.items()},
               "pruned_distilled": {str(b): {k: r[k] for k in ("epochs_run", "stopped", "best_step", "final_eval", "seconds",
                                                              "train_texts", "max_length", "losses") if k in r}
                                    for b, (_, r) in distilled.items()},
               "other_students": {k: {f: r[f] for f in ("epochs_run", "stopped", "best_step", "final_eval", "seconds",
                                                        "train_texts", "max_length", "losses", "student") if f in r}
                                  for k, (_, r) in others.items()},
               "early_exit": {spec: {k: ee.get(k) for k in ("exit_layers", "layers", "threshold", "choice", "data",
                                                           "agreement_gate", "backend", "precision")}
                              | {"rows": exit_rows_of[spec]} for spec, (_, ee) in early.items()},
               "fp32_checkpoint_bytes": sum(p.stat().st_size for p in Path(teacher).glob("*.safetensors")),
               "test_rows": len(test), "rows": {k: {} for k in rows}}
    out = results["rows"]
    try:
        sizes = {k: artifact_bytes(paths[k]) if paths[k] else None for k in rows}
        sizes[NNCF] = sum(f.stat().st_size for f in (nncf_xml, nncf_xml.with_suffix(".bin")))
        sizes[ORT] = ort_anchor_path.stat().st_size
        sample = [r["text"] for r in random.Random(3).sample(test, min(args.latency_rows, len(test)))]
        measure_contestants(rows, runner_of, ckpt=ckpt, exported=exported, torch_model=torch_model, encode=encode,
                            test_csv=test_csv, sample=sample, args=args, out=out, results=results, stage=stage,
                            sizes=sizes)
    finally:
        for r in runner_of.values():
            if hasattr(r, "deactivate"):
                r.deactivate()
    results["rejected_by_gates"] = rejected
    results["stages_seconds"], results["total_seconds"] = stages, round(time.time() - t_start, 1)
    md = table(results)
    (folder / "results.json").write_text(json.dumps(results, indent=1, default=str))
    (folder / "results.md").write_text(md)
    print(md)
    print(f"written: {folder / 'results.json'}, {folder / 'results.md'}")


def _ab(name: str) -> str:
    return "NNCF" if name == NNCF else "ORT"


def table(r: dict) -> str:
    fp32 = r["fp32_checkpoint_bytes"]
    lines = [f"{r['date']} · `{r['command']}` · {r['environment']['cpu'].get('model', '?')} · {r['threads']} threads pinned · "
             f"CPU features {', '.join(r['cpu_features'])} · load avg b1 {r['load_avg_b1']}, b8 {r['load_avg_b8']}, "
             f"per-row {r['per_row']['load_avg']} · whole run {r['total_seconds'] / 60:.1f} min", "",
             "| row | test accuracy | drop vs PyTorch (pts, 95 % paired interval) | agreement | bytes (of fp32) | "
             "b1/s128 p50 ms (x best anchor) | b8/s128 p50 ms (x best anchor) | per-row b1 mean / p90 ms (x best anchor, mean) |",
             "|---|---|---|---|---|---|---|---|"]
    for k, v in r["rows"].items():
        iv = v.get("drop_interval") or {}
        size = f"{v['bytes'] / 1e6:.1f} MB ({v['bytes'] / fp32:.0%})" if v.get("bytes") else "—"
        cells = [f"{v[c_]['p50_ms']:.2f} ({v[c_]['x_best_anchor']:.2f}x {_ab(v[c_]['best_anchor'])})" for c_ in ("b1/s128", "b8/s128")]
        pr = v["per_row_b1"]
        lines.append(f"| {k} | {v['metric_candidate']:.2f} % | {v['metric_drop']:+.2f} [{iv.get('low', float('nan')):+.2f}, "
                     f"{iv.get('high', float('nan')):+.2f}] | {v['agreement']:.4f} | {size} | {cells[0]} | {cells[1]} | "
                     f"{pr['mean_ms']:.2f} / {pr['p90_ms']:.2f} ({pr['x_best_anchor']:.2f}x {_ab(pr['best_anchor'])}) |")
    ref = next(iter(r["rows"].values()))["metric_reference"]
    lines += ["", f"PyTorch fp32 teacher: {ref:.2f} % on {r['test_rows']} test snippets (movies unseen in training). "
              f"x best anchor = the faster anchor's figure / the row's (NNCF: OpenVINO + NNCF int8, precision hint "
              f"{r['nncf_precision_hint']}; ORT: Olive's fused + dynamic per-tensor int8). Per-row latency: "
              f"{r['per_row']['rows']} test rows at batch 1 and their own length, p50 of {r['per_row']['runs_per_row']} "
              f"interleaved runs per row; mean and p90 over the rows. int8 recipe: {r['recipe']}"
              + (f" (chosen by b1/b8 geometric-mean ms {', '.join(f'{k} {v:.2f}' for k, v in r['recipe_selection_ms'].items())})"
                 if r.get("recipe_selection_ms") else "") + ".", ""]
    for b, p in r["pruning"].items():
        lines.append(f"- pruned to {b}: {p['student']['name']}, measured MAC fraction {p.get('mac_fraction', float('nan')):.3f} "
                     f"at {p.get('seq_len')} tokens, least-squares tuning {'kept' if p.get('tuned') else 'dropped'}, held-out "
                     f"agreement {p.get('agreement', float('nan')):.4f} (untuned {p.get('agreement_untuned', float('nan')):.4f}) on "
                     f"{p.get('held_out')} rows, {p.get('samples')} calibration texts, {p.get('seconds', 0):.0f} s "
                     f"(+ {p.get('calibration_seconds', 0):.0f} s shared calibration)")
    rows = r["rows"]
    pr = {k: v["per_row_b1"]["mean_ms"] for k, v in rows.items()}
    fp32_row, int8_row = (next(k for k in rows if k.startswith("teacher, ") and t in k) for t in ("ort-fp32", r["recipe"]))
    for spec, ee in r["early_exit"].items():
        c, (at, worst) = ee["choice"], ee["rows"]
        name, _, target = spec.partition("@")
        lines.append(f"- early exit {spec}: exits after layers {ee['exit_layers']} of {ee['layers']}, heads on "
                     f"{ee['data']['train']} training texts, threshold {ee['threshold']:.4g} chosen on {ee['data']['heldout']} "
                     f"held-out rows (agreement gate {ee['agreement_gate']}: held-out agreement {c['agreement']:.4f}, "
                     f"{c['mean_layers']:.2f} layers per row on average, exits {c['exits']}); segments: "
                     f"{ee.get('backend') or 'onnxruntime'} {ee.get('precision') or 'fp32'} ({target}) on "
                     + ("the teacher" if name == "teacher" else f"the {name} pruned + distilled checkpoint")
                     + f"; per-row mean at the threshold / with no row exiting: {pr[fp32_row] / pr[at]:.2f}x / "
                     f"{pr[fp32_row] / pr[worst]:.2f}x the fp32 teacher (ort-fp32), {pr[int8_row] / pr[at]:.2f}x / "
                     f"{pr[int8_row] / pr[worst]:.2f}x the teacher's int8 ({r['recipe']}).")
    for k, o in (r.get("other_students") or {}).items():
        lines.append(f"- {k}: {o.get('epochs_run')} epochs, stopped {o.get('stopped')}, {o.get('seconds') or 0:.0f} s of training, "
                     f"{o.get('train_texts')} texts at {o.get('max_length')} tokens")
    lines.append("- bytes: artifacts count their manifest's files (model + tokenizer + config); the anchors their model "
                 "files only (NNCF: .xml + .bin; ORT: the .onnx).")
    if r.get("rejected_by_gates"):
        lines.append(f"- rejected by the profile's parity gates but measured anyway: {r['rejected_by_gates']}")
    lines.append(f"- stages (s): {r['stages_seconds']}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
