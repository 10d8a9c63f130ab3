"""The student search of ``optimize``: which students to train, in which order, within the budget.

``StudentSearch.run`` predicts every shape's latency with the cost model
(``bertexport.search.cost_model``: a few anchor shapes measured on this machine, random init, the
real recipe; the rest predicted), bisects over them by predicted latency (``next_shape``: the
middle untried shape of the tier most likely to pass first: pre-trained inits, then the shapes
that keep the teacher's hidden size, then the rest; the fastest of that tier when the student just
judged passed with room to spare, ``_passed_with_room``), never trains a shape that cannot beat the
best passing candidate so far (*hopeless*) nor one no larger in any dimension than a student
that missed the gate, or than a shape predicted as fast (*dominated*; ``outsized``). Each
remaining student is trained (``search.student_training``: sliced or ``--student-init``, cached,
resumable, within the deadline) and judged by the search (``Search.try_candidate``) against the
*original* model with the gate's statistics on the builds ``search.student_builds`` gives it.
Which shapes: ``search.student_shapes`` (the pruned
originals that missed the gate among them, ``PrunedShape``: distilled from the pruned weights,
ordered and judged like every student).

The budget goes to the few students most likely to pass: a new student trains for at most
``STUDENT_SHARE`` of the time left (all of it when no other shape could still win; at least
``MIN_STUDENT_EPOCHS`` when that and its judging fit, else it is skipped: a student the time
stops is judged on its annealed best state, so it need not fit a whole training), and before any new shape starts, the student closest to
the gate among those that missed it while still improving (stopped by that share or by its
epoch cap, not by its patience; ``most_promising``) is continued from its checkpoint with all
the time left, until its patience runs out (``student_training``: ``train`` resumes a
time-stopped one, ``extend`` takes one past its cap), then judged again as a record of its own
(``<shape> continued``, with ``continues`` and its whole learning curve: search.md shows where
it resumed).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from bertexport.core.errors import UserError
from bertexport.core.hashing import cache_key
from bertexport.search.candidates import Candidate
from bertexport.search.student_builds import fastest_bases, skip_supported, student_candidates
from bertexport.search.student_shapes import InitShape, PrunedShape, dominated, next_shape, outsized, pruned_students
from bertexport.students.distill_config import EVALS_PER_EPOCH
from bertexport.search.student_training import PATIENCE, STUDENT_SHARE, StudentTraining, learning_curve, training_units

# a student stops training this long before the deadline (an absolute end, whatever its own time
# share): what judging it took the first time (a new one: the slowest judging so far; its builds and
# evaluations, x JUDGE_MARGIN), at least MIN_JUDGE_SECONDS. Without it, a continuation trained to
# the deadline and its builds were skipped: the time bought nothing (seen in the Rotten Tomatoes run
# of 2026-12-03: 607 s of training, never judged; and on the news topics, 2026-12-04 11:12, when a
# continuation's time was counted from after its setup)
MIN_JUDGE_SECONDS, JUDGE_MARGIN = 30.0, 1.5
# a new student whose time share is less than one pass over its data gets that pass when it and its
# judging fit in the time left, else it is not started: judged on so little training it says nothing
# of its shape (seen: students of 0.01 and 0.27 epochs judged and "missed" after the first passed,
# 2026-12-03); skipping it when the time was there left 762 s of a 1,680-s budget unused (news
# topics, 2026-12-04: the 3-layer layer-drop student, a 381-s share of an epoch of ~573 s)
MIN_STUDENT_EPOCHS = 1.0
# a student is continued when one more held-out evaluation (half an epoch) and its judging fit in
# the time left: requiring a whole epoch started a new, narrower student instead (seen on the news
# topics, 2026-12-03: the pre-trained L3, 0.81 agreement and rising at 0.72 epochs of ~575 s, was
# not continued with 596 s left; an L3-H192 from scratch got 253 s and missed by 25 points)
MIN_CONTINUE_EPOCHS = 1.0 / EVALS_PER_EPOCH


class StudentSearch(StudentTraining):
    """Trains and judges the students of one ``optimize`` run (see the module doc)."""

    def __init__(self, search, *, ckpt, teacher_model, tokenizer, tok_dir: Path, shapes: list, recipes: list[Candidate],
                 distill_data=None, epochs: int | None = None, seed: int = 0, cost_timer=None, inits: list = (),
                 device: str = "auto", pruned: dict | None = None):
        super().__init__(search, ckpt=ckpt, teacher_model=teacher_model, tokenizer=tokenizer, distill_data=distill_data,
                         epochs=epochs, seed=seed, device=device)
        # --student-init checkpoints and the pruned originals that missed the gate (both InitShape)
        self.inits = list(inits) + pruned_students(pruned, ckpt, tokenizer, search.reporter.log)
        self.tok_dir, self.shapes, self.recipes = tok_dir, shapes, recipes
        self.cost_timer = cost_timer
        self.records: list[dict] = []
        self.cost_record: dict | None = None
        self._judged: list[dict] = []  # every trained student judged: its record, shape, segment, trials
        self._continuations: dict[str, int] = {}

    # -- the search over shapes ---------------------------------------------------------------------
    def costs(self, bases) -> tuple[dict, object]:
        """Every shape's latency relative to the teacher on the fastest base recipe: anchors
        measured (or cached), the rest predicted."""
        from bertexport.search.cost_model import CostModel
        from bertexport.students.shapes import teacher_shape

        s = self.search
        base = bases[0][0]
        shapes = self.shapes or self.inits  # only --student-init checkpoints: their shapes anchor the model
        recipe = student_candidates(shapes[0], [base], self.skip)[0]
        cost = CostModel(self.teacher_model.config, teacher_shape(self.teacher_model.config), recipe=recipe, reference=base,
                         task=self.ckpt.task, tokenizer_dir=self.tok_dir,
                         feeds=s.cell_feeds(), batch=s.batch,
                         sequence=s.sequence, threads=s.threads, calib=s.calib, reporter=s.reporter, timer=self.cost_timer,
                         config_digest=cache_key(self.ckpt.config))
        error = None
        try:
            if s.remaining() <= 0:  # no time to train anyway: order by what is known
                costs, fit = cost.costs(shapes, measure=False)
            else:
                with s.reporter.step(f"cost model: time anchor shapes ({recipe.recipe}, random init)"):
                    costs, fit = cost.costs(shapes)
        except Exception as e:  # a shape the recipe cannot build must not end the search: MACs decide then
            error = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"
            self.log(f"cost model: measuring failed ({error}); predicting from MACs")
            costs, fit = cost.costs(shapes, measure=False)
        costs |= {i.name: cost.predict(i, fit) for i in self.inits if i.name not in costs}
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
        order = sorted(self.shapes + self.inits, key=lambda sh: costs[sh.name].ratio)
        self.log("students by predicted latency: " + ", ".join(
            f"{sh.name} {costs[sh.name].ratio:.2f}x ({costs[sh.name].source})" for sh in order))
        larger_as_fast = outsized(order, {sh.name: costs[sh.name].ratio for sh in order})
        pending, missed = [sh for sh in order if sh not in larger_as_fast], []
        while pending or self.most_promising() is not None:
            follow = self.most_promising()
            if follow is not None:  # the budget continues the best student before it starts a new shape
                self._continue(follow, bases, costs, missed)
                continue
            # bisect over the shapes that could still win: counting the hopeless ones (predicted no
            # faster than the best passing build; recorded when nothing else is left) put the middle
            # among the slower shapes after a pass
            live = [sh for sh in pending if not all(self._hopeless(pred) for _, pred in
                                                    self._candidates(sh, sh.name, bases, costs[sh.name]))]
            room = self._passed_with_room()
            shape = next_shape(live or pending, self.teacher.hidden, fastest=room is not None)
            if room is not None:
                self.log(f"{room['shape']} kept the gate with room to spare (stopped at its target agreement at epoch "
                         f"{room.get('epochs_run')}): the fastest shape that could still win next, {shape.name}")
            pending.remove(shape)
            # the last shape that could still win (none other live, nor ruled out by a miss) gets all the time left
            last = not any(sh is not shape and not any(dominated(sh, m) for m in missed) for sh in live)
            c = costs[shape.name]
            beaten = next((m for m in missed if dominated(shape, m)), None)
            if beaten is not None:  # no larger in any dimension than a student that missed the gate
                self._untrained(shape, c, bases, "dominated",
                                f"never trained: no larger in any dimension than {beaten.name}, which missed the gate")
                continue
            cands = self._candidates(shape, shape.name, bases, c)
            rec = {"shape": shape.name, **dataclasses.asdict(shape), "predicted_ratio": round(c.ratio, 4),
                   "prediction": c.source, "predicted_ms": cands[0][1], "measured_ms": None, "train_seconds": None,
                   "cached": False, "status": "", "reason": "", "candidates": [cand.name for cand, _ in cands]}
            self.records.append(rec)
            if isinstance(shape, InitShape):
                rec["init"] = shape.init.to_dict()
            if isinstance(shape, PrunedShape):  # the original pruned without training, distilled from here
                rec["pruned"] = dict(shape.pruned)

            live = [(cand, pred) for cand, pred in cands if not self._hopeless(pred)]
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
            texts, labels, digest = self.data()
            cached = (self._cached_path(shape, digest) / "student_report.json").is_file()
            epoch = self._epoch_seconds(shape)
            share = s.remaining() if last else STUDENT_SHARE * s.remaining()
            if last:
                self.log(f"{shape.name}: the last shape that could still win; it gets all the time left")
            reason = None
            if epoch is not None and not cached and share < MIN_STUDENT_EPOCHS * epoch:
                room = s.remaining() - self._judge_reserve(self._slowest_judging())
                if MIN_STUDENT_EPOCHS * epoch <= room:  # its share raised to one epoch: the time is there
                    self.log(f"{shape.name}: its share of the time left ({share:.0f} s) is less than "
                             f"{MIN_STUDENT_EPOCHS:g} epoch (~{epoch:.0f} s); it gets that epoch ({room:.0f} s left "
                             "but what judging it takes)")
                    share = MIN_STUDENT_EPOCHS * epoch
                else:
                    reason = (f"{MIN_STUDENT_EPOCHS:g} epoch (~{epoch:.0f} s, estimated from the students trained so "
                              f"far) and its judging do not fit in the {s.remaining():.0f} s left")
            if reason:
                rec["status"], rec["reason"] = "skipped", reason
                for cand, pred in cands:
                    self._record(Trial(cand, "skipped", rec["reason"]), pred)
                continue
            try:
                with s.reporter.step(f"student {shape.name} (predicted {c.ratio:.2f}x the teacher's latency)"):
                    path, report, rec["cached"] = self.train(shape, seconds=share,
                                                             reserve=self._judge_reserve(self._slowest_judging()))
            except Exception as e:  # one student failing (a shape a backend refuses, ...) must not end the search
                self._failed(rec, cands, e)
                continue
            self._judge(rec, shape, 0, cands, path, report, missed)
        for shape, larger in larger_as_fast.items():  # this one would buy no speed
            self._untrained(shape, costs[shape.name], bases, "dominated",
                            f"never trained: {larger.name} is larger in every dimension and predicted as fast "
                            f"({costs[larger.name].ratio:.3f}x the teacher's latency against {costs[shape.name].ratio:.3f}x)")
        return self.records

    def _passed_with_room(self) -> dict | None:
        """The record of the student judged last if it passed having stopped at its target agreement
        (``stopped: target``: it keeps the gate with half the allowance to spare, ``StudentTraining.target``),
        else None. After it the search tries the fastest shape that could still win, not the middle one
        (``next_shape``'s ``fastest``); after anything else (a miss, a pass on its patience or its
        time) it bisects."""
        rec = self._judged[-1]["rec"] if self._judged else None
        return rec if rec is not None and rec["status"] == "passed" and rec.get("stopped") == "target" else None

    def _untrained(self, shape, c, bases, status: str, reason: str) -> None:
        """A shape never trained: its record and a skipped trial for each of its builds, at its predicted latency."""
        from bertexport.search.session import Trial

        base_ms = bases[0][1]
        self.records.append({"shape": shape.name, **dataclasses.asdict(shape), "predicted_ratio": round(c.ratio, 4),
                             "prediction": c.source, "predicted_ms": None if base_ms is None else c.ratio * base_ms,
                             "measured_ms": None, "train_seconds": None, "cached": False, "status": status,
                             "reason": reason, "candidates": []})
        for cand, (_, ms) in zip(student_candidates(shape, [b for b, _ in bases], self.skip), bases):
            self._record(Trial(cand, "skipped", reason), None if ms is None else c.ratio * ms)

    def _epoch_seconds(self, shape) -> float | None:
        """Seconds one epoch of ``shape`` would take: the students judged so far (a time-stopped one
        too), their epoch time per ``training_units``, the slowest rate; None before any."""
        rates = [e["epoch_seconds"] / training_units(e["shape"], self.teacher) for e in self._judged
                 if e.get("epoch_seconds")]
        return max(rates) * training_units(shape, self.teacher) if rates else None

    # -- continuing the most promising student -------------------------------------------------------
    def _candidates(self, shape, name: str, bases, cost) -> list[tuple[Candidate, float | None]]:
        """The student's builds (named ``name``: a continued student's builds are other builds) with predicted latencies."""
        return [(dataclasses.replace(cand, student=name), None if ms is None else cost.ratio * ms)
                for cand, (_, ms) in zip(student_candidates(shape, [b for b, _ in bases], self.skip), bases)]

    def _hopeless(self, pred) -> bool:
        s = self.search
        return pred is not None and s.best is not None and pred >= s.best.latency_ms

    def _failed(self, rec: dict, cands, e: Exception) -> None:
        from bertexport.search.session import Trial

        first = (str(e).strip().splitlines() or [""])[0][:300]
        rec["status"], rec["reason"] = "error", first if isinstance(e, UserError) else f"{type(e).__name__}: {first}"
        for cand, pred in cands:
            self._record(Trial(cand, "error", rec["reason"]), pred)

    def _judge(self, rec: dict, shape, segment: int, cands, path: Path, report: dict, missed: list) -> None:
        """Judge a trained student's builds against the original; remember it as one that may be continued."""
        from bertexport.search.session import Trial

        s = self.search
        rec["train_seconds"] = report.get("train_seconds")
        rec["kept_teacher_layers"] = report.get("kept_teacher_layers")
        rec |= learning_curve(report)
        rec["device"] = report.get("device")
        getattr(s, "_digests", {}).pop(str(path), None)  # a continued student may be judged from the same folder again
        trials, left = [], s.remaining()  # the search's clock: what judging takes
        for cand, pred in cands:
            if self._hopeless(pred):  # a student candidate that passed made this one hopeless
                t = self._record(Trial(cand, "hopeless", f"not built: predicted {pred:.2f} ms >= best passing "
                                                         f"{s.best.latency_ms:.2f} ms"), pred)
            else:
                t = s.try_candidate(cand, str(path))
                t.predicted_ms = pred
            trials.append(t)
        statuses = [t.status for t in trials]
        latencies = [t.latency_ms for t in trials if t.latency_ms is not None]
        rec["measured_ms"] = min(latencies) if latencies else None
        rec["status"] = "passed" if "passed" in statuses else "not passed"
        if "failed" in statuses and "passed" not in statuses and shape not in missed:  # missed outright, not within noise
            missed.append(shape)
        if "passed" in statuses and shape in missed:  # continued, it made the gate: it rules nothing out any more
            missed.remove(shape)
        rec["reason"] = ", ".join(f"{cand.recipe}: {st}" for (cand, _), st in zip(cands, statuses))
        rising = rec["status"] != "passed" and still_improving(rec["curve"])
        if rec["stopped"] == "time":
            rec["reason"] += (f"; training stopped by the time it had at epoch {rec['epochs_run']} (judged on its best "
                              "state; " + ("still improving: continued if it is the most promising, else " if rising else "")
                              + "the next run continues it)")
        elif rec["stopped"] == "max_epochs" and rising:
            rec["reason"] += f"; still improving at the {rec['epochs_run']:g}-epoch cap (continued if it is the most promising)"
        steps = report.get("steps") or 0
        per_epoch = (report.get("schedule") or {}).get("steps_per_epoch")
        trained = steps - (report.get("resumed_from_step") or 0)
        self._judged.append({"rec": rec, "shape": shape, "segment": segment, "trials": trials,
                             "judge_seconds": max(0.0, left - s.remaining()),
                             "epoch_seconds": (float(report["train_seconds"]) * per_epoch / trained
                                               if report.get("train_seconds") and per_epoch and trained > 0 else None)})

    def most_promising(self) -> dict | None:
        """The student to continue, if any: among those that missed the gate while still improving
        (stopped by their time share or their epoch cap, not by their patience, with a rising curve:
        ``still_improving``) and are not hopeless now, the one closest to the gate (lowest metric
        drop, then highest agreement, then cosine), when one more of its held-out evaluations
        (``MIN_CONTINUE_EPOCHS`` of an epoch) and its judging fit in the time left."""
        s = self.search
        if s.remaining() <= 0:
            return None
        able = []
        for entry in self._judged:
            rec = entry["rec"]
            if rec.get("continued_as") or rec["status"] != "not passed" or rec.get("stopped") not in ("time", "max_epochs"):
                continue
            if not still_improving(rec.get("curve") or []):
                continue
            judged = [t for t in entry["trials"] if t.status in ("failed", "undecided") and t.metrics is not None]
            if not judged or self._hopeless(rec.get("predicted_ms")):  # not judged on the gate (slower, error), or beaten
                continue
            if (entry["epoch_seconds"] or 0.0) * MIN_CONTINUE_EPOCHS + self._judge_reserve(entry) > s.remaining():
                continue  # not one more evaluation and its judging fit in the time left
            if rec["stopped"] == "max_epochs" and not self.can_extend(entry["shape"], entry["segment"] + 1):
                continue
            able.append((min(_closeness(t.metrics) for t in judged), rec.get("predicted_ms") or 0.0, len(able), entry))
        return min(able)[-1] if able else None

    def _continue(self, entry: dict, bases, costs, missed: list) -> None:
        """Train ``entry``'s student on (resumed from its checkpoint) with all the time left, and judge it again
        as a record of its own (``<shape> continued``)."""
        s, before, shape = self.search, entry["rec"], entry["shape"]
        segment = entry["segment"] + (before["stopped"] == "max_epochs")
        self._continuations[shape.name] = n = self._continuations.get(shape.name, 0) + 1
        name = f"{shape.name} continued" + (f" ({n})" if n > 1 else "")
        before["continued_as"] = name
        c = costs[shape.name]
        cands = self._candidates(shape, name, bases, c)
        rec = {"shape": name, **dataclasses.asdict(shape), "predicted_ratio": before["predicted_ratio"],
               "prediction": before["prediction"], "predicted_ms": cands[0][1], "measured_ms": None, "train_seconds": None,
               "cached": False, "status": "", "reason": "", "candidates": [cand.name for cand, _ in cands],
               "continues": before["shape"], "segment": segment}
        for k in ("init", "pruned"):
            if k in before:
                rec[k] = before[k]
        self.records.append(rec)
        why = "its time share" if before["stopped"] == "time" else f"its {before['epochs_run']:g}-epoch cap"
        self.log(f"continue {shape.name}: the closest to the gate of the students that missed it, still improving at {why}")
        try:
            at = before["curve"][-1]["step"] if before.get("curve") else 0
            reserve = self._judge_reserve(entry)  # time kept to judge what it trains
            with s.reporter.step(f"continue student {shape.name} from step {at}"):
                path, report, rec["cached"] = (self.extend(shape, segment, reserve=reserve) if segment
                                               else self.train(shape, reserve=reserve))
        except Exception as e:  # continuing one student must not end the search
            self._failed(rec, cands, e)
            return
        self._judge(rec, shape, segment, cands, path, report, missed)

    def _slowest_judging(self) -> dict:
        """The judged student whose judging took longest (what a new one's judging may take), or an empty entry."""
        return max(self._judged, key=lambda e: e.get("judge_seconds", 0.0), default={})

    @staticmethod
    def _judge_reserve(entry: dict) -> float:
        """Seconds to keep for judging ``entry``'s student once more (``MIN_JUDGE_SECONDS``, ``JUDGE_MARGIN``)."""
        return max(MIN_JUDGE_SECONDS, JUDGE_MARGIN * entry.get("judge_seconds", 0.0))

    def _record(self, trial, predicted_ms):
        trial.predicted_ms = predicted_ms
        self.search.trials.append(trial)
        self.search.log_board(trial)
        return trial


