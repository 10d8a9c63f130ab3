"""The student search of ``optimize``: which students to train, in which order, within the budget.

``StudentSearch.run`` predicts every shape's latency with the cost model
(``bertexport.search.cost_model``: a few anchor shapes measured on this machine, random init, the
real recipe; the rest predicted), bisects over them by predicted latency (``next_shape``:
the middle untried shape first), never trains a shape that cannot beat the best passing
candidate so far (*hopeless*) nor one no larger in any dimension than a student that
missed the gate (*dominated*). Each remaining student is trained (``search.student_training``:
sliced or ``--student-init``, cached, resumable, within the deadline) and judged by the search
(``Search.try_candidate``) against the *original* model with the gate's statistics on the
builds ``search.student_builds`` gives it. A student that cannot finish in the time left
(estimated from the first student's training time, scaled by MACs) is skipped with a reason.
Which shapes: ``search.student_shapes``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from bertexport.core.errors import UserError
from bertexport.core.hashing import cache_key
from bertexport.search.candidates import Candidate
from bertexport.search.student_builds import fastest_bases, skip_supported, student_candidates
from bertexport.search.student_shapes import InitShape, dominated, next_shape
from bertexport.search.student_training import StudentTraining, learning_curve, training_units


class StudentSearch(StudentTraining):
    """Trains and judges the students of one ``optimize`` run (see the module doc)."""

    def __init__(self, search, *, ckpt, teacher_model, tokenizer, tok_dir: Path, shapes: list, recipes: list[Candidate],
                 distill_data=None, epochs: int | None = None, seed: int = 0, cost_timer=None, inits: list = (),
                 device: str = "auto"):
        super().__init__(search, ckpt=ckpt, teacher_model=teacher_model, tokenizer=tokenizer, distill_data=distill_data,
                         epochs=epochs, seed=seed, device=device)
        self.inits = list(inits)  # --student-init checkpoints (InitShape)
        self.tok_dir, self.shapes, self.recipes = tok_dir, shapes, recipes
        self.cost_timer = cost_timer
        self.records: list[dict] = []
        self.cost_record: dict | None = None
        self._rate: float | None = None  # training seconds per ``training_units`` (the first student trained here)

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
        shapes = self.shapes or self.inits  # only --student-init checkpoints: their shapes anchor the model
        recipe = student_candidates(shapes[0], [base], self.skip)[0]
        cost = CostModel(self.teacher_model.config, teacher_shape(self.teacher_model.config), recipe=recipe, reference=base,
                         task=self.ckpt.task, tokenizer_dir=self.tok_dir,
                         feeds=fixed_cell_feeds(s.encode, builtin_samples(), s.batch, s.sequence), batch=s.batch,
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
            if isinstance(shape, InitShape):
                rec["init"] = shape.init.to_dict()

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
            rec |= learning_curve(report)
            rec["device"] = report.get("device")
            if self._rate is None and rec["train_seconds"] and rec["stopped"] != "time":  # a whole training, now or cached
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
            if rec["stopped"] == "time":
                rec["reason"] += (f"; training stopped by the budget at epoch {rec['epochs_run']} (judged on its best state; "
                                  "the next run continues it)")
        return self.records

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
