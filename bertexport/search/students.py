"""The students ``optimize`` tries: which shapes, in which order, trained within the budget.

- ``plan_students`` turns ``--distill`` into checked shapes before any work: ``auto`` is the
  depth x width grid (``student_grid``), ``3,4`` layer-drop students at full width, and
  ``L3-H256-F1024,L2`` explicit shapes (``students.parse_shape``; missing parts are the
  teacher's). A shape the family cannot take is refused here (exit 2).
- ``StudentSearch.run`` predicts every shape's latency with the cost model
  (``bertexport.search.cost_model``: a few anchor shapes measured on this machine, random init, the
  real recipe; the rest predicted), bisects over them by predicted latency (``next_shape``:
  the middle untried shape first), never trains a shape that cannot beat the best passing
  candidate so far (*hopeless*) nor one no larger in any dimension than a student that
  missed the gate (*dominated*). Each remaining student is
  built by ``students.make_student`` (layers chosen by ``students.choose_layers``, then
  importance scores of those layers on the training data), trained by
  ``distill.train_student`` (logit + intermediate losses, teacher-labelled expansion) on
  ``--distill-data`` or the search slice — never the held-out confirm slice — and judged by the search (``Search.try_candidate``) against the
  *original* model with the gate's statistics. A student that cannot finish in the time left
  (estimated from the first student's training time, scaled by MACs) is skipped with a
  reason. Students are cached by (teacher, data, shape, distill config); an interrupted one
  resumes from its work folder in the cache.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from pathlib import Path

from bertexport.search.candidates import Candidate
from bertexport.core.errors import UserError
from bertexport.core.hashing import cache_key

GRID_MAX = 12  # shapes in the ``auto`` grid at most
SCORING_TEXTS = 512  # texts the importance scores and the layer choice are measured on


# -- which shapes ---------------------------------------------------------------------------------

def teacher_config(ckpt):
    """The teacher's transformers config, read from its folder (no weights loaded)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(ckpt.path, trust_remote_code=ckpt.trust_remote_code)


def _whole(value: float) -> int:
    return max(1, int(round(value)))


