"""Early-exit artifacts as ``optimize`` candidates (``optimize --early-exit auto|on``).

- ``plan_exit_search`` reads ``--early-exit`` before any model loads: ``off`` (the default)
  tries nothing; ``auto`` tries one early-exit artifact where early exit applies (a
  text classifier with one list of two or more layers, single texts) and, elsewhere, none,
  with the reason in the search report; ``on`` is the same but refuses (exit 2) a model or
  data early exit cannot take.
- ``ExitSearch.run`` builds it with ``students.early_exit.build_early_exit`` on the *search*
  slice only (never the held-out confirm slice): exit heads trained on the search slice's
  texts against the original's logits (and its labels when it has them); the threshold is the
  library's own choice (``choose_threshold``) on the part of the search slice the heads did not
  train on, at an agreement with the full model of ``agreement_target(gates)`` — the gate's
  allowed disagreement halved, the other half left for the build itself and the held-out rows.
  The segments are built on the fastest int8 recipes measured so far when ``build_early_exit``
  accepts them (asked through its planner, ``plan_early_exit``), else on ``ort-fp32``. The
  build is cached (``cache_dir("builds")/early-exit-<key>``, the key from the checkpoint, the
  search slice, the target, the settings and the version), so a rerun trains no heads. It is
  skipped with the reason when the budget is used up, or when the time left is below its
  recipe's measured build time (an early-exit build does that work once per segment, and more).
- Its latency is the mean per-row latency over the search slice at the chosen threshold, on
  the search's latency cell: each exit path (leave after the first exit, the second, ..., no
  exit) is timed interleaved on the cell's feeds, and each round's figure is the paths'
  times weighted by the share of search-slice rows that take each path (``exit_paths.mix_rounds``), so
  the p50 over rounds is the slice's mean row cost on the same scale as every candidate's
  quick latency; the row p90 and the worst case (no row exits) are reported beside it. The
  paths' timing is kept next to the build (``Search.timed_once``: per machine, runtime, threads
  and cell), and the decision to prune it unjudged is every candidate's
  (``Search.slower_than_best``): within the quick timing's noise of the best, it is timed again
  side by side with the best, its paths mixed by the same shares.
  ``optimize``'s final interleaved timing times the paths the same way (``exit_paths.path_calls`` /
  ``fold_paths``).
- It is judged like every candidate (``Search._judge``): on the search slice, then on the
  held-out confirm slice by the user's gate; its verdict is the gate's and it can win.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bertexport import __version__
from bertexport.core.errors import GateFailed, UserError
from bertexport.core.hashing import cache_key
from bertexport.judging.gates import Gates
from bertexport.judging.latency import QUICK_RUNS
from bertexport.search.candidates import Candidate
from bertexport.search.exit_paths import mix_rounds, time_paths

MODES = ("off", "auto", "on")
MARGIN = 0.5  # the share of the gate's allowed disagreement the threshold may use
FALLBACK_TARGET = "ort-fp32"  # the segments as exported, accepted by every ``build_early_exit``


@dataclass
class ExitPlan:
    """What ``--early-exit`` asked and, for ``auto`` on a model early exit cannot take, why none is tried."""

    asked: str | None = None  # None: off
    reason: str | None = None

    @property
    def on(self) -> bool:
        return self.asked is not None


def unsupported_reason(ckpt, pairs: bool) -> str | None:
    """Why early exit cannot serve this model and data (None: it can)."""
    from bertexport.core.families import get_family
    from bertexport.students.early_exit import TASK, check_exit_layers

    if ckpt.task != TASK:
        return f"early exit serves text-classification only, not {ckpt.task}"
    family = get_family(ckpt.family)
    if family.layers_module is None or family.shared_layers:
        return f"early exit needs one list of transformer layers; {family.display} does not have one"
    try:
        check_exit_layers(None, int(family.config_value(ckpt.config, family.layers_key, 0)))
    except UserError as e:
        return str(e)
    if pairs:
        return "early exit reads single texts; this data holds text pairs"
    return None


def plan_exit_search(mode: str | None, ckpt, pairs: bool = False) -> ExitPlan:
    """``--early-exit`` checked before any model loads (see the module doc)."""
    mode = (mode or "off").strip().lower()
    if mode not in MODES:
        raise UserError(f"--early-exit {mode}: give one of {', '.join(MODES)}")
    if mode == "off":
        return ExitPlan()
    reason = unsupported_reason(ckpt, pairs)
    if reason and mode == "on":
        raise UserError(f"--early-exit on: {reason}")
    return ExitPlan(mode, reason)


def agreement_target(gates) -> float:
    """The agreement with the full model the threshold keeps: ``gates.implied_agreement`` at
    ``MARGIN``; the library's default without a gate that bounds it (a cosine gate only)."""
    from bertexport.judging.gates import implied_agreement
    from bertexport.students.early_exit import EarlyExitConfig

    target = implied_agreement(gates, MARGIN)
    return EarlyExitConfig.agreement if target is None else target


