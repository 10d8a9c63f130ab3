"""The state of one ``optimize`` run, shared by the search over recipes (``optimize``) and
over students (``search.students``): the data slices with the original's outputs, the
trials so far, and each candidate's build, quick latency and evaluation, each cached."""

from __future__ import annotations

import dataclasses
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bertexport import __version__
from bertexport.core.errors import GateFailed, UserError
from bertexport.core.hashing import cache_key
from bertexport.core.staging import write_text_atomic
from bertexport.judging.compare import BATCH_TOLERANCE, compare_on_data, decide, task_metrics
from bertexport.judging.gates import Gates
from bertexport.search.candidates import Candidate


# -- options and records -------------------------------------------------------------------------

def parse_budget(text: str | float | int) -> float:
    """Seconds from '20m', '90s', '1h', '1.5h' or a number of seconds."""
    if isinstance(text, (int, float)):
        seconds = float(text)
    else:
        t = str(text).strip().lower()
        units = {"s": 1, "m": 60, "h": 3600}
        try:
            seconds = float(t[:-1]) * units[t[-1]] if t and t[-1] in units else float(t)
        except ValueError as e:
            raise UserError(f"budget {text!r}: give seconds or a number with s, m or h (e.g. 20m)") from e
    if seconds <= 0:
        raise UserError(f"budget must be positive, got {text!r}")
    return seconds


# two quick timings closer than this factor are within the quick timing's noise: a build
# quick-timed slower than the best passing one by less, or a passing one faster by less, is
# timed again side by side with the best before it is pruned, or takes the best's place
# (``Search._faster_side_by_side``)
SIDE_BY_SIDE_BELOW, SIDE_BY_SIDE_RUNS = 1.5, 20


@dataclass
class Trial:
    """What happened to one candidate."""

    candidate: Candidate
    status: str  # passed | failed | undecided | pruned | excluded | skipped | error
    reason: str = ""
    latency_ms: float | None = None
    metrics: dict = field(default_factory=dict)
    artifact: str | None = None
    build_seconds: float | None = None
    cached: bool = False
    confirm_metrics: dict = field(default_factory=dict)
    noise: list[str] = field(default_factory=list)  # verdicts its data could not resolve (interval straddled the gate)
    batch_invariance: dict | None = None
    predicted_ms: float | None = None  # a student's latency predicted by the cost model before it was built
    latency_cached: bool = False  # the quick latency came from an earlier run on this machine (``Search.latency``)
    exit_shares: list[float] | None = None  # an early-exit build: each exit path's share of rows, its latency their mix

    def to_dict(self) -> dict:
        return {"candidate": self.candidate.to_dict(), "status": self.status, "reason": self.reason,
                "latency_ms": self.latency_ms, "predicted_ms": self.predicted_ms, "metrics": self.metrics,
                "confirm_metrics": self.confirm_metrics,
                "within_noise": bool(self.noise), "noise": self.noise, "batch_invariance": self.batch_invariance,
                "artifact": self.artifact, "build_seconds": self.build_seconds, "cached": self.cached,
                "latency_cached": self.latency_cached, "exit_shares": self.exit_shares}


@dataclass
class SearchResult:
    artifact: Path
    passed: bool
    report: dict


# -- the search -------------------------------------------------------------------------------------

class Slice:
    """A data slice with its labels and the original model's outputs, computed once."""

    def __init__(self, texts, labels, pairs, name):
        from bertexport.core.textdata import TextSet

        self.data = TextSet(texts, None, pairs, name)
        self.labels = labels
        self.reference_cache: dict = {}
        self.digest = cache_key(texts, pairs, None if labels is None else labels.tolist())


def split_slices(ts, labels, fraction: float, seed: int, max_search: int):
    """Search and held-out confirm slices, stratified by label (each label keeps its share
    in both slices, so a rare class is not all on one side)."""
    rng = random.Random(seed)
    n = len(ts.texts)
    n_search = max(1, min(int(n * fraction), max_search))
    strata = [list(range(n))] if labels is None else [list(np.nonzero(labels == v)[0]) for v in np.unique(labels)]
    search_ids, confirm_ids = [], []
    for ids in strata:
        rng.shuffle(ids)
        k = int(round(len(ids) * n_search / n))
        search_ids += ids[:k]
        confirm_ids += ids[k:]
    rng.shuffle(search_ids)
    rng.shuffle(confirm_ids)
    parts = []
    for name, ids in (("search", search_ids), ("confirm", confirm_ids)):
        parts.append(Slice([ts.texts[i] for i in ids], None if labels is None else labels[ids],
                            [ts.pairs[i] for i in ids] if ts.pairs else None, name))
    return parts


