"""Post-training pruning (bertexport/students/pruning.py) on tiny trained and random models."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers as T

from bertexport.core.errors import UserError
from bertexport.students import pruning as P
from bertexport.students.shapes import StudentShape
from tests.tinymodels import keyword_sentence


def _texts(seed: int, n: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [keyword_sentence(rng, int(rng.integers(4, 30)), "excellent" if rng.random() < 0.5 else None) for _ in range(n)]


def _load(path):
    return T.AutoModelForSequenceClassification.from_pretrained(path, attn_implementation="eager").eval()


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One torch thread: on this shared 2-core machine two threads are several times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------ MACs, search, rearrangement

def test_layer_macs_by_hand():
    # seq 10, hidden 8, 2 heads of 4, FFN 16: Q,K,V,O 4*10*8*8 + scores/context 2*10*10*8 + FFN 2*10*8*16
    assert P.layer_macs(10, 8, 2, 4, 16) == 2560 + 1600 + 2560
    assert P.model_macs(StudentShape(3, 8, 2, 16), 4, 10) == 3 * 6720


def _synthetic_grads(seed=0, batches=12, layers=2, heads=4, hs=8, ffn=40):
    rng = np.random.default_rng(seed)
    return P.MaskGradients(rng.normal(size=(batches, layers, heads)) * rng.uniform(0.1, 2, size=(1, layers, heads)),
                           rng.normal(size=(batches, layers, ffn)) * rng.uniform(0.1, 2, size=(1, layers, ffn)),
                           rng.normal(size=(batches, heads * hs))), StudentShape(layers, heads * hs, heads, ffn)


@pytest.mark.parametrize("budget", [0.9, 0.75, 0.5, 0.3])
def test_search_keeps_every_candidate_within_the_budget_and_stock(budget):
    grads, teacher = _synthetic_grads()
    hs, seq = 8, 16
    found = P.search_masks(grads, teacher, seq, budget)
    assert found, "a candidate must fit"
    assert [m.estimate for m in found] == sorted(m.estimate for m in found)
    limit = budget * P.model_macs(teacher, hs, seq)
    for m in found:
        shape = m.shape
        assert P.model_macs(shape, hs, seq) <= limit
        assert len({len(h) for h in m.heads}) == 1 and len({len(f) for f in m.ffn}) == 1  # uniform per layer
        assert shape.hidden == shape.heads * hs and len(set(m.hidden)) == shape.hidden
        # the largest FFN that fits: one more neuron per layer would not (or the teacher's FFN is kept)
        bigger = StudentShape(shape.layers, shape.hidden, shape.heads, shape.ffn + 1)
        assert shape.ffn == teacher.ffn or P.model_macs(bigger, hs, seq) > limit
    f_heads, f_ffn, _ = grads.fisher()
    full = next((m for m in found if m.shape.heads == teacher.heads), None)
    if full is not None:  # each layer keeps its highest-Fisher neurons
        for i, kept in enumerate(full.ffn):
            dropped = sorted(set(range(teacher.ffn)) - set(kept))
            assert not dropped or f_ffn[i][dropped].max() <= f_ffn[i][kept].min()


def test_search_finds_nothing_below_the_smallest_model():
    grads, teacher = _synthetic_grads()
    assert P.search_masks(grads, teacher, 16, 0.001) == []


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

    diagonal = P._top(np.diag(fisher), 5)
    better = P.rearrange(g, diagonal)
    assert len(better) == 5 and cost(better) < cost(diagonal)
    assert P.rearrange(g, better) == better  # a fixed point: no swap lowers it further
    assert P.rearrange(g, list(range(10))) == list(range(10))


# ------------------------------------------------------------------ the trained keyword classifier

@pytest.fixture(scope="module")
def pruned_keyword(keyword_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("pruned") / "model"
    result = P.prune(keyword_model, _texts(11, 600), mac_budget=0.75, out=out, threads=1)
    return keyword_model, out, result


def test_prune_cuts_macs_and_keeps_the_decisions(pruned_keyword):
    teacher_path, out, r = pruned_keyword
    assert r.labels == "teacher" and r.accuracy is None  # no labels given: the teacher's predictions stood in
    assert r.macs_after <= 0.75 * r.macs_before and r.mac_fraction == r.macs_after / r.macs_before
    assert r.held_out >= 100 and r.agreement >= 0.97  # measured 1.00 (600 texts, FFN 64 -> 27)
    student = StudentShape(**{k: r.student[k] for k in ("layers", "hidden", "heads", "ffn")})
    assert student.ffn < 64 and [len(f) for f in r.ffn] == [student.ffn] * 2 and len(r.hidden) == student.hidden
    assert P.model_macs(student, 16, r.seq_len) == r.macs_after
    report = json.loads((out / P.REPORT_NAME).read_text())
    assert report["student"]["name"] == r.student["name"] and report["mac_fraction"] == pytest.approx(r.mac_fraction)
    # a plain stock checkpoint: it loads without bertexport and agrees on texts it never saw
    pruned, teacher = _load(out), _load(teacher_path)
    cfg = pruned.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size) == \
           (student.layers, student.hidden, student.heads, student.ffn)
    tok = T.AutoTokenizer.from_pretrained(out)
    fresh = _texts(99, 300)
    with torch.no_grad():
        enc = tok(fresh, padding=True, return_tensors="pt")
        same = (pruned(**enc).logits.argmax(-1) == teacher(**enc).logits.argmax(-1)).float().mean()
    assert float(same) >= 0.97


def _graph_dims(model_path) -> set[int]:
    if model_path.suffix == ".onnx":
        import onnx

        return {d for t in onnx.load(str(model_path)).graph.initializer for d in t.dims}
    import openvino as ov

    return {int(d) for op in ov.Core().read_model(str(model_path)).get_ops() if op.get_type_name() == "Constant"
            for d in op.get_output_shape(0)}


@pytest.mark.parametrize("target", ["ort-fp32", "openvino-fp32"])
def test_pruned_artifact_has_the_smaller_shapes(pruned_keyword, tmp_path, target):
    from bertexport.building.convert import convert

    if target.startswith("openvino"):
        pytest.importorskip("openvino")
    _, out, r = pruned_keyword
    result = convert(str(out), target, tmp_path / target, latency_runs=0)
    assert result.passed and all(c["agreement"] == 1.0 for c in result.manifest["parity"]["checks"].values())
    dims = _graph_dims(result.artifact / result.manifest["model"]["path"])
    assert r.student["ffn"] in dims  # the pruned FFN width is what the runtime multiplies
    assert 64 not in dims  # nothing of the teacher's FFN width (64) is left


def test_least_squares_tuning_lowers_the_reconstruction_error(keyword_model):
    teacher = _load(keyword_model)
    tok = T.AutoTokenizer.from_pretrained(keyword_model)
    texts = _texts(11, 600)
    untuned, r0 = P.prune_model(teacher, tok, texts, mac_budget=0.75, tune=False)
    tuned, r1 = P.prune_model(teacher, tok, texts, mac_budget=0.75, tune=True)
    assert (r0.heads, r0.ffn, r0.hidden) == (r1.heads, r1.ffn, r1.hidden)  # the same masks, only rescaled
    assert r1.tuned and not r0.tuned and r1.calibration_kl < r1.calibration_kl_untuned == r0.calibration_kl
    fitted = [f"{t['layer']}.{t['sublayer']}" for t in r1.tuning if t.get("tuned")]
    assert fitted, "least squares must have rescaled at least one sublayer"
    for t in r1.tuning:
        if t.get("tuned"):  # on the calibration texts it was fitted on
            assert t["error_after"] < t["error_before"]
    held = P._batches(tok, _texts(77, 200), 32, 128)  # texts neither run saw
    before = P.sublayer_errors(untuned, teacher, held, r0.hidden)
    after = P.sublayer_errors(tuned, teacher, held, r1.hidden)
    for key in fitted:  # measured on these held-out texts: 0.ffn 25943 -> 2073, 1.attention 1046 -> 503, 1.ffn 16746 -> 875
        assert after[key] < 0.8 * before[key], (key, before, after)
    assert sum(after.values()) < sum(before.values())


def test_tuning_keeps_every_scale_within_its_bound(keyword_model):
    teacher = _load(keyword_model)
    tok = T.AutoTokenizer.from_pretrained(keyword_model)
    texts = _texts(11, 300)
    pruned, r = P.prune_model(teacher, tok, texts, mac_budget=0.75, tune=False)
    batches = P._batches(tok, texts, 32, 128)
    before = {k: v.clone() for k, v in pruned.state_dict().items()}
    report = P.tune_masks(pruned, teacher, batches, r.hidden, bound=1.5)
    assert any(t["tuned"] for t in report)
    for t in report:
        assert -1.5 <= t["scale_min"] <= t["scale_max"] <= 1.5
        assert t["error_after"] < t["error_before"] if t["tuned"] else t["error_after"] == t["error_before"]
    changed = {k for k, v in pruned.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.endswith("output.dense.weight") for k in changed)  # only the output projections' columns


def test_tuning_is_kept_only_when_it_lowers_the_calibration_kl(keyword_model):
    teacher = _load(keyword_model)
    tok = T.AutoTokenizer.from_pretrained(keyword_model)
    texts = _texts(11, 600)
    # at half the MACs the hidden size goes 32 -> 16: the sublayer fits then raised the KL
    # (measured: held-out agreement 1.00 -> 0.74 when kept regardless), so they are dropped
    untuned, r0 = P.prune_model(teacher, tok, texts, mac_budget=0.5, tune=False)
    tuned, r1 = P.prune_model(teacher, tok, texts, mac_budget=0.5, tune=True)
    assert r1.student["hidden"] < 32 and r1.tuning  # the fit ran
    assert r1.calibration_kl <= r1.calibration_kl_untuned == r0.calibration_kl
    if not r1.tuned:
        assert all(torch.equal(v, untuned.state_dict()[k]) for k, v in tuned.state_dict().items())
        assert r1.agreement == r1.agreement_untuned


def test_given_labels_are_used_and_accuracy_reported(keyword_model):
    texts = _texts(5, 200)
    labels = ["present" if "excellent" in t.split() else "absent" for t in texts]
    r = P.prune(keyword_model, texts, labels=labels, mac_budget=0.6, threads=1)
    assert r.labels == "given" and set(r.accuracy) == {"teacher", "pruned"}
    assert r.accuracy["teacher"] >= 0.95 and r.mac_fraction <= 0.6


@pytest.mark.parametrize("family", ["distilbert", "electra"])
def test_other_width_families_prune_to_a_stock_checkpoint(tiny, tmp_path, family):
    ckpt = tiny(family, "text-classification")
    out = tmp_path / "pruned"
    r = P.prune(ckpt, _texts(3, 120), mac_budget=0.6, out=out, measure=2, threads=1)
    assert r.mac_fraction <= 0.6
    model = T.AutoModelForSequenceClassification.from_pretrained(out)
    assert type(model).__name__ == type(_load(ckpt)).__name__


def test_refusals_come_before_any_model_loads(tiny, keyword_model, tmp_path):
    texts = _texts(1, 100)
    missing = str(tmp_path / "no-such-model")
    for budget in (0, 1.0, 1.5, -0.2):
        with pytest.raises(UserError, match="MAC budget"):
            P.prune(missing, texts, mac_budget=budget)
    with pytest.raises(UserError, match="too few"):
        P.prune(missing, texts[:10])
    with pytest.raises(UserError, match="labels for"):
        P.prune(missing, texts, labels=["present"] * 3)
    with pytest.raises(UserError, match="not found"):
        P.prune(missing, texts)
    with pytest.raises(UserError, match="text-classification only"):
        P.prune(tiny("bert", "feature-extraction"), texts)
    with pytest.raises(UserError, match="not mpnet"):
        P.prune(tiny("mpnet", "text-classification"), texts)
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "mine.txt").write_text("user data")
    with pytest.raises(UserError, match="already exists"):
        P.prune(keyword_model, texts, out=taken)
    assert (taken / "mine.txt").read_text() == "user data"
    with pytest.raises(UserError, match="raise the budget"):
        P.prune(keyword_model, texts, mac_budget=0.001, threads=1)


# ------------------------------------------------------------------ `distill --prune` (the CLI) and --force

def _data_file(path, n=200, seed=21):
    texts = _texts(seed, n)
    path.write_text("".join(json.dumps({"text": t, "label": "present" if "excellent" in t.split() else "absent"}) + "\n"
                            for t in texts))
    return path


def test_cli_prune_writes_a_checkpoint_that_converts_and_force_replaces_it(keyword_model, tmp_path):
    from click.testing import CliRunner

    from bertexport.cli import cli
    from bertexport.core.staging import made_by_bertexport

    data = _data_file(tmp_path / "train.jsonl")
    out = tmp_path / "pruned"
    args = ["distill", str(keyword_model), "--out", str(out), "--prune", "0.6", "--data", str(data), "--json", "-"]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, (r.output, r.stderr)
    report = json.loads(r.stdout)
    assert report["labels"] == "given" and report["mac_fraction"] <= 0.6 and report["out"] == str(out.resolve())
    assert f"pruned: {out.resolve()}" in r.stderr and "agreement with the teacher" in r.stderr
    assert made_by_bertexport(out) == "pruned"  # marked, so --force may replace it
    ffn = json.loads((out / "config.json").read_text())["intermediate_size"]
    assert ffn == report["student"]["ffn"] < 64
    # the pruned checkpoint converts like any other, and the artifact keeps the teacher's decisions
    c = CliRunner().invoke(cli, ["convert", str(out), "--target", "ort-int8", "--out", str(tmp_path / "art"),
                                 "--latency-runs", "0", "--json", "-"])
    assert c.exit_code == 0, (c.output, c.stderr)
    assert json.loads(c.stdout)["status"] == "passed"
    # again without --force: refused; with it: the pruning's own output is replaced
    again = CliRunner().invoke(cli, args[:-2])
    assert again.exit_code == 2 and "already exists" in again.stderr
    (out / "marker").write_text("from the first run")
    forced = CliRunner().invoke(cli, args[:-2] + ["--force", "--prune", "0.75"])
    assert forced.exit_code == 0, (forced.output, forced.stderr)
    assert not (out / "marker").exists() and json.loads((out / P.REPORT_NAME).read_text())["mac_budget"] == 0.75


def test_cli_prune_refuses_before_any_model_loads(tiny, keyword_model, tmp_path, monkeypatch):
    from click.testing import CliRunner

    import bertexport.building.checkpoint as checkpoint
    from bertexport.cli import cli

    def no_loading(*a, **k):
        raise AssertionError("a model was loaded before the refusal")

    monkeypatch.setattr(checkpoint, "load_model", no_loading)
    data = _data_file(tmp_path / "train.jsonl", n=40)
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("user data")
    base = ["distill", str(keyword_model), "--data", str(data)]
    cases = [
        (base + ["--out", str(tmp_path / "o"), "--prune", "1.5"], "MAC budget"),
        (base + ["--out", str(tmp_path / "o"), "--prune", "0"], "MAC budget"),
        (base + ["--out", str(tmp_path / "o"), "--prune", "0.7", "--layers", "1"], "does not go with --layers"),
        (base + ["--out", str(tmp_path / "o"), "--prune", "0.7", "--epochs", "3", "--patience", "2", "--lr", "3e-4",
                 "--device", "cpu"], "does not go with --epochs, --patience, --lr, --device"),
        (["distill", str(keyword_model), "--out", str(tmp_path / "o"), "--prune", "0.7"], "needs --data"),
        (["distill", str(keyword_model), "--out", str(tmp_path / "o"), "--prune", "0.7", "--data",
          str(tmp_path / "missing.jsonl")], "not found"),
        (["distill", str(tiny("bert")), "--data", str(data), "--out", str(tmp_path / "o"), "--prune", "0.7"],
         "text-classification only"),
        (base + ["--out", str(theirs), "--prune", "0.7"], "already exists"),
        (base + ["--out", str(theirs), "--prune", "0.7", "--force"], "bertexport did not make"),
        (base + ["--out", str(keyword_model / "inside"), "--prune", "0.7", "--force"], "source checkpoint"),
    ]
    for args, message in cases:
        r = CliRunner().invoke(cli, args)
        assert r.exit_code == 2 and message in r.stderr, (args, r.exit_code, r.stderr, r.output)
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.output
    assert not (tmp_path / "o").exists() and (theirs / "notes.txt").read_text() == "user data"
    assert not (keyword_model / "inside").exists()


def test_prune_settings_refuse_training_values_but_not_the_defaults():
    """The rule lives on the record (library callers get it too): a training setting other
    than its default does not go with --prune; one at its default trains nothing either."""
    from bertexport.core.options import build
    from bertexport.students.settings import DistillSettings

    base = {"teacher": "t", "out": "o", "prune_fraction": 0.7, "distill_data": "d.jsonl"}
    with pytest.raises(UserError, match="does not go with --student-init, --alpha-attention, --resume"):
        build(DistillSettings, base | {"student": "s", "alpha_attention": 0.5, "resume": True}, "distill")
    with pytest.raises(UserError, match="MAC budget"):
        build(DistillSettings, base | {"prune_fraction": 1.0}, "distill")
    kept = build(DistillSettings, base | {"lr": 1e-4, "device": "auto", "seed": 3, "distill_threads": 2}, "distill")
    assert kept.training_options_set() == [] and kept.seed == 3
