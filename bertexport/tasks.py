"""Task post-processing on raw model outputs (numpy only; runs on devices).

Long texts are split into overlapping windows by the tokenizer (``Window``s carry each
token's character offsets); the functions here turn per-window outputs into one answer
per input text, aggregating across windows instead of truncating silently.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Window:
    text_index: int  # which input text this window belongs to
    ids: list[int]
    type_ids: list[int]
    offsets: list[tuple[int, int]]  # character span per token; (0, 0) for special tokens
    special: list[int]  # 1 for special tokens
    sequence_ids: list[int | None]  # 0 = first segment, 1 = second (QA context), None = special


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    z = x - x.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=axis, keepdims=True)


# -- classification -------------------------------------------------------------------

def classify(window_logits: list[np.ndarray], id2label: dict[int, str], aggregation: str = "mean", top_k: int = 1) -> dict:
    """Labels with probabilities for one text from its windows' logits.

    ``mean``: average the windows' logits; ``max``: the window whose top class is most confident."""
    stack = np.stack(window_logits)
    if aggregation == "mean":
        logits = stack.mean(0)
    elif aggregation == "max":
        logits = stack[softmax(stack).max(-1).argmax()]
    else:
        raise ValueError("aggregation must be mean or max")
    probs = softmax(logits)
    order = np.argsort(-probs)[:top_k]
    return {"label": id2label.get(int(order[0]), str(order[0])), "score": float(probs[order[0]]),
            "scores": [{"label": id2label.get(int(i), str(i)), "score": float(probs[i])} for i in order],
            "windows": len(window_logits)}


# -- embeddings -----------------------------------------------------------------------

def embed(window_hidden: list[np.ndarray], window_masks: list[np.ndarray], pooling: str = "mean", normalize: bool = False) -> list[float]:
    """One embedding per text: pooled per window, windows averaged by their token counts."""
    vecs, weights = [], []
    for h, m in zip(window_hidden, window_masks):
        m = m.astype(np.float64)
        if pooling == "cls":
            vecs.append(h[0].astype(np.float64))
        else:
            vecs.append((h * m[:, None]).sum(0) / max(m.sum(), 1.0))
        weights.append(m.sum())
    v = np.average(np.stack(vecs), axis=0, weights=np.asarray(weights))
    if normalize:
        v = v / max(np.linalg.norm(v), 1e-12)
    return v.astype(np.float32).tolist()


# -- token classification -------------------------------------------------------------

def entities(text: str, windows: list[Window], window_logits: list[np.ndarray], id2label: dict[int, str]) -> list[dict]:
    """Entity spans with character offsets. Tokens seen in several windows get their logits
    averaged; B-/I- tags are merged into spans of one type (``simple`` aggregation)."""
    per_token: dict[tuple[int, int], list[np.ndarray]] = {}
    for w, logits in zip(windows, window_logits):
        for j, (span, sp) in enumerate(zip(w.offsets, w.special)):
            if not sp and span[1] > span[0]:
                per_token.setdefault(tuple(span), []).append(logits[j])
    spans = sorted(per_token)
    out: list[dict] = []
    for start, end in spans:
        probs = softmax(np.mean(per_token[(start, end)], axis=0))
        k = int(probs.argmax())
        tag = id2label.get(k, str(k))
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
    return out


# -- question answering ---------------------------------------------------------------

def answer(context: str, windows: list[Window], starts: list[np.ndarray], ends: list[np.ndarray], max_answer_tokens: int = 30) -> dict:
    """The best context span across all windows (start <= end, within the context segment)."""
    best = {"score": -np.inf}
    for w, s, e in zip(windows, starts, ends):
        ctx = [i for i, sid in enumerate(w.sequence_ids) if sid == 1]
        if not ctx:
            continue
        ls, le = softmax(s[: len(w.ids)]), softmax(e[: len(w.ids)])
        top_s = sorted(ctx, key=lambda i: -ls[i])[:20]
        top_e = sorted(ctx, key=lambda i: -le[i])[:20]
        for i in top_s:
            for j in top_e:
                if i <= j < i + max_answer_tokens:
                    score = float(ls[i] * le[j])
                    if score > best["score"]:
                        best = {"score": score, "start": w.offsets[i][0], "end": w.offsets[j][1]}
    if best["score"] == -np.inf:
        return {"answer": "", "start": 0, "end": 0, "score": 0.0}
    return {"answer": context[best["start"]:best["end"]], "start": best["start"], "end": best["end"], "score": best["score"]}


# -- fill-mask ------------------------------------------------------------------------

def fill_mask(windows: list[Window], window_logits: list[np.ndarray], mask_id: int, id_to_token, top_k: int = 5) -> list[dict]:
    """Top-k tokens for each mask position (deduplicated across overlapping windows)."""
    seen: dict[tuple[int, int], list[np.ndarray]] = {}
    for w, logits in zip(windows, window_logits):
        for j, tid in enumerate(w.ids):
            if tid == mask_id:
                seen.setdefault(tuple(w.offsets[j]), []).append(logits[j])
    out = []
    for span in sorted(seen):
        probs = softmax(np.mean(seen[span], axis=0))
        order = np.argsort(-probs)[:top_k]
        out.append({"start": span[0], "end": span[1],
                    "tokens": [{"token": id_to_token(int(i)), "score": float(probs[i])} for i in order]})
    return out
