"""The teacher's intermediate states computed once (``students.teacher_intermediates``): the
losses read from the cache equal those of a teacher run on the fly; a second run maps the arrays;
too large a cache, or an interrupted pass, leaves the teacher computed on the fly and no file."""

from __future__ import annotations

import numpy as np
import pytest

from bertexport.core.progress import Reporter
from bertexport.students.distill_config import DistillConfig
from bertexport.students.training_data import length_batches
from tests.test_distill import _teacher, _texts


def _inter(teacher, narrow: bool):
    from bertexport.students.losses import _Intermediate
    from bertexport.students.shapes import StudentShape, make_student, shrink

    student = make_student(teacher, StudentShape(1, 16, 1, 32), [1], None) if narrow else shrink(teacher, [1])
    cfg = DistillConfig(layers=1, alpha_hidden=1.0, alpha_attention=1.0)
    return student, _Intermediate(teacher, student, [1], cfg)


@pytest.mark.parametrize("narrow", [False, True], ids=["equal-width", "narrow-projection"])
def test_cached_losses_equal_the_teacher_run_on_the_fly(keyword_model, narrow, tmp_path):
    import torch

    teacher, tok = _teacher(keyword_model)
    texts, labels = _texts(40, seed=5)
    batches = length_batches(tok, texts, labels, 8, 32, 0)
    student, inter = _inter(teacher, narrow)
    assert inter.keys() == [("h", 0), ("h", 2), ("qkv", 1)]
    torch.manual_seed(0)
    student.train()

    def losses(index):
        b = batches[index]
        out = student(**b["inputs"], **inter.student_kwargs())
        return {k: float(v) for k, v in inter.parts(out, b["inputs"], index).items()}

    torch.manual_seed(1)
    live = [losses(i) for i in range(len(batches))]  # no cache yet: the teacher runs per batch
    record = inter.cache_teacher(batches, tmp_path, "x-", Reporter().log)
    assert record["cached"] and record["tensors"] == ["h0", "h2", "qkv1"] and record["bytes_written"] > 0
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["x-inter-h0.npy", "x-inter-h2.npy", "x-inter-qkv1.npy"]
    # every token of every batch, in float16; the Q/K/V array holds the three projections
    tokens = sum(b["inputs"]["input_ids"].numel() for b in batches)
    assert np.load(tmp_path / "x-inter-qkv1.npy", mmap_mode="r").shape == (3, tokens, 32)
    assert np.load(tmp_path / "x-inter-h2.npy", mmap_mode="r").dtype == np.float16
    torch.manual_seed(1)
    cached = [losses(i) for i in range(len(batches))]
    for a, b in zip(live, cached):
        assert a.keys() == b.keys() == {"hidden", "attention"}
        for k in a:
            assert b[k] == pytest.approx(a[k], rel=2e-3, abs=1e-5)

    _, again = _inter(teacher, narrow)  # a second student on the same batches: the arrays are mapped, not computed
    record = again.cache_teacher(batches, tmp_path, "x-", Reporter().log)
    assert record["cached"] and record["bytes_written"] == 0
    inter.close()
    again.close()


def test_training_reads_the_cache_and_reports_it(keyword_model, tmp_path):
    from bertexport.students.shapes import shrink
    from bertexport.students.training import train_student

    teacher, tok = _teacher(keyword_model)
    texts, labels = _texts(120, seed=5)
    cfg = DistillConfig(layers=1, epochs=2, batch_size=16, lr=2e-3, seed=0, augment=0, alpha_hidden=1.0)
    _, r = train_student(teacher, shrink(teacher, [1]), tok, texts, labels, "text-classification", cfg, tmp_path / "w")
    states = r["intermediate"]["teacher_states"]
    assert states["cached"] and states["tensors"] == ["h0", "h2", "qkv1"]
    assert {p.name for p in (tmp_path / "w").glob("*inter-*.npy")} == {"inter-h0.npy", "inter-h2.npy", "inter-qkv1.npy"}
    assert r["loss_parts"]["hidden"]["steps"] == r["steps"] > 0


