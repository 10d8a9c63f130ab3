"""What a student shape costs on *this* machine, before anyone trains it.

A shape (``students.StudentShape``) is measured by building a random-init model of that
shape (``students.random_student``: same class as the teacher) with the search's real
recipe (e.g. ORT fused int8 + first-token skipping + int8 embeddings) and timing it at the
search's cell (batch, sequence, threads) interleaved with the teacher's shape built with the
reference recipe (the same recipe on the original) in the same run. What is kept is the
*ratio* shape / teacher (the machine's drift hits both alike), cached on disk
(``cache_dir("costs")``) by CPU model and features, package versions, the teacher's config,
the shape, both recipes' passes, the cell and the threads, so a rerun measures nothing.

Unmeasured shapes are predicted from the measured points by least squares,
``ratio ~ a + b * MACs + c * layers`` (MACs of the linear layers at the cell, the
first-token skip counted where the recipe skips), or from the MACs ratio alone when fewer
than two points are known. Every number says whether it was measured or predicted.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from bertexport.core.hashing import cache_key

SCHEMA = "bertexport.cost/1"
_WEIGHTS = {".safetensors", ".bin", ".pt", ".pth", ".onnx", ".h5", ".msgpack", ".ckpt"}


def linear_macs(shape, batch: int, sequence: int, skip_last: bool = False) -> float:
    """Multiply-accumulates of a shape's linear layers for one call at ``batch`` x ``sequence``:
    per layer and token Q, K, V and the attention output (4 H^2) and the FFN (2 H F); with the
    first-token skip the last layer computes Q/K/V for every token but the attention output
    and the FFN for the first token only."""
    h, f, n = shape.hidden, shape.ffn, shape.layers
    per_token = 4 * h * h + 2 * h * f
    tokens = batch * sequence
    if not skip_last:
        return float(n * per_token * tokens)
    return float((n - 1) * per_token * tokens + 3 * h * h * tokens + (h * h + 2 * h * f) * batch)


def recipe_skips(candidate) -> bool:
    return any(p.get("type") == "first-token-skip" for p in candidate.passes)


@dataclass
class Cost:
    """A shape's latency relative to the teacher (``ratio``; < 1 is faster), ``measured``
    or ``predicted``, and in ms once the teacher's latency with the reference recipe is known."""

    shape: str
    ratio: float
    source: str  # measured | predicted
    macs: float
    ms: float | None = None

    def to_dict(self) -> dict:
        return {"shape": self.shape, "ratio": self.ratio, "source": self.source, "macs": self.macs, "ms": self.ms}


def machine_key() -> dict:
    """What makes a timing valid on another run: the CPU (model name and ISA features)
    and the versions of the packages that build and run the models."""
    from bertexport.core.envinfo import cpu_features, cpu_info, package_versions

    return {"cpu": cpu_info().get("model", ""), "machine": os.uname().machine, "features": sorted(cpu_features()),
            "packages": package_versions()}


