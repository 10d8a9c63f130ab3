"""Post-training pruning's masks (``students.pruning``, steps 1-3 of Kwon et al. 2022): the
MACs of a stock encoder, the Fisher information of the head / FFN-neuron / hidden gates
(gradients of the loss w.r.t. gates of ones, per batch), the search for the masks under a
MAC budget, and the greedy rearrangement that lowers the block-diagonal Fisher estimate of
what is removed."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bertexport.students.shapes import StudentShape, _top, head_size, unit_gate_gradients


# ------------------------------------------------------------------ MACs

def layer_macs(seq_len: int, hidden: int, heads: int, head_dim: int, ffn: int) -> int:
    """Multiply-accumulates of one encoder layer for one sequence of ``seq_len`` tokens."""
    inner = heads * head_dim
    projections = 4 * seq_len * hidden * inner  # Q, K, V and the output projection
    attention = 2 * seq_len * seq_len * inner  # scores and context
    return projections + attention + 2 * seq_len * hidden * ffn


def model_macs(shape: StudentShape, head_dim: int, seq_len: int) -> int:
    """MACs of the encoder layers of a stock model of ``shape``."""
    return shape.layers * layer_macs(seq_len, shape.hidden, shape.heads, head_dim, shape.ffn)


# ------------------------------------------------------------------ Fisher information

@dataclass
class MaskGradients:
    """Per-batch gradients of the loss w.r.t. the gates: heads (B, L, H), ffn (B, L, F),
    hidden (B, hidden). The empirical Fisher is the sum of squares over batches."""

    heads: np.ndarray
    ffn: np.ndarray
    hidden: np.ndarray

    def fisher(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return tuple((g.astype(np.float64) ** 2).sum(0) for g in (self.heads, self.ffn, self.hidden))


def mask_gradients(model, batches, labels: list[np.ndarray]) -> MaskGradients:
    """Gradients of the cross-entropy against ``labels`` (one array per batch) w.r.t.
    head, FFN-neuron and hidden-dimension gates of ones, one row per batch."""
    import torch
    import torch.nn.functional as F

    def loss_of(i, pair):
        b, y = pair
        return F.cross_entropy(model(**b["inputs"]).logits, torch.as_tensor(y, dtype=torch.long))

    rows = ([], [], [])
    for grads in unit_gate_gradients(model, zip(batches, labels, strict=True), loss_of):
        for r, g in zip(rows, grads):
            r.append(g.detach().numpy().copy())
    return MaskGradients(*(np.stack(r) for r in rows))


# ------------------------------------------------------------------ search and rearrangement

def rearrange(grads: np.ndarray, keep: list[int], max_swaps: int | None = None) -> list[int]:
    """Kwon et al.'s mask rearrangement within one layer: ``grads`` (batches, units) give
    the block's empirical Fisher F = G^T G; starting from ``keep``, swap the (removed,
    kept) pair that lowers the removed set's estimated loss z^T F z most, while any does."""
    g = np.asarray(grads, dtype=np.float64)
    n = g.shape[1]
    z = np.ones(n)
    z[list(keep)] = 0.0
    if z.sum() == 0 or z.sum() == n:
        return sorted(keep)
    fisher = g.T @ g
    diag = np.diag(fisher)
    for _ in range(max_swaps if max_swaps is not None else n):
        fz = fisher @ z
        pruned, kept = np.flatnonzero(z == 1), np.flatnonzero(z == 0)
        delta = (diag[pruned][:, None] + diag[kept][None, :] - 2 * fz[pruned][:, None] + 2 * fz[kept][None, :]
                 - 2 * fisher[np.ix_(pruned, kept)])
        i, j = np.unravel_index(np.argmin(delta), delta.shape)
        if delta[i, j] >= -1e-12 * max(float(z @ fz), 1e-30):
            break
        z[pruned[i]], z[kept[j]] = 0.0, 1.0
    return sorted(int(i) for i in np.flatnonzero(z == 0))


@dataclass
class Masks:
    """What a pruned model keeps, in the teacher's numbering."""

    heads: list[list[int]]
    ffn: list[list[int]]
    hidden: list[int]
    estimate: float  # half the Fisher of what is removed (diagonal), before rearrangement

    @property
    def shape(self) -> StudentShape:
        return StudentShape(len(self.heads), len(self.hidden), len(self.heads[0]), len(self.ffn[0]))


def search_masks(grads: MaskGradients, teacher: StudentShape, seq_len: int, mac_budget: float) -> list[Masks]:
    """Candidates within ``mac_budget`` x the teacher's MACs, best Fisher estimate first:
    for every head count per layer, the most FFN neurons per layer that fit."""
    hs = head_size(teacher)
    f_heads, f_ffn, f_hidden = grads.fisher()
    limit = mac_budget * model_macs(teacher, hs, seq_len)
    out = []
    for heads in range(teacher.heads, 0, -1):
        hidden = heads * hs
        fixed = layer_macs(seq_len, hidden, heads, hs, 0) * teacher.layers
        per_neuron = 2 * seq_len * hidden * teacher.layers
        ffn = min(teacher.ffn, int((limit - fixed) // per_neuron))
        if ffn < 1:
            continue
        kept_heads = [_top(s, heads) for s in f_heads]
        kept_ffn = [_top(s, ffn) for s in f_ffn]
        kept_hidden = _top(f_hidden, hidden)
        removed = (sum(f_heads[i].sum() - f_heads[i][k].sum() for i, k in enumerate(kept_heads))
                   + sum(f_ffn[i].sum() - f_ffn[i][k].sum() for i, k in enumerate(kept_ffn))
                   + f_hidden.sum() - f_hidden[kept_hidden].sum())
        out.append(Masks(kept_heads, kept_ffn, kept_hidden, float(removed) / 2))
    return sorted(out, key=lambda m: m.estimate)


def rearranged(masks: Masks, grads: MaskGradients) -> Masks:
    """``masks`` after per-layer rearrangement (heads, FFN neurons) and of the hidden set."""
    heads = [rearrange(grads.heads[:, i], k) for i, k in enumerate(masks.heads)]
    ffn = [rearrange(grads.ffn[:, i], k) for i, k in enumerate(masks.ffn)]
    hidden = rearrange(grads.hidden, masks.hidden)
    return Masks(heads, ffn, hidden, masks.estimate)
