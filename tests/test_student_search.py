"""``optimize`` searching students: the grid, shapes checked before any work, shapes ordered
by the cost model's prediction, hopeless shapes never trained, a passing student returned,
the best recipe on the original returned when no student passes, and a rerun served from
the caches. Latency comes from an injected clock (tests never time): a linear function of
the linear layers' MACs, which the cost model's fit recovers."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from bertexport.search.candidates import Candidate
from bertexport.cli import cli
from bertexport.judging.gates import Gates
from bertexport.search.cost_model import linear_macs
from bertexport.core.errors import UserError
from bertexport.students.shapes import StudentShape, check_shape
from tests.searchclock import inject_search_clock
from tests.tinymodels import write_keyword_jsonl

TEACHER = StudentShape(2, 32, 2, 64)  # tests/tinymodels.py's keyword classifier


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    # 500 rows: the held-out slice must resolve the gate
    return write_keyword_jsonl(tmp_path_factory.mktemp("data") / "kw.jsonl", 11)


def test_grid_is_small_checked_and_narrower_than_the_teacher():
    from bertexport.search.student_shapes import GRID_MAX, student_grid

    minilm = StudentShape(6, 384, 12, 1536)
    grid = student_grid(minilm, "bert")
    assert 6 <= len(grid) <= GRID_MAX + 3 and len(set(grid)) == len(grid)
    assert {s.layers for s in grid} == {3, 2, 1}  # half and a third of the depth, and one layer
    assert {(s.hidden, s.ffn) for s in grid if s.layers == 1} == {(384, 1536), (384, 768), (384, 384)}  # full width only
    assert len([s for s in grid if s.layers > 1]) == GRID_MAX  # the cap is the other depths'
    assert {s.hidden for s in grid} >= {384, 256, 192} and all(s.hidden % 32 == 0 for s in grid)  # whole heads
    assert {s.ffn for s in grid} >= {1536, 768, 384}
    for s in grid:
        check_shape(s, minilm, "bert")
        assert s.ffn / s.hidden <= minilm.ffn / minilm.hidden
    # a family that cannot be width-pruned gets layer-drop students only
    assert {(s.hidden, s.ffn) for s in student_grid(minilm, "mpnet")} == {(384, 1536)}
    # where one layer is already a depth (a 2- or 3-layer teacher), its narrower widths stay in the grid
    assert {s.hidden for s in student_grid(StudentShape(3, 384, 12, 1536), "bert") if s.layers == 1} == {384, 256, 192}


def test_a_shape_a_larger_one_costs_as_much_as_is_outsized():
    from bertexport.search.student_shapes import SAME_COST, init_shape, outsized

    l1 = {f: StudentShape(1, 384, 12, f) for f in (384, 768, 1536)}
    l2 = StudentShape(2, 384, 12, 384)
    # first-token skipping: a 1-layer student's FFN runs on one token, its widths cost the same
    ratio = {l1[384].name: 0.100, l1[768].name: 0.101, l1[1536].name: 0.102, l2.name: 0.30}
    assert outsized([*l1.values(), l2], ratio) == {l1[384]: l1[1536], l1[768]: l1[1536]}
    # without it the widths cost what their MACs do: each is a speed of its own
    ratio |= {l1[768].name: 0.13, l1[1536].name: 0.19}
    assert outsized([*l1.values(), l2], ratio) == {}
    assert outsized([l1[384], l1[768]], {l1[384].name: 0.1, l1[768].name: 0.1 * (1 + SAME_COST) + 1e-6}) == {}
    # a pre-trained checkpoint's weights come from elsewhere: never outsized, never outsizing

    class _Init:
        name, path = "init:x", "x"
        shape = l1[384]
    small_init = init_shape(_Init(), True)
    assert outsized([small_init, l1[1536]], {small_init.name: 0.1, l1[1536].name: 0.1}) == {}


def test_distill_option_is_checked_before_any_work(keyword_model, tmp_path):
    from bertexport.building.checkpoint import resolve_checkpoint
    from bertexport.search.student_shapes import plan_students

    ckpt = resolve_checkpoint(str(keyword_model), None)
    assert [s.name for s in plan_students("1", ckpt)] == ["L1-H32-A2-F64"]  # layer drop at full width
    assert [s.name for s in plan_students("L1-H16-F32,L1", ckpt)] == ["L1-H16-A1-F32", "L1-H32-A2-F64"]
    assert len(plan_students("auto", ckpt)) >= 3 and plan_students(None, ckpt) == []
    for bad, says in (("L1-H20", "head size"), ("L3", "larger than the teacher"), ("L2", "own shape"),
                      ("auto,L1", "cannot be combined"), ("0", ">= 1"), ("L1-X", "not like")):
        with pytest.raises(UserError, match=says):
            plan_students(bad, ckpt)
    r = CliRunner().invoke(cli, ["optimize", str(keyword_model), "--distill", "L1-H24", "-o", str(tmp_path / "o")])
    assert r.exit_code == 2 and "head size" in r.stderr and "Traceback" not in r.output and not (tmp_path / "o").exists()


def _shape_of(name: str) -> StudentShape:
    m = re.match(r"L(\d+)-H(\d+)-A(\d+)-F(\d+)", name)
    return StudentShape(*map(int, m.groups()))


def _clock_ms(shape: StudentShape, skip: bool) -> float:
    """Milliseconds of a shape on the injected clock (the teacher's shape unskipped: 1.0)."""
    return 0.2 + 0.8 * linear_macs(shape, 1, 128, skip) / linear_macs(TEACHER, 1, 128)


class _Ckpt:
    """What StudentSearch reads of the teacher's checkpoint: a MiniLM-shaped BERT classifier."""

    task, family, sha256, trust_remote_code = "text-classification", "bert", "sha", False
    config = {"model_type": "bert", "num_hidden_layers": 6, "hidden_size": 384, "num_attention_heads": 12,
              "intermediate_size": 1536}


def _stub_costs_training_and_data(monkeypatch, tmp_path, ratios: dict, train) -> None:
    """StudentSearch without a model: the cost model predicts ``ratios`` (shape name -> latency
    ratio), ``train`` stands in for training, no data and nothing cached."""
    import bertexport.search.students as ss
    from bertexport.search.cost_model import Cost

    monkeypatch.setattr(ss.StudentSearch, "costs", lambda self, bases: (
        {s.name: Cost(s.name, ratios[s.name], "predicted", 0.0) for s in self.shapes}, None))
    monkeypatch.setattr(ss.StudentSearch, "train", train)
    monkeypatch.setattr(ss.StudentSearch, "data", lambda self: ([], None, "digest"))
    monkeypatch.setattr(ss.StudentSearch, "_cached_path", lambda self, shape, digest: tmp_path / "none")


def _fake_clock(monkeypatch, trained: list, costs_dir):
    """The search's clock and the cost model's timings replaced by ``_clock_ms``, the cost model's
    cache in ``costs_dir`` (the session's cache holds real timings under the same keys: read here,
    they decided the order; written from here, they would mislead later tests); ``trained``
    collects the hidden size of each student trained."""
    import bertexport.students.training as training
    from bertexport.search.cost_model import CostModel

    real_path = CostModel._path
    costs_dir.mkdir(parents=True, exist_ok=True)
    monkeypatch.setattr(CostModel, "_path", lambda self, shape: costs_dir / real_path(self, shape).name)

    def fake_ms(cand):
        if cand.student:
            return _clock_ms(_shape_of(cand.student), any(p["type"] == "first-token-skip" for p in cand.passes))
        return 2.0 if cand.precision == "fp32" else 1.0 + 0.4 * len(cand.keep_float)

    inject_search_clock(monkeypatch, fake_ms)
    monkeypatch.setattr(CostModel, "_time_builds", lambda self, builds: {
        n: _clock_ms(shape, any(p["type"] == "first-token-skip" for p in cand.passes)) / 1e3
        for n, (shape, cand) in builds.items()})
    real_train = training.train_student

    def train_student(teacher, student, *a, **k):
        trained.append(student.config.hidden_size)
        return real_train(teacher, student, *a, **k)

    monkeypatch.setattr(training, "train_student", train_student)


def test_grid_search_returns_a_passing_student_trains_no_hopeless_shape_and_reruns_from_caches(keyword_model, labelled,
                                                                                              tmp_path, monkeypatch):
    from bertexport.core.manifest import load_manifest
    from bertexport.search.optimize import optimize

    trained: list = []
    _fake_clock(monkeypatch, trained, tmp_path / "costs")
    kw = dict(budget="5m", distill="auto", distill_epochs=1, backends={"onnxruntime"}, threads=1,
              gates=Gates(max_accuracy_drop=10.0))
    res = optimize(str(keyword_model), labelled, tmp_path / "s", **kw)
    rep = res.report
    students = rep["students"]
    assert len(students) >= 3 and {s["prediction"] for s in students} == {"measured", "predicted"}
    # bisection, the shapes that keep the teacher's hidden size first: the first student trained is
    # the middle of those by predicted latency (but those a larger one is predicted as fast as: first-token
    # skipping makes a 1-layer student's FFN widths cost the same)
    outsized = [r for r in students if "predicted as fast" in r["reason"]]
    assert outsized and all(r["layers"] == 1 and r["status"] == "dominated" for r in outsized)
    full = sorted((r for r in students if r["hidden"] == TEACHER.hidden and r not in outsized),
                  key=lambda r: r["predicted_ratio"])
    assert 1 <= len(full) < len(students)
    assert students[0]["hidden"] == TEACHER.hidden
    assert students[0]["predicted_ratio"] == full[len(full) // 2]["predicted_ratio"]
    # every trained student was judged; hopeless/dominated ones were never trained
    trained_names = [s["shape"] for s in students if s["train_seconds"] is not None]
    assert [_shape_of(n).hidden for n in trained_names] == trained
    assert all(s["train_seconds"] is None for s in students if s["status"] in ("hopeless", "dominated"))
    assert len(trained_names) < len(students)  # bisection trains fewer than the grid
    passed = [s for s in students if s["status"] == "passed"]
    assert passed
    first = min(passed, key=lambda r: _clock_ms(_shape_of(r["shape"]), True))  # the fastest passing student
    assert first["measured_ms"] == pytest.approx(first["predicted_ms"])
    # every shape slower than a student build that had passed when it came up is hopeless (the cost model's
    # fit of the clock is allowed 1 %: two grid shapes can differ by 0.1 %, below what a fit promises)
    passing_ms = {}
    for c in rep["candidates"]:
        if c["candidate"]["student"] and c["status"] == "passed":
            passing_ms[c["candidate"]["student"]] = min(c["latency_ms"], passing_ms.get(c["candidate"]["student"], 1e9))
    for i, r in enumerate(students):
        before = [passing_ms[p["shape"]] for p in students[:i] if p["status"] == "passed"]
        if before and _clock_ms(_shape_of(r["shape"]), True) >= 1.01 * min(before) and r not in outsized:
            assert r["status"] == "hopeless", r
    hopeless = [c for c in rep["candidates"] if c["status"] == "hopeless"]
    assert all(c["artifact"] is None and c["predicted_ms"] is not None for c in hopeless)
    # the winner is the student, judged against the original on the held-out slice
    w = rep["winner"]
    assert w["candidate"]["student"] == first["shape"] and w["name"].startswith(first["shape"] + "/")
    assert w["confirm_metrics"]["metric_drop"] <= 10.0 and w["confirm_metrics"]["metric_reference"] > 90
    m = load_manifest(res.artifact)
    assert m["status"] == "passed" and m["search"]["winner"]["name"] == w["name"]
    md = (res.artifact / "search.md").read_text()
    assert f"| {first['shape']} | passed" in md and "(predicted)" in md
    assert all(s["curve"] and s["stopped"] == "epochs" for s in students if s["train_seconds"] is not None)
    assert f"- {first['shape']}: stopped by epochs after 1 epochs" in md  # its learning curve
    assert (res.artifact / "search.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    r = CliRunner().invoke(cli, ["run", str(res.artifact), "an excellent film", "--json", "-"])
    assert r.exit_code == 0 and json.loads(r.stdout)["label"] in ("absent", "present")
    # the teacher's intermediate states the students trained on were removed with the search; its logits stay
    from bertexport.core.cache import cache_dir

    assert list(cache_dir("students").glob("teacher-*/*teacher-train.npz"))
    assert not list(cache_dir("students").glob("teacher-*/*inter-*"))

    # a rerun: costs, the student and every build come from the caches
    again = optimize(str(keyword_model), labelled, tmp_path / "s2", **kw)
    assert trained == [_shape_of(n).hidden for n in trained_names] and again.report["cost_model"]["measured_now"] == []
    assert all(s["cached"] for s in again.report["students"] if s["train_seconds"] is not None)
    assert again.report["winner"]["name"] == w["name"]
    assert all(c["cached"] for c in again.report["candidates"] if c["artifact"])


def test_no_passing_student_returns_the_best_recipe_on_the_original(keyword_model, labelled, tmp_path, monkeypatch):
    """A forced failing student (random weights of its shape instead of trained ones) is
    judged, fails the gate against the original, and the original's recipe wins."""
    import bertexport.search.students as ss
    from bertexport.search.optimize import optimize
    from bertexport.students.shapes import random_student

    trained: list = []
    _fake_clock(monkeypatch, trained, tmp_path / "costs")

    def untrained(self, shape, seconds=None, reserve=0.0):
        import torch

        out = tmp_path / f"random-{shape.name}"
        torch.manual_seed(1)
        random_student(self.teacher_model.config, shape).save_pretrained(out, safe_serialization=True)
        self.tokenizer.save_pretrained(out)
        return out, {"train_seconds": 0.5}, False

    monkeypatch.setattr(ss.StudentSearch, "train", untrained)
    res = optimize(str(keyword_model), labelled, tmp_path / "n", budget="5m", distill="L1-H16-F32", distill_epochs=1,
                   backends={"onnxruntime"}, threads=1, gates=Gates(max_accuracy_drop=10.0))
    (student,) = res.report["students"]
    assert student["status"] == "not passed" and "failed" in student["reason"]
    judged = [c for c in res.report["candidates"] if c["candidate"]["student"] and c["status"] == "failed"]
    assert judged and all(c["metrics"]["metric_drop"] > 10.0 for c in judged)
    w = res.report["winner"]
    assert w["candidate"]["student"] is None and not w["candidate"]["student_layers"]
    assert w["name"] == min((c for c in res.report["candidates"] if c["status"] == "passed"),
                            key=lambda c: c["latency_ms"])["candidate"]["name"]


class _Search:
    """What StudentSearch reads of optimize's search, with a clock that training advances."""

    def __init__(self, trials, budget: float):
        from bertexport.core.progress import Reporter

        self.trials, self.best, self.reporter = trials, (trials or [None])[0], Reporter()
        self.gates = Gates()  # no gate that bounds agreement: students train on their patience
        self.threads, self.clock, self.budget = 1, 0.0, budget
        self.tried = []
        # the search slice students train on without --distill-data: too many texts to augment
        self.search = SimpleNamespace(data=SimpleNamespace(texts=[f"text {i}" for i in range(5000)]), labels=None)

    def remaining(self):
        return self.budget - self.clock

    def log_board(self, trial):
        pass

    def try_candidate(self, cand, path):
        from bertexport.search.session import Trial

        self.tried.append(cand.name)
        t = Trial(cand, "failed", "metric_drop 3.00 > 1.0", latency_ms=0.5)
        self.trials.append(t)
        return t


def test_shapes_are_bisected_dominated_and_hopeless_ones_untrained_and_slow_ones_skipped_by_the_budget(tmp_path,
                                                                                                    monkeypatch):
    """No model: the cost model's prediction, training and judging are stubbed (every student
    misses the gate), so what is checked is the search's own decisions: the shapes keeping the
    teacher's hidden size first, bisection within each tier, shapes dominated by a miss never
    trained, hopeless ones never trained, the budget estimate."""
    import bertexport.search.students as ss
    from bertexport.search.student_training import training_units
    from bertexport.search.session import Trial

    base = Candidate("ort-int8-avx2", "onnxruntime", "int8", [{"type": "ort-dynamic-quantize"}], {})
    original = Trial(base, "passed", "meets the gate", latency_ms=1.0)
    teacher = StudentShape(6, 384, 12, 1536)
    ratios = {"L2-H192-A6-F384": 0.2, "L4-H192-A6-F384": 0.4, "L3-H256-A8-F768": 0.45, "L3-H384-A12-F1536": 0.7,
              "L4-H384-A12-F1536": 1.1}
    small, deep_narrow, middle, wide, slow = (_shape_of(n) for n in ratios)
    shapes = [_shape_of(n) for n in reversed(ratios)]
    first_seconds = 30.0
    epoch = first_seconds * training_units(deep_narrow, teacher) / training_units(wide, teacher)
    # after the first student (the full-width one, one epoch): no room for one epoch of the deep-narrow one
    search = _Search([original], budget=first_seconds + epoch / 2)
    trained = []

    def train(self, shape, seconds=None, reserve=0.0):
        trained.append(shape.name)
        self.search.clock += first_seconds
        return tmp_path / shape.name, {"train_seconds": first_seconds, "steps": 20,  # one epoch
                                       "schedule": {"steps_per_epoch": 20}}, False

    _stub_costs_training_and_data(monkeypatch, tmp_path, ratios, train)

    records = ss.StudentSearch(search, ckpt=_Ckpt(), teacher_model=None, tokenizer=None, tok_dir=None, shapes=shapes,
                               recipes=[base]).run()
    status = {r["shape"]: r["status"] for r in records}
    # the full-width tier first, bisected over the shapes that could still win (the slow one is hopeless
    # against the original's 1.0 ms: left for last); then the narrower ones, their middle first: the
    # deep-narrow one does not fit in the time left, and the full-width one's miss rules out the shapes
    # it dominates
    assert [r["shape"] for r in records] == [wide.name, deep_narrow.name, middle.name, small.name, slow.name]
    assert trained == [wide.name]
    assert status == {slow.name: "hopeless", wide.name: "not passed", deep_narrow.name: "skipped",
                      middle.name: "dominated", small.name: "dominated"}
    reasons = {r["shape"]: r["reason"] for r in records}
    assert reasons[deep_narrow.name] == (f"1 epoch (~{epoch:.0f} s, estimated from the students trained so far) and its "
                                         f"judging do not fit in the {epoch / 2:.0f} s left")
    assert "predicted 1.10 ms >= the best passing" in reasons[slow.name]
    assert all(wide.name in reasons[n] and "missed the gate" in reasons[n] for n in (middle.name, small.name))
    assert records[0]["predicted_ms"] == pytest.approx(0.7) and records[0]["measured_ms"] == 0.5
    # the trained students were judged against the original, with the predicted latency on each trial
    assert search.tried == [c for r in records if r["shape"] in trained for c in r["candidates"]]
    judged = [t for t in search.trials if t.candidate.student]
    assert {t.status for t in judged} == {"failed", "skipped", "hopeless"}
    assert all(t.predicted_ms is not None for t in judged)


def test_an_outsized_shape_is_recorded_and_never_trained(tmp_path, monkeypatch):
    """No model: the cost model predicts a 1-layer student's narrower FFN as fast as its full one
    (first-token skipping); the narrower one is never trained, and its record says why."""
    import bertexport.search.students as ss
    from bertexport.search.session import Trial

    base = Candidate("ort-int8-avx2", "onnxruntime", "int8", [{"type": "ort-dynamic-quantize"}], {})
    ratios = {"L1-H384-A12-F384": 0.100, "L1-H384-A12-F1536": 0.102, "L2-H384-A12-F768": 0.3}
    narrow, full, deeper = (_shape_of(n) for n in ratios)
    trained = []

    def train(self, shape, seconds=None, reserve=0.0):
        trained.append(shape.name)
        self.search.clock += 10
        return tmp_path / shape.name, {"train_seconds": 10.0}, False

    _stub_costs_training_and_data(monkeypatch, tmp_path, ratios, train)
    records = ss.StudentSearch(_Search([Trial(base, "passed", "meets the gate", latency_ms=1.0)], budget=1000),
                               ckpt=_Ckpt(), teacher_model=None, tokenizer=None, tok_dir=None,
                               shapes=[narrow, full, deeper], recipes=[base]).run()
    rec = {r["shape"]: r for r in records}
    assert narrow.name not in trained and set(trained) == {full.name, deeper.name}
    assert rec[narrow.name]["status"] == "dominated" and rec[narrow.name]["train_seconds"] is None
    assert f"{full.name} is larger in every dimension and predicted as fast" in rec[narrow.name]["reason"]
    assert rec[narrow.name]["predicted_ms"] == pytest.approx(0.1)


def test_an_interrupted_student_resumes_from_its_work_folder_then_is_served_from_the_cache(keyword_model, labelled,
                                                                                          tmp_path, monkeypatch):
    import bertexport.students.training as training
    from bertexport.core.cache import cache_dir
    from bertexport.building.checkpoint import load_model, load_tokenizer, resolve_checkpoint
    from bertexport.search.students import StudentSearch

    ckpt = resolve_checkpoint(str(keyword_model), None)
    teacher, tokenizer = load_model(ckpt), load_tokenizer(ckpt)
    shape = StudentShape(1, 16, 1, 32)
    data = tmp_path / "train.jsonl"  # 150 rows (+ 8 teacher-labelled variants of each): 2 epochs of ~38 steps
    data.write_text("\n".join(labelled.read_text().splitlines()[:150]))

    def students():
        return StudentSearch(_Search([], budget=600), ckpt=ckpt, teacher_model=teacher, tokenizer=tokenizer, tok_dir=None,
                             shapes=[shape], recipes=[], distill_data=data, epochs=2)

    real = training.train_student
    stop_at = 55  # past the first checkpoint (every 50 steps)

    def interrupted(*a, **k):
        def on_step(step, loss):
            if step == stop_at:
                raise KeyboardInterrupt
        return real(*a, **k, on_step=on_step)

    before = set(cache_dir("students").glob("*.work"))
    monkeypatch.setattr(training, "train_student", interrupted)
    with pytest.raises(KeyboardInterrupt):
        students().train(shape)
    (work,) = set(cache_dir("students").glob("*.work")) - before
    assert (work / "checkpoint.pt").is_file()
    monkeypatch.setattr(training, "train_student", real)
    path, report, cached = students().train(shape)
    assert not cached and report["resumed_from_step"] == 50 and report["steps"] > stop_at and report["shape"] == shape.name
    assert not work.exists() and (path / "student_report.json").is_file() and (path / "model.safetensors").is_file()
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(path)
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size) == (1, 16, 1, 32)
    monkeypatch.setattr(training, "train_student", lambda *a, **k: pytest.fail("retrained a cached student"))
    again_path, again_report, again_cached = students().train(shape)
    assert again_cached and again_path == path and again_report["train_seconds"] == report["train_seconds"]


def test_a_student_stopped_by_the_budget_is_judged_on_its_best_state_and_the_next_run_continues_it(keyword_model, labelled,
                                                                                                   tmp_path):
    """Training converges (patience, the default) and never runs past the search's deadline:
    a student the deadline stops is returned at its best state so far with its work folder
    kept; the next run continues that training from the saved step, then caches it. Its
    learning curve goes into the report and search.md."""
    from bertexport.building.checkpoint import load_model, load_tokenizer, resolve_checkpoint
    from bertexport.search.report import students_markdown
    from bertexport.search.student_training import MAX_EPOCHS, PATIENCE, learning_curve
    from bertexport.search.students import StudentSearch

    ckpt = resolve_checkpoint(str(keyword_model), None)
    teacher, tokenizer = load_model(ckpt), load_tokenizer(ckpt)
    shape = StudentShape(1, 16, 1, 32)
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(labelled.read_text().splitlines()[150:210]))

    def students(budget):
        return StudentSearch(_Search([], budget=budget), ckpt=ckpt, teacher_model=teacher, tokenizer=tokenizer, tok_dir=None,
                             shapes=[shape], recipes=[], distill_data=data, seed=7)

    cut = students(1e-9)  # the deadline passes during the first step
    assert cut.config(shape).patience == PATIENCE and cut.config(shape).max_epochs == MAX_EPOCHS
    path, report, cached = cut.train(shape)
    assert report["stopped"] == "time" and report["steps"] == 1 and not cached
    assert path.name == "best" and (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file()
    work = path.parent
    assert (work / "checkpoint.pt").is_file()
    path2, report2, cached2 = students(600).train(shape)
    assert report2["resumed_from_step"] == 1 and report2["stopped"] in ("plateau", "max_epochs") and not cached2
    assert report2["steps"] > 1 and not work.exists() and (path2 / "student_report.json").is_file()
    curve = learning_curve(report2)
    assert curve["curve"][0]["step"] == 0 and [c["step"] for c in curve["curve"][1:]] == [e["step"] for e in report2["evals"]]
    assert curve["curve"][1]["step"] == 1  # the evaluation at the budget stop is part of the curve
    assert curve["best_step"] in [c["step"] for c in curve["curve"]]
    md = "\n".join(students_markdown({"students": [{"shape": shape.name, "status": "not passed", "predicted_ratio": 0.5,
                                                     "prediction": "predicted", **curve}], "cost_model": {}}))
    assert "Learning curves" in md and f"- {shape.name}: stopped by {report2['stopped']}" in md
    assert "resumed at step 1" in md and "*" in md.split("Learning curves")[1]


def _held_out_agreement(teacher_path, student_path, texts: list[str]) -> float:
    """Agreement of two classifiers' decisions on the rows a search student is evaluated on
    (``training_data.split_eval`` of ``texts`` with the search's settings), batched as training batches them."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from bertexport.students.distill_config import DistillConfig
    from bertexport.students.training_data import length_batches, sequence_length, split_eval

    cfg = DistillConfig(student=str(student_path))
    tok = AutoTokenizer.from_pretrained(teacher_path)
    teacher, student = (AutoModelForSequenceClassification.from_pretrained(p, attn_implementation="eager").eval()
                        for p in (teacher_path, student_path))
    _, held_out = split_eval(len(texts), cfg)
    batches = length_batches(tok, [texts[i] for i in held_out], None, cfg.batch_size,
                             sequence_length(tok, texts, cfg, teacher.config), cfg.seed)
    same = total = 0
    with torch.inference_mode():
        for b in batches:
            a, s = teacher(**b["inputs"]).logits.argmax(-1), student(**b["inputs"]).logits.argmax(-1)
            same, total = same + int((a == s).sum()), total + len(a)
    return same / total


def test_a_pruned_original_that_missed_the_gate_is_distilled_from_its_pruned_weights(tiny, tmp_path, monkeypatch):
    """``--prune 0.5,0.7 --distill L1``: a random-init classifier pruned to half its MACs misses the
    98 % agreement gate (its decisions are not robust to pruning), so it becomes a student,
    ``pruned 0.5 MACs + distilled``: initialised from the pruned checkpoint (its shape, and at step 0
    exactly the pruned model's held-out agreement), trained, judged against the original. Only
    the most aggressive budget is pruned before the students; 0.7 comes after them, and not at
    all when a student passed faster than a 0.7 pruning is predicted to run."""
    from transformers import AutoConfig

    from bertexport.search.optimize import optimize

    keyword_rows = [json.loads(line)["text"] for line in write_keyword_jsonl(tmp_path / "kw.jsonl", 5).read_text().splitlines()]
    data, train = tmp_path / "texts.txt", tmp_path / "train.txt"
    data.write_text("\n".join(keyword_rows) + "\n")
    train.write_text("\n".join(keyword_rows[:200]) + "\n")  # --distill-data: the rows the students learn and are evaluated on
    model = tiny("bert", "text-classification")
    trained: list = []
    _fake_clock(monkeypatch, trained, tmp_path / "costs")

    def fake_ms(cand):  # the pruned original: 0.5 ms; distilled from it: 0.4 ms; the original's int8 builds 1 ms
        if cand.student:
            return 0.4 if cand.student.startswith("pruned") else 0.3
        return cand.pruned or (2.0 if cand.precision == "fp32" else 1.0 + 0.4 * len(cand.keep_float))

    inject_search_clock(monkeypatch, fake_ms)
    res = optimize(str(model), data, tmp_path / "o", budget="5m", prune="0.5,0.7", distill="1", distill_epochs=1,
                   distill_data=train, backends={"onnxruntime"}, threads=1)
    pruned, larger = res.report["pruning"]["records"]
    assert pruned["mac_budget"] == 0.5 and pruned["status"] == "not passed" and pruned["checkpoint"]
    cands = res.report["candidates"]
    students_at = [i for i, c in enumerate(cands) if c["candidate"]["student"]]
    larger_at = [i for i, c in enumerate(cands) if c["candidate"]["pruned"] == 0.7]
    assert students_at and larger_at and min(larger_at) > max(students_at)  # 0.7: after every student
    from bertexport.search.pruned import PRUNED_SPEED_FLOOR

    floor = PRUNED_SPEED_FLOOR * 0.7 * 1.0  # the original's fastest int8 build: 1 ms
    fast = [c for c in cands if c["candidate"]["student"] and c["status"] == "passed" and c["latency_ms"] <= floor]
    if fast:  # no 0.7 pruning can beat it: skipped with the reason, never pruned
        assert larger["status"] == "skipped" and "faster than pruning to 0.7 of the MACs can be" in larger["reason"]
        assert larger["checkpoint"] is None
    else:
        assert larger["checkpoint"] and larger["status"] in ("passed", "not passed")
    by_name = {r["shape"]: r for r in res.report["students"]}
    assert set(by_name) == {"L1-H32-A2-F64", "pruned 0.5 MACs + distilled"}
    rec = by_name["pruned 0.5 MACs + distilled"]
    assert rec["pruned"]["checkpoint"] == pruned["checkpoint"] and rec["init"]["path"] == pruned["checkpoint"]
    assert rec["pruned"]["shape"] == pruned["shape"] and rec["prediction"] in ("predicted", "measured")
    assert rec["train_seconds"] is not None and rec["stopped"] == "epochs" and rec["status"] in ("passed", "not passed")
    # judged like every student: its builds, against the original
    builds = [c for c in res.report["candidates"] if c["candidate"]["student"] == rec["shape"]]
    assert [c["candidate"]["name"] for c in builds] == rec["candidates"] and builds
    assert all(c["status"] in ("passed", "failed", "undecided", "hopeless", "pruned") for c in builds)
    judged = next(c for c in builds if c["artifact"])
    student_path = json.loads((Path(judged["artifact"]) / "manifest.json").read_text())["source"]["path"]
    # started from the pruned weights: the pruned shape, and at step 0 exactly the pruned model's agreement
    pruned_cfg, student_cfg = AutoConfig.from_pretrained(pruned["checkpoint"]), AutoConfig.from_pretrained(student_path)
    dims = ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size")
    assert [getattr(student_cfg, k) for k in dims] == [getattr(pruned_cfg, k) for k in dims]
    assert pruned["shape"] == "L{}-H{}-A{}-F{}".format(*(getattr(pruned_cfg, k) for k in dims))
    texts = train.read_text().splitlines()
    assert rec["curve"][0]["step"] == 0
    assert rec["curve"][0]["score"] == pytest.approx(_held_out_agreement(model, pruned["checkpoint"], texts), abs=1e-9)
    assert _held_out_agreement(model, student_path, texts) == pytest.approx(max(c["score"] for c in rec["curve"][1:]), abs=1e-9)
    md = (res.artifact / "search.md").read_text()
    assert "| pruned 0.5 MACs + distilled |" in md and "- pruned 0.5 MACs + distilled: stopped by epochs" in md


class _MissingSearch(_Search):
    """``_Search`` whose every student build misses the gate with figures (closest to the gate: highest agreement)."""

    def try_candidate(self, cand, path):
        t = super().try_candidate(cand, path)
        t.metrics = {"agreement": 0.9, "metric_drop": 3.0}
        return t


def _continuing_search(keyword_model, labelled, tmp_path, monkeypatch, cap: int):
    """A student search over one student, the keyword classifier's last layer with its head turned
    against it (``--student-init``: it starts far from its teacher, so its agreement rises as the
    head learns), on 200 labelled texts; every build misses the gate."""
    import torch

    import bertexport.search.student_training as st
    import bertexport.search.students as ss
    from bertexport.building.checkpoint import load_model, load_tokenizer, resolve_checkpoint
    from bertexport.search.cost_model import Cost
    from bertexport.search.session import Trial
    from bertexport.search.student_shapes import plan_init_students
    from bertexport.students.shapes import shrink

    monkeypatch.setattr(st, "MAX_EPOCHS", cap)  # one run's epoch cap
    monkeypatch.setattr(ss.StudentSearch, "costs", lambda self, bases: (
        {s.name: Cost(s.name, 0.45, "predicted", 0.0) for s in self.shapes + self.inits}, None))
    ckpt = resolve_checkpoint(str(keyword_model), None)
    teacher, tokenizer = load_model(ckpt), load_tokenizer(ckpt)
    folder = tmp_path / "flipped-l1"
    student = shrink(teacher, [1])
    with torch.no_grad():  # its head says the opposite of the teacher's: it starts near 0 agreement
        student.classifier.weight.neg_()
        student.classifier.bias.neg_()
    student.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    (init,) = plan_init_students([str(folder)], ckpt)
    assert init.init.head == "kept"
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(labelled.read_text().splitlines()[300:500]))
    base = Candidate("ort-int8-avx2", "onnxruntime", "int8", [{"type": "ort-dynamic-quantize"}], {})

    def run():
        search = _MissingSearch([Trial(base, "passed", "meets the gate", latency_ms=1.0)], budget=600)
        records = ss.StudentSearch(search, ckpt=ckpt, teacher_model=teacher, tokenizer=tokenizer, tok_dir=None,
                                   shapes=[], inits=[init], recipes=[base], distill_data=data, seed=3).run()
        return records, search

    return run, init


def test_a_capped_student_still_improving_is_continued_from_its_checkpoint_before_new_shapes(keyword_model, labelled,
                                                                                          tmp_path, monkeypatch):
    """Every build misses the gate; the student stops at its epoch cap (1 epoch here) while its
    agreement is still rising, so the rest of the budget continues it from its checkpoint (a segment
    with a cap one run later, cached under its own key) until its patience runs out: its curve is
    the first run's, then evaluations past the cap; a rerun trains nothing."""
    import bertexport.students.training as training
    from bertexport.search.report import students_markdown
    from bertexport.search.students import still_improving

    run, init = _continuing_search(keyword_model, labelled, tmp_path, monkeypatch, cap=1)
    records, search = run()
    first, *continued = records
    assert first["shape"] == init.name and first["stopped"] == "max_epochs" and first["status"] == "not passed"
    assert len(first["curve"]) == 3 and first["epochs_run"] == 1 and still_improving(first["curve"])  # one run's cap
    assert first["curve"][0]["score"] < 0.2  # its flipped head
    assert first["continued_as"] == f"{init.name} continued" and "still improving at the 1-epoch cap" in first["reason"]
    cont = continued[0]
    assert cont["shape"] == first["continued_as"] and cont["continues"] == init.name and cont["segment"] == 1
    cap_step = first["curve"][-1]["step"]
    assert cont["resumed_from_step"] == cap_step  # trained on from the checkpoint at the cap, not from the start
    assert cont["curve"][:3] == first["curve"] and len(cont["curve"]) > 3  # its history, then more evaluations
    assert all(c["step"] > cap_step for c in cont["curve"][3:]) and cont["epochs_run"] > 1
    last = continued[-1]  # continued while it kept rising at its cap; it ends when that stops
    assert last["stopped"] == "plateau" or not still_improving(last["curve"])
    assert all(r["stopped"] == "max_epochs" for r in records[:-1])
    assert [r["segment"] for r in continued] == list(range(1, len(continued) + 1))
    # each continuation was built and judged as builds of its own
    assert [n for n in search.tried if "continued" in n] == [c for r in continued for c in r["candidates"]]
    assert all(n.startswith(f"{init.name} continued") for r in continued for n in r["candidates"])
    md = "\n".join(students_markdown({"students": records, "cost_model": {}}))
    assert f"- {init.name} continued: stopped by" in md and f"resumed at step {cap_step}" in md

    monkeypatch.setattr(training, "train_student", lambda *a, **k: pytest.fail("retrained a cached student"))
    again, _ = run()  # a rerun: the first run and every continuation come from the cache
    assert [r["shape"] for r in again] == [r["shape"] for r in records] and all(r["cached"] for r in again)
    assert [r["curve"] for r in again] == [r["curve"] for r in records]


def _stub_report(scores: list[float], stopped: str, resumed: int | None = None, every: int = 10) -> dict:
    """A training report (``train_student``'s fields the search reads) with held-out ``scores``."""
    evals = [{"step": every * (i + 1), "epoch": (i + 1) / 2, "score": sc} for i, sc in enumerate(scores[1:])]
    best = max(evals, key=lambda e: e["score"])
    return {"train_seconds": 10.0, "stopped": stopped, "initial_eval": {"score": scores[0]}, "evals": evals,
            "best_step": best["step"], "epochs_run": evals[-1]["epoch"], "resumed_from_step": resumed,
            "steps": evals[-1]["step"], "schedule": {"steps_per_epoch": 2 * every}}


def test_a_student_stopped_by_its_time_share_while_rising_is_continued_before_new_shapes_a_flat_one_is_not(
        tmp_path, monkeypatch):
    """No model: training and judging stubbed (every build misses the gate). A new student trains
    for at most its share of the time left; the first (the middle shape) stops there with a rising
    curve, so it is continued with all the time left (but what judging it takes) before any new shape; missing again, it rules
    out the shapes it dominates. One that reaches its cap with a flat curve is not continued."""
    import bertexport.search.students as ss
    from bertexport.search.session import Trial

    base = Candidate("ort-int8-avx2", "onnxruntime", "int8", [{"type": "ort-dynamic-quantize"}], {})
    # none keeps the teacher's hidden size (384): one tier, bisected
    ratios = {"L4-H192-A6-F384": 0.2, "L2-H224-A7-F384": 0.3, "L3-H256-A8-F768": 0.45, "L4-H352-A11-F1408": 0.7}
    fast, small, middle, wide = (_shape_of(n) for n in ratios)
    search = _MissingSearch([Trial(base, "passed", "meets the gate", latency_ms=1.0)], budget=1000)
    calls = []

    def train(self, shape, seconds=None, reserve=0.0):
        calls.append((shape.name, seconds, reserve))
        self.search.clock += 10
        if shape == middle and [c for c, *_ in calls].count(middle.name) == 1:  # its share ran out while still rising
            return tmp_path / "m", _stub_report([0.5, 0.6, 0.7], "time"), False
        if shape == middle:  # continued from there: rising no more, its patience ran out
            return tmp_path / "m", _stub_report([0.5, 0.6, 0.7, 0.72, 0.71, 0.7, 0.7], "plateau", resumed=20), False
        return tmp_path / "w", _stub_report([0.8, 0.8, 0.8], "max_epochs"), False  # at its cap, flat

    _stub_costs_training_and_data(monkeypatch, tmp_path, ratios, train)
    monkeypatch.setattr(ss.StudentSearch, "extend", lambda self, shape, segment, seconds=None, reserve=0.0: pytest.fail("no cap to extend"))

    records = ss.StudentSearch(search, ckpt=_Ckpt(), teacher_model=None, tokenizer=None, tok_dir=None,
                               shapes=[fast, small, middle, wide], recipes=[base]).run()
    # a new student: its share, ending before the deadline by what judging takes (none judged yet, then
    # judging took no time here: the floor); continued with all the time left but that (no share of its own)
    assert calls == [(middle.name, ss.STUDENT_SHARE * 1000, ss.MIN_JUDGE_SECONDS), (middle.name, None, ss.MIN_JUDGE_SECONDS),
                     (wide.name, ss.STUDENT_SHARE * 980, ss.MIN_JUDGE_SECONDS)]
    assert ss.StudentSearch._judge_reserve({"judge_seconds": 100.0}) == 100.0 * ss.JUDGE_MARGIN  # a slow judging keeps more
    assert [(r["shape"], r["status"]) for r in records] == [
        (middle.name, "not passed"), (f"{middle.name} continued", "not passed"), (small.name, "dominated"),
        (wide.name, "not passed"), (fast.name, "dominated")]
    first, cont = records[0], records[1]
    assert first["continued_as"] == cont["shape"] and cont["continues"] == middle.name and cont["segment"] == 0
    assert "time it had" in first["reason"] and cont["resumed_from_step"] == 20 and len(cont["curve"]) == 7
    assert "continued_as" not in records[3] and "still improving" not in records[3]["reason"]  # flat at its cap
    assert search.tried == [c for r in (first, cont, records[3]) for c in r["candidates"]]
    assert all(c.startswith(f"{middle.name} continued/") for c in cont["candidates"])


def test_a_new_student_whose_share_of_the_time_left_is_under_one_epoch_gets_one_if_it_fits_else_is_not_started(
        tmp_path, monkeypatch):
    """No model: the first student (the middle shape) trains 3 epochs of 100 s each (300 s), stopped by
    its time share with a flat curve (not continued); 120 s are left then. The next (the small one)
    gets a share of 60 s, under one epoch of it (estimated from the first's epoch time, scaled by
    training cost): that epoch and its judging (the 30-s floor) fit, so it trains for that epoch, not
    its share. 50 s are left then: the wide one's epoch and its judging do not fit: skipped, saying
    so; the last one (the deep one) would get all the time left, but its epoch does not fit either."""
    import bertexport.search.students as ss
    from bertexport.search.session import Trial
    from bertexport.search.student_training import training_units

    base = Candidate("ort-int8-avx2", "onnxruntime", "int8", [{"type": "ort-dynamic-quantize"}], {})
    # none dominates another, none keeps the teacher's hidden size (384): one tier, bisected
    ratios = {"L5-H128-A4-F256": 0.1, "L4-H192-A6-F384": 0.2, "L3-H256-A8-F768": 0.45, "L4-H352-A11-F1408": 0.7}
    deep, small, middle, wide = (_shape_of(n) for n in ratios)
    search = _MissingSearch([Trial(base, "passed", "meets the gate", latency_ms=1.0)], budget=420)
    trained = []

    def train(self, shape, seconds=None, reserve=0.0):
        trained.append((shape.name, seconds))
        self.search.clock += seconds if trained[1:] else 300  # the first overran its share: 3 epochs
        report = _stub_report([0.8, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8], "time")  # 3 epochs, flat
        return tmp_path / shape.name, report | {"train_seconds": 300.0}, False

    _stub_costs_training_and_data(monkeypatch, tmp_path, ratios, train)
    student_search = ss.StudentSearch(search, ckpt=_Ckpt(), teacher_model=None, tokenizer=None, tok_dir=None,
                                      shapes=[wide, middle, small, deep], recipes=[base])
    epochs, estimate = {}, student_search._epoch_seconds  # one epoch of each shape as the search estimated it

    def spy(shape):
        epochs[shape.name] = estimate(shape)
        return epochs[shape.name]

    student_search._epoch_seconds = spy
    records = student_search.run()
    assert [n for n, _ in trained] == [middle.name, small.name]
    assert trained[0][1] == ss.STUDENT_SHARE * 420
    # a 100-s epoch scaled by training cost, at the slowest rate of the students judged so far
    units = {sh.name: training_units(sh, StudentShape(6, 384, 12, 1536)) for sh in (deep, small, middle, wide)}
    assert epochs[small.name] == pytest.approx(100 * units[small.name] / units[middle.name])
    for sh in (wide, deep):
        assert epochs[sh.name] == pytest.approx(100 * units[sh.name] / min(units[middle.name], units[small.name]))
    assert 60 < epochs[small.name] <= 90 and epochs[wide.name] > 20 and epochs[deep.name] > 20
    assert trained[1][1] == pytest.approx(ss.MIN_STUDENT_EPOCHS * epochs[small.name])  # its epoch, not its 60-s share
    reasons = {r["shape"]: r["reason"] for r in records if r["status"] == "skipped"}
    assert set(reasons) == {wide.name, deep.name}
    left = 420 - 300 - epochs[small.name]
    for sh in (wide, deep):
        assert reasons[sh.name] == (f"1 epoch (~{epochs[sh.name]:.0f} s, estimated from the students trained so far) "
                                    f"and its judging do not fit in the {left:.0f} s left")
    assert not any(r.get("continued_as") for r in records)  # flat: not continued


def test_a_student_of_the_search_stops_at_the_agreement_that_keeps_the_gate_with_room_to_spare(tmp_path):
    from bertexport.search.student_training import StudentTraining

    search = _Search([], budget=100)
    training = StudentTraining(search, ckpt=_Ckpt(), teacher_model=None, tokenizer=None)
    assert training.config(_shape_of("L2-H384-A12-F768")).stop_at_score is None  # no gate that bounds agreement
    search.gates = Gates(max_accuracy_drop=1.0)
    assert training.config(_shape_of("L2-H384-A12-F768")).stop_at_score == pytest.approx(0.995)  # a 1-point gate
    search.gates = Gates(min_agreement=0.98)
    assert training.config(_shape_of("L2-H384-A12-F768")).stop_at_score == pytest.approx(0.99)
    search.gates = Gates(max_accuracy_drop=1.0, max_macro_f1_drop=2.0)  # agreement does not bound macro-F1
    assert training.config(_shape_of("L2-H384-A12-F768")).stop_at_score is None
    training.epochs = 2  # a fixed count, as asked: no target
    assert training.config(_shape_of("L2-H384-A12-F768")).stop_at_score is None


def test_the_last_shape_that_could_still_win_gets_all_the_time_left(tmp_path, monkeypatch):
    """No model: two full-width shapes, every build missing the gate; the slower one (the middle of
    the two) trains first, for its share, and misses on a plateau (not continued); the faster one,
    which that miss does not rule out (a wider FFN), is then the last that could win: it trains for
    all the time left, not its share."""
    import bertexport.search.students as ss
    from bertexport.search.session import Trial

    base = Candidate("ort-int8-avx2", "onnxruntime", "int8", [{"type": "ort-dynamic-quantize"}], {})
    ratios = {"L1-H384-A12-F1536": 0.2, "L2-H384-A12-F768": 0.35}
    fast, slow = (_shape_of(n) for n in ratios)
    search = _Search([Trial(base, "passed", "meets the gate", latency_ms=1.0)], budget=1000)
    trained = []

    def train(self, shape, seconds=None, reserve=0.0):
        trained.append((shape.name, seconds))
        self.search.clock += 200
        return tmp_path / shape.name, _stub_report([0.8, 0.9, 0.95], "plateau"), False

    _stub_costs_training_and_data(monkeypatch, tmp_path, ratios, train)
    records = ss.StudentSearch(search, ckpt=_Ckpt(), teacher_model=None, tokenizer=None, tok_dir=None,
                               shapes=[slow, fast], recipes=[base]).run()
    assert trained == [(slow.name, ss.STUDENT_SHARE * 1000), (fast.name, 800)]
    assert [r["shape"] for r in records] == [slow.name, fast.name]


def test_the_student_to_continue_is_the_one_closest_to_the_gate_that_is_still_rising():
    """``most_promising``: the lowest metric drop (then the highest agreement) among the students
    that missed while rising; never one that is flat, passed, already continued or now hopeless."""
    from bertexport.search.session import Trial
    from bertexport.search.students import StudentSearch, still_improving

    assert still_improving([{"score": 0.5}, {"score": 0.6}]) and not still_improving([{"score": 0.5}, {"score": 0.5}])
    assert still_improving([{"score": s} for s in (0.5, 0.9, 0.6, 0.7, 0.8, 0.91)])
    assert not still_improving([{"score": s} for s in (0.5, 0.9, 0.6, 0.7, 0.8, 0.85)])  # best before the patience window
    base = Candidate("ort-int8-avx2", "onnxruntime", "int8", [{"type": "ort-dynamic-quantize"}], {})
    best = Trial(base, "passed", "meets the gate", latency_ms=1.0)
    ss = StudentSearch(_Search([best], budget=100), ckpt=None, teacher_model=None, tokenizer=None, tok_dir=None,
                       shapes=[], recipes=[base])
    rising = [{"step": 0, "score": 0.5}, {"step": 10, "score": 0.7}]

    def entry(name, drop, agreement, curve=rising, status="not passed", predicted=0.5, **extra):
        t = Trial(dataclasses.replace(base, student=name), "failed", "missed", latency_ms=predicted)
        t.metrics = {"metric_drop": drop, "agreement": agreement}
        rec = {"shape": name, "status": status, "stopped": "time", "curve": curve, "predicted_ms": predicted} | extra
        return {"rec": rec, "shape": _shape_of(name), "segment": 0, "trials": [t], "epoch_seconds": 5.0}

    far, near, nearer_flat, nearest_passed, done, slow = (
        entry("L1-H32-A1-F64", 3.0, 0.90), entry("L2-H32-A1-F64", 1.5, 0.93),
        entry("L3-H32-A1-F64", 1.1, 0.95, curve=[{"step": 0, "score": 0.7}, {"step": 10, "score": 0.7}]),
        entry("L4-H32-A1-F64", 0.5, 0.99, status="passed"), entry("L5-H32-A1-F64", 0.2, 0.99, continued_as="x"),
        entry("L6-H32-A1-F64", 0.1, 0.99, predicted=1.2))
    ss._judged = [far, near, nearer_flat, nearest_passed, done, slow]
    assert ss.most_promising() is near
    near["epoch_seconds"] = 120.0  # a whole epoch does not fit the time left, one more evaluation (half) and judging do
    assert ss.most_promising() is near
    near["epoch_seconds"] = 150.0  # half an epoch and its judging no longer fit
    assert ss.most_promising() is far


@pytest.mark.parametrize("stopped", ["target", "plateau"])
def test_after_a_pass_with_room_to_spare_the_fastest_shape_that_could_win_trains_next(tmp_path, monkeypatch, stopped):
    """No model: four full-width shapes; the middle one (L3-F384) trains first and passes. When it
    stopped at its target agreement (the gate kept with half its allowance to spare) the fastest
    shape that could still win trains next (L1), and its pass makes the 2-layer one hopeless; when it
    stopped on its patience the search bisects as before (L2, then L1)."""
    import bertexport.search.students as ss
    from bertexport.search.session import Trial

    base = Candidate("ort-int8-avx2", "onnxruntime", "int8", [{"type": "ort-dynamic-quantize"}], {})
    ratios = {"L1-H384-A12-F1536": 0.2, "L2-H384-A12-F768": 0.35, "L3-H384-A12-F384": 0.45, "L3-H384-A12-F1536": 0.6}
    fast, two, three, wide = (_shape_of(n) for n in ratios)

    class Passing(_Search):  # every build passes, at its shape's predicted latency
        def try_candidate(self, cand, path):
            self.tried.append(cand.name)
            t = Trial(cand, "passed", "meets the gate", latency_ms=ratios[cand.student])
            self.trials.append(t)
            self.best = min(self.best, t, key=lambda tr: tr.latency_ms)
            return t

    search = Passing([Trial(base, "passed", "meets the gate", latency_ms=1.0)], budget=1000)
    trained = []

    def train(self, shape, seconds=None, reserve=0.0):
        trained.append(shape.name)
        self.search.clock += 100
        return tmp_path / shape.name, _stub_report([0.8, 0.99, 0.996], stopped), False

    _stub_costs_training_and_data(monkeypatch, tmp_path, ratios, train)
    records = ss.StudentSearch(search, ckpt=_Ckpt(), teacher_model=None, tokenizer=None, tok_dir=None,
                               shapes=[wide, three, two, fast], recipes=[base]).run()
    status = {r["shape"]: r["status"] for r in records}
    if stopped == "target":
        assert trained == [three.name, fast.name]
        assert status == {three.name: "passed", fast.name: "passed", two.name: "hopeless", wide.name: "hopeless"}
    else:
        assert trained == [three.name, two.name, fast.name]
        assert status == {three.name: "passed", two.name: "passed", fast.name: "passed", wide.name: "hopeless"}
    assert search.best.candidate.student == fast.name


@pytest.mark.parametrize("times,expected", [(10, 8), (4.5, 4), (1.2, 1), (0.9, 0)])
def test_augmentation_is_halved_until_its_variants_hold_at_most_the_searchs_tokens(keyword_model, monkeypatch, times,
                                                                                   expected):
    """Small data is augmented (8 variants a text) unless its variants would hold more than
    ``AUGMENT_TOKENS`` tokens: halved until they fit (the teacher labels every variant before any
    student trains, outside the deadline). Decided once: every student trains on the same rows."""
    import bertexport.search.student_training as st_mod
    from bertexport.building.checkpoint import load_model, load_tokenizer, resolve_checkpoint
    from bertexport.core.progress import Reporter
    from bertexport.students.distill_config import DistillConfig

    ckpt = resolve_checkpoint(str(keyword_model), None)
    tokenizer = load_tokenizer(ckpt)
    texts = [f"alpha beta gamma {i}" for i in range(300)]
    tokens = sum(len(ids) for ids in tokenizer(texts)["input_ids"])  # short texts: none truncated
    monkeypatch.setattr(st_mod, "AUGMENT_TOKENS", int(times * tokens))
    reporter = Reporter()
    st = st_mod.StudentTraining(SimpleNamespace(reporter=reporter), ckpt=ckpt, teacher_model=load_model(ckpt),
                                tokenizer=tokenizer)
    st._data = (texts, None, "digest")
    cfg = DistillConfig(layers=1)
    assert cfg.augment == 8 and cfg.augment_below > len(texts)
    assert st.augment_count(cfg) == expected
    (line,) = [m for kind, m, _ in reporter.events if kind == "log"]
    assert line.startswith(f"augmentation: {expected} variant")
    assert (f"8 variants of {tokens:,} tokens = {8 * tokens:,}" in line) == (expected < 8)
    st._data = ([t * 50 for t in texts], None, "other")  # decided once per search
    assert st.augment_count(cfg) == expected
    st2 = st_mod.StudentTraining(SimpleNamespace(reporter=reporter), ckpt=ckpt, teacher_model=None, tokenizer=None)
    st2._data = ([f"text {i}" for i in range(5000)], None, "digest")  # not small: never augmented, nothing counted
    assert st2.augment_count(cfg) == 8
