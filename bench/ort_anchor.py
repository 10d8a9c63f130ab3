"""Issue #17: the ONNX Runtime anchor, timed in ONE interleaved run with the OpenVINO anchor
and bertexport's ONNX Runtime builds, on the Rotten Tomatoes MiniLM classifier.

Contestants (each on the same fixed latency cells, b1/s128 and b8/s128, threads pinned):
- **ORT anchor**: Microsoft Olive's documented ORT recipe (OnnxConversion ->
  OrtTransformersOptimization -> OnnxDynamicQuantization, per-tensor) rebuilt with
  onnxruntime's own API only: ``onnxruntime.transformers.optimizer.optimize_model(
  model_type="bert", num_heads, hidden_size)`` then ``quantize_dynamic(per_channel=False,
  weight_type=QuantType.QInt8, extra_options={"DefaultTensorType": FLOAT})`` (the extra option
  is needed on an optimized graph: "Unable to find data type for weight_name"). Its input is
  bertexport's ONNX export of the checkpoint (what OnnxConversion makes); no bertexport pass code.
- **OpenVINO + NNCF anchor**: ``optimize``'s anchor candidate (``ov-int8-*``: NNCF's
  documented BERT recipe, OpenVINO's default precision for this CPU).
- the ``ort-int8`` and ``ort-fused-int8`` profiles (``convert``, calibrated on training snippets);
- the ``optimize --backend onnxruntime`` winner (searched on the test split, gate 1 point).

Accuracy: every contestant and PyTorch on the test split (movies unseen in training), with the
paired interval ``bertexport.judging.compare.task_metrics`` reports. Note the optimize winner was
*selected* on that split (its search and confirm slices), the others never saw it.

Usage (benchmarks only under the machine's bench lock):
  flock /tmp/bertexport-bench.lock python bench/ort_anchor.py [--threads 2] [--runs 40]
        [--model DIR] [--train-limit N] [--test-limit N] [--budget 15m]
Writes <cache>/bench/ort-anchor/results.json and results.md; prints the Markdown table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
from pathlib import Path

from bertexport.core.cache import cache_dir
from bertexport.judging.compare import compare_on_data, fixed_cell_feeds, reference_runner, task_metrics
from bertexport.judging.gates import Gates
from bertexport.core.envinfo import cpu_features, environment
from bertexport.judging.latency import speedup, time_interleaved
from bertexport.core.textdata import builtin_samples

ORT_ANCHOR = "ORT anchor (Olive recipe: fused + dynamic int8 per-tensor)"


def ort_anchor(onnx_path: Path, config: dict, out: Path) -> tuple[Path, dict]:
    """Olive's ORT recipe with onnxruntime's API, nothing of bertexport's."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.transformers.optimizer import optimize_model

    t0 = time.perf_counter()
    fused = out / "anchor.fused.onnx"
    model = optimize_model(str(onnx_path), model_type="bert", num_heads=config["num_attention_heads"],
                           hidden_size=config["hidden_size"])
    model.save_model_to_file(str(fused))
    quantized = out / "anchor.int8.onnx"
    quantize_dynamic(str(fused), str(quantized), per_channel=False, weight_type=QuantType.QInt8,
                     extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    ops: dict[str, int] = {}
    for n in onnx.load(str(quantized), load_external_data=False).graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    return quantized, {"build_seconds": round(time.perf_counter() - t0, 1), "ops": ops,
                       "fused": {k: v for k, v in model.get_fused_operator_statistics().items() if v}}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--runs", type=int, default=40, help="interleaved rounds per cell")
    ap.add_argument("--model", type=Path, help="a fine-tuned classifier folder (default: the cached Rotten Tomatoes one)")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--train-limit", type=int, default=None, help="fine-tune on this many training snippets (cached per limit)")
    ap.add_argument("--test-limit", type=int, default=None)
    ap.add_argument("--budget", default="15m", help="optimize --backend onnxruntime search budget")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).parent))
    from rotten_tomatoes import rotten_tomatoes_rows, split_by_movie, train_classifier, write_csv

    from bertexport.search.candidates import candidate_recipes
    from bertexport.building.checkpoint import load_model, resolve_checkpoint
    from bertexport.building.convert import convert
    from bertexport.building.export import export_onnx
    from bertexport.backends.onnxruntime.runner import OrtRunner
    from bertexport.search.optimize import optimize
    from bertexport.core.progress import RichReporter
    from bertexport.shipping.runtime import Artifact
    from bertexport.core.textdata import label_ids, load_texts

    started = dt.datetime.now(dt.timezone.utc)
    root = cache_dir("bench", "ort-anchor")
    rt = cache_dir("bench", "rotten-tomatoes")
    train, test = split_by_movie(rotten_tomatoes_rows())
    test = test[: args.test_limit] if args.test_limit else test
    test_csv, train_csv = write_csv(test, root / "test.csv"), write_csv(train, root / "train.csv")
    suffix = f"-{args.train_limit}" if args.train_limit else ""
    model = args.model or train_classifier(train, rt / f"minilm-sentiment-{args.epochs}ep{suffix}", args.epochs,
                                           args.train_limit, threads=args.threads)
    ckpt = resolve_checkpoint(str(model))
    features = cpu_features()
    report = {"command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
              "date": started.isoformat(timespec="seconds"), "threads": args.threads, "cpu_features": sorted(features),
              "environment": environment(), "model": str(model), "train_limit": args.train_limit, "test_rows": len(test)}

    # builds
    torch_model = load_model(ckpt)
    exported = export_onnx(ckpt, torch_model, 18)
    anchor_path, report["ort_anchor"] = ort_anchor(exported.path, ckpt.config, root)
    ov_anchor = next(c for c in candidate_recipes(features, {"openvino"}) if c.anchor)
    arts: dict[str, Path] = {}
    t0 = time.time()
    arts[f"OpenVINO+NNCF anchor ({ov_anchor.recipe})"] = convert(
        str(model), ov_anchor.profile(), root / "ov-anchor", calib=train_csv, force=True, latency_runs=0,
        threads=args.threads, gates=Gates()).artifact
    report["ov_anchor_build_seconds"] = round(time.time() - t0, 1)
    for profile in ("ort-int8", "ort-fused-int8"):
        t0 = time.time()
        res = convert(str(model), profile, root / profile, calib=train_csv, force=True, latency_runs=0, threads=args.threads,
                      gates=Gates())
        arts[f"`{profile}` profile"] = res.artifact
        report[f"{profile}_build"] = {"seconds": round(time.time() - t0, 1),
                                      "notes": {k: v for k, v in res.manifest["target"]["passes"][-1]["notes"].items()
                                                if k != "ranking"}}
    t0 = time.time()
    search = optimize(str(model), test_csv, root / "optimize-ort", gates=Gates(max_accuracy_drop=1.0), budget=args.budget,
                      calib=train_csv, threads=args.threads, backends={"onnxruntime"}, force=True, reporter=RichReporter())
    report["optimize"] = {"seconds": round(time.time() - t0, 1), "winner": search.report["winner"]["name"],
                          "candidates": [{"name": c["candidate"]["name"], "status": c["status"], "latency_ms": c["latency_ms"],
                                          "reason": c["reason"]} for c in search.report["candidates"]]}
    arts[f"`optimize --backend onnxruntime` winner ({search.report['winner']['name']})"] = search.artifact

    # one interleaved run per cell: the two anchors and our three ORT builds
    opened = {n: Artifact(p, threads=args.threads, allow_rejected=True) for n, p in arts.items()}
    encode = next(iter(opened.values())).encoder.encode
    anchor = OrtRunner(anchor_path, threads=args.threads)
    runners = {ORT_ANCHOR: anchor} | {n: a.runner for n, a in opened.items()}
    for r in runners.values():
        r.activate()
    cells = {}
    try:
        for batch in (1, 8):
            feeds = fixed_cell_feeds(encode, builtin_samples(), batch, 128)
            load0 = os.getloadavg()[0]
            timed = time_interleaved({n: (lambda r=r: r.infer(feeds)) for n, r in runners.items()}, runs=args.runs, warmup=5)
            a = timed[ORT_ANCHOR]
            cells[f"b{batch}/s128"] = {n: {"p50_ms": t.p50 * 1e3, "p90_ms": t.p90 * 1e3, "vs_ort_anchor": a.p50 / t.p50,
                                           "vs_ort_anchor_rounds_p10_p90": [speedup(a, t)["round_ratio_p10"],
                                                                            speedup(a, t)["round_ratio_p90"]]}
                                       for n, t in timed.items()} | {"load_avg_before_after": [load0, os.getloadavg()[0]]}
        # task accuracy on the test split, each contestant against PyTorch, paired intervals
        ts = load_texts(test_csv)
        labels = label_ids(ts.labels, ckpt.id2label)
        reference = reference_runner(ckpt, exported.input_names, args.threads, torch_model=torch_model)
        cache: dict = {}
        accuracy = {}
        with reference:
            for n, r in runners.items():
                m = task_metrics(compare_on_data(r, reference, encode, ts, ckpt.task, reference_cache=cache), labels)
                accuracy[n] = {k: m.get(k) for k in ("metric_reference", "metric_candidate", "metric_drop", "agreement",
                                                      "samples")} | {"stats": m.get("stats", {})}
    finally:
        for r in runners.values():
            r.deactivate()
    report["cells"], report["accuracy"] = cells, accuracy
    (root / "results.json").write_text(json.dumps(report, indent=1, default=str))
    md = table(report)
    (root / "results.md").write_text(md)
    print(md)
    print(f"\nwritten: {root / 'results.json'}")