def test_one_teacher_pass_gives_the_outputs_and_the_states(keyword_model, tmp_path, monkeypatch):
    """The teacher runs once over the training batches (its outputs saved from the pass that
    caches its states) and once over the held-out ones; its outputs equal those of a pass of
    their own (a run whose states are not cached)."""
    import math

    from bertexport.students import teacher_intermediates
    from bertexport.students.shapes import shrink
    from bertexport.students.training import train_student

    teacher, tok = _teacher(keyword_model)
    texts, labels = _texts(120, seed=5)
    cfg = DistillConfig(layers=1, epochs=2, batch_size=16, lr=2e-3, seed=0, augment=0, alpha_hidden=1.0)
    calls = []
    hook = teacher.register_forward_hook(lambda *a: calls.append(1))
    try:
        _, r = train_student(teacher, shrink(teacher, [1]), tok, texts, labels, "text-classification", cfg, tmp_path / "one")
    finally:
        hook.remove()
    assert r["intermediate"]["teacher_states"]["with_outputs"]
    train_batches, eval_batches = r["steps"] // 2, math.ceil(r["data"]["eval_texts"] / 16)
    assert len(calls) == train_batches + eval_batches

    monkeypatch.setattr(teacher_intermediates, "MAX_BYTES", 1000)  # states not cached: the outputs' own pass
    _, r2 = train_student(teacher, shrink(teacher, [1]), tok, texts, labels, "text-classification", cfg, tmp_path / "two")
    assert not r2["intermediate"]["teacher_states"]["cached"]
    one, two = np.load(tmp_path / "one" / "teacher-train.npz"), np.load(tmp_path / "two" / "teacher-train.npz")
    assert sorted(one.files) == sorted(two.files) and len(one.files) == train_batches
    for k in one.files:
        np.testing.assert_allclose(one[k], two[k], rtol=1e-5, atol=1e-6)


def test_too_large_a_cache_runs_the_teacher_per_step(keyword_model, tmp_path, monkeypatch):
    from bertexport.students import teacher_intermediates
    from bertexport.students.shapes import shrink
    from bertexport.students.training import train_student

    monkeypatch.setattr(teacher_intermediates, "MAX_BYTES", 1000)
    teacher, tok = _teacher(keyword_model)
    texts, labels = _texts(60, seed=5)
    cfg = DistillConfig(layers=1, epochs=1, batch_size=16, lr=2e-3, seed=0, augment=0)
    _, r = train_student(teacher, shrink(teacher, [1]), tok, texts, labels, "text-classification", cfg, tmp_path / "w")
    states = r["intermediate"]["teacher_states"]
    assert not states["cached"] and "GiB of teacher states >" in states["why"]
    assert r["loss_parts"]["attention"]["steps"] == r["steps"] and not list((tmp_path / "w").glob("*inter-*"))


def test_an_interrupted_pass_leaves_no_array(keyword_model, tmp_path):
    from bertexport.students.teacher_intermediates import TeacherIntermediates, remove_cached

    _, tok = _teacher(keyword_model)
    texts, labels = _texts(40, seed=5)
    batches = length_batches(tok, texts, labels, 8, 32, 0)
    store = TeacherIntermediates(tmp_path, "", batches)

    def compute(missing):
        b = batches[0]["inputs"]["input_ids"].shape
        yield {k: np.zeros((*b, 4), np.float32) for k in missing}
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        store.load_or_compute([("h", 0)], 4, compute)
    assert not list(tmp_path.iterdir())

    def beyond(missing):  # a value float16 cannot hold: nothing cached, and said why
        for b in batches:
            yield {k: np.full((*b["inputs"]["input_ids"].shape, 4), 7e4, np.float32) for k in missing}

    assert "beyond float16" in store.load_or_compute([("h", 0)], 4, beyond) and not list(tmp_path.iterdir())

    def ones(missing):
        for b in batches:
            yield {k: np.ones((*b["inputs"]["input_ids"].shape, 4), np.float32) for k in missing}

    assert store.load_or_compute([("h", 0)], 4, ones) is None
    assert remove_cached(tmp_path) > 0 and not list(tmp_path.iterdir())

