"""A shallower student from a pre-trained one (issue #24: can 2 layers hold the topic task's
point when they start from general-distilled weights rather than the teacher's own layers?).

1. Slice --keep layers (default 0,2) of the pre-trained checkpoint (bench/pretrained_l3.py's
   paraphrase-MiniLM-L3-v2) into a new checkpoint folder (cached).
2. Distil it from --teacher on --data as `optimize`'s students are trained:
   `bertexport distill --student-init <slice> --patience 3` (cached).
3. Judge the teacher and the student in PyTorch fp32 on --test (text,label; untouched rows):
   the paired accuracy drop with its 95 % interval (Tango) and the agreement (Wilson).

Usage (alone on the machine; ~20 min of training on 2 vCPUs for 900 posts):
  flock /tmp/bench.lock .venv/bin/python bench/init_layer_drop.py \\
      --teacher ~/.cache/bertexport/bench/news-topics/minilm-20ng-coarse-1ep-t128-5000 \\
      --data ~/.cache/bertexport/bench/news-topics/distill-s0-700-1000-500-coarse.csv \\
      --test ~/.cache/bertexport/bench/news-topics/test-s0-700-1000-500-coarse.csv
Writes <cache>/bench/init-layer-drop/<tag>-verdict.json and prints it.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bertexport.core.cache import cache_dir


def slice_layers(source: Path, keep: list[int], out: Path) -> Path:
    """``source`` with only the encoder layers in ``keep`` (renumbered in order)."""
    from safetensors.torch import load_file, save_file

    if (out / "model.safetensors").exists():
        return out
    staging = out.with_name(out.name + ".staging")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(source, staging)
    tensors = {}
    for name, value in load_file(str(source / "model.safetensors")).items():
        if ".layer." in name:
            index = int(name.split(".layer.")[1].split(".")[0])
            if index not in keep:
                continue
            name = name.replace(f".layer.{index}.", f".layer.{keep.index(index)}.")
        tensors[name] = value.contiguous()
    save_file(tensors, str(staging / "model.safetensors"))
    config = json.loads((staging / "config.json").read_text())
    config["num_hidden_layers"] = len(keep)
    (staging / "config.json").write_text(json.dumps(config, indent=1))
    staging.rename(out)
    return out


def predictions(model_dir: Path, tokenizer, texts: list[str], max_length: int) -> list[str]:
    import torch
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir)).eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(texts), 32):
            enc = tokenizer(texts[i:i + 32], truncation=True, max_length=max_length, padding=True, return_tensors="pt")
            out += [model.config.id2label[p] for p in model(**enc).logits.argmax(-1).tolist()]
    return out


def paired_verdict(teacher: list[str], pupil: list[str], gold: list[str]) -> dict:
    """The student's accuracy drop vs the teacher on the same rows (Tango paired interval, points)
    and their agreement (Wilson), from the two label lists and the gold labels."""
    import numpy as np

    from bertexport.judging.stats import accuracy_drop, agreement

    ref = np.array([p == g for p, g in zip(teacher, gold)])
    cand = np.array([p == g for p, g in zip(pupil, gold)])
    drop, agree = accuracy_drop(ref, cand), agreement(np.array([a == b for a, b in zip(teacher, pupil)]))
    return {"teacher_accuracy": 100 * ref.mean(), "accuracy": 100 * cand.mean(),
            "drop_points": [drop.estimate, drop.low, drop.high], "agreement": [agree.estimate, agree.low, agree.high]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--init", type=Path,
                    default=cache_dir("bench", "pretrained-l3") / "paraphrase-MiniLM-L3-v2",
                    help="pre-trained checkpoint to slice (default: bench/pretrained_l3.py's)")
    ap.add_argument("--keep", default="0,2", help="its layers to keep, e.g. 0,2")
    ap.add_argument("--teacher", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True, help="distillation text (.csv with a text column)")
    ap.add_argument("--test", type=Path, required=True, help="untouched text,label rows")
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    import torch
    from transformers import AutoTokenizer

    keep = [int(k) for k in args.keep.split(",")]
    tag = f"{args.init.name}-keep-{'-'.join(map(str, keep))}-{args.teacher.name}"
    work = cache_dir("bench", "init-layer-drop")
    sliced = slice_layers(args.init, keep, work / f"init-{args.init.name}-keep-{'-'.join(map(str, keep))}")
    student = work / f"student-{tag}"
    train_seconds = None  # None: the student was cached
    if not (student / "config.json").exists():
        t0 = time.time()
        subprocess.run([sys.executable, "-m", "bertexport", "distill", str(args.teacher), "--student-init", str(sliced),
                        "--data", str(args.data), "--patience", "3", "--distill-threads", str(args.threads),
                        "-o", str(student), "--force"], check=True)
        train_seconds = round(time.time() - t0)
    torch.set_num_threads(args.threads)
    rows = list(csv.DictReader(open(args.test, newline="")))
    texts, gold = [r["text"] for r in rows], [r["label"] for r in rows]
    tokenizer = AutoTokenizer.from_pretrained(str(args.teacher))
    teacher = predictions(args.teacher, tokenizer, texts, args.max_length)
    pupil = predictions(student, tokenizer, texts, args.max_length)
    verdict = {"student": str(student), "keep": keep, "train_seconds": train_seconds, "rows": len(rows)} | paired_verdict(
        teacher, pupil, gold)
    (work / f"{tag}-verdict.json").write_text(json.dumps(verdict, indent=1))
    print(json.dumps(verdict, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
