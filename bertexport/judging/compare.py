"""The one comparison engine: is a candidate close enough to the reference (the PyTorch
original)? Used by ``convert`` (parity on built-in sentences), ``validate`` and
``benchmark`` (task metrics on the user's data), ``distill`` and ``optimize`` (the same
checks score every search candidate).

Comparisons only look at real tokens: padded positions carry no meaning and differ
legitimately between runtimes. What is compared per task (the mean-pooled embedding,
class probabilities, ...) and which decision agreement counts come from the task
records (``bertexport.core.tasks``). The gates and their verdicts are the registry's
(``bertexport.judging.gates``), re-exported here for callers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bertexport.judging import gates as gate_registry
from bertexport.judging import stats
from bertexport.judging.gates import Decision, Gates
from bertexport.core.errors import UserError
from bertexport.core.tasks import get_task


# -- gates (the registry: bertexport.judging.gates) --------------------------------------------

def judge(figures: dict, gates: Gates, name: str = "") -> list[str]:
    """Failures of one set of figures against the gates, on point estimates."""
    return gate_registry.judge(figures, gates, name, intervals=False).failures


def decide(figures: dict, gates: Gates, name: str = "") -> Decision:
    """Task gates judged with their intervals (``bertexport.judging.gates.judge``)."""
    return gate_registry.judge(figures, gates, name)


def judge_checks(checks: dict[str, dict], gates: Gates) -> list[str]:
    return gate_registry.judge_checks(checks, gates, intervals=False).failures


# -- the reference and feeds ------------------------------------------------------------------

def reference_runner(ckpt, input_names: list[str], threads: int | None = 1, torch_model=None):
    """The PyTorch original as a runner (loaded unless ``torch_model`` is given)."""
    from bertexport.backends.torch.runner import TorchRunner
    from bertexport.building.checkpoint import load_model

    model = torch_model if torch_model is not None else load_model(ckpt)
    return TorchRunner(model, input_names, list(get_task(ckpt.task).outputs), threads=threads)


def reference_for_manifest(manifest: dict, model: str | None = None, force: bool = False, threads: int | None = 1):
    """The PyTorch original an artifact names (or ``model``), checked to be the same checkpoint."""
    from bertexport.building.checkpoint import resolve_checkpoint

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
    # float64 sums without float64 copies of the inputs (a fill-mask batch's vocabulary logits)
    dot = lambda x, y: np.einsum("...i,...i->...", x, y, dtype=np.float64)  # noqa: E731
    num = dot(a, b)
    den = np.sqrt(dot(a, a) * dot(b, b))
    return np.where(den > 0, num / np.maximum(den, 1e-30), 1.0)


def _cosines(vr: list[np.ndarray], vc: list[np.ndarray]) -> list[float]:
    """Cosine of each pair of vectors; one vectorised call when they share a shape (per-token
    vectors: thousands per batch), pair by pair otherwise (answer spans of varying length)."""
    if vr and len({np.shape(v) for v in vr}) == 1 and np.ndim(vr[0]) == 1:
        return _cos(np.stack(vr), np.stack(vc)).tolist()
    return [float(_cos(a, b)) for a, b in zip(vr, vc)]


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
    pred_rows: list = field(default_factory=list)  # the row (sample index) of every decision
    vec_reference: list = field(default_factory=list)  # per-sample vectors of tasks without decisions (embeddings)
    vec_candidate: list = field(default_factory=list)

    def add(self, ref: dict[str, np.ndarray], out: dict[str, np.ndarray], mask: np.ndarray) -> None:
        task = get_task(self.task)
        valid = mask.astype(bool)
        for name in task.outputs:
            # float32 differences (the outputs' own precision; float64 copies of a fill-mask
            # batch's vocabulary logits took half a conversion's time), summed in float64
            a, b = np.asarray(ref[name], dtype=np.float32), np.asarray(out[name], dtype=np.float32)
            if a.shape != b.shape:
                raise ValueError(f"output {name}: shape {b.shape} differs from the reference {a.shape}")
            diff = np.abs(a - b)[valid] if task.per_token else np.abs(a - b)
            if not np.all(np.isfinite(b)):
                self.max_abs_diff = float("inf")
            if diff.size:
                worst = diff.max()  # NaN when any difference is NaN
                if np.isfinite(worst):
                    self.max_abs_diff = max(self.max_abs_diff, float(worst))
                    self._abs_sum += float(diff.sum(dtype=np.float64))
                else:
                    self.max_abs_diff = max(self.max_abs_diff, float(np.nan_to_num(diff, nan=np.inf).max()))
                    self._abs_sum += float(np.nan_to_num(diff, nan=1e30).sum(dtype=np.float64))
                self._abs_count += diff.size
        vr, vc = task.vectors(ref, mask), task.vectors(out, mask)
        self.cosines.extend(_cosines(vr, vc))
        if task.decisions is None:
            self.vec_reference.extend(vr)
            self.vec_candidate.extend(vc)
        else:
            dr, do = task.decisions(ref, mask), task.decisions(out, mask)
            self.agree += int((dr == do).sum())
            self.decided += int(dr.size)
            self.pred_reference.append(dr)
            self.pred_candidate.append(do)
            self.pred_rows.append(self.samples + _decision_rows(dr.size, mask))
        self.samples += mask.shape[0]

    def agreement_interval(self, confidence: float = stats.CONFIDENCE) -> stats.Interval | None:
        if not self.decided:
            return None
        eq = np.concatenate(self.pred_reference) == np.concatenate(self.pred_candidate)
        return stats.agreement(eq, np.concatenate(self.pred_rows), confidence)

    def summary(self) -> dict:
        cos = np.nan_to_num(np.array(self.cosines or [1.0]), nan=-1.0)
        agree = self.agreement_interval()
        return ({"stats": {"agreement": agree.to_dict()}} if agree else {}) | {
            "samples": self.samples,
            "max_abs_diff": self.max_abs_diff,
            "mean_abs_diff": self._abs_sum / self._abs_count if self._abs_count else 0.0,
            "cosine_min": float(cos.min()),
            "cosine_mean": float(cos.mean()),
            "agreement": (self.agree / self.decided) if self.decided else None,
            "decisions": self.decided,
        }


def _decision_rows(n: int, mask: np.ndarray) -> np.ndarray:
    """Which row each of a batch's ``n`` decisions belongs to (one per row, one per real
    token, or a fixed number per row such as an answer's start and end)."""
    batch = mask.shape[0]
    if n == batch:
        return np.arange(batch)
    if n == int(mask.astype(bool).sum()):
        return np.nonzero(mask.astype(bool))[0]
    return np.repeat(np.arange(batch), n // max(batch, 1))


PARITY_BATCH = 64  # rows per batch of the parity checks


def parity_figures(comp: Comparison, confidence: float = stats.CONFIDENCE) -> dict:
    """A parity check's figures: ``Comparison.summary`` with the agreement interval at
    ``confidence``; for tasks without decisions (embeddings), the tie-robust top-5
    retrieval agreement among the check's texts and its interval (as ``task_metrics``)."""
    s = comp.summary()
    if comp.decided and confidence != stats.CONFIDENCE:  # summary() holds it at the default level
        s["stats"] = {"agreement": comp.agreement_interval(confidence).to_dict()}
    elif len(comp.vec_reference) > 1:
        kept = retrieval_kept(comp.vec_reference, comp.vec_candidate)
        iv = stats.mean_of_rows(kept, confidence)
        iv.discordant = int((kept < 1).sum())
        iv.resolution = 1.0 / max(len(kept), 1)
        s["agreement"] = s["retrieval_agreement"] = iv.estimate
        s["retrieval"] = {"k": min(RETRIEVAL_K, len(kept) - 1), "tolerance": RETRIEVAL_TOLERANCE}
        s["stats"] = {"agreement": iv.to_dict()}
    return s


def parity_checks(reference, candidate, encode, texts: list[str], task: str, padded_length: int,
                  confidence: float = stats.CONFIDENCE) -> dict[str, dict]:
    """Parity of ``candidate`` against ``reference`` on the same texts, two ways:
    ``real-lengths`` (texts at their own length, batched only with texts of the same token
    length, so no row carries padding: exercises the dynamic sequence axis) and
    ``padded-batch`` (batches of texts padded to ``padded_length``: exercises the dynamic
    batch axis and the attention mask). Decisions — or, for embeddings, retrieval among the
    texts — carry their interval at ``confidence`` (``parity_figures``)."""
    checks = {}
    real = Comparison(task)
    every = encode(texts, padding="longest")  # one tokenization; a same-length group is a slice of it
    lengths = every["attention_mask"].sum(axis=1)
    for n in sorted(set(lengths.tolist())):
        rows = np.nonzero(lengths == n)[0]
        for i in range(0, len(rows), PARITY_BATCH):
            sl = rows[i:i + PARITY_BATCH]
            feeds = {k: np.ascontiguousarray(v[sl, :n]) for k, v in every.items()}
            real.add(reference.infer(feeds), candidate.infer(feeds), feeds["attention_mask"])
    checks["real-lengths"] = parity_figures(real, confidence)
    padded = Comparison(task)
    width = None
    for i in range(0, len(texts), PARITY_BATCH):
        feeds = encode(texts[i:i + PARITY_BATCH], padding="max_length", length=padded_length)
        width = int(feeds["input_ids"].shape[1])
        padded.add(reference.infer(feeds), candidate.infer(feeds), feeds["attention_mask"])
    checks["padded-batch"] = parity_figures(padded, confidence) | {"padded_length": width}
    return checks


# -- batch invariance -----------------------------------------------------------------------------

# Largest output difference still called batch-invariant. fp32 kernels legitimately reorder
# sums when the GEMM's row count changes (text alone vs in a batch): ~1e-6 measured; ORT's
# dynamic int8 moves outputs by ~1e-3..1e-2 because it takes one activation scale per tensor
# over the whole batch (padding included). 1e-4 sits two decades from each.
BATCH_TOLERANCE = 1e-4


def batch_invariance(runner, encode, texts: list[str], task: str, tolerance: float = BATCH_TOLERANCE,
                     alone: list[dict] | None = None) -> dict:
    """Does a text's output depend on its batch neighbours? Each text alone (its own length)
    vs the same text inside one batch of all of them (mixed lengths, padded to the longest):
    the largest difference on real tokens and the lowest cosine of the task's vectors."""
    t = get_task(task)
    singles = alone or [runner.infer(encode([x], padding="longest")) for x in texts]
    feeds = encode(texts, padding="longest")
    batch = runner.infer(feeds)
    mask = feeds["attention_mask"]
    worst, cos_min = 0.0, 1.0
    for i, one in enumerate(singles):
        n = int(mask[i].sum())
        for name in t.outputs:
            a = one[name][0].astype(np.float64)
            b = batch[name][i].astype(np.float64)
            if t.per_token:
                a, b = a[:n], b[:n]
            worst = max(worst, float(np.nan_to_num(np.abs(a - b), nan=np.inf).max()) if a.size else 0.0)
        va = t.vectors(one, np.ones((1, n), dtype=mask.dtype))
        vb = t.vectors({k: v[i:i + 1] for k, v in batch.items()}, mask[i:i + 1])
        cos_min = min([cos_min] + [float(c) for c in (_cos(x, y) for x, y in zip(va, vb))])
    return {"texts": len(texts), "max_abs_diff": worst, "cosine_min": cos_min, "bitwise": worst == 0.0,
            "invariant": worst <= tolerance, "tolerance": tolerance,
            "method": "each text alone vs inside one batch of all texts (mixed lengths, padded to the longest)"}


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


RETRIEVAL_K = 5
RETRIEVAL_TOLERANCE = 0.01


def _unit(vecs) -> np.ndarray:
    v = np.asarray(vecs, dtype=np.float64)
    return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)


