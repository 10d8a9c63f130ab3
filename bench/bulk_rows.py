"""Bulk inference throughput (issue #13): rows/s of `run --out` on one machine without Ray,
and through Ray Data with 1 and 2 Predictor actors on a local Ray instance (this machine's
cores), on Rotten Tomatoes snippets with an artifact of the fine-tuned MiniLM classifier
(bench/rotten_tomatoes.py builds it; the default is the ort-int8 conversion).

Usage: python bench/bulk_rows.py [--rows 4000] [--artifact PATH]
Writes <cache>/bench/bulk/results.json; prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from rotten_tomatoes import rotten_tomatoes_rows, split_by_movie, train_classifier  # noqa: E402

from bertexport.shipping import bulk  # noqa: E402
from bertexport.core.cache import cache_dir  # noqa: E402
from bertexport.core.envinfo import environment  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=4000)
    ap.add_argument("--artifact", type=Path)
    args = ap.parse_args(argv)
    root = cache_dir("bench", "bulk")
    train, test = split_by_movie(rotten_tomatoes_rows())
    art = args.artifact
    if art is None:
        from bertexport.building.convert import convert

        model = train_classifier(train, cache_dir("bench", "rotten-tomatoes") / "minilm-sentiment-1ep", 1, None)
        art = root / "minilm-ort-int8"
        if not (art / "manifest.json").is_file():
            convert(str(model), "ort-int8", art, force=True, latency_runs=0)
    texts = [r["text"] for r in (test + train)][: args.rows]
    inp = root / "in.txt"
    inp.write_text("\n".join(t.replace("\n", " ") for t in texts) + "\n")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # a local instance on loopback
    import ray

    results = {}
    runs = [("one machine, no Ray (1 process, 2 threads)", lambda out: bulk.run_local(art, inp, out, threads=2, force=True))]
    for workers in (1, 2):
        runs.append((f"Ray Data, {workers} actor(s) x 1 thread", lambda out, w=workers: bulk.run_ray(art, inp, out, workers=w,
                                                                                                   threads=1, batch_size=64, force=True)))
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        for name, fn in runs:
            out = root / "out.jsonl"
            if out.exists() and not (root / ".out.jsonl.bulk.json").exists():
                out.unlink()  # this bench's own output from before bulk runs kept an ownership sidecar
            stats = fn(out)
            results[name] = stats
            print(f"{name}: {stats['rows']} rows in {stats['seconds']:.1f} s = {stats['rows_per_second']:.1f} rows/s", flush=True)
    finally:
        ray.shutdown()
    (root / "results.json").write_text(json.dumps({"environment": environment(), "rows": len(texts), "artifact": str(art),
                                                    "results": results}, indent=1))
    print("\n| setup | rows/s |\n|---|---|")
    for name, s in results.items():
        print(f"| {name} | {s['rows_per_second']:.1f} |")


if __name__ == "__main__":
    main()
