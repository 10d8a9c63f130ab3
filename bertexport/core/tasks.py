"""Tasks: one record per task holds everything bertexport knows about it (numpy only; the
device runtime imports it). Adding a task is adding a record here (plus its tests).

A record says which ONNX outputs the model has, which transformers class loads the
PyTorch original, which vector parity compares and which decision agreement counts, and
how raw outputs become an answer: ``reduce`` shrinks one window's outputs to what the
answer needs right after inference (so a text of a million characters never holds all
its hidden states at once), ``aggregate`` turns a text's reduced windows into its answer.
Long texts are split into overlapping windows by the tokenizer (``Window``s carry each
token's character offsets) and answers aggregate across windows instead of truncating.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np


@dataclass
class Window:
    text_index: int  # which input text this window belongs to
    ids: list[int]
    type_ids: list[int]
    offsets: list[tuple[int, int]]  # character span per token; (0, 0) for special tokens
    special: list[int]  # 1 for special tokens
    sequence_ids: list[int | None]  # 0 = first segment, 1 = second (QA context), None = special


@dataclass
class Post:
    """Post-processing settings of one Predictor."""

    id2label: dict[int, str] = field(default_factory=dict)
    aggregation: str = "mean"  # classification of long texts: mean | max
    top_k: int = 1
    pooling: str = "mean"  # embeddings: mean | cls
    normalize: bool = False
    mask_id: int | None = None
    id_to_token: Callable[[int], str] | None = None


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    z = np.asarray(x, dtype=np.float64)
    z = z - z.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=axis, keepdims=True)


def mean_pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    m = mask[..., None].astype(np.float64)
    return (hidden.astype(np.float64) * m).sum(1) / np.maximum(m.sum(1), 1.0)


# -- per-task pieces ----------------------------------------------------------------------

def _real_tokens(x: np.ndarray, mask: np.ndarray) -> list[np.ndarray]:
    return [x[i, j] for i in range(mask.shape[0]) for j in range(mask.shape[1]) if mask[i, j]]


def classify(window_logits: list[np.ndarray], post: Post) -> dict:
    """Labels with probabilities for one text from its windows' logits.

    ``mean``: average the windows' logits; ``max``: the window whose top class is most confident."""
    stack = np.stack(window_logits)
    if post.aggregation == "mean":
        logits = stack.mean(0)
    elif post.aggregation == "max":
        logits = stack[softmax(stack).max(-1).argmax()]
    else:
        raise ValueError("aggregation must be mean or max")
    probs = softmax(logits)
    order = np.argsort(-probs)[: post.top_k]
    label = post.id2label
    return {"label": label.get(int(order[0]), str(order[0])), "score": float(probs[order[0]]),
            "scores": [{"label": label.get(int(i), str(i)), "score": float(probs[i])} for i in order],
            "windows": len(window_logits)}


def _pool_window(w: Window, out: dict, post: Post):
    h = out["last_hidden_state"]
    vec = h[0].astype(np.float64) if post.pooling == "cls" else h.astype(np.float64).mean(0)
    return vec, float(len(w.ids))


def embed(pooled: list[tuple[np.ndarray, float]], post: Post) -> dict:
    """One embedding per text: pooled per window, windows averaged by their token counts."""
    v = np.average(np.stack([p for p, _ in pooled]), axis=0, weights=np.asarray([n for _, n in pooled]))
    if post.normalize:
        v = v / max(np.linalg.norm(v), 1e-12)
    return {"embedding": v.astype(np.float32).tolist(), "windows": len(pooled)}


def entities(text: str, windows: list[tuple], post: Post) -> dict:
    """Entity spans with character offsets. Tokens seen in several windows get their logits
    averaged; B-/I- tags are merged into spans of one type (``simple`` aggregation)."""
    per_token: dict[tuple[int, int], list[np.ndarray]] = {}
    for offsets, special, logits in windows:
        for j, (span, sp) in enumerate(zip(offsets, special)):
            if not sp and span[1] > span[0]:
                per_token.setdefault(tuple(span), []).append(logits[j])
    out: list[dict] = []
    for start, end in sorted(per_token):
        probs = softmax(np.mean(per_token[(start, end)], axis=0))
        k = int(probs.argmax())
        tag = post.id2label.get(k, str(k))
        if tag == "O":
            continue
        prefix, _, etype = tag.partition("-") if "-" in tag else ("", "", tag)
        cur = out[-1] if out else None
        contiguous = cur is not None and text[cur["end"]:start].strip() == "" and cur["entity"] == etype
        same_word = cur is not None and cur["end"] == start  # subword continuation
        if cur is not None and cur["entity"] == etype and (prefix == "I" and contiguous or same_word):
            cur["end"] = end
            cur["scores"].append(float(probs[k]))
        else:
            out.append({"entity": etype, "start": start, "end": end, "scores": [float(probs[k])]})
    for e in out:
        e["word"] = text[e["start"]:e["end"]]
        e["score"] = float(np.mean(e.pop("scores")))
    return {"entities": out, "windows": len(windows)}