def exit_candidate(base: Candidate) -> Candidate:
    return dataclasses.replace(base, keep_float=[], anchor=False, student=None, student_layers=None, pruned=None,
                               early_exit=True)


# -- the search -------------------------------------------------------------------------------------

class ExitSearch:
    """Builds, times and judges the early-exit candidate of one ``optimize`` run (see the module doc)."""

    def __init__(self, search, *, plan: ExitPlan, ckpt, recipes: list[Candidate], seed: int = 0):
        self.search, self.plan, self.ckpt, self.recipes, self.seed = search, plan, ckpt, recipes, seed
        self.record: dict = {"asked": plan.asked, "skipped": None, "agreement_target": agreement_target(search.gates),
                             "candidate": None, "target": None, "refused_targets": [], "status": "", "reason": "",
                             "cached": False, "build_seconds": None, "threshold": None, "choice": None,
                             "search_slice": None, "latency": None, "confirm": None}

    @property
    def log(self):
        return self.search.reporter.log

    def config(self):
        from bertexport.students.early_exit import EarlyExitConfig

        return EarlyExitConfig(agreement=self.record["agreement_target"], seed=self.seed)

    def write_data(self, path: Path) -> Path:
        """The search slice as JSON lines (text, and the label's name when it has labels)."""
        sl = self.search.search
        id2label = self.ckpt.id2label or {}
        with open(path, "w") as f:
            for i, text in enumerate(sl.data.texts):
                row = {"text": text}
                if sl.labels is not None:
                    row["label"] = id2label.get(int(sl.labels[i]), str(int(sl.labels[i])))
                f.write(json.dumps(row) + "\n")
        return path

    def bases(self) -> list[Candidate]:
        """The fastest int8 recipes measured so far, then ``ort-fp32``: what the segments may be built on."""
        from bertexport.search.student_builds import fastest_bases

        fp32 = next((c for c in self.recipes if c.recipe == FALLBACK_TARGET),
                    Candidate(FALLBACK_TARGET, "onnxruntime", "fp32", [], {}))
        measured = [b for b, ms in fastest_bases(self.search.trials, self.recipes) if ms is not None]
        return measured + [fp32]

    def folder(self, base: Candidate) -> Path:
        from dataclasses import asdict

        from bertexport.core.cache import cache_dir

        key = cache_key("early-exit/2", self.ckpt.sha256, self.ckpt.task, self.search.search.digest, base.backend,
                        base.profile().to_dict()["passes"], asdict(self.config()), __version__)
        return cache_dir("builds") / f"early-exit-{key}"

    def choose_base(self, data: Path) -> tuple[Candidate | None, Path | None]:
        """The first base ``build_early_exit``'s planner accepts (refusals recorded with their reasons)."""
        from bertexport.students.early_exit import plan_early_exit

        for base in self.bases():
            folder = self.folder(base)
            try:
                plan_early_exit(str(self.ckpt.path), base.profile(), folder, data, config=self.config(), force=True,
                                threads=self.search.threads, trust_remote_code=self.search.trust_remote_code, gates=Gates())
            except UserError as e:
                self.record["refused_targets"].append({"recipe": base.recipe, "reason": str(e)})
                continue
            return base, folder
        return None, None

    def build(self, base: Candidate, folder: Path, data: Path) -> tuple[bool, float]:
        from bertexport.core.staging import made_by_bertexport
        from bertexport.students.early_exit import build_early_exit

        if made_by_bertexport(folder) == "artifact":
            return True, 0.0
        t0 = time.perf_counter()
        # no parity gate, as for every build the search makes (``Search.build``): the search judges it on its
        # own slice against the user's gate. The profile's gate judged the built-in texts, out of a narrow
        # classifier's domain: on Reuters R8 (2026-12-05) the teacher's median top-2 margin there was 0.28
        # (0.96 on R8 texts; 24 % of them under 0.1), the no-exit path's int8 flipped 7 % of its decisions
        # (agreement 0.926 < 0.95) and the build was refused, while the same recipe kept the task on the
        # slice (+0.29 points)
        build_early_exit(str(self.ckpt.path), base.profile(), folder, data, config=self.config(), force=True,
                         threads=self.search.threads, latency_runs=0, trust_remote_code=self.search.trust_remote_code,
                         reporter=self.search.reporter, gates=Gates())
        return False, time.perf_counter() - t0

    def _finish(self, trial, status: str | None = None, reason: str | None = None):
        if status is not None:
            trial.status, trial.reason = status, reason
        self.search.trials.append(trial)
        self.search.log_board(trial)
        self.record["status"], self.record["reason"] = trial.status, trial.reason
        return trial

    def run(self) -> dict:
        from bertexport.core.staging import WorkFolder, made_by_bertexport
        from bertexport.search.session import Trial

        s, rec = self.search, self.record
        with WorkFolder("early-exit-search") as work:
            data = self.write_data(work / "search-slice.jsonl")
            base, folder = self.choose_base(data)
            if base is None:
                rec["status"], rec["reason"] = "skipped", "build_early_exit accepts none of the recipes: " + "; ".join(
                    f"{r['recipe']}: {r['reason']}" for r in rec["refused_targets"])
                self.log(f"early exit skipped: {rec['reason']}")
                return rec
            cand = exit_candidate(base)
            rec["candidate"], rec["target"] = cand.name, base.recipe
            cached = made_by_bertexport(folder) == "artifact"
            if s.remaining() <= 0 and not cached:
                self._finish(Trial(cand, "skipped", "time budget used up before the early-exit build"))
                return rec
            estimate = max((t.build_seconds or 0.0 for t in s.trials if t.candidate == base and not t.cached), default=0.0)
            if not cached and estimate > s.remaining():  # it does at least its recipe's work, once per segment
                self._finish(Trial(cand, "skipped", f"the early-exit build needs more than ~{estimate:.0f} s (its recipe's "
                                                    f"measured build), {s.remaining():.0f} s left"))
                return rec
            try:
                with s.reporter.step(f"build {cand.name} (exit heads on the search slice's {len(s.search.data.texts)} texts)"):
                    rec["cached"], seconds = self.build(base, folder, data)
            except (GateFailed, UserError) as e:  # its no-exit path missed the profile's parity gate, or a refusal
                first = (str(e).strip().splitlines() or [""])[0][:300]
                self._finish(Trial(cand, "error", f"early-exit build: {first}"))
                return rec
            except Exception as e:  # one build failing must not end the search
                first = (str(e).strip().splitlines() or [""])[0][:300]
                self._finish(Trial(cand, "error", f"{type(e).__name__}: {first}"))
                return rec
        rec["build_seconds"] = round(seconds, 1)
        return self.judge(cand, folder, rec["cached"], seconds)

    def judge(self, cand: Candidate, folder: Path, cached: bool, seconds: float) -> dict:
        from bertexport.judging.compare import BATCH_TOLERANCE
        from bertexport.search.session import Trial
        from bertexport.shipping.runtime import Artifact
        from bertexport.students.early_exit import runner_outputs, simulate

        s, rec = self.search, self.record
        art = Artifact(folder, threads=s.threads, allow_rejected=True, runtime_overrides=cand.runtime)
        early = art.manifest["early_exit"]
        threshold, layers, exit_layers = float(early["threshold"]), int(early["layers"]), list(early["exit_layers"])
        rec["threshold"], rec["choice"] = threshold, {k: early["choice"].get(k) for k in ("agreement", "mean_layers", "rows", "exits")}
        invariance = art.manifest.get("batch_invariance")
        with art:
            runner = art.runner
            texts = list(s.search.data.texts)
            exit_logits, final_logits = runner_outputs(runner, art.encoder.encode, texts)
            decision, ran = simulate(exit_logits, final_logits, exit_layers, layers, threshold)
            paths = np.array([exit_layers.index(int(r)) if int(r) in exit_layers else len(exit_layers) for r in ran])
            shares = [float((paths == p).mean()) for p in range(len(exit_layers) + 1)]
            rec["search_slice"] = {"rows": len(texts), "shares": shares,
                                   "agreement_with_full_model": float((decision == final_logits.argmax(-1)).mean()),
                                   "exits": {str(layer): int((ran == layer).sum()) for layer in [*exit_layers, layers]},
                                   "mean_layers": float(ran.mean())}

            def measure() -> dict:
                timed = time_paths(runner, s.cell_feeds())
                return {"mean_ms": mix_rounds(timed, shares).p50 * 1e3, "paths_p50_ms": [p.p50 * 1e3 for p in timed]}

            # timed once per machine and kept next to the build, like every build's quick latency
            timing, latency_cached = s.timed_once(folder, "exit-paths/1", cand.runtime, measure, shares)
            path_ms = list(timing["paths_p50_ms"])
            costs = np.array([path_ms[p] for p in paths])
            rec["latency"] = {"mean_ms": timing["mean_ms"], "p90_ms": float(np.percentile(costs, 90)),
                              "worst_ms": path_ms[-1], "row_mean_ms": float(costs.mean()),
                              "paths": [{"exit_after": (exit_layers + [layers])[p], "p50_ms": path_ms[p],
                                         "share": shares[p]} for p in range(len(path_ms))],
                              "cell": {"batch": s.batch, "sequence": s.sequence, "threads": s.threads},
                              "runs": QUICK_RUNS, "cached": latency_cached}
            lat = rec["latency"]["mean_ms"]
            t = Trial(cand, "failed", latency_ms=lat, artifact=str(folder), build_seconds=round(seconds, 1), cached=cached,
                      batch_invariance=invariance, latency_cached=latency_cached, exit_shares=shares)
            if threshold >= 1.0:
                t.status, t.reason = "skipped", (f"no threshold below 1.0 keeps agreement >= {rec['agreement_target']:.4f} "
                                                 "with the full model on the search slice: no row would exit")
            elif s.batch_invariant and not (invariance or {}).get("invariant"):
                t.status = "excluded"
                t.reason = ("--batch-invariant: a text's output moves with its batch by up to "
                            f"{(invariance or {}).get('max_abs_diff', float('nan')):.2g} (tolerance {BATCH_TOLERANCE:g})")
            elif s.slower_than_best(t, art, folder):
                t.status, t.reason = "pruned", (f"measured slower (mean row {t.latency_ms:.2f} ms) than the best passing "
                                                f"{s.best.latency_ms:.2f} ms")
            else:
                s._judge(t, art, folder, cand)
        if t.confirm_metrics:
            rec["confirm"] = {k: t.confirm_metrics.get(k) for k in ("samples", "agreement", "metric_drop", "metric_reference",
                                                                     "metric_candidate", "cosine_min")}
        self._finish(t)
        return rec


def search_early_exit(search, *, plan: ExitPlan, **kw) -> dict | None:
    """Run the early-exit candidate; the report's ``early_exit`` section (None: ``--early-exit`` off)."""
    if not plan.on:
        return None
    if plan.reason:
        search.reporter.log(f"early exit skipped: {plan.reason}")
        return {"asked": plan.asked, "skipped": plan.reason, "candidate": None, "status": "skipped", "reason": plan.reason}
    return ExitSearch(search, plan=plan, **kw).run()


def exit_mix(section: dict | None) -> dict[str, list[float]]:
    """Candidate name -> each exit path's share of search-slice rows (``optimize``'s final timing)."""
    if not section or not section.get("candidate") or not (section.get("search_slice") or {}).get("shares"):
        return {}
    return {section["candidate"]: list(section["search_slice"]["shares"])}
