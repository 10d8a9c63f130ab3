"""Distillation benchmark (issue: distillation): the Rotten Tomatoes MiniLM classifier
built by bench/rotten_tomatoes.py (6 layers) as teacher -> a 3-layer student trained on
the training snippets (teacher logits + labels), then both measured on the test split.

Usage: python bench/distill_minilm.py [--layers 3] [--epochs 2] [--runs 30]
Needs bench/rotten_tomatoes.py to have built the teacher (it is cached).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from rotten_tomatoes import convert_all, rotten_tomatoes_rows, split_by_movie, write_csv  # noqa: E402

from bertexport.judging.benchmark import benchmark  # noqa: E402
from bertexport.judging.benchmark_report import to_markdown, write_outputs  # noqa: E402
from bertexport.core.cache import cache_dir  # noqa: E402
from bertexport.students.distill import distill  # noqa: E402
from bertexport.students.distill_config import DistillConfig  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2, help="training threads")
    args = ap.parse_args(argv)

    root = cache_dir("bench", "rotten-tomatoes")
    teacher = root / "minilm-rt-classifier"
    if not (teacher / "model.safetensors").is_file():
        raise SystemExit("run bench/rotten_tomatoes.py first: it builds the teacher")
    train, test = split_by_movie(rotten_tomatoes_rows())
    train_csv = write_csv(train, root / "train.csv")
    test_csv = write_csv(test, root / "test.csv")
    student = root / f"minilm-rt-student-{args.layers}l"
    if not (student / "distill_report.json").is_file():
        cfg = DistillConfig(layers=args.layers, epochs=args.epochs, batch_size=32, lr=5e-5, threads=args.threads,
                            checkpoint_every=100)
        distill(str(teacher), student, data=train_csv, config=cfg, force=True)
    report = json.loads((student / "distill_report.json").read_text())
    # PyTorch teacher vs student at b1/s128 and b8/s128, interleaved, 1 thread
    import torch

    from bertexport.building.checkpoint import load_model, resolve_checkpoint
    from bertexport.judging.latency import speedup, time_interleaved

    torch.set_num_threads(1)
    t_model = load_model(resolve_checkpoint(str(teacher)))
    s_model = load_model(resolve_checkpoint(str(student)))
    torch_latency = {}
    for b in (1, 8):
        feeds = {"input_ids": torch.randint(1000, 20000, (b, 128)), "attention_mask": torch.ones(b, 128, dtype=torch.long)}
        with torch.inference_mode():
            timed = time_interleaved({"teacher": lambda: t_model(**feeds), "student": lambda: s_model(**feeds)},
                                     runs=args.runs, warmup=3)
        torch_latency[f"b{b}/s128"] = {"teacher_p50_ms": timed["teacher"].p50 * 1e3, "student_p50_ms": timed["student"].p50 * 1e3,
                                       "speedup": speedup(timed["teacher"], timed["student"])}
    report["latency_b_s128"] = torch_latency
    (root / "student-results").mkdir(parents=True, exist_ok=True)
    (root / "student-results" / "distill_summary.json").write_text(json.dumps(report, indent=1))
    print(json.dumps({k: report[k] for k in ("teacher", "student", "final_eval", "latency_b_s128", "train_seconds")}, indent=1))

    arts = convert_all(student, ["ort-fp32", "openvino-int8"], root / "calib.csv", root / "student-artifacts")
    bench = benchmark(str(student), arts, batches=[1, 8], sequences=[128], data=test_csv, runs=args.runs, threads=1)
    write_outputs(bench, root / "student-results", force=True)
    print(to_markdown(bench))


if __name__ == "__main__":
    main()
