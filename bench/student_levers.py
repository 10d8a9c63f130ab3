"""What each student lever contributes (issue 18), measured in one interleaved run:

  teacher, anchor recipe (OpenVINO + NNCF int8 as NNCF documents it for BERT)   = 1.00x
  teacher, the student recipe's int8 (no student)            -> what the recipe alone gives
  layer-drop student (full width), distilled, same int8      -> + distillation
  the pruned student (width), same int8                      -> + width pruning
  + first-token skip                                         -> + skipping
  + int8 word embeddings                                     -> + int8 embeddings (bytes)

Every row's accuracy on the whole test set with the paired interval of its drop vs PyTorch,
its artifact bytes and its latency at b1/s128 and b8/s128 (threads pinned, one interleaved
run per cell; PyTorch in a second run for the vs-PyTorch ratio only, as optimize_targets.py).
Students are taken from the cache of an `optimize --distill` run (students/*/student_report.json
of this teacher): the pruned shape is the one named with --shape, the layer-drop student the
full-width shape of the same depth (trained now with the same settings when absent).

Usage: python bench/student_levers.py --shape L3-H256-A8-F768 [--recipe ort-fused-int8-pt-avx2]
                                      [--threads 2] [--runs 30]
Results: <cache>/bench/levers/ (JSON + Markdown); nothing is written to the repo.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

from bertexport.core.cache import cache_dir  # noqa: E402
from bertexport.judging.compare import compare_on_data, reference_runner, task_metrics  # noqa: E402
from bertexport.judging.gates import Gates  # noqa: E402
from bertexport.core.envinfo import cpu_features, environment  # noqa: E402


def cached_students(teacher_sha: str) -> dict[str, Path]:
    out = {}
    for rep in cache_dir("students").glob("*/student_report.json"):
        r = json.loads(rep.read_text())
        if r.get("teacher_sha256") == teacher_sha:
            out[r["shape"]] = rep.parent
    return out


def build(model: Path, recipe, name: str, calib: Path, threads: int, folder: Path) -> Path:
    from bertexport.building.convert import convert

    out = folder / name.replace("/", "_")
    if (out / "manifest.json").is_file():
        return out
    convert(str(model), recipe.profile(), out, calib=calib, force=True, threads=threads, latency_runs=0, gates=Gates())
    return out


def main(argv=None):
    from bertexport.search.candidates import candidate_recipes
    from bertexport.building.checkpoint import load_model, resolve_checkpoint
    from bertexport.judging.latency import speedup, time_interleaved
    from bertexport.shipping.runtime import Artifact
    from bertexport.search.student_builds import student_candidates
    from bertexport.students.shapes import parse_shape, teacher_shape
    from bertexport.core.textdata import builtin_samples, load_texts
    from bertexport.judging.compare import fixed_cell_feeds, task_labels
    from optimize_targets import anchor_ir, artifact_bytes
    from rotten_tomatoes import rotten_tomatoes_rows, split_by_movie, write_csv

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", required=True, help="the pruned student's shape (cached by an optimize --distill run)")
    ap.add_argument("--recipe", default=None, help="the int8 recipe (default: the machine's fastest ORT fused int8)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--epochs", type=int, default=1, help="the Rotten Tomatoes teacher's fine-tuning epochs (cached)")
    args = ap.parse_args(argv)

    rt = cache_dir("bench", "rotten-tomatoes")
    teacher = rt / f"minilm-sentiment-{args.epochs}ep"
    train, test = split_by_movie(rotten_tomatoes_rows())
    test_csv, train_csv = write_csv(test, rt / "test.csv"), write_csv(train, rt / "train.csv")
    ckpt = resolve_checkpoint(str(teacher))
    tshape = teacher_shape(ckpt.config)
    pruned = parse_shape(args.shape, tshape)
    full = parse_shape(f"L{pruned.layers}", tshape)
    students = cached_students(ckpt.sha256)
    if pruned.name not in students:
        sys.exit(f"{pruned.name} is not in the cache for this teacher (have {sorted(students)}); run "
                 f"`optimize --distill {pruned.name}` first")
    if full.name not in students:
        print(f"{full.name} (layer drop at full width) was not trained by the search: its row is left out", flush=True)
    recipes = {c.recipe: c for c in candidate_recipes(cpu_features(), {"onnxruntime", "openvino"})}
    base = recipes[args.recipe] if args.recipe else next(c for c in recipes.values() if c.backend == "onnxruntime" and c.int8)
    def variant(skip: bool, emb8: bool):
        c = student_candidates(pruned, [base], skip=skip)[0]
        return dataclasses.replace(c, passes=[p for p in c.passes if emb8 or p["type"] != "int8-embeddings"],
                                   recipe=base.recipe + ("+skip" if skip else "") + ("+emb8" if emb8 else ""),
                                   student=None, student_layers=None)

    plain, skip_only, skip = variant(False, False), variant(True, False), variant(True, True)
    folder = cache_dir("bench", "levers")
    rows = [
        ("teacher, anchor recipe (NNCF int8)", None, None),
        (f"teacher, {base.recipe}", teacher, base),
        (f"+ distillation: {full.name} (layer drop), {base.recipe}", students.get(full.name), plain),
        (f"+ width pruning: {pruned.name}, {base.recipe}", students[pruned.name], plain),
        ("+ first-token skip", students[pruned.name], skip_only),
        ("+ int8 word embeddings", students[pruned.name], skip),
    ]
    rows = [r for r in rows if r[1] is not None or r[2] is None]
    arts = {}
    for label, model, recipe in rows[1:]:
        t0 = time.time()
        arts[label] = build(model, recipe, f"{Path(model).name}-{recipe.recipe}", train_csv, args.threads, folder)
        print(f"built {label} ({time.time() - t0:.0f} s)", flush=True)
    anchor_xml = anchor_ir(teacher, rt, [r["text"] for r in train])

    # accuracy of every row on the whole test set, with the paired interval of its drop
    ts = load_texts(test_csv)
    labels = task_labels(ts, ckpt.task, ckpt.id2label)
    opened = {k: Artifact(p, threads=args.threads, allow_rejected=True) for k, p in arts.items()}
    first = next(iter(opened.values()))
    torch_model = load_model(ckpt)
    reference = reference_runner(ckpt, first.encoder.input_names, args.threads, torch_model=torch_model)
    results = {"environment": environment(), "threads": args.threads, "shape": pruned.name, "recipe": base.recipe,
               "fp32_checkpoint_bytes": sum(p.stat().st_size for p in teacher.glob("*.safetensors")), "rows": {}}
    cache: dict = {}
    import openvino as ov

    core = ov.Core()
    anchor = core.compile_model(core.read_model(str(anchor_xml)), "CPU",
                                {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": str(args.threads)})

    class _Anchor:  # the anchor IR behind the runner interface compare_on_data uses
        def __init__(self):
            self.req = anchor.create_infer_request()
            self.outputs = ["logits"]

        def infer(self, feeds):
            out = self.req.infer({k: v for k, v in feeds.items()})
            return {"logits": np.asarray(next(iter(out.values())))}

    with reference:
        for label, a in [(rows[0][0], None)] + list(opened.items()):
            runner = _Anchor() if a is None else a
            if a is not None:
                a.runner.activate()
            comp = compare_on_data(runner if a is None else a, reference, first.encoder.encode, ts, ckpt.task, reference_cache=cache)
            m = task_metrics(comp, labels)
            results["rows"][label] = {"accuracy": m.get("metric_candidate"), "reference_accuracy": m.get("metric_reference"),
                                      "drop": m.get("metric_drop"), "drop_interval": m.get("stats", {}).get("metric_drop"),
                                      "bytes": None if a is None else artifact_bytes(Path(arts[label]))}
            if a is not None:
                a.runner.deactivate()
            print(f"{label}: accuracy {m.get('metric_candidate'):.2f} % (drop {m.get('metric_drop'):+.2f})", flush=True)
        for a in opened.values():
            a.runner.activate()
        req = anchor.create_infer_request()
        for b, s in ((1, 128), (8, 128)):
            feeds = fixed_cell_feeds(first.encoder.encode, builtin_samples(), b, s)
            calls = {rows[0][0]: lambda: req.infer(feeds)} | {k: (lambda a=a: a.infer(feeds)) for k, a in opened.items()}
            timed = time_interleaved(calls, runs=args.runs, warmup=5)
            with_torch = time_interleaved({"pytorch": lambda: reference.infer(feeds)} | calls, runs=max(10, args.runs // 2), warmup=3)
            anchor_lat = timed[rows[0][0]]
            for k, t in timed.items():
                results["rows"][k][f"b{b}/s{s}"] = {"p50_ms": t.p50 * 1e3, "vs_anchor": anchor_lat.p50 / t.p50,
                                                    "vs_anchor_p10_p90": [speedup(anchor_lat, t)["round_ratio_p10"],
                                                                          speedup(anchor_lat, t)["round_ratio_p90"]],
                                                    "vs_pytorch": speedup(with_torch["pytorch"], with_torch[k])["p50_ratio"]}
            results[f"load_avg_b{b}"] = os.getloadavg()[:2]
        for a in opened.values():
            a.runner.deactivate()
    fp32 = results["fp32_checkpoint_bytes"]
    lines = [f"{time.strftime('%Y-%m-%dT%H:%M:%S%z')} · `student_levers.py --shape {args.shape}` · {args.threads} threads pinned · "
             f"CPU features {', '.join(sorted(cpu_features()))} · load avg {results['load_avg_b1']}, {results['load_avg_b8']}", "",
             "| lever | b1/s128 vs anchor (p10-p90) | b8/s128 vs anchor | vs PyTorch b1 / b8 | test accuracy | drop (pts, 95 % interval) | bytes (of fp32) |",
             "|---|---|---|---|---|---|---|"]
    for k, r in results["rows"].items():
        iv = r["drop_interval"] or {}
        size = f"{r['bytes'] / 1e6:.1f} MB ({r['bytes'] / fp32:.0%})" if r["bytes"] else "—"
        lines.append(f"| {k} | {r['b1/s128']['vs_anchor']:.2f}x ({r['b1/s128']['vs_anchor_p10_p90'][0]:.2f}-"
                     f"{r['b1/s128']['vs_anchor_p10_p90'][1]:.2f}) | {r['b8/s128']['vs_anchor']:.2f}x | "
                     f"{r['b1/s128']['vs_pytorch']:.1f}x / {r['b8/s128']['vs_pytorch']:.1f}x | {r['accuracy']:.2f} % | "
                     f"{r['drop']:+.2f} [{iv.get('low', float('nan')):+.2f}, {iv.get('high', float('nan')):+.2f}] | {size} |")
    md = "\n".join(lines) + f"\n\nPyTorch fp32 test accuracy {next(iter(results['rows'].values()))['reference_accuracy']:.2f} % on {len(ts.texts)} snippets.\n"
    (folder / "results.json").write_text(json.dumps(results, indent=1, default=str))
    (folder / "results.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
