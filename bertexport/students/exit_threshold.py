"""Early exit's threshold and latency (``students.early_exit``): the runtime's exit rule
simulated on cached exit logits, the smallest threshold that keeps the agreement asked for
with the full model on held-out rows, every exit's logits through an artifact's compiled
segments, and per-row latency at the threshold and with no row exiting (the worst case)."""

from __future__ import annotations

import numpy as np

RULE = "a row leaves at the first exit whose highest class probability is above the threshold (1.0: never; 0.0: always the first exit)"


def simulate(exit_logits: list[np.ndarray], final_logits: np.ndarray, exit_layers: list[int], layers: int,
             threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Each row's decision and the layer count it ran at ``threshold`` (the runtime's rule)."""
    from bertexport.shipping.runtime import _softmax_max

    decision = final_logits.argmax(-1).copy()
    ran = np.full(len(final_logits), layers)
    open_rows = np.ones(len(final_logits), bool)
    for scores, layer in zip(exit_logits, exit_layers):
        leave = open_rows & (_softmax_max(scores) > threshold)
        decision[leave] = scores[leave].argmax(-1)
        ran[leave] = layer
        open_rows &= ~leave
    return decision, ran


def choose_threshold(exit_logits: list[np.ndarray], final_logits: np.ndarray, exit_layers: list[int], layers: int,
                     agreement: float) -> dict:
    """The smallest threshold, scanning down from 1.0, before held-out agreement with the full
    model first falls below ``agreement`` (thresholds between observed exit confidences)."""
    from bertexport.shipping.runtime import _softmax_max

    full = final_logits.argmax(-1)
    confidences = np.unique(np.concatenate([_softmax_max(s) for s in exit_logits]))
    # a candidate just below each observed confidence lets exactly the rows at or above it leave
    candidates = [1.0] + sorted({float(np.nextafter(c, -np.inf)) for c in confidences if c <= 1.0}, reverse=True)
    curve, chosen = [], 1.0
    for t in candidates:
        decision, ran = simulate(exit_logits, final_logits, exit_layers, layers, max(t, 0.0))
        agree = float((decision == full).mean())
        curve.append({"threshold": max(t, 0.0), "agreement": agree, "mean_layers": float(ran.mean())})
        if agree < agreement:
            break
        chosen = max(t, 0.0)
    decision, ran = simulate(exit_logits, final_logits, exit_layers, layers, chosen)
    return {"threshold": chosen, "agreement": float((decision == full).mean()), "mean_layers": float(ran.mean()),
            "exits": {str(layer): int((ran == layer).sum()) for layer in [*exit_layers, layers]},
            "rows": int(len(full)), "curve": curve[:: max(1, len(curve) // 50)]}


def runner_outputs(runner, encode, texts: list[str], batch: int = 16):
    """Every exit's logits and the final logits of ``texts`` through the artifact's segments."""
    exits: list[list] = []
    finals = []
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    for s in range(0, len(order), batch):
        idx = order[s:s + batch]
        e, f = runner.every_exit(encode([texts[i] for i in idx]))
        exits.append(e)
        finals.append(f)
    back = np.argsort(np.concatenate([order[s:s + batch] for s in range(0, len(order), batch)]))
    return [np.concatenate([e[j] for e in exits])[back] for j in range(len(exits[0]))], np.concatenate(finals)[back]


def row_latency(runner, encode, texts: list[str], threshold: float, runs: int) -> dict:
    """Per-row latency (batch 1, each row at its own length) at ``threshold`` and with no row
    exiting (the worst case), interleaved (``judging.latency``), over ``texts``."""
    from bertexport.judging.latency import Latency, time_interleaved

    at, worst = [], []
    for text in texts:
        feeds = encode([text])
        timed = time_interleaved({"threshold": lambda: runner.infer(feeds, threshold), "no-exit": lambda: runner.infer(feeds, 1.0)},
                                 runs=runs, warmup=1)
        at.append(timed["threshold"].p50)
        worst.append(timed["no-exit"].p50)
    a, w = Latency.from_values(at), Latency.from_values(worst)
    keep = ("mean", "p50", "p90", "max")
    return {"rows": len(texts), "batch": 1, "runs_per_row": runs, "unit": "s",
            "at_threshold": {k: getattr(a, k) for k in keep}, "no_exit": {k: getattr(w, k) for k in keep},
            "mean_ratio": w.mean / a.mean if a.mean > 0 else None}
