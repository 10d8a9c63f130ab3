"""Post-training pruning's masks (bertexport/students/prune_masks.py): MACs, the mask search
under a budget, the rearrangement; on synthetic gradients."""

from __future__ import annotations

import numpy as np
import pytest

from bertexport.students import prune_masks as M
from bertexport.students.shapes import StudentShape, _top


def test_layer_macs_by_hand():
    # seq 10, hidden 8, 2 heads of 4, FFN 16: Q,K,V,O 4*10*8*8 + scores/context 2*10*10*8 + FFN 2*10*8*16
    assert M.layer_macs(10, 8, 2, 4, 16) == 2560 + 1600 + 2560
    assert M.model_macs(StudentShape(3, 8, 2, 16), 4, 10) == 3 * 6720


def _synthetic_grads(seed=0, batches=12, layers=2, heads=4, hs=8, ffn=40):
    rng = np.random.default_rng(seed)
    return M.MaskGradients(rng.normal(size=(batches, layers, heads)) * rng.uniform(0.1, 2, size=(1, layers, heads)),
                           rng.normal(size=(batches, layers, ffn)) * rng.uniform(0.1, 2, size=(1, layers, ffn)),
                           rng.normal(size=(batches, heads * hs))), StudentShape(layers, heads * hs, heads, ffn)


@pytest.mark.parametrize("budget", [0.9, 0.75, 0.5, 0.3])
def test_search_keeps_every_candidate_within_the_budget_and_stock(budget):
    grads, teacher = _synthetic_grads()
    hs, seq = 8, 16
    found = M.search_masks(grads, teacher, seq, budget)
    assert found, "a candidate must fit"
    assert [m.estimate for m in found] == sorted(m.estimate for m in found)
    limit = budget * M.model_macs(teacher, hs, seq)
    for m in found:
        shape = m.shape
        assert M.model_macs(shape, hs, seq) <= limit
        assert len({len(h) for h in m.heads}) == 1 and len({len(f) for f in m.ffn}) == 1  # uniform per layer
        assert shape.hidden == shape.heads * hs and len(set(m.hidden)) == shape.hidden
        # the largest FFN that fits: one more neuron per layer would not (or the teacher's FFN is kept)
        bigger = StudentShape(shape.layers, shape.hidden, shape.heads, shape.ffn + 1)
        assert shape.ffn == teacher.ffn or M.model_macs(bigger, hs, seq) > limit
    f_heads, f_ffn, _ = grads.fisher()
    full = next((m for m in found if m.shape.heads == teacher.heads), None)
    if full is not None:  # each layer keeps its highest-Fisher neurons
        for i, kept in enumerate(full.ffn):
            dropped = sorted(set(range(teacher.ffn)) - set(kept))
            assert not dropped or f_ffn[i][dropped].max() <= f_ffn[i][kept].min()


def test_search_finds_nothing_below_the_smallest_model():
    grads, teacher = _synthetic_grads()
    assert M.search_masks(grads, teacher, 16, 0.001) == []


def test_rearrangement_lowers_the_block_fisher_estimate():
    rng = np.random.default_rng(3)
    base = rng.normal(size=(40, 1))
    # units 0-3 share one gradient direction (removing them together costs more than the
    # diagonal says), units 4-9 are independent and a little smaller each
    g = np.concatenate([base + 0.05 * rng.normal(size=(40, 4)), 0.8 * rng.normal(size=(40, 6))], axis=1)
    fisher = g.T @ g

    def cost(keep):
        z = np.ones(g.shape[1])
        z[keep] = 0
        return z @ fisher @ z

    diagonal = _top(np.diag(fisher), 5)
    better = M.rearrange(g, diagonal)
    assert len(better) == 5 and cost(better) < cost(diagonal)
    assert M.rearrange(g, better) == better  # a fixed point: no swap lowers it further
    assert M.rearrange(g, list(range(10))) == list(range(10))
