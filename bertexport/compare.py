"""The one comparison engine: is a candidate close enough to the reference (the PyTorch
original)? Used by ``convert`` (parity on built-in sentences), ``validate`` and
``benchmark`` (task metrics on the user's data), ``distill`` and ``optimize`` (the same
checks score every search candidate).

Comparisons only look at real tokens: padded positions carry no meaning and differ
legitimately between runtimes. What is compared per task (the mean-pooled embedding,
class probabilities, ...) and which decision agreement counts come from the task
records (``bertexport.tasks``). One vocabulary of gates (``Gates``) for everything.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from bertexport.errors import UserError
from bertexport.options import option
from bertexport.tasks import get_task, mean_pool  # noqa: F401  (mean_pool re-exported for callers)


# -- gates ----------------------------------------------------------------------------------

@dataclass
class Gates:
    """What a candidate must meet against the reference. ``None``: not gated."""

    min_cosine: float | None = option(None, "lowest per-sample cosine to the PyTorch original", min=0, max=1, min_open=True)
    max_abs_diff: float | None = option(None, "largest absolute output difference", min=0, min_open=True)
    min_agreement: float | None = option(None, "fraction of decisions equal to PyTorch's", min=0, max=1)
    max_accuracy_drop: float | None = option(None, "points of task metric the candidate may lose (labelled data)", min=0)

    def any(self) -> bool:
        return any(v is not None for v in asdict(self).values())

    def given(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


def judge(figures: dict, gates: Gates, name: str = "") -> list[str]:
    """Failures of one set of figures (a parity check or task metrics) against the gates."""
    pre = f"{name}: " if name else ""
    fails = []
    cos = figures.get("cosine_min")
    if gates.min_cosine is not None and cos is not None and (cos < gates.min_cosine or not np.isfinite(figures.get("max_abs_diff", 0.0))):
        fails.append(f"{pre}cosine_min {cos:.5f} < {gates.min_cosine}")
    diff = figures.get("max_abs_diff")
    if gates.max_abs_diff is not None and diff is not None and diff > gates.max_abs_diff:
        fails.append(f"{pre}max_abs_diff {diff:.3g} > {gates.max_abs_diff}")
    agree = figures.get("agreement")
    if gates.min_agreement is not None and agree is not None and agree < gates.min_agreement:
        fails.append(f"{pre}agreement {agree:.4f} < {gates.min_agreement}")
    drop = figures.get("metric_drop")
    if gates.max_accuracy_drop is not None and drop is not None and drop > gates.max_accuracy_drop:
        fails.append(f"{pre}{figures.get('metric_name', 'accuracy')} drop {drop:.2f} points > {gates.max_accuracy_drop}")
    return fails


def judge_checks(checks: dict[str, dict], gates: Gates) -> list[str]:
    return [f for name, c in checks.items() for f in judge(c, gates, name)]


# -- the reference and feeds ------------------------------------------------------------------

def reference_runner(ckpt, input_names: list[str], threads: int | None = 1, torch_model=None):
    """The PyTorch original as a runner (loaded unless ``torch_model`` is given)."""
    from bertexport.backends.torch.runner import TorchRunner
    from bertexport.checkpoint import load_model

    model = torch_model if torch_model is not None else load_model(ckpt)
    return TorchRunner(model, input_names, list(get_task(ckpt.task).outputs), threads=threads)


def reference_for_manifest(manifest: dict, model: str | None = None, force: bool = False, threads: int | None = 1):
    """The PyTorch original an artifact names (or ``model``), checked to be the same checkpoint."""
    from bertexport.checkpoint import resolve_checkpoint

    src = model or manifest["source"]["path"]
    ckpt = resolve_checkpoint(src, manifest["task"], allow_pickle=manifest["source"].get("weights_format") == "pickle",
                              trust_remote_code=bool(manifest["source"].get("trust_remote_code")))
    if ckpt.sha256 != manifest["source"]["sha256"] and not force:
        raise UserError(f"{src} is not the checkpoint this artifact was built from (sha256 differs); pass --force to compare anyway")
    return ckpt, reference_runner(ckpt, [i["name"] for i in manifest["inputs"]], threads)


def fixed_cell_feeds(encode, texts: list[str], batch: int, sequence: int) -> dict:
    """A fixed latency cell: ``batch`` copies of one sequence of ``sequence`` real tokens
    (the texts joined and truncated), so every measurement of that cell is comparable."""
    return encode([" ".join(texts)] * batch, padding="max_length", length=sequence)


# -- parity on sentences -------------------------------------------------------------------------

def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    num = (a * b).sum(-1)
    den = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    return np.where(den > 0, num / np.maximum(den, 1e-30), 1.0)


def min_cosine(ref: dict, out: dict, task: str, mask: np.ndarray) -> float:
    t = get_task(task)
    return float(min(_cos(a, b) for a, b in zip(t.vectors(ref, mask), t.vectors(out, mask))))


@dataclass
class Comparison:
    """Parity figures accumulated over any number of batches."""

    task: str
    max_abs_diff: float = 0.0
    _abs_sum: float = 0.0
    _abs_count: int = 0
    cosines: list[float] = field(default_factory=list)
    agree: int = 0
    decided: int = 0
    samples: int = 0
    pred_reference: list = field(default_factory=list)
    pred_candidate: list = field(default_factory=list)
    vec_reference: list = field(default_factory=list)  # per-sample vectors of tasks without decisions (embeddings)
    vec_candidate: list = field(default_factory=list)

    def add(self, ref: dict[str, np.ndarray], out: dict[str, np.ndarray], mask: np.ndarray) -> None:
        task = get_task(self.task)
        valid = mask.astype(bool)
        for name in task.outputs:
            a, b = ref[name].astype(np.float64), out[name].astype(np.float64)
            if a.shape != b.shape:
                raise ValueError(f"output {name}: shape {b.shape} differs from the reference {a.shape}")
            diff = np.abs(a - b)[valid] if task.per_token else np.abs(a - b)
            if not np.all(np.isfinite(b)):
                self.max_abs_diff = float("inf")
            if diff.size:
                self.max_abs_diff = max(self.max_abs_diff, float(np.nan_to_num(diff, nan=np.inf).max()))
                self._abs_sum += float(np.nan_to_num(diff, nan=1e30).sum())
                self._abs_count += diff.size
        vr, vc = task.vectors(ref, mask), task.vectors(out, mask)
        self.cosines.extend(float(c) for c in (_cos(a, b) for a, b in zip(vr, vc)))
        if task.decisions is None:
            self.vec_reference.extend(vr)
            self.vec_candidate.extend(vc)
        else:
            dr, do = task.decisions(ref, mask), task.decisions(out, mask)
            self.agree += int((dr == do).sum())
            self.decided += int(dr.size)
            self.pred_reference.append(dr)
            self.pred_candidate.append(do)
        self.samples += mask.shape[0]

    def summary(self) -> dict:
        cos = np.nan_to_num(np.array(self.cosines or [1.0]), nan=-1.0)
        return {
            "samples": self.samples,
            "max_abs_diff": self.max_abs_diff,
            "mean_abs_diff": self._abs_sum / self._abs_count if self._abs_count else 0.0,
            "cosine_min": float(cos.min()),
            "cosine_mean": float(cos.mean()),
            "agreement": (self.agree / self.decided) if self.decided else None,
            "decisions": self.decided,
        }


def parity_checks(reference, candidate, encode, texts: list[str], task: str, padded_length: int) -> dict[str, dict]:
    """Parity of ``candidate`` against ``reference`` on the same texts, two ways:
    ``real-lengths`` (each text alone at its own length: exercises the dynamic sequence
    axis) and ``padded-batch`` (all texts in one batch padded to ``padded_length``:
    exercises the dynamic batch axis and the attention mask)."""
    checks = {}
    real = Comparison(task)
    for t in texts:
        feeds = encode([t], padding="longest")
        real.add(reference.infer(feeds), candidate.infer(feeds), feeds["attention_mask"])
    checks["real-lengths"] = real.summary()
    padded = Comparison(task)
    feeds = encode(texts, padding="max_length", length=padded_length)
    padded.add(reference.infer(feeds), candidate.infer(feeds), feeds["attention_mask"])
    checks["padded-batch"] = padded.summary() | {"padded_length": int(feeds["input_ids"].shape[1])}
    return checks


# -- task metrics on data ---------------------------------------------------------------------------

def _batched(n: int, size: int):
    for i in range(0, n, size):
        yield slice(i, min(i + size, n))


def compare_on_data(candidate, reference, encode, data, task: str, batch_size: int = 16,
                    reference_cache: dict | None = None) -> Comparison:
    """Both sides on the data's texts with the same token ids (``encode``: the artifact's
    encoder); ``reference_cache`` (batch index -> outputs) lets several candidates of one
    checkpoint share one pass of the original."""
    comp = Comparison(task)
    cache = reference_cache if reference_cache is not None else {}
    for bi, sl in enumerate(_batched(len(data.texts), batch_size)):
        feeds = encode(data.texts[sl], data.pairs[sl] if data.pairs else None)
        out = candidate.infer(feeds)
        if bi not in cache:
            cache[bi] = reference.infer(feeds)
        comp.add(cache[bi], out, feeds["attention_mask"])
    return comp


def retrieval_agreement(reference: list[np.ndarray], candidate: list[np.ndarray], k: int = 5) -> float:
    """How much of each text's top-k nearest neighbours (by cosine, among the given texts)
    the candidate's embeddings keep: what a search or dedup user of embeddings would see."""
    n = len(reference)
    if n < 2:
        return 1.0
    k = min(k, n - 1)

    def neighbours(vecs):
        v = np.asarray(vecs, dtype=np.float64)
        v = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
        sim = v @ v.T
        np.fill_diagonal(sim, -np.inf)
        return np.argsort(-sim, axis=1)[:, :k]

    a, b = neighbours(reference), neighbours(candidate)
    return float(np.mean([len(set(x) & set(y)) / k for x, y in zip(a, b)]))