def _neighbours(sim: np.ndarray, k: int) -> np.ndarray:
    sim = sim.copy()
    np.fill_diagonal(sim, -np.inf)
    return np.argsort(-sim, axis=1, kind="stable")[:, :k]


def retrieval_kept(reference: list[np.ndarray], candidate: list[np.ndarray], k: int = RETRIEVAL_K,
                   tolerance: float = RETRIEVAL_TOLERANCE) -> np.ndarray:
    """Per text, the fraction of the candidate's top-k neighbours (by cosine, among the given
    texts) that the *reference* ranks as top-k — counting as kept a neighbour the reference
    itself cannot tell from its own k-th (reference similarity within ``tolerance`` of the
    k-th). This is ann-benchmarks' k-NN recall with a distance slack (there 1e-3 on a
    distance): with near-duplicates, the exact top-k is decided by ties in the fourth
    decimal, which measures ties, not retrieval. ``tolerance=0`` is plain top-k overlap."""
    n = len(reference)
    if n < 2:
        return np.ones(n)
    k = min(k, n - 1)
    ref = _unit(reference)
    sim_ref = ref @ ref.T
    np.fill_diagonal(sim_ref, -np.inf)
    kth = -np.sort(-sim_ref, axis=1)[:, k - 1]
    cand = _unit(candidate)
    chosen = _neighbours(cand @ cand.T, k)
    got = np.take_along_axis(sim_ref, chosen, axis=1)
    return (got >= kth[:, None] - tolerance).sum(axis=1) / k