class Search:
    def __init__(self, *, ckpt, task, gates, reference, encode, search_slice, confirm_slice, deadline, threads, batch,
                 sequence, calib, reporter, trust_remote_code, batch_invariant=False):
        self.ckpt, self.task, self.gates, self.reference, self.encode = ckpt, task, gates, reference, encode
        self.search, self.confirm = search_slice, confirm_slice
        self.deadline, self.threads = deadline, threads
        self.batch, self.sequence, self.calib, self.reporter = batch, sequence, calib, reporter
        self.trust_remote_code = trust_remote_code
        self.batch_invariant = batch_invariant
        self.trials: list[Trial] = []
        self.best: Trial | None = None
        self._feeds = None
        self._digests: dict[str, str] = {str(ckpt.path): ckpt.sha256}

    # builds and measurements, each cached
    def build(self, cand: Candidate, model_path: str) -> tuple[Path, bool, float]:
        from bertexport.core.cache import cache_dir
        from bertexport.building.convert import convert
        from bertexport.core.hashing import sha256_file
        from bertexport.core.staging import made_by_bertexport

        calib_digest = sha256_file(self.calib) if self.calib else "builtin"
        # the runtime (e.g. OpenVINO's bf16 vs f32 precision) is not part of the build: one IR
        # serves both, opened with the candidate's runtime settings
        key = cache_key(self._ckpt_sha(model_path), cand.backend, cand.profile().to_dict()["passes"], calib_digest, __version__)
        folder = cache_dir("builds") / key
        if made_by_bertexport(folder) == "artifact":
            return folder, True, 0.0
        t0 = time.perf_counter()
        try:
            convert(model_path, cand.profile(), folder, task=self.task, calib=self.calib, force=True, threads=self.threads,
                    latency_runs=0, gates=Gates(), trust_remote_code=self.trust_remote_code)
        except GateFailed as e:  # no parity gate is set, so this would be a bug
            raise RuntimeError(f"unexpected parity gate on a search build: {e}") from e
        return folder, False, time.perf_counter() - t0

    def _ckpt_sha(self, model_path: str) -> str:
        """The checkpoint digest, computed once per checkpoint (it hashes every weight file)."""
        from bertexport.building.checkpoint import resolve_checkpoint

        if model_path not in self._digests:
            self._digests[model_path] = resolve_checkpoint(model_path, self.task, trust_remote_code=self.trust_remote_code).sha256
        return self._digests[model_path]

    def _machine_key(self) -> dict:
        """The CPU and package versions a timing is valid for (``cost_model.machine_key``), read once per search."""
        from bertexport.search.cost_model import machine_key

        if getattr(self, "_machine", None) is None:
            self._machine = machine_key()
        return self._machine

    def cell_feeds(self) -> dict:
        """The search's latency cell (batch x sequence of the built-in samples), made once."""
        from bertexport.core.textdata import builtin_samples
        from bertexport.judging.compare import fixed_cell_feeds

        if self._feeds is None:
            self._feeds = fixed_cell_feeds(self.encode, builtin_samples(), self.batch, self.sequence)
        return self._feeds

    def quick_latency(self, art) -> float:
        from bertexport.judging.latency import QUICK_RUNS, QUICK_WARMUP, time_interleaved

        self.cell_feeds()
        timed = time_interleaved({"c": lambda: art.infer(self._feeds)}, runs=QUICK_RUNS, warmup=QUICK_WARMUP)
        return timed["c"].p50 * 1e3

    def latency(self, art, folder: Path, runtime: dict | None) -> tuple[float, bool]:
        """A build's quick latency and whether it came from the cache (``timed_once``). A rerun
        then makes the decisions the first run made (two recipes within noise of each other do
        not swap places) and times nothing but the final interleaved run."""
        rec, cached = self.timed_once(folder, "quick-latency/1", runtime, lambda: {"p50_ms": self.quick_latency(art)})
        return float(rec["p50_ms"]), cached

    def timed_once(self, folder: Path, kind: str, runtime: dict | None, measure, *key) -> tuple[dict, bool]:
        """``measure()``'s record (a JSON dict) for the build in ``folder``, and whether it came
        from the cache: kept next to the build, keyed by ``kind``, ``key`` and what makes a timing
        valid on another run (the machine's CPU and packages: ``cost_model.machine_key``), the
        runtime settings, threads and cell."""
        k = cache_key(kind, self._machine_key(), runtime or {}, self.threads, self.batch, self.sequence, *key)
        cached = folder.with_name(f"{folder.name}.latency-{k}.json")
        if cached.is_file():
            return json.loads(cached.read_text()), True
        rec = measure() | {"threads": self.threads, "batch": self.batch, "sequence": self.sequence}
        write_text_atomic(cached, json.dumps(rec))
        return rec, False

    def evaluate(self, art, folder: Path, sl: Slice, runtime: dict | None = None) -> dict:
        # the metrics' schema (intervals, at the gate's level) is part of the key
        rt = cache_key(runtime or {}, "metrics/2", self.gates.level)
        cached = folder.with_name(f"{folder.name}.eval-{sl.digest}-{rt}.json")
        if cached.is_file():
            return json.loads(cached.read_text())
        comp = compare_on_data(art, self.reference, self.encode, sl.data, self.task, reference_cache=sl.reference_cache)
        m = task_metrics(comp, sl.labels, self.gates.level)
        cached.write_text(json.dumps(m))
        return m

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def log_board(self, trial: Trial):
        lat = "-" if trial.latency_ms is None else f"{trial.latency_ms:.2f} ms"
        best = f"; best so far {self.best.candidate.name} {self.best.latency_ms:.2f} ms" if self.best else ""
        self.reporter.log(f"{trial.status:7s} {trial.candidate.name:34s} {lat:>10s}  {trial.reason}{best}")

    def try_candidate(self, cand: Candidate, model_path: str) -> Trial:
        from bertexport.shipping.runtime import Artifact

        if self.remaining() <= 0 and any(t.artifact for t in self.trials):  # the first build always runs
            t = Trial(cand, "skipped", "time budget used up")
            self.trials.append(t)
            self.log_board(t)
            return t
        try:
            with self.reporter.step(f"build {cand.name}"):
                folder, cached, seconds = self.build(cand, model_path)
        except Exception as e:  # one recipe failing (a backend refusing this graph) must not end the search
            first = (str(e).strip().splitlines() or [""])[0][:300]
            t = Trial(cand, "error", f"{type(e).__name__}: {first}" if not isinstance(e, UserError) else first)
            self.trials.append(t)
            self.log_board(t)
            return t
        art = Artifact(folder, threads=self.threads, allow_rejected=True, runtime_overrides=cand.runtime)
        invariance = art.manifest.get("batch_invariance")
        with art:
            lat, lat_cached = self.latency(art, folder, cand.runtime)
            t = Trial(cand, "failed", latency_ms=lat, artifact=str(folder), build_seconds=round(seconds, 1), cached=cached,
                      batch_invariance=invariance, latency_cached=lat_cached)
            if self.batch_invariant and not (invariance or {}).get("invariant"):
                t.status = "excluded"
                t.reason = ("--batch-invariant: a text's output moves with its batch by up to "
                            f"{(invariance or {}).get('max_abs_diff', float('nan')):.2g} (tolerance {BATCH_TOLERANCE:g})")
            elif self.slower_than_best(t, art, folder):
                t.status, t.reason = "pruned", f"measured slower ({t.latency_ms:.2f} ms) than the best passing {self.best.latency_ms:.2f} ms"
            else:
                self._judge(t, art, folder, cand)
        self.trials.append(t)
        self.log_board(t)
        return t

    def slower_than_best(self, t: Trial, art, folder: Path) -> bool:
        """The one decision that prunes a build unjudged, for every kind of candidate: it is
        slower than the best passing one in its quick timing and, when that is within the quick
        timing's noise, side by side with it too (``_faster_side_by_side``)."""
        return self.best is not None and t.latency_ms >= self.best.latency_ms and not self._faster_side_by_side(t, art, folder)

    def _faster_than_best(self, t: Trial, art, folder: Path) -> bool:
        """Whether a passing build takes the best's place: clearly faster in its quick timing
        (by more than its noise, ``SIDE_BY_SIDE_BELOW``), or faster side by side with the best
        (``_faster_side_by_side``). A best only slightly faster by one quick timing would
        prune the builds after it against a figure the noise gave it."""
        if t.latency_ms * SIDE_BY_SIDE_BELOW <= self.best.latency_ms or not self.best.artifact:
            return True
        return self._faster_side_by_side(t, art, folder)

    def _faster_side_by_side(self, t: Trial, art, folder: Path) -> bool:
        """A build whose quick timing is slower than the best passing one's, but by less than
        the quick timing's noise (``SIDE_BY_SIDE_BELOW``), is timed again interleaved with the
        best in one run before it is pruned: two quick timings taken minutes apart scatter by
        ~15 % at b1 (measured: the same pruned model 21.4 ms per tensor vs 15.6 ms per channel;
        an early-exit build's mean row 21.7 vs 13.7 ms, docs/measurements.md). ``t.latency_ms``
        becomes the best's quick latency x the ratio of their p50s in that run (one scale for
        the board). True when it was faster there."""
        if t.latency_ms >= self.best.latency_ms * SIDE_BY_SIDE_BELOW or not self.best.artifact:
            return False
        ratio = self.side_by_side_ratio(t, art, folder)
        t.latency_ms = self.best.latency_ms * ratio
        return ratio < 1.0

    def side_by_side_ratio(self, t: Trial, art, folder: Path) -> float:
        """``art``'s p50 / the best passing build's, interleaved in one run of
        ``SIDE_BY_SIDE_RUNS`` rounds at the search's cell (an early-exit build's exit paths each
        timed in those rounds and mixed by its shares of rows, as in its quick timing); cached
        next to the build like its quick latency (same machine, runtimes, threads and cell), so
        a rerun decides alike."""
        from bertexport.judging.latency import time_interleaved
        from bertexport.search.exit_paths import fold_paths, path_calls
        from bertexport.shipping.runtime import Artifact

        mix = {name: trial.exit_shares for name, trial in (("best", self.best), ("this", t)) if trial.exit_shares}
        key = cache_key("side-by-side/1", self._machine_key(), Path(self.best.artifact).name, self.best.candidate.runtime or {},
                        t.candidate.runtime or {}, self.threads, self.batch, self.sequence, *([mix] if mix else []))
        cached = folder.with_name(f"{folder.name}.side-by-side-{key}.json")
        if cached.is_file():
            return float(json.loads(cached.read_text())["p50_ratio"])
        self.cell_feeds()
        with Artifact(self.best.artifact, threads=self.threads, allow_rejected=True,
                      runtime_overrides=self.best.candidate.runtime) as best:
            calls = path_calls({"best": lambda: best.infer(self._feeds), "this": lambda: art.infer(self._feeds)},
                               {"best": best, "this": art}, mix, self._feeds)
            timed = fold_paths(time_interleaved(calls, runs=SIDE_BY_SIDE_RUNS, warmup=3), mix)
        ratio = timed["this"].p50 / timed["best"].p50
        write_text_atomic(cached, json.dumps({"p50_ratio": ratio, "best": Path(self.best.artifact).name}))
        return ratio

    def _judge(self, t: Trial, art, folder: Path, cand: Candidate) -> None:
        """The search slice may only reject a candidate its interval puts clearly outside the
        gate; anything else is decided on the held-out confirm slice (every row of it), by the
        user's rule: the point estimate, or the interval with ``--confidence``."""
        t.metrics = self.evaluate(art, folder, self.search, cand.runtime)
        first = decide(t.metrics, dataclasses.replace(self.gates, confidence=self.gates.level))
        if first.status == "failed":
            t.reason = "; ".join(first.failures)
            return
        if first.status == "undecided":
            t.noise.append("search slice: " + "; ".join(first.undecided))
        t.confirm_metrics = self.evaluate(art, folder, self.confirm, cand.runtime)
        held_out = decide(t.confirm_metrics, self.gates)
        t.noise += [f"confirm slice: {n}" for n in held_out.within_noise + held_out.undecided]
        if held_out.status == "passed":
            # only a confirmed candidate may become the best, which prunes others
            t.status, t.reason = "passed", "meets the gate on the held-out slice"
            if self.best is None or self._faster_than_best(t, art, folder):
                self.best = t
            else:
                t.reason += f"; side by side with {self.best.candidate.name} not faster (it stays the best)"
        else:
            t.status = held_out.status
            t.reason = "held-out slice: " + "; ".join(held_out.reasons())

    def restore_ladder(self, base: Candidate, ranking: list[str], model_path: str) -> None:
        """Restore the most harmful regions to float 1, 2, 4, ... at a time until the gate holds."""
        k = 1
        while ranking:
            k = min(k, len(ranking))
            t = self.try_candidate(base.with_float(ranking[:k]), model_path)
            if t.status not in ("failed", "undecided") or k == len(ranking):
                return
            k *= 2