def macro_f1(pred: np.ndarray, labels: np.ndarray) -> float:
    scores = []
    for c in np.unique(np.concatenate([pred, labels])):
        tp = int(((pred == c) & (labels == c)).sum())
        fp, fn = int(((pred == c) & (labels != c)).sum()), int(((pred != c) & (labels == c)).sum())
        scores.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores)) if scores else 0.0


def task_metrics(comp: Comparison, labels: np.ndarray | None) -> dict:
    """Agreement and cosine vs the original (agreement: equal decisions; for embeddings,
    top-5 retrieval agreement); with labels (classification), the task metric (accuracy)
    of both, its drop in points, and macro-F1."""
    s = comp.summary()
    m = {"samples": s["samples"], "cosine_min": s["cosine_min"], "cosine_mean": s["cosine_mean"],
         "max_abs_diff": s["max_abs_diff"]}
    if comp.decided:
        m["agreement"] = s["agreement"]
        m["decisions"] = s["decisions"]
    elif comp.vec_reference:
        m["agreement"] = m["retrieval_agreement"] = retrieval_agreement(comp.vec_reference, comp.vec_candidate)
    if labels is not None and comp.pred_candidate:
        pr, pc = np.concatenate(comp.pred_reference), np.concatenate(comp.pred_candidate)
        m["metric_name"] = "accuracy"
        m["metric_reference"] = float((pr == labels).mean() * 100)
        m["metric_candidate"] = float((pc == labels).mean() * 100)
        m["metric_drop"] = m["metric_reference"] - m["metric_candidate"]
        m["macro_f1_reference"], m["macro_f1_candidate"] = macro_f1(pr, labels), macro_f1(pc, labels)
    return m


