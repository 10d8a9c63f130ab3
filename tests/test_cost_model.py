"""The student cost model: shapes measured at random init with the real recipe are cached
(a rerun measures nothing), unmeasured shapes are predicted from the measured ones, and
every figure says whether it was measured or predicted. Prediction tests use an injected
clock (tests never time); one test builds and times real tiny models, asserting only
what was cached, never how fast."""

from __future__ import annotations

import json

import pytest

from bertexport.search.candidates import Candidate
from bertexport.search.cost_model import CostModel, linear_macs
from bertexport.students.shapes import StudentShape

TEACHER = StudentShape(6, 384, 12, 1536)
ORT = Candidate("ort-int8-avx2", "onnxruntime", "int8", [{"type": "ort-dynamic-quantize", "isa": "avx2", "per_channel": True}], {})
SKIP = Candidate("ort-int8-avx2+skip", "onnxruntime", "int8", [{"type": "first-token-skip"}] + ORT.passes, {})


class _Config(dict):
    def to_json_string(self):
        return json.dumps(self)


def _model(recipe=ORT, timer=None, **kw):
    return CostModel(_Config(model_type="bert", num_hidden_layers=6, hidden_size=384), TEACHER, recipe=recipe, reference=ORT,
                     task="text-classification", tokenizer_dir=None, feeds=None, batch=kw.pop("batch", 1),
                     sequence=kw.pop("sequence", 128), threads=2, timer=timer, **kw)


def _linear_clock(calls: list):
    """Seconds as a linear function of the linear-layer MACs plus a per-layer cost: what a
    CPU roughly does, and what the least-squares fit must recover."""
    def timer(builds):
        calls.append(sorted(builds))
        out = {}
        for name, (shape, cand) in builds.items():
            skip = any(p["type"] == "first-token-skip" for p in cand.passes)
            out[name] = 1e-4 + 2e-13 * linear_macs(shape, 1, 128, skip) + 3e-5 * shape.layers
        return out
    return timer


def test_macs_count_the_linear_layers_and_the_first_token_skip():
    s = StudentShape(3, 256, 8, 1024)
    per_token = 4 * 256 * 256 + 2 * 256 * 1024
    assert linear_macs(s, 2, 64) == 3 * per_token * 128
    skipped = linear_macs(s, 2, 64, skip_last=True)
    assert skipped == 2 * per_token * 128 + 3 * 256 * 256 * 128 + (256 * 256 + 2 * 256 * 1024) * 2
    assert skipped < linear_macs(s, 2, 64)


def test_measured_ratios_are_cached_and_a_rerun_measures_nothing():
    calls: list = []
    shapes = [StudentShape(3, 256, 8, 1024), StudentShape(2, 384, 12, 768)]
    first = _model(timer=_linear_clock(calls))
    ratios = first.measure(shapes)
    assert calls == [sorted(["teacher", *(s.name for s in shapes)])]  # one interleaved run, the teacher's shape in it
    assert first.measured_now == [s.name for s in shapes]
    again = _model(timer=_linear_clock(calls))
    assert again.measure(shapes) == ratios and len(calls) == 1 and again.measured_now == []
    # another cell, thread count or recipe is another measurement
    assert _model(timer=_linear_clock(calls), batch=8).cached(shapes[0]) is None
    assert _model(recipe=SKIP, timer=_linear_clock(calls)).cached(shapes[0]) is None
    cost = again.predict(shapes[0])
    assert cost.source == "measured" and cost.ratio == pytest.approx(ratios[shapes[0].name])


def test_prediction_orders_shapes_and_says_what_was_measured():
    calls: list = []
    grid = [StudentShape(2, 192, 6, 384), StudentShape(2, 256, 8, 768), StudentShape(3, 256, 8, 768),
            StudentShape(3, 384, 12, 768), StudentShape(3, 384, 12, 1536), StudentShape(4, 384, 12, 1536)]
    model = _model(recipe=SKIP, timer=_linear_clock(calls))
    costs, fit = model.costs(grid)
    measured = {n for n, c in costs.items() if c.source == "measured"}
    assert measured == {s.name for s in model.anchors(grid)} and 0 < len(measured) < len(grid)
    assert fit["model"] == "a + b*macs + c*layers" and fit["points"] == len(measured) == 3
    # the clock is linear in MACs and layers: the fit recovers it for the shapes it never measured
    clock = _linear_clock([])
    truth = {s.name: clock({"s": (s, SKIP)})["s"] / clock({"t": (TEACHER, ORT)})["t"] for s in grid}
    for name, c in costs.items():
        assert c.ratio == pytest.approx(truth[name], rel=1e-6)
    # narrower or shallower is predicted faster
    r = {n: c.ratio for n, c in costs.items()}
    assert r["L2-H192-A6-F384"] < r["L2-H256-A8-F768"] < r["L3-H256-A8-F768"] < r["L3-H384-A12-F768"]
    assert r["L3-H384-A12-F768"] < r["L3-H384-A12-F1536"] < r["L4-H384-A12-F1536"] < 1.0


def test_with_fewer_than_two_points_the_macs_ratio_decides():
    model = _model(timer=_linear_clock([]), batch=4)  # a cell no other test measured
    shapes = [StudentShape(3, 384, 12, 1536), StudentShape(3, 256, 8, 1024)]
    fit = model.fit(shapes)  # nothing measured: only the teacher's own point
    assert fit["model"] == "macs ratio" and fit["coef"] is None
    c = model.predict(shapes[0], fit)
    assert c.source == "predicted" and c.ratio == pytest.approx(0.5)  # half the layers, same width
    assert model.predict(shapes[1], fit).ratio < c.ratio


def test_real_random_init_shapes_are_built_timed_and_cached(keyword_model, monkeypatch):
    """Tiny random-init students built with ONNX Runtime int8 and timed interleaved with the
    teacher's shape; the ratio is cached so a second model serves it without building."""
    from transformers import AutoConfig

    from bertexport.judging.compare import fixed_cell_feeds
    from bertexport.shipping.runtime import TextEncoder
    from bertexport.core.textdata import builtin_samples

    config = AutoConfig.from_pretrained(keyword_model)
    encoder = TextEncoder.from_folder(keyword_model, ["input_ids", "attention_mask", "token_type_ids"], 128)
    feeds = fixed_cell_feeds(encoder.encode, builtin_samples(), 1, 32)
    teacher = StudentShape(2, 32, 2, 64)
    shape = StudentShape(1, 16, 1, 32)

    def model():
        return CostModel(config, teacher, recipe=ORT, reference=ORT, task="text-classification", tokenizer_dir=keyword_model,
                         feeds=feeds, batch=1, sequence=32, threads=1, runs=5)

    first = model()
    ratios = first.measure([shape])
    assert first.measured_now == [shape.name] and ratios[shape.name] > 0
    record = first.cached(shape)
    assert record["runs"] == 5 and record["ms"] > 0 and record["teacher_ms"] > 0
    assert record["key"]["shape"] == shape.name and record["key"]["machine"]["features"] is not None
    monkeypatch.setattr(CostModel, "_time_builds", lambda self, builds: pytest.fail("re-measured a cached shape"))
    again = model()
    assert again.measure([shape]) == ratios and again.predict(shape).source == "measured"
