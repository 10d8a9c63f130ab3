"""The topic task's verdict on every untouched post (issue #24: a 1-point target judged on 500
posts has a ~±2-point interval, too wide to tell a 2-layer student from a 3-layer one).

bench/news_topics.py draws search, distillation and test rows from one seeded shuffle of the
20 Newsgroups test file (texts never in the teacher's training file). This takes the rows
after those draws (same --seed and sizes), which nothing has seen: not the teacher, the search,
the students, the calibration nor the 500-row verdict, and judges against the PyTorch teacher:
  --artifact ART    through the product's own gate: `bertexport validate ART --model TEACHER
                    --force --max-accuracy-drop 1 --confidence 0.95` (the artifact was built
                    from a student, hence --force; the torch-free runtime, as shipped)
  --checkpoint DIR  a student checkpoint in PyTorch fp32 (paired Tango interval, Wilson agreement);
                    with several, each later one against the first too, paired (did a change pay?)

Usage (alone on the machine; ~1-2 min per contestant on 2 vCPUs):
  flock /tmp/bench.lock .venv/bin/python bench/topic_verdict.py \\
      --teacher ~/.cache/bertexport/bench/news-topics/minilm-20ng-coarse-1ep-t128-5000 \\
      --artifact WINNER_DIR [--artifact ...] [--checkpoint STUDENT_DIR ...]
Adds to <cache>/bench/news-topics/verdict-<draw>.json (earlier contestants kept); prints each verdict.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from bertexport.core.cache import cache_dir  # noqa: E402
from news_topics import DATASETS, data_tag, draw_rows, topic_rows  # noqa: E402  (bench/ is on sys.path above)


def untouched_rows(seed: int, sizes: dict[str, int], topics: str, dataset: str = "20ng") -> list[dict]:
    _, test, _ = topic_rows(topics, dataset)
    drawn = draw_rows(test, sizes | {"rest": len(test)}, seed)
    return drawn["rest"]


def validate(artifact: Path, teacher: Path, data: Path, threads: int, out: Path) -> dict:
    cmd = [sys.executable, "-m", "bertexport", "validate", str(artifact), "--model", str(teacher), "--force",
           "--data", str(data), "--max-accuracy-drop", "1", "--confidence", "0.95", "--threads", str(threads),
           "--json", str(out)]
    code = subprocess.run(cmd).returncode
    if code not in (0, 1) or not out.is_file():
        raise SystemExit(f"validate {artifact} exited {code}")
    return {"exit_code": code, "report": json.loads(out.read_text())}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", type=Path, required=True)
    ap.add_argument("--artifact", type=Path, action="append", default=[])
    ap.add_argument("--checkpoint", type=Path, action="append", default=[])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--search-rows", type=int, default=700)
    ap.add_argument("--distill-rows", type=int, default=1000)
    ap.add_argument("--test-rows", type=int, default=500)
    ap.add_argument("--topics", choices=("coarse", "all"), default="coarse")
    ap.add_argument("--dataset", choices=tuple(DATASETS), default="20ng", help="as news_topics.py's --dataset")
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    from rotten_tomatoes import write_csv

    sizes = {"search": args.search_rows, "distill": args.distill_rows, "test": args.test_rows}
    rows = untouched_rows(args.seed, sizes, args.topics, args.dataset)
    tag = f"s{args.seed}-{args.search_rows}-{args.distill_rows}-{args.test_rows}" + (
        f"-{args.topics}" if args.dataset == "20ng" else data_tag(args.dataset, args.topics))
    root = cache_dir("bench", "news-topics")
    data = write_csv(rows, root / f"untouched-{tag}.csv")
    record = root / f"verdict-{tag}.json"  # contestants of earlier runs on the same rows are kept
    earlier = json.loads(record.read_text()) if record.is_file() else {}
    results = {"teacher": str(args.teacher), "rows": len(rows), "data": str(data),
               "contestants": earlier.get("contestants", {}) if earlier.get("teacher") == str(args.teacher) else {}}
    for art in args.artifact:
        results["contestants"][str(art)] = validate(art, args.teacher, data, args.threads,
                                                    root / f"verdict-{art.name}-{tag}.json")
        print(f"{art.name}: {results['contestants'][str(art)]['report'].get('verdict')}", flush=True)
    if args.checkpoint:
        import torch
        from init_layer_drop import paired_verdict, predictions
        from transformers import AutoTokenizer

        torch.set_num_threads(args.threads)
        texts, gold = [r["text"] for r in rows], [r["category"] for r in rows]
        tokenizer = AutoTokenizer.from_pretrained(str(args.teacher))
        teacher = predictions(args.teacher, tokenizer, texts, args.max_length)
        pupils = {}
        for ckpt in args.checkpoint:
            pupils[ckpt] = pupil = predictions(ckpt, tokenizer, texts, args.max_length)
            results["contestants"][str(ckpt)] = {"pytorch_fp32": True} | paired_verdict(teacher, pupil, gold)
            print(json.dumps(results["contestants"][str(ckpt)]), flush=True)
        first, *others = args.checkpoint
        for ckpt in others:  # two students on the same rows: the second's drop against the first, paired
            pair = paired_verdict(pupils[first], pupils[ckpt], gold)
            results.setdefault("pairs", {})[f"{ckpt} vs {first}"] = pair
            print(f"{ckpt.name} vs {first.name}: drop {pair['drop_points'][0]:+.2f} "
                  f"[{pair['drop_points'][1]:+.2f}, {pair['drop_points'][2]:+.2f}] points", flush=True)
    record.write_text(json.dumps(results, indent=1, default=str))
    print(f"{len(rows)} untouched rows; {record}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