def check_gates_fit(gates: Gates, task: str, labelled: bool) -> None:
    """Refuse, before any work, a gate the task or data cannot answer."""
    if gates.max_accuracy_drop is not None and not labelled:
        raise UserError("--max-accuracy-drop needs labelled data (a label column) for a text-classification model")


def write_junit(name: str, task: str, gates: Gates, metrics: dict, failures: list[str], path: str | Path) -> None:
    import xml.etree.ElementTree as ET

    given = gates.given() or {"parity": None}
    suite = ET.Element("testsuite", name="bertexport.validate", tests=str(len(given)), failures=str(len(failures)))
    words = {"max_accuracy_drop": "drop", "min_agreement": "agreement", "min_cosine": "cosine_min", "max_abs_diff": "max_abs_diff"}
    for gate, limit in given.items():
        case = ET.SubElement(suite, "testcase", classname=f"bertexport.{task}", name=f"{name}:{gate}")
        failed = [f for f in failures if words.get(gate, gate) in f]
        if failed:
            ET.SubElement(case, "failure", message=failed[0]).text = str(metrics)
        ET.SubElement(case, "system-out").text = f"{gate}={limit} metrics={metrics}"
    ET.ElementTree(suite).write(str(path), encoding="utf-8", xml_declaration=True)
