"""Student shapes, importance scores, width pruning and layer choice (bertexport.students.shapes)
on tiny random-init models of every width-prunable family and a tiny trained keyword model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers as T

from bertexport.students import shapes as S
from bertexport.students.shapes import shrink
from bertexport.students.training_data import TeacherOutputs, length_batches
from bertexport.core.errors import UserError
from tests.tinymodels import TASK_AUTO, keyword_sentence

WIDTH_FAMILIES = ["bert", "roberta", "distilbert", "electra"]
MINILM = S.StudentShape(6, 384, 12, 1536)  # head size 32


def _load(path, task):
    return getattr(T, TASK_AUTO[task]).from_pretrained(path, attn_implementation="eager").eval()


def _feeds(model, batch=3, length=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, min(model.config.vocab_size, 500), (batch, length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0  # one padded row
    return {"input_ids": ids, "attention_mask": mask}


def _out(model, feeds):
    with torch.no_grad():
        o = model(**feeds)
    if getattr(o, "start_logits", None) is not None:
        return torch.stack([o.start_logits, o.end_logits])
    return o.logits if getattr(o, "logits", None) is not None else o.last_hidden_state


# ------------------------------------------------------------------ shapes

def test_parse_shape_fills_from_the_teacher_and_derives_heads():
    assert S.parse_shape("L3", MINILM) == S.StudentShape(3, 384, 12, 1536)
    assert S.parse_shape("L3-H256", MINILM) == S.StudentShape(3, 256, 8, 1536)
    assert S.parse_shape("L3-H256-F1024", MINILM) == S.StudentShape(3, 256, 8, 1024)
    assert S.parse_shape("L3-F768", MINILM) == S.StudentShape(3, 384, 12, 768)
    assert S.parse_shape("H256", MINILM) == S.StudentShape(6, 256, 8, 1536)
    s = S.StudentShape(3, 256, 8, 1024)
    assert s.name == "L3-H256-A8-F1024" and S.parse_shape(s.name, MINILM) == s
    assert s.to_dict() == {"layers": 3, "hidden": 256, "heads": 8, "ffn": 1024, "name": "L3-H256-A8-F1024"}


@pytest.mark.parametrize("text, message", [
    ("", "is not like"), ("3", "is not like"), ("L3-X2", "is not like"), ("L3-H", "is not like"), ("L-3", "is not like"),
    ("L3-H250", "not a multiple of the teacher's head size 32"), ("L3-H256-A4", "4 heads do not fit"),
])
def test_parse_shape_refuses_with_one_line(text, message):
    with pytest.raises(UserError, match=message) as e:
        S.parse_shape(text, MINILM)
    assert "\n" not in str(e.value)


def test_check_shape_and_families():
    S.check_shape(S.StudentShape(3, 256, 8, 1024), MINILM, "bert")
    S.check_shape(S.StudentShape(3, 384, 12, 1536), MINILM, "albert")  # layer-drop: every family
    with pytest.raises(UserError, match="larger than the teacher .* in layers"):
        S.check_shape(S.StudentShape(7, 384, 12, 1536), MINILM, "bert")
    with pytest.raises(UserError, match="nothing to compress"):
        S.check_shape(MINILM, MINILM, "bert")
    with pytest.raises(UserError, match="hidden size must be heads x"):
        S.check_shape(S.StudentShape(3, 256, 12, 1024), MINILM, "bert")
    with pytest.raises(UserError, match="supports bert, roberta, xlm-roberta, camembert, electra, distilbert, not albert"):
        S.check_shape(S.StudentShape(3, 384, 12, 768), MINILM, "albert")
    with pytest.raises(UserError, match="embedding_size == hidden_size"):
        S.check_shape(S.StudentShape(3, 256, 8, 1536), MINILM, "electra", {"embedding_size": 128, "hidden_size": 384})
    assert [f for f in ("bert", "roberta", "xlm-roberta", "camembert", "electra", "distilbert", "albert", "deberta-v2",
                        "mpnet", "mobilebert") if S.width_prunable(f)] == ["bert", "roberta", "xlm-roberta", "camembert",
                                                                           "electra", "distilbert"]


def test_teacher_shape_reads_config_objects_and_dicts():
    assert S.teacher_shape(T.BertConfig(hidden_size=384, num_attention_heads=12, intermediate_size=1536,
                                        num_hidden_layers=6)) == MINILM
    assert S.teacher_shape({"model_type": "distilbert", "dim": 768, "n_heads": 12, "hidden_dim": 3072, "n_layers": 6}) \
        == S.StudentShape(6, 768, 12, 3072)


def test_random_student_is_the_teachers_class_with_a_stock_config(tiny):
    teacher = _load(tiny("distilbert", "text-classification"), "text-classification")
    model = S.random_student(teacher.config, S.StudentShape(1, 16, 1, 24))
    assert type(model) is type(teacher)
    assert (model.config.n_layers, model.config.dim, model.config.n_heads, model.config.hidden_dim) == (1, 16, 1, 24)
    assert model.distilbert.transformer.layer[0].ffn.lin1.weight.shape == (24, 16)
    assert _out(model, _feeds(model)).shape == (3, 3)


# ------------------------------------------------------------------ slicing

def _parts(model):
    """(query weight, ffn-in weight, word embeddings, first LayerNorm) of layer 0."""
    w = S.WIDTH_FAMILIES[model.config.model_type]
    layers, _ = S._layers(model)
    emb = model.get_input_embeddings().weight
    return (layers[0].get_submodule(w.qkv[0]).weight.shape, layers[0].get_submodule(w.ffn_in).weight.shape,
            layers[0].get_submodule(w.attn_out).weight.shape, emb.shape)


@pytest.mark.parametrize("family", WIDTH_FAMILIES)
def test_make_student_slices_saves_and_reloads(tiny, tmp_path, family):
    task = "text-classification"
    teacher = _load(tiny(family, task), task)  # hidden 32, 2 heads of 16, FFN 64, 2 layers
    shape = S.parse_shape("L1-H16-F24", S.teacher_shape(teacher.config))
    student = S.make_student(teacher, shape, [1], None)  # magnitude scores
    assert type(student) is type(teacher)
    assert S.teacher_shape(student.config) == shape and not getattr(student.config, "pruned_heads", None)
    vocab = teacher.config.vocab_size
    assert _parts(student) == ((16, 16), (24, 16), (16, 16), (vocab, 16))
    assert not any(32 in p.shape or 64 in p.shape for p in student.parameters())
    student.save_pretrained(tmp_path / "s")
    again, info = getattr(T, TASK_AUTO[task]).from_pretrained(tmp_path / "s", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    feeds = _feeds(teacher)
    torch.testing.assert_close(_out(again.eval(), feeds), _out(student, feeds))


@pytest.mark.parametrize("family, task", [(f, "text-classification") for f in WIDTH_FAMILIES]
                         + [("bert", "feature-extraction"), ("bert", "fill-mask"), ("roberta", "token-classification"),
                            ("distilbert", "question-answering")])
def test_slicing_every_unit_in_any_order_reproduces_the_teacher(tiny, family, task):
    """Keeping every head, neuron and hidden dimension, each in a shuffled order, touches
    every sliced tensor (a dimension sliced inconsistently anywhere breaks the outputs)."""
    teacher = _load(tiny(family, task), task)
    t = S.teacher_shape(teacher.config)
    g = torch.Generator().manual_seed(1)
    hidden = torch.randperm(t.hidden, generator=g).tolist()
    heads = [torch.randperm(t.heads, generator=g).tolist() for _ in range(t.layers)]
    ffn = [torch.randperm(t.ffn, generator=g).tolist() for _ in range(t.layers)]
    assert hidden != sorted(hidden) and ffn[0] != sorted(ffn[0]) and any(h != sorted(h) for h in heads)
    sliced = S.slice_width(teacher, hidden, heads, ffn)
    feeds = _feeds(teacher)
    a, b = _out(teacher, feeds), _out(sliced, feeds)
    if task == "feature-extraction":
        a = a[..., hidden]  # the student's hidden dimensions follow the order given
    torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", WIDTH_FAMILIES)
def test_removing_dead_neurons_is_exact(tiny, family):
    """FFN neurons whose output weights are zero contribute nothing: removing exactly
    those (ranked lowest) must leave the outputs unchanged."""
    task = "text-classification"
    teacher = _load(tiny(family, task), task)
    w = S.WIDTH_FAMILIES[family]
    layers, _ = S._layers(teacher)
    rng = np.random.default_rng(0)
    dead = [sorted(rng.choice(64, 20, replace=False).tolist()) for _ in layers]
    with torch.no_grad():
        for layer, d in zip(layers, dead):
            layer.get_submodule(w.ffn_out).weight[:, d] = 0
    imp = S.magnitude_importance(teacher)
    assert all(set(np.argsort(f)[:20].tolist()) == set(d) for f, d in zip(imp.ffn, dead))
    student = S.make_student(teacher, S.parse_shape("L2-F44", S.teacher_shape(teacher.config)), [0, 1], imp)
    assert S._layers(student)[0][0].get_submodule(w.ffn_in).weight.shape == (44, 32)
    feeds = _feeds(teacher)
    torch.testing.assert_close(_out(student, feeds), _out(teacher, feeds), atol=1e-5, rtol=1e-5)


def test_full_width_student_is_the_layer_dropped_teacher(tiny):
    teacher = _load(tiny("bert", "text-classification"), "text-classification")
    student = S.make_student(teacher, S.StudentShape(1, 32, 2, 64), [1], None)
    feeds = _feeds(teacher)
    torch.testing.assert_close(_out(student, feeds), _out(shrink(teacher, [1]).eval(), feeds))


def test_make_student_refusals(tiny):
    albert = _load(tiny("albert", "text-classification"), "text-classification")
    with pytest.raises(UserError, match="width pruning .* not albert"):
        S.make_student(albert, S.StudentShape(1, 32, 2, 32), [1], None)
    assert S.teacher_shape(S.make_student(albert, S.StudentShape(1, 32, 2, 64), [1], None).config).layers == 1
    bert = _load(tiny("bert", "text-classification"), "text-classification")
    with pytest.raises(UserError, match="has 1 layers but 2 teacher layers"):
        S.make_student(bert, S.StudentShape(1, 16, 1, 64), [0, 1], None)


# ------------------------------------------------------------------ importance and layer choice on a trained model

@pytest.fixture(scope="module")
def keyword_data(keyword_model, tmp_path_factory):
    """The trained keyword teacher, 256 texts of its task in length batches, its outputs."""
    teacher = _load(keyword_model, "text-classification")
    tok = T.AutoTokenizer.from_pretrained(keyword_model)
    rng = np.random.default_rng(5)
    texts = [keyword_sentence(rng, int(rng.integers(4, 24)), "excellent" if rng.random() < 0.5 else None) for _ in range(256)]
    batches = length_batches(tok, texts, None, 32, 64, 0)
    outs = TeacherOutputs(tmp_path_factory.mktemp("outs") / "t.npz", "text-classification").load_or_compute(
        teacher, batches, lambda m: None)
    return teacher, batches, outs


def _reversed(imp):
    return S.Importance(-imp.heads, -imp.ffn, -imp.hidden, "reversed")


def test_importance_ranks_what_the_teacher_needs(keyword_data):
    teacher, batches, outs = keyword_data
    task = "text-classification"
    imp = S.score_importance(teacher, batches, task, outs)
    assert imp.heads.shape == (2, 2) and imp.ffn.shape == (2, 64) and imp.hidden.shape == (32,)
    np.testing.assert_allclose(np.linalg.norm(imp.heads, axis=1), 1.0, rtol=1e-5)  # L2-normalised per layer
    shape = S.parse_shape("L2-H16", S.teacher_shape(teacher.config))  # half the heads and hidden dimensions
    kept = S.measure_student(S.make_student(teacher, shape, [0, 1], imp), batches, task, outs)
    dropped = S.measure_student(S.make_student(teacher, shape, [0, 1], _reversed(imp)), batches, task, outs)
    assert kept["agreement"] > dropped["agreement"] and kept["loss"] < dropped["loss"]
    assert kept["agreement"] >= 0.95  # measured 1.00 (reversed: 0.83) before any re-training


def test_importance_on_a_layer_dropped_student(keyword_data):
    """Scored on the layer-dropped model (not at a loss minimum), keeping the top-scored
    FFN neurons beats keeping the bottom-scored ones and beats |gradient| scores."""
    teacher, batches, outs = keyword_data
    task = "text-classification"
    depth = shrink(teacher, [1]).eval()
    shape = S.parse_shape("L1-F16", S.teacher_shape(teacher.config))
    signed = S.score_importance(depth, batches, task, outs)
    absolute = S.score_importance(depth, batches, task, outs, signed=False)
    assert signed.method == "taylor-signed" and absolute.method == "taylor-abs" and signed.heads.shape == (1, 2)
    loss = {name: S.measure_student(S.make_student(teacher, shape, [1], imp), batches, task, outs)["loss"]
            for name, imp in [("signed", signed), ("reversed", _reversed(signed)), ("abs", absolute)]}
    assert loss["signed"] < loss["reversed"] and loss["signed"] < loss["abs"]
    # scores indexed by the teacher's layers are mapped onto the kept ones
    full = S.score_importance(teacher, batches, task, outs)
    a = S.make_student(teacher, shape, [1], full)
    b = S.make_student(teacher, shape, [1], S.Importance(full.heads[[1]], full.ffn[[1]], full.hidden))
    feeds = _feeds(teacher)
    torch.testing.assert_close(_out(a, feeds), _out(b, feeds))


@pytest.mark.parametrize("family", WIDTH_FAMILIES)
def test_feature_extraction_importance_is_not_zero_on_the_teacher(tiny, tmp_path, family):
    """Every gate's hook fires (every score has a gradient). On the teacher itself the MSE
    against its own outputs has none; the random projection term still ranks units."""
    ckpt = tiny(family, "feature-extraction")
    teacher = _load(ckpt, "feature-extraction")
    tok = T.AutoTokenizer.from_pretrained(ckpt)
    batches = length_batches(tok, [f"text number {i} of a few words" for i in range(40)], None, 16, 32, 0)
    outs = TeacherOutputs(tmp_path / "o.npz", "feature-extraction").load_or_compute(teacher, batches, lambda m: None)
    imp = S.score_importance(teacher, batches, "feature-extraction", outs, signed=False)
    assert (imp.ffn > 0).all() and (imp.hidden > 0).all() and (imp.heads > 0).all()


def test_choose_layers_measures_every_candidate(keyword_data):
    teacher, batches, outs = keyword_data
    task = "text-classification"
    assert S.layer_candidates(6, 3) == {"lower": [0, 1, 2], "every-k": [1, 3, 5], "lower+last": [0, 1, 5]}
    assert S.layer_candidates(2, 1) == {"lower": [0], "every-k": [1]}  # lower+last is every-k here
    keep, table = S.choose_layers(teacher, 1, batches, task, outs, train_steps=0)
    assert [r["keep"] for r in table] == [[0], [1]]
    assert keep == min(table, key=lambda r: r["loss"])["keep"]
    for row in table:  # measured on the held-out (odd) batches, as built
        again = S.measure_student(shrink(teacher, row["keep"]), batches[1::2], task, outs[1::2])
        assert row["loss"] == pytest.approx(again["loss"]) and row["agreement"] == again["agreement"]
    keep_trained, trained = S.choose_layers(teacher, 1, batches, task, outs, train_steps=4)
    assert [r["train_steps"] for r in trained] == [4, 4] and keep_trained == min(trained, key=lambda r: r["loss"])["keep"]
    assert trained[1]["loss"] < table[1]["loss"]  # four steps already adapt the head to layer 1 alone


# ------------------------------------------------------------------ pruned students on the backends

def _graph_dims(model_path) -> list[tuple[int, ...]]:
    """Shapes of the weights inside a compiled model (ONNX initializers, OpenVINO constants)."""
    if model_path.suffix == ".onnx":
        import onnx

        return [tuple(t.dims) for t in onnx.load(str(model_path)).graph.initializer]
    import openvino as ov

    return [tuple(int(d) for d in op.get_output_shape(0)) for op in ov.Core().read_model(str(model_path)).get_ops()
            if op.get_type_name() == "Constant"]


@pytest.mark.parametrize("family", WIDTH_FAMILIES)
def test_pruned_student_converts_and_runs_on_ort_and_openvino(tiny, tmp_path, family):
    from bertexport.building.convert import convert
    from bertexport.shipping.runtime import Artifact, Predictor

    pytest.importorskip("openvino")
    task = "text-classification"
    ckpt = tiny(family, task)
    teacher = _load(ckpt, task)
    student = S.make_student(teacher, S.parse_shape("L1-H16-F24", S.teacher_shape(teacher.config)), [1], None)
    folder = tmp_path / "student"
    student.save_pretrained(folder, safe_serialization=True)
    T.AutoTokenizer.from_pretrained(ckpt).save_pretrained(folder)
    for target in ("ort-fp32", "openvino-fp32"):
        result = convert(str(folder), target, tmp_path / target, latency_runs=0)
        checks = result.manifest["parity"]["checks"]
        assert result.passed and all(c["agreement"] == 1.0 for c in checks.values())
        dims = _graph_dims(result.artifact / result.manifest["model"]["path"])
        flat = {d for shape in dims for d in shape}
        assert 24 in flat and 16 in flat  # the FFN and hidden sizes of the student
        assert not flat & {32, 64}  # nothing of the teacher's hidden (32) or FFN (64) width is left
        with Artifact(result.artifact) as art:
            enc = art.encoder.encode(["an excellent film", "a dull one"])
            logits = art.infer(enc)["logits"]
            with torch.no_grad():
                ref = student(**{k: torch.from_numpy(v) for k, v in enc.items()}).logits.numpy()
            np.testing.assert_allclose(logits, ref, atol=1e-4, rtol=1e-4)
            assert len(Predictor(art).predict(["an excellent film"])) == 1
