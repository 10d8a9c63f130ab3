"""``POST /v1/rerank`` (and TEI's ``/rerank``): a text-classification artifact as a cross-encoder. Which artifacts can
rerank (a 1- or 2-logit relevance head), the relevance score of a (query, document) pair's
logits, and a predictor whose answers are those scores (``run --context``'s pair encoding,
windowing and batching)."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np


def relevance_head(manifest: dict, id2label: dict | None) -> tuple[int | None, str | None]:
    """(logits, None) for an artifact that can rerank, (None, why not) otherwise.

    A cross-encoder is a sequence classifier over (query, document) pairs with one relevance
    logit (sentence-transformers' CrossEncoder, ms-marco, bge-reranker) or two (not relevant,
    relevant). The manifest does not record what the model was trained on, so a 1- or 2-logit
    text classifier is taken as one; anything else is refused, saying why."""
    task = manifest["task"]
    if task != "text-classification":
        return None, (f"it is a {task} model; reranking needs a cross-encoder: a text-classification model "
                      "trained on (query, document) pairs")
    width = len(id2label) if id2label else None
    if width is None:
        shape = next((o.get("shape") for o in manifest.get("outputs") or [] if o.get("name") == "logits"), None)
        width = shape[-1] if shape and isinstance(shape[-1], int) else None
    if width not in (1, 2):
        labels = f" ({', '.join(map(str, id2label.values()))})" if id2label else ""
        return None, (f"its head has {width} labels{labels}; a cross-encoder has one relevance logit "
                      "or two (not relevant, relevant)")
    return width, None


def relevance(logits: np.ndarray) -> float:
    """The relevance score of one (query, document) pair from its head's logits: sigmoid of
    the logit for a 1-logit head, softmax's second (relevant) class for a 2-logit head —
    the latter exactly ``run``'s probability of label 1 for the same pair."""
    from bertexport.core.tasks import softmax

    z = np.asarray(logits, dtype=np.float64)
    if z.shape[-1] == 1:
        return float(1.0 / (1.0 + np.exp(-z[0])))
    return float(softmax(z)[1])


def relevance_logit(logits: np.ndarray) -> float:
    """The pair's relevance as a log-odds (TEI's ``raw_scores``): the logit of a 1-logit head,
    relevant minus not relevant for a 2-logit head; its sigmoid is ``relevance``."""
    z = np.asarray(logits, dtype=np.float64)
    return float(z[0]) if z.shape[-1] == 1 else float(z[1] - z[0])


def reranker(predictor):
    """A copy of ``predictor`` whose answers are ``{"relevance_score": float, "logit": float}``
    (``relevance`` and ``relevance_logit``): the same pair encoding, windowing of long documents
    and batching as ``run --context``; windows of one document are combined as ``run`` does
    (``mean``: their logits averaged; ``max``: the best window's)."""
    def aggregate(text, pair, windows, post):
        stack = np.stack(windows)
        best = max(stack, key=relevance) if post.aggregation == "max" else stack.mean(0)
        return {"relevance_score": relevance(best), "logit": relevance_logit(best), "windows": len(windows)}

    r = copy.copy(predictor)
    r.task = dataclasses.replace(predictor.task, aggregate=aggregate)
    return r