def retrieval_agreement(reference: list[np.ndarray], candidate: list[np.ndarray], k: int = RETRIEVAL_K,
                        tolerance: float = RETRIEVAL_TOLERANCE) -> float:
    """Mean of ``retrieval_kept``: what a search or dedup user of the embeddings would see."""
    return float(np.mean(retrieval_kept(reference, candidate, k, tolerance)))


def retrieval_precision(vectors: list[np.ndarray], labels: np.ndarray, k: int = RETRIEVAL_K) -> np.ndarray:
    """Per text, the fraction of its top-k neighbours that share its label: the downstream
    retrieval quality itself, when the data is labelled."""
    labels = np.asarray(labels)
    if len(labels) < 2:
        return np.ones(len(labels))
    k = min(k, len(labels) - 1)
    v = _unit(vectors)
    nb = _neighbours(v @ v.T, k)
    return (labels[nb] == labels[:, None]).mean(axis=1)


def macro_f1(pred: np.ndarray, labels: np.ndarray) -> float:
    scores = []
    for c in np.unique(np.concatenate([pred, labels])):
        tp = int(((pred == c) & (labels == c)).sum())
        fp, fn = int(((pred == c) & (labels != c)).sum()), int(((pred != c) & (labels == c)).sum())
        scores.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores)) if scores else 0.0