def _interval(acc: dict) -> str:
    iv = (acc.get("stats") or {}).get("metric_drop")
    return f" [{iv['low']:+.2f}, {iv['high']:+.2f}]" if iv else ""


def table(report: dict) -> str:
    b1, b8 = report["cells"]["b1/s128"], report["cells"]["b8/s128"]
    names = sorted((n for n in b1 if n != "load_avg_before_after"), key=lambda n: b1[n]["p50_ms"])
    lines = [f"{report['date']} · `{report['command']}` · {report['threads']} threads pinned · CPU features "
             f"{', '.join(report['cpu_features'])} · {report['environment']['cpu'].get('model', '?')} · load avg "
             f"b1 {b1['load_avg_before_after']}, b8 {b8['load_avg_before_after']}", "",
             "| contestant | b1/s128 p50 ms | vs ORT anchor | b8/s128 p50 ms | vs ORT anchor | test accuracy | drop vs PyTorch (pts, 95 % interval) |",
             "|---|---|---|---|---|---|---|"]
    for n in names:
        acc = report["accuracy"][n]
        lines.append(f"| {n} | {b1[n]['p50_ms']:.2f} | {b1[n]['vs_ort_anchor']:.2f}x | {b8[n]['p50_ms']:.1f} | "
                     f"{b8[n]['vs_ort_anchor']:.2f}x | {acc['metric_candidate']:.2f} % | {acc['metric_drop']:+.2f}{_interval(acc)} |")
    ref = next(iter(report["accuracy"].values()))["metric_reference"]
    lines += ["", f"PyTorch fp32 test accuracy {ref:.2f} % on {report['test_rows']} snippets."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