class CostModel:
    """Latency ratios of student shapes for one recipe on this machine (see the module doc).

    ``measure_calls`` builds and times shapes; tests may inject a clock instead
    (``timer(builds: dict[name, (shape, candidate)]) -> dict[name, seconds]``)."""

    def __init__(self, teacher_config, teacher_shape, *, recipe, reference, task: str, tokenizer_dir: Path | None,
                 feeds: dict | None, batch: int, sequence: int, threads: int, calib=None, runs: int = 20,
                 reporter=None, timer: Callable[[dict], dict] | None = None, config_digest: str | None = None):
        self.config, self.teacher = teacher_config, teacher_shape
        self.recipe, self.reference = recipe, reference
        self.task, self.tokenizer_dir, self.feeds = task, tokenizer_dir, feeds
        self.batch, self.sequence, self.threads, self.calib, self.runs = batch, sequence, threads, calib, runs
        self.reporter = reporter
        self.timer = timer
        self.skip = recipe_skips(recipe)
        self.measured_now: list[str] = []  # shapes timed in this run (not served by the cache)
        if config_digest is None:  # prefer the digest of the checkpoint's config.json: a loaded config gains runtime fields
            config_json = json.loads(teacher_config.to_json_string()) if hasattr(teacher_config, "to_json_string") else dict(teacher_config)
            config_json.pop("transformers_version", None)
            config_digest = cache_key(config_json)
        self.base_key = {"schema": SCHEMA, "machine": machine_key(), "teacher_config": config_digest,
                         "recipe": recipe.passes, "recipe_runtime": recipe.runtime, "backend": recipe.backend,
                         "reference": reference.passes, "reference_runtime": reference.runtime,
                         "cell": {"batch": batch, "sequence": sequence}, "threads": threads}

    # -- the cache ---------------------------------------------------------------------------
    def _path(self, shape) -> Path:
        from bertexport.core.cache import cache_dir

        return cache_dir("costs") / f"{cache_key(self.base_key | {'shape': shape.name})}.json"

    def cached(self, shape) -> dict | None:
        p = self._path(shape)
        if not p.is_file():
            return None
        try:
            return json.loads(p.read_text())
        except (OSError, ValueError):
            return None

    def _store(self, shape, record: dict) -> None:
        from bertexport.core.staging import write_text_atomic

        write_text_atomic(self._path(shape), json.dumps(record | {"key": self.base_key | {"shape": shape.name}}, indent=1,
                                                        default=str))

    # -- measuring ---------------------------------------------------------------------------
    def measure(self, shapes) -> dict[str, float]:
        """Ratios of ``shapes`` (cached ones read, the others built and timed in one
        interleaved run with the teacher's shape on the reference recipe)."""
        out, todo = {}, []
        for s in shapes:
            rec = self.cached(s)
            if rec is not None:
                out[s.name] = rec["ratio"]
            elif s.name not in [t.name for t in todo]:
                todo.append(s)
        if not todo:
            return out
        builds = {"teacher": (self.teacher, self.reference)} | {s.name: (s, self.recipe) for s in todo}
        seconds = self.timer(builds) if self.timer else self._time_builds(builds)
        for s in todo:
            ratio = seconds[s.name] / seconds["teacher"]
            self._store(s, {"shape": s.name, "ratio": ratio, "ms": seconds[s.name] * 1e3,
                            "teacher_ms": seconds["teacher"] * 1e3, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                            "runs": self.runs})
            out[s.name] = ratio
            self.measured_now.append(s.name)
        return out

    def _time_builds(self, builds: dict) -> dict[str, float]:
        """Random-init models of each shape, built with their recipe, timed interleaved (p50 seconds)."""
        import shutil

        import torch

        from bertexport.judging.gates import Gates
        from bertexport.building.convert import convert
        from bertexport.judging.latency import time_interleaved
        from bertexport.shipping.runtime import Artifact
        from bertexport.core.staging import WorkFolder
        from bertexport.students.shapes import random_student

        log = self.reporter.log if self.reporter else (lambda m: None)
        arts = {}
        with WorkFolder("costs") as work:
            for name, (shape, cand) in builds.items():
                ckpt = work / f"ckpt-{shape.name}"
                torch.manual_seed(0)  # the same weights every run: the export cache serves a rerun
                random_student(self.config, shape).save_pretrained(ckpt, safe_serialization=True)
                tokenizer_files = list(Path(self.tokenizer_dir).iterdir()) if self.tokenizer_dir else []
                for f in tokenizer_files:  # the tokenizer only: never the teacher's config or weights
                    if f.is_file() and f.name not in ("config.json", "generation_config.json") and f.suffix not in _WEIGHTS:
                        shutil.copy2(f, ckpt / f.name)
                folder = work / f"build-{name}"
                log(f"cost model: build {shape.name} with {cand.recipe} (random init)")
                convert(str(ckpt), cand.profile(), folder, task=self.task, calib=self.calib, force=True, threads=self.threads,
                        latency_runs=0, gates=Gates())
                arts[name] = Artifact(folder, threads=self.threads, allow_rejected=True, runtime_overrides=cand.runtime)
            for a in arts.values():
                a.runner.activate()
            try:
                calls = {n: (lambda a=a: a.infer(self.feeds)) for n, a in arts.items()}
                timed = time_interleaved(calls, runs=self.runs, warmup=3)
            finally:
                for a in arts.values():
                    a.runner.deactivate()
        return {n: lat.p50 for n, lat in timed.items()}

    # -- predicting --------------------------------------------------------------------------
    def macs(self, shape, skip: bool | None = None) -> float:
        return linear_macs(shape, self.batch, self.sequence, self.skip if skip is None else skip)

    def points(self, shapes=None) -> list[tuple]:
        """(shape, ratio, MACs) of every cached measurement among ``shapes``; with fewer than
        two, the reference point too: the teacher's own shape on the reference recipe (1.0),
        a point of another recipe (no skipping), so it is used only when nothing better is known."""
        pts = []
        for s in shapes or []:
            rec = self.cached(s)
            if rec is not None:
                pts.append((s, rec["ratio"], self.macs(s)))
        if len(pts) < 2:
            pts.append((self.teacher, 1.0, self.macs(self.teacher, skip=recipe_skips(self.reference))))
        return pts

    def fit(self, shapes) -> dict:
        """Least squares over the measured points: ratio ~ a + b MACs + c layers (three or more
        points), else or when that fit is not monotone (more MACs or more layers must not cost
        less) ratio ~ a + b MACs, else (fewer than two points, or still not monotone) the MACs
        ratio alone."""
        pts = self.points(shapes)
        t_macs = self.macs(self.teacher, skip=recipe_skips(self.reference))
        x = np.array([[1.0, m / t_macs, s.layers] for s, _, m in pts])
        y = np.array([r for _, r, _ in pts])
        coef, model = None, "macs ratio"
        if len(pts) >= 3 and len({s.layers for s, _, _ in pts}) > 1:
            c3, *_ = np.linalg.lstsq(x, y, rcond=None)
            if c3[1] > 0 and c3[2] >= 0:
                coef, model = c3, "a + b*macs + c*layers"
        if coef is None and len(pts) >= 2:
            c2, *_ = np.linalg.lstsq(x[:, :2], y, rcond=None)
            if c2[1] > 0:
                coef, model = np.array([c2[0], c2[1], 0.0]), "a + b*macs"
        return {"model": model, "points": len(pts), "coef": None if coef is None else [float(c) for c in coef],
                "teacher_macs": t_macs}

    def predict(self, shape, fit: dict | None = None, shapes=None) -> Cost:
        """The shape's ratio: measured when cached, else predicted by ``fit``."""
        macs = self.macs(shape)
        rec = self.cached(shape)
        if rec is not None:
            return Cost(shape.name, float(rec["ratio"]), "measured", macs)
        fit = fit or self.fit(shapes)
        rel = macs / fit["teacher_macs"]
        if fit["coef"] is None:
            ratio = rel
        else:
            a, b, c = fit["coef"]
            ratio = a + b * rel + c * shape.layers
        return Cost(shape.name, max(float(ratio), 0.01), "predicted", macs)

    def anchors(self, shapes, count: int = 3) -> list:
        """The shapes worth measuring: the cheapest, the dearest and the middle one by MACs."""
        by_macs = sorted(shapes, key=self.macs)
        if len(by_macs) <= count:
            return by_macs
        idx = sorted({0, len(by_macs) - 1} | {round(i * (len(by_macs) - 1) / (count - 1)) for i in range(1, count - 1)})
        return [by_macs[i] for i in idx]

    def costs(self, shapes, measure: bool = True) -> tuple[dict[str, Cost], dict]:
        """Every shape's cost: the anchors measured (or read from the cache), the rest predicted."""
        if measure:
            self.measure(self.anchors(shapes))
        fit = self.fit(shapes)
        return {s.name: self.predict(s, fit) for s in shapes}, fit

    def describe(self, fit: dict | None = None) -> dict:
        return {"recipe": self.recipe.recipe, "reference": self.reference.recipe, "skip": self.skip,
                "cell": self.base_key["cell"], "threads": self.threads, "cpu": self.base_key["machine"]["cpu"],
                "measured_now": list(self.measured_now), "fit": fit}