def task_metrics(comp: Comparison, labels: np.ndarray | None, confidence: float = stats.CONFIDENCE) -> dict:
    """Agreement and cosine vs the original (agreement: equal decisions; for embeddings,
    tie-robust top-5 retrieval agreement); with labels, the task metric of both —
    accuracy for classification, retrieval precision@5 for embeddings — its drop in points,
    and macro-F1. ``stats`` holds each gated figure with its paired interval
    (``bertexport.judging.stats``): estimate, low, high, rows, discordant rows, resolution."""
    s = comp.summary()
    m = {"samples": s["samples"], "cosine_min": s["cosine_min"], "cosine_mean": s["cosine_mean"],
         "max_abs_diff": s["max_abs_diff"]}
    st: dict = {}
    if comp.cosines:
        st["cosine_mean"] = stats.mean_of_rows(np.nan_to_num(np.array(comp.cosines), nan=-1.0), confidence).to_dict()
    if comp.decided:
        m["agreement"] = s["agreement"]
        m["decisions"] = s["decisions"]
        st["agreement"] = comp.agreement_interval(confidence).to_dict()
    elif comp.vec_reference:
        kept = retrieval_kept(comp.vec_reference, comp.vec_candidate)
        iv = stats.mean_of_rows(kept, confidence)
        iv.discordant = int((kept < 1).sum())
        iv.resolution = 1.0 / max(len(kept), 1)
        m["agreement"] = m["retrieval_agreement"] = iv.estimate
        m["retrieval"] = {"k": min(RETRIEVAL_K, max(len(kept) - 1, 1)), "tolerance": RETRIEVAL_TOLERANCE}
        st["agreement"] = st["retrieval_agreement"] = iv.to_dict()
    if labels is not None and comp.pred_candidate:
        pr, pc = np.concatenate(comp.pred_reference), np.concatenate(comp.pred_candidate)
        labels = np.asarray(labels)
        m["metric_name"] = "accuracy"
        m["metric_reference"] = float((pr == labels).mean() * 100)
        m["metric_candidate"] = float((pc == labels).mean() * 100)
        drop = stats.accuracy_drop(pr == labels, pc == labels, confidence)
        m["metric_drop"] = drop.estimate
        m["macro_f1_reference"], m["macro_f1_candidate"] = macro_f1(pr, labels), macro_f1(pc, labels)
        m["macro_f1_drop"] = 100 * (m["macro_f1_reference"] - m["macro_f1_candidate"])
        st["metric_drop"] = drop.to_dict()
        both = np.stack([pr, pc, labels], 1)
        lo, hi = stats.bootstrap(both, lambda v: 100 * (macro_f1(v[:, 0], v[:, 2]) - macro_f1(v[:, 1], v[:, 2])), confidence,
                                 resamples=500)
        st["macro_f1_drop"] = stats.Interval(m["macro_f1_drop"], lo, hi, confidence,
                                             int(len(labels)), "bootstrap-rows", None, int((pr != pc).sum())).to_dict()
    elif labels is not None and comp.vec_reference:
        pref = retrieval_precision(comp.vec_reference, labels)
        pcan = retrieval_precision(comp.vec_candidate, labels)
        diff = 100 * (pref - pcan)
        iv = stats.mean_of_rows(diff, confidence)
        iv.discordant, iv.resolution = int((pref != pcan).sum()), 100.0 / max(len(diff), 1)
        m["metric_name"] = f"retrieval precision@{RETRIEVAL_K}"
        m["metric_reference"], m["metric_candidate"] = float(pref.mean() * 100), float(pcan.mean() * 100)
        m["metric_drop"] = iv.estimate
        st["metric_drop"] = iv.to_dict()
    m["stats"] = st
    return m