def still_improving(curve: list[dict], window: int = PATIENCE) -> bool:
    """Whether a learning curve (``learning_curve``: step 0 first) was still rising when training
    stopped: its best score in the last ``window`` evaluations (the patience) beats every score
    before them, the step-0 one included. A flat curve is not (nothing says more training helps)."""
    scores = [c["score"] for c in curve]
    if len(scores) < 2:
        return False
    recent = scores[1:][-window:]
    return max(recent) > max(scores[:len(scores) - len(recent)])


def _closeness(metrics: dict) -> tuple:
    """How far a judged build is from the gate, smaller nearer: its metric drop, then its agreement, then cosine."""
    return (metrics.get("metric_drop") or 0.0, -(metrics.get("agreement") or 0.0), -(metrics.get("cosine_min") or 0.0))


def search_students(search, **kw) -> dict:
    """Run the student search; the report's ``students`` and ``cost_model`` sections."""
    from bertexport.students.teacher_intermediates import remove_cached

    ss = StudentSearch(search, **kw)
    try:
        records = ss.run()
    finally:  # the teacher's intermediate states (GBs, one teacher pass to compute again) end with the search
        freed = remove_cached(ss.teacher_folder())
        if freed:
            ss.log(f"removed {freed / 2 ** 20:.0f} MiB of cached teacher intermediate states")
    return {"students": records, "cost_model": ss.cost_record}