def answer(context: str, windows: list[tuple], max_answer_tokens: int = 30) -> dict:
    """The best context span across all windows (start <= end, within the context segment)."""
    best = {"score": -np.inf}
    for offsets, sequence_ids, s, e in windows:
        ctx = [i for i, sid in enumerate(sequence_ids) if sid == 1]
        if not ctx:
            continue
        ls, le = softmax(s), softmax(e)
        top_s = sorted(ctx, key=lambda i: -ls[i])[:20]
        top_e = sorted(ctx, key=lambda i: -le[i])[:20]
        for i in top_s:
            for j in top_e:
                if i <= j < i + max_answer_tokens:
                    score = float(ls[i] * le[j])
                    if score > best["score"]:
                        best = {"score": score, "start": offsets[i][0], "end": offsets[j][1]}
    if best["score"] == -np.inf:
        return {"answer": "", "start": 0, "end": 0, "score": 0.0, "windows": len(windows)}
    return {"answer": context[best["start"]:best["end"]], "start": best["start"], "end": best["end"],
            "score": best["score"], "windows": len(windows)}


def _mask_rows(w: Window, out: dict, post: Post):
    if post.mask_id is None:
        from bertexport.core.errors import UserError

        raise UserError("this tokenizer has no mask token")
    return [(tuple(w.offsets[j]), out["logits"][j]) for j, tid in enumerate(w.ids) if tid == post.mask_id]


def fill_mask(windows: list[list], post: Post) -> dict:
    """Top-k tokens for each mask position (deduplicated across overlapping windows)."""
    seen: dict[tuple[int, int], list[np.ndarray]] = {}
    for rows in windows:
        for span, logits in rows:
            seen.setdefault(span, []).append(logits)
    out = []
    k = max(post.top_k, 5)
    for span in sorted(seen):
        probs = softmax(np.mean(seen[span], axis=0))
        order = np.argsort(-probs)[:k]
        out.append({"start": span[0], "end": span[1],
                    "tokens": [{"token": post.id_to_token(int(i)), "score": float(probs[i])} for i in order]})
    return {"masks": out}


# -- the registry ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Task:
    name: str
    auto_class: str  # transformers class that loads the PyTorch original
    outputs: tuple[str, ...]  # ONNX output names (optimum's naming)
    per_token: bool  # every output is (batch, sequence, ...)
    vectors: Callable[[dict, np.ndarray], list[np.ndarray]]  # what parity compares by cosine, per sample/token
    decisions: Callable[[dict, np.ndarray], np.ndarray] | None  # what agreement counts (None: no decision)
    reduce: Callable[[Window, dict, Post], Any]  # one window's outputs -> what the answer needs
    aggregate: Callable[[str, str | None, list, Post], dict]  # a text's reduced windows -> its answer
    arch_suffixes: tuple[str, ...] = ()  # config.architectures suffixes of checkpoints trained for it
    needs_pair: bool = False


def _qa_vectors(o, mask):
    return [np.concatenate([o["start_logits"][i][mask[i].astype(bool)], o["end_logits"][i][mask[i].astype(bool)]])
            for i in range(mask.shape[0])]


def _qa_decisions(o, mask):
    neg = np.where(mask.astype(bool), 0.0, -np.inf)
    return np.stack([(o["start_logits"] + neg).argmax(-1), (o["end_logits"] + neg).argmax(-1)], 1).ravel()


TASKS: dict[str, Task] = {t.name: t for t in (
    Task("feature-extraction", "AutoModel", ("last_hidden_state",), True,
         # the mean-pooled embedding is what a user of embeddings would notice
         vectors=lambda o, m: list(mean_pool(o["last_hidden_state"], m)),
         decisions=None,
         reduce=_pool_window,
         aggregate=lambda text, pair, ws, post: embed(ws, post),
         arch_suffixes=("Model",)),
    Task("text-classification", "AutoModelForSequenceClassification", ("logits",), False,
         # class probabilities, not logits: a 2-class logit pair near the decision boundary
         # swings the cosine between -1 and 1 for tiny changes
         vectors=lambda o, m: list(softmax(o["logits"])),
         decisions=lambda o, m: o["logits"].argmax(-1),
         reduce=lambda w, out, post: out["logits"],
         aggregate=lambda text, pair, ws, post: classify(ws, post),
         arch_suffixes=("ForSequenceClassification",)),
    Task("token-classification", "AutoModelForTokenClassification", ("logits",), True,
         vectors=lambda o, m: _real_tokens(softmax(o["logits"]), m),
         decisions=lambda o, m: o["logits"].argmax(-1)[m.astype(bool)],
         reduce=lambda w, out, post: (w.offsets, w.special, out["logits"]),
         aggregate=lambda text, pair, ws, post: entities(text, ws, post),
         arch_suffixes=("ForTokenClassification",)),
    Task("question-answering", "AutoModelForQuestionAnswering", ("start_logits", "end_logits"), True,
         vectors=_qa_vectors,
         decisions=_qa_decisions,
         reduce=lambda w, out, post: (w.offsets, w.sequence_ids, out["start_logits"], out["end_logits"]),
         aggregate=lambda text, pair, ws, post: answer(pair, ws),
         arch_suffixes=("ForQuestionAnswering",), needs_pair=True),
    Task("fill-mask", "AutoModelForMaskedLM", ("logits",), True,
         vectors=lambda o, m: _real_tokens(o["logits"], m),
         decisions=lambda o, m: o["logits"].argmax(-1)[m.astype(bool)],
         reduce=_mask_rows,
         aggregate=lambda text, pair, ws, post: fill_mask(ws, post),
         arch_suffixes=("ForMaskedLM", "ForPreTraining")),
)}


def get_task(name: str) -> Task:
    if name not in TASKS:
        from bertexport.core.errors import UserError

        raise UserError(f"unknown task '{name}'; tasks: {', '.join(TASKS)}")
    return TASKS[name]