def labelled_task(task: str) -> bool:
    """Tasks whose gate can be a metric drop on labelled rows (one label per text)."""
    return task in ("text-classification", "feature-extraction")


def task_labels(ts, task: str, id2label: dict | None):
    """Label ids a gate can use: class ids for classification (mapped through the model's
    labels), any label values for embeddings (retrieval precision); None otherwise."""
    from bertexport.core.textdata import label_ids

    if ts.labels is None or not labelled_task(task):
        return None
    if task == "text-classification":
        return label_ids(ts.labels, id2label)
    return np.unique(np.asarray([str(x) for x in ts.labels]), return_inverse=True)[1]


def write_junit(name: str, task: str, gates: Gates, metrics: dict, decision: Decision, path: str | Path) -> None:
    """One testcase per verdict (a gate judged on one set of figures); a failed or undecided
    verdict is a ``<failure>`` with its message. Every figure with its interval, and every
    verdict's value, interval, threshold and status, go into the suite's ``<properties>``."""
    import xml.etree.ElementTree as ET

    verdicts = decision.verdicts
    failing = [v for v in verdicts if v.blocking]
    suite = ET.Element("testsuite", name="bertexport.judging.validate", tests=str(max(len(verdicts), 1)),
                       failures=str(len(failing)))
    props = ET.SubElement(suite, "properties")
    for key in ("samples", "agreement", "metric_drop", "metric_reference", "metric_candidate", "cosine_min", "cosine_mean",
                "max_abs_diff"):
        if metrics.get(key) is not None:
            ET.SubElement(props, "property", name=key, value=f"{metrics[key]:.6g}")
    for metric, iv in (metrics.get("stats") or {}).items():
        for field_ in ("estimate", "low", "high", "confidence", "rows", "discordant", "resolution", "method"):
            if iv.get(field_) is not None:
                v = iv[field_]
                ET.SubElement(props, "property", name=f"{metric}.{field_}", value=v if isinstance(v, str) else f"{v:.6g}")
    if gates.confidence is not None:
        ET.SubElement(props, "property", name="gate.confidence", value=f"{gates.confidence:g}")
    for v in verdicts:
        key = f"verdict.{v.check + '.' if v.check else ''}{v.gate}"
        for field_ in ("status", "value", "low", "high", "threshold", "rows_needed"):
            x = getattr(v, field_)
            if x is not None:
                ET.SubElement(props, "property", name=f"{key}.{field_}", value=x if isinstance(x, str) else f"{x:.6g}")
    for v in verdicts:
        case = ET.SubElement(suite, "testcase", classname=f"bertexport.{task}",
                             name=f"{name}:{v.check + ':' if v.check else ''}{v.gate}")
        if v.blocking:
            ET.SubElement(case, "failure", message=v.message, type=v.status).text = str(v.to_dict())
        ET.SubElement(case, "system-out").text = f"{v.gate}={v.threshold} {v.message}"
    if not verdicts:  # no gate given, or none the figures could answer: the report itself
        case = ET.SubElement(suite, "testcase", classname=f"bertexport.{task}", name=f"{name}:parity")
        ET.SubElement(case, "system-out").text = f"metrics={metrics}"
    ET.ElementTree(suite).write(str(path), encoding="utf-8", xml_declaration=True)