def student_grid(teacher, family: str, cap: int = GRID_MAX, config=None) -> list:
    """``--distill auto``: depths {L/2, L/3, 2} (below the teacher's) x widths {the teacher's,
    2/3, 1/2 of its heads (the hidden size goes with them)} x FFN {the teacher's, 1/2, 1/4},
    keeping an FFN no wider (relative to the hidden size) than the teacher's and at least half
    the hidden size, only shapes ``students.check_shape`` accepts; at most ``cap`` shapes:
    where more, the shapes whose MACs are nearest another's are dropped first."""
    from bertexport.search.cost_model import linear_macs
    from bertexport.students.shapes import StudentShape, check_shape, width_prunable

    n, head = teacher.layers, teacher.hidden // teacher.heads
    depths = sorted({d for d in (n // 2, n // 3, 2) if 1 <= d < n} or {max(1, n - 1)}, reverse=True)
    if width_prunable(family) and (family != "electra" or config is None
                                   or getattr(config, "embedding_size", teacher.hidden) == teacher.hidden):
        heads = sorted({_whole(teacher.heads * f) for f in (1.0, 2 / 3, 1 / 2)}, reverse=True)
        ffns = sorted({_whole(teacher.ffn * f) for f in (1.0, 1 / 2, 1 / 4)}, reverse=True)
    else:
        heads, ffns = [teacher.heads], [teacher.ffn]
    widest = teacher.ffn / teacher.hidden
    shapes = []
    for d in depths:
        for a in heads:
            h = a * head
            for f in ffns:
                if (f > widest * h + 1e-9 or 2 * f < h) and (h, f) != (teacher.hidden, teacher.ffn):
                    continue
                shape = StudentShape(d, h, a, f)
                try:
                    check_shape(shape, teacher, family, config)
                except UserError:
                    continue
                shapes.append(shape)
    shapes = sorted(set(shapes), key=lambda s: linear_macs(s, 1, 1))
    while len(shapes) > cap:  # drop the shape nearest (in log MACs) to its cheaper neighbour, never the ends
        logs = [math.log(linear_macs(s, 1, 1)) for s in shapes]
        i = min(range(1, len(shapes) - 1), key=lambda k: logs[k] - logs[k - 1])
        shapes.pop(i)
    return shapes


def plan_students(distill, ckpt) -> list:
    """``--distill`` as checked shapes (empty: no students). ``auto``: the grid; integers
    (``3,4`` or a list): layer-drop students at full width; ``L3-H256-F1024,L2``: shapes."""
    if not distill:
        return []
    from bertexport.core.families import get_family

    fam = get_family(ckpt.family)
    n = int(fam.config_value(ckpt.config, fam.layers_key, 0))
    items = list(distill) if isinstance(distill, (list, tuple)) else [x.strip() for x in str(distill).split(",") if x.strip()]
    if not items:
        return []
    depths = [x for x in items if isinstance(x, int) or str(x).lstrip("-").isdigit()]
    if depths and len(depths) == len(items):  # the layer-drop form, checked as it always was
        layers = [int(x) for x in depths]
        if any(k < 1 for k in layers):
            raise UserError("--distill layer counts must be >= 1")
        too_deep = sorted({k for k in layers if k >= n})
        if too_deep:
            raise UserError(f"--distill {','.join(map(str, too_deep))}: the model has {n} layers; a student needs fewer "
                            f"(1..{n - 1})")
        items = [f"L{k}" for k in sorted(set(layers))]
    from bertexport.students.shapes import check_shape, parse_shape, teacher_shape

    config = teacher_config(ckpt)
    teacher = teacher_shape(config)
    if items == ["auto"]:
        shapes = student_grid(teacher, ckpt.family, config=config)
        if not shapes:
            raise UserError(f"--distill auto: no student shape fits a {n}-layer {ckpt.family} model")
        return shapes
    if "auto" in items:
        raise UserError("--distill auto cannot be combined with other shapes")
    shapes = []
    for text in items:
        shape = parse_shape(str(text), teacher)
        check_shape(shape, teacher, ckpt.family, config)
        if shape not in shapes:
            shapes.append(shape)
    return shapes


# -- the candidates a student is built with ---------------------------------------------------------

def _pass_known(name: str) -> bool:
    """Whether this installation has the pass (registered and its module present)."""
    import importlib.util

    from bertexport.building.passes.base import CATALOG

    return name in CATALOG and importlib.util.find_spec(CATALOG[name]) is not None


def skip_supported(task: str, family: str, config: dict) -> bool:
    """First-token skipping applies to text classification with a first-token pooler
    (``passes.first_token_skip.check_supported``)."""
    if task != "text-classification" or not _pass_known("first-token-skip"):
        return False
    from bertexport.building.passes.first_token_skip import check_supported

    try:
        check_supported(family, task, config)
    except UserError:
        return False
    return True


def student_candidates(shape, bases: list[Candidate], skip: bool) -> list[Candidate]:
    """The student's builds: each base recipe with first-token skipping first (where the
    task allows it) and int8 word embeddings (both ONNX passes, before the backend's)."""
    out = []
    emb8 = _pass_known("int8-embeddings")
    for base in bases:
        pre, suffix = [], ""
        if skip:
            pre.append({"type": "first-token-skip"})
            suffix += "+skip"
        if emb8:
            pre.append({"type": "int8-embeddings"})
            suffix += "+emb8"
        out.append(dataclasses.replace(base, recipe=base.recipe + suffix, passes=pre + [dict(p) for p in base.passes],
                                       keep_float=[], anchor=False, student=shape.name, student_layers=shape.layers))
    return out


def fastest_bases(trials, recipes: list[Candidate], count: int = 2) -> list[tuple[Candidate, float | None]]:
    """The ``count`` fastest int8 recipes measured on the original (quick latency), with that
    latency; recipes not yet measured follow in the machine's order."""
    measured: dict[str, tuple[Candidate, float]] = {}
    for t in trials:
        c = t.candidate
        if c.student or c.student_layers or c.keep_float or t.latency_ms is None or not c.int8 or t.status == "excluded":
            continue
        if c.recipe not in measured or t.latency_ms < measured[c.recipe][1]:
            measured[c.recipe] = (c, t.latency_ms)
    out = sorted(measured.values(), key=lambda x: x[1])[:count]
    for c in recipes:
        if len(out) >= count:
            break
        if c.int8 and c.recipe not in measured:
            out.append((c, None))
    return out


# -- training ---------------------------------------------------------------------------------------

def training_units(shape, teacher) -> float:
    """What a training step costs, in linear MACs per token: the teacher's forward pass (its
    intermediate outputs are computed per batch) and the student's forward and backward (~3x)."""
    from bertexport.search.cost_model import linear_macs

    return linear_macs(teacher, 1, 1) + 3 * linear_macs(shape, 1, 1)


def next_shape(pending: list):
    """The next student to train: the middle of the untried shapes (ordered by predicted
    latency). Accuracy grows with size roughly monotonically, so this bisects: a pass makes
    every slower shape hopeless, a miss rules out the shapes it dominates (``dominated``),
    and the fastest passing shape is found in ~log2(n) trainings instead of n (fastest-first
    spends the budget on the smallest shapes, which miss the gate first)."""
    return pending[len(pending) // 2]


def dominated(shape, missed) -> bool:
    """``shape`` is no larger than ``missed`` in depth, hidden size and FFN: expected no better."""
    return shape.layers <= missed.layers and shape.hidden <= missed.hidden and shape.ffn <= missed.ffn


class StudentSearch:
    """Trains and judges the students of one ``optimize`` run (see the module doc)."""

    def __init__(self, search, *, ckpt, teacher_model, tokenizer, tok_dir: Path, shapes: list, recipes: list[Candidate],
                 distill_data=None, epochs: int = 2, seed: int = 0, cost_timer=None):
        self.search, self.ckpt, self.teacher_model, self.tokenizer, self.tok_dir = search, ckpt, teacher_model, tokenizer, tok_dir
        self.shapes, self.recipes = shapes, recipes
        self.distill_data, self.epochs, self.seed = distill_data, epochs, seed
        self.cost_timer = cost_timer
        self.records: list[dict] = []
        self.cost_record: dict | None = None
        self._importance: dict[tuple[int, ...], object] = {}
        self._data: tuple[list[str], list[int] | None, str] | None = None
        self._scoring: tuple[list, list] | None = None
        self._layer_choice: dict[int, tuple[list[int], list[dict]]] = {}
        self._rate: float | None = None  # training seconds per ``training_units`` (the first student trained here)

    @property
    def log(self):
        return self.search.reporter.log

    def data(self) -> tuple[list[str], list[int] | None, str]:
        """Training texts and labels: ``--distill-data`` (labels used when present) or the
        search slice; never the held-out confirm slice."""
        if self._data is not None:
            return self._data
        task = self.ckpt.task
        if self.distill_data:
            from bertexport.core.textdata import label_ids, load_texts

            ts = load_texts(self.distill_data)
            labelled = ts.labels is not None and task == "text-classification"
            labels = [int(x) for x in label_ids(ts.labels, self.ckpt.id2label)] if labelled else None
            texts = ts.texts
        else:
            sl = self.search.search
            texts = list(sl.data.texts)
            labels = [int(x) for x in sl.labels] if sl.labels is not None and task == "text-classification" else None
        self._data = (texts, labels, cache_key(texts, labels))
        return self._data

    def config(self, shape):
        from bertexport.students.distill import DistillConfig

        return DistillConfig(shape=shape.name, epochs=self.epochs, seed=self.seed, threads=self.search.threads)

    def _key(self, shape, data_digest: str, cfg) -> str:
        c = dataclasses.asdict(cfg)
        c.pop("threads", None)  # threads change the speed, not the student
        return cache_key("student/3", self.ckpt.sha256, self.ckpt.task, data_digest, shape.name, c)

    def scoring(self, texts, labels, cfg) -> tuple[list, list]:
        """Batches of the training data (at most ``SCORING_TEXTS``) with the teacher's outputs,
        computed once per search: importance scores and the layer choice read them."""
        if self._scoring is None:
            from bertexport.students.distill import _length_batches, _Outputs
            from bertexport.core.staging import WorkFolder

            n = min(len(texts), SCORING_TEXTS)
            batches = _length_batches(self.tokenizer, texts[:n], None if labels is None else labels[:n], cfg.batch_size,
                                      cfg.max_length, cfg.seed)
            with WorkFolder("scoring") as work:
                outs = _Outputs(work / "teacher.npz").load_or_compute(self.teacher_model, batches, self.ckpt.task, self.log)
            self._scoring = (batches, outs)
        return self._scoring

    def importance(self, keep: list[int], texts, labels, cfg):
        """Importance of the heads, neurons and hidden dims of the teacher's layers ``keep``
        (scored on the layer-dropped copy, so the scores see the layers the student keeps),
        once per layer choice: every width of that depth reads the same scores."""
        key = tuple(keep)
        if key not in self._importance:
            from bertexport.students.distill import _layer_count, shrink
            from bertexport.students.shapes import score_importance

            full = len(keep) == _layer_count(self.teacher_model.config)
            model = self.teacher_model if full else shrink(self.teacher_model, list(keep))
            with self.search.reporter.step(f"score heads, FFN neurons and hidden dims of layers {list(keep)} (first-order Taylor)"):
                batches, outs = self.scoring(texts, labels, cfg)
                self._importance[key] = score_importance(model, batches, self.ckpt.task, outs)
        return self._importance[key]

    def layers(self, shape, teacher, texts, labels, cfg) -> tuple[list[int], list[dict]]:
        """The teacher layers the student starts from, chosen by measured effect (once per depth)."""
        from bertexport.students.shapes import choose_layers

        if shape.layers == teacher.layers:
            return list(range(teacher.layers)), []
        if shape.layers not in self._layer_choice:
            batches, outs = self.scoring(texts, labels, cfg)
            self._layer_choice[shape.layers] = choose_layers(self.teacher_model, shape.layers, batches, self.ckpt.task, outs)
        return self._layer_choice[shape.layers]

    def train(self, shape) -> tuple[Path, dict, bool]:
        """The trained student's checkpoint folder, its report and whether it came from the cache."""
        from bertexport.core.cache import cache_dir
        from bertexport.students.distill import default_layer_map, train_student
        from bertexport.core.staging import StagedFolder
        from bertexport.students.shapes import make_student, teacher_shape

        texts, labels, data_digest = self.data()
        cfg = self.config(shape)
        key = self._key(shape, data_digest, cfg)
        out = cache_dir("students") / key
        report_file = out / "student_report.json"
        if report_file.is_file():
            return out, json.loads(report_file.read_text()), True
        teacher = teacher_shape(self.teacher_model.config)
        width = (shape.hidden, shape.heads, shape.ffn) != (teacher.hidden, teacher.heads, teacher.ffn)
        keep, layer_table = self.layers(shape, teacher, texts, labels, cfg)
        importance = self.importance(keep, texts, labels, cfg) if width else None
        student = make_student(self.teacher_model, shape, keep, importance)
        work = cache_dir("students") / f"{key}.work"  # kept when interrupted: the next run resumes from it
        work.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        # the student's last layer learns from the teacher's last (kept layers map onto themselves
        # only when they end there, e.g. every k-th; lower layers map uniformly)
        layer_map = default_layer_map(teacher.layers, keep, shape.layers)
        best, report = train_student(self.teacher_model, student, self.tokenizer, texts, labels, self.ckpt.task, cfg, work,
                                     self.search.reporter, layer_map,
                                     teacher_cache=cache_dir("students") / f"teacher-{self.ckpt.sha256[:16]}")
        seconds = time.perf_counter() - t0
        report = {k: v for k, v in report.items() if not k.startswith("_")} | {  # "_eval" holds tensors
            "shape": shape.name, "kept_teacher_layers": list(keep), "layer_choice": layer_table,
            "wall_seconds": round(seconds, 1), "train_seconds": report.get("train_seconds", seconds),
            "data_digest": data_digest, "teacher_sha256": self.ckpt.sha256}
        with StagedFolder(out, force=True, protect=[self.ckpt.path], what="student folder") as staged:
            best.save_pretrained(staged.staging, safe_serialization=True)
            self.tokenizer.save_pretrained(staged.staging)
            (staged.staging / "student_report.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
            staged.publish(True)
        shutil.rmtree(work, ignore_errors=True)
        return out, report, False

    # -- the search over shapes ---------------------------------------------------------------------
    def costs(self, bases) -> tuple[dict, object]:
        """Every shape's latency relative to the teacher on the fastest base recipe: anchors
        measured (or cached), the rest predicted."""
        from bertexport.judging.compare import fixed_cell_feeds
        from bertexport.search.cost_model import CostModel
        from bertexport.students.shapes import teacher_shape
        from bertexport.core.textdata import builtin_samples

        s = self.search
        base = bases[0][0]
        recipe = student_candidates(self.shapes[0], [base], self.skip)[0]
        cost = CostModel(self.teacher_model.config, teacher_shape(self.teacher_model.config), recipe=recipe, reference=base,
                         task=self.ckpt.task, tokenizer_dir=self.tok_dir,
                         feeds=fixed_cell_feeds(s.encode, builtin_samples(), s.batch, s.sequence), batch=s.batch,
                         sequence=s.sequence, threads=s.threads, calib=s.calib, reporter=s.reporter, timer=self.cost_timer,
                         config_digest=cache_key(self.ckpt.config))
        error = None
        try:
            if s.remaining() <= 0:  # no time to train anyway: order by what is known
                costs, fit = cost.costs(self.shapes, measure=False)
            else:
                with s.reporter.step(f"cost model: time anchor shapes ({recipe.recipe}, random init)"):
                    costs, fit = cost.costs(self.shapes)
        except Exception as e:  # a shape the recipe cannot build must not end the search: MACs decide then
            error = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"
            self.log(f"cost model: measuring failed ({error}); predicting from MACs")
            costs, fit = cost.costs(self.shapes, measure=False)
        self.cost_record = cost.describe(fit) | {"error": error}
        return costs, cost

    def run(self) -> list[dict]:
        from bertexport.search.session import Trial
        from bertexport.students.shapes import teacher_shape

        s = self.search
        bases = fastest_bases(s.trials, self.recipes)
        if not bases:
            self.log("no int8 recipe to build students with")
            return self.records
        self.skip = skip_supported(self.ckpt.task, self.ckpt.family, self.ckpt.config)
        self.teacher = teacher_shape(self.ckpt.config)
        costs, cost = self.costs(bases)
        order = sorted(self.shapes, key=lambda sh: costs[sh.name].ratio)
        self.log("students by predicted latency: " + ", ".join(
            f"{sh.name} {costs[sh.name].ratio:.2f}x ({costs[sh.name].source})" for sh in order))
        pending, missed = list(order), []
        while pending:
            shape = next_shape(pending)
            pending.remove(shape)
            c = costs[shape.name]
            beaten = next((m for m in missed if dominated(shape, m)), None)
            if beaten is not None:  # no larger in any dimension than a student that missed the gate
                base_ms = bases[0][1]
                rec = {"shape": shape.name, **dataclasses.asdict(shape), "predicted_ratio": round(c.ratio, 4),
                       "prediction": c.source, "predicted_ms": None if base_ms is None else c.ratio * base_ms,
                       "measured_ms": None, "train_seconds": None, "cached": False, "status": "dominated",
                       "reason": f"never trained: no larger in any dimension than {beaten.name}, which missed the gate",
                       "candidates": []}
                self.records.append(rec)
                for cand, (_, ms) in zip(student_candidates(shape, [b for b, _ in bases], self.skip), bases):
                    self._record(Trial(cand, "skipped", rec["reason"]), None if ms is None else c.ratio * ms)
                continue
            cands = [(cand, None if ms is None else c.ratio * ms)
                     for cand, (_, ms) in zip(student_candidates(shape, [b for b, _ in bases], self.skip), bases)]
            rec = {"shape": shape.name, **dataclasses.asdict(shape), "predicted_ratio": round(c.ratio, 4),
                   "prediction": c.source, "predicted_ms": cands[0][1], "measured_ms": None, "train_seconds": None,
                   "cached": False, "status": "", "reason": "", "candidates": [cand.name for cand, _ in cands]}
            self.records.append(rec)

            def hopeless(pred):
                return pred is not None and s.best is not None and pred >= s.best.latency_ms

            live = [(cand, pred) for cand, pred in cands if not hopeless(pred)]
            if not live:
                rec["status"] = "hopeless"
                rec["reason"] = (f"predicted {cands[0][1]:.2f} ms >= the best passing {s.best.candidate.name} "
                                 f"{s.best.latency_ms:.2f} ms")
                for cand, pred in cands:
                    self._record(Trial(cand, "hopeless", f"never trained: predicted {pred:.2f} ms >= best passing "
                                                         f"{s.best.latency_ms:.2f} ms"), pred)
                continue
            if s.remaining() <= 0:
                rec["status"], rec["reason"] = "skipped", "time budget used up before distillation"
                for cand, pred in cands:
                    self._record(Trial(cand, "skipped", rec["reason"]), pred)
                continue
            need = None if self._rate is None else self._rate * training_units(shape, self.teacher)
            texts, labels, digest = self.data()
            cached = (self._cached_path(shape, digest) / "student_report.json").is_file()
            if need is not None and not cached and need > s.remaining():
                rec["status"] = "skipped"
                rec["reason"] = f"training needs ~{need:.0f} s (estimated from the first student), {s.remaining():.0f} s left"
                for cand, pred in cands:
                    self._record(Trial(cand, "skipped", rec["reason"]), pred)
                continue
            try:
                with s.reporter.step(f"student {shape.name} (predicted {c.ratio:.2f}x the teacher's latency)"):
                    path, report, rec["cached"] = self.train(shape)
            except Exception as e:  # one student failing (a shape a backend refuses, ...) must not end the search
                first = (str(e).strip().splitlines() or [""])[0][:300]
                rec["status"], rec["reason"] = "error", first if isinstance(e, UserError) else f"{type(e).__name__}: {first}"
                for cand, pred in cands:
                    self._record(Trial(cand, "error", rec["reason"]), pred)
                continue
            rec["train_seconds"] = report.get("train_seconds")
            rec["kept_teacher_layers"] = report.get("kept_teacher_layers")
            if self._rate is None and rec["train_seconds"]:  # measured now or when the cached student was trained
                self._rate = float(rec["train_seconds"]) / training_units(shape, self.teacher)
            latencies, statuses = [], []
            for cand, pred in cands:
                if hopeless(pred):  # a student candidate that passed made this one hopeless
                    t = self._record(Trial(cand, "hopeless", f"not built: predicted {pred:.2f} ms >= best passing "
                                                             f"{s.best.latency_ms:.2f} ms"), pred)
                else:
                    t = s.try_candidate(cand, str(path))
                    t.predicted_ms = pred
                statuses.append(t.status)
                if t.latency_ms is not None:
                    latencies.append(t.latency_ms)
            rec["measured_ms"] = min(latencies) if latencies else None
            rec["status"] = "passed" if "passed" in statuses else "not passed"
            if "failed" in statuses and "passed" not in statuses:  # missed outright, not within noise
                missed.append(shape)
            rec["reason"] = ", ".join(f"{cand.recipe}: {st}" for (cand, _), st in zip(cands, statuses))
        return self.records

    def _cached_path(self, shape, data_digest: str) -> Path:
        from bertexport.core.cache import cache_dir

        return cache_dir("students") / self._key(shape, data_digest, self.config(shape))

    def _record(self, trial, predicted_ms):
        trial.predicted_ms = predicted_ms
        self.search.trials.append(trial)
        self.search.log_board(trial)
        return trial


def search_students(search, **kw) -> dict:
    """Run the student search; the report's ``students`` and ``cost_model`` sections."""
    ss = StudentSearch(search, **kw)
    records = ss.run()
    return {"students": records, "cost_model": ss.cost_record}
