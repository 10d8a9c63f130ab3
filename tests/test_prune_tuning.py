"""Post-training pruning's least-squares mask tuning (bertexport/students/prune_tuning.py) on
the tiny trained keyword classifier; whether ``prune_model`` keeps the tuning is tested in
test_pruning.py."""

from __future__ import annotations

import pytest
import torch
import transformers as T

from bertexport.students.prune_tuning import sublayer_errors, tune_masks
from bertexport.students.pruning import _batches, prune_model
from tests.tinymodels import keyword_texts, load_classifier

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_least_squares_tuning_lowers_the_reconstruction_error(keyword_model):
    teacher = load_classifier(keyword_model)
    tok = T.AutoTokenizer.from_pretrained(keyword_model)
    texts = keyword_texts(11, 600)
    untuned, r0 = prune_model(teacher, tok, texts, mac_budget=0.75, tune=False)
    tuned, r1 = prune_model(teacher, tok, texts, mac_budget=0.75, tune=True)
    assert (r0.heads, r0.ffn, r0.hidden) == (r1.heads, r1.ffn, r1.hidden)  # the same masks, only rescaled
    assert r1.tuned and not r0.tuned and r1.calibration_kl < r1.calibration_kl_untuned == r0.calibration_kl
    fitted = [f"{t['layer']}.{t['sublayer']}" for t in r1.tuning if t.get("tuned")]
    assert fitted, "least squares must have rescaled at least one sublayer"
    for t in r1.tuning:
        if t.get("tuned"):  # on the calibration texts it was fitted on
            assert t["error_after"] < t["error_before"]
    held = _batches(tok, keyword_texts(77, 200), 32, 128)  # texts neither run saw
    before = sublayer_errors(untuned, teacher, held, r0.hidden)
    after = sublayer_errors(tuned, teacher, held, r1.hidden)
    for key in fitted:  # measured on these held-out texts: 0.ffn 25943 -> 2073, 1.attention 1046 -> 503, 1.ffn 16746 -> 875
        assert after[key] < 0.8 * before[key], (key, before, after)
    assert sum(after.values()) < sum(before.values())


def test_tuning_keeps_every_scale_within_its_bound(keyword_model):
    teacher = load_classifier(keyword_model)
    tok = T.AutoTokenizer.from_pretrained(keyword_model)
    texts = keyword_texts(11, 300)
    pruned, r = prune_model(teacher, tok, texts, mac_budget=0.75, tune=False)
    batches = _batches(tok, texts, 32, 128)
    before = {k: v.clone() for k, v in pruned.state_dict().items()}
    report = tune_masks(pruned, teacher, batches, r.hidden, bound=1.5)
    assert any(t["tuned"] for t in report)
    for t in report:
        assert -1.5 <= t["scale_min"] <= t["scale_max"] <= 1.5
        assert t["error_after"] < t["error_before"] if t["tuned"] else t["error_after"] == t["error_before"]
    changed = {k for k, v in pruned.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.endswith("output.dense.weight") for k in changed)  # only the output projections' columns
