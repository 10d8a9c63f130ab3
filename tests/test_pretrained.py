"""``--student-init``: a pre-trained smaller checkpoint as the student. Tiny init checkpoints
are built here (tests/tinymodels.py's BERT vocabulary, or another one): sharing the
teacher's vocabulary it distils (with the teacher's head, projections where the width
differs) and converts; with another vocabulary it is refused (exit 2) before any model
loads; other refusals (not a checkpoint, not smaller, task mismatch, embedding width) too."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
from click.testing import CliRunner

from bertexport.cli import cli
from bertexport.core.errors import UserError
from bertexport.students.distill import distill
from bertexport.students.distill_config import DistillConfig
from tests.tinymodels import keyword_sentence, make_tokenizer, minilm_vocab, write_keyword_jsonl


@pytest.fixture(scope="module")
def transfer(tmp_path_factory):
    rng = np.random.default_rng(5)
    path = tmp_path_factory.mktemp("transfer") / "kw.csv"
    rows = []
    for _ in range(240):
        y = int(rng.random() < 0.5)
        rows.append(f"{keyword_sentence(rng, int(rng.integers(4, 20)), 'excellent' if y else None)},{['absent', 'present'][y]}")
    path.write_text("text,label\n" + "\n".join(rows) + "\n")
    return path


def _init(out, tmp_path, *, family="bert", arch="AutoModel", hidden=16, heads=2, ffn=32, layers=1, labels=None, seed=3,
          tokenizer=None):
    """A tiny 'pre-trained' checkpoint (random weights stand in for pre-training)."""
    import torch
    import transformers as T

    tok = tokenizer or make_tokenizer(family, tmp_path / "tok" / family)
    dims = (dict(dim=hidden, n_heads=heads, hidden_dim=ffn, n_layers=layers) if family == "distilbert" else
            dict(hidden_size=hidden, num_attention_heads=heads, intermediate_size=ffn, num_hidden_layers=layers))
    extra = {"id2label": dict(enumerate(labels)), "label2id": {n: i for i, n in enumerate(labels)}} if labels else {}
    config = T.AutoConfig.for_model(family, vocab_size=len(tok), pad_token_id=tok.pad_token_id, max_position_embeddings=128,
                                    **dims, **extra)
    torch.manual_seed(seed)
    getattr(T, arch).from_config(config).save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def _encoder_from(teacher_path, out, hidden=16):
    """A stand-in for a general-distilled checkpoint: a bare 1-layer encoder sliced from the
    teacher (``shapes.make_student``; hidden 16: 1 head, FFN 32), saved without a task head."""
    import transformers as T

    from bertexport.students.shapes import StudentShape, make_student

    teacher = T.AutoModelForSequenceClassification.from_pretrained(teacher_path)
    shape = StudentShape(1, 16, 1, 32) if hidden == 16 else StudentShape(1, 32, 2, 64)
    make_student(teacher, shape, [1], None).bert.save_pretrained(out, safe_serialization=True)
    T.AutoTokenizer.from_pretrained(teacher_path).save_pretrained(out)
    return out


def _cfg(init, **kw):
    return DistillConfig(**(dict(student=str(init), epochs=3, batch_size=16, lr=2e-3, augment=0, seed=0) | kw))


def test_init_student_distils_with_the_teachers_head_and_converts(keyword_model, transfer, tmp_path):
    import torch
    import transformers as T

    init = _encoder_from(keyword_model, tmp_path / "mini-L1-H16")  # narrower than the teacher: projected
    r = distill(str(keyword_model), tmp_path / "s", data=transfer, config=_cfg(init, alpha_hidden=1.0)).report
    info = r["student"]["init"]
    assert info["name"] == "init:mini-L1-H16 L1-H16" and info["head"].startswith("fresh: the checkpoint has no task head")
    assert info["vocabulary"]["size"] == len(minilm_vocab().read_text().splitlines())
    assert r["student"]["layers"] == 1 and r["intermediate"]["projection"] is True and r["layer_map"] == [1]
    assert r["loss_parts"]["hidden"]["last_10pct"] < r["loss_parts"]["hidden"]["first_10pct"]
    assert r["final_eval"]["agreement"] > r["initial_eval"]["agreement"] and r["final_eval"]["agreement"] >= 0.8
    assert r["device"] == {"used": "cuda" if torch.cuda.is_available() else "cpu", "requested": "auto"}
    student = T.AutoModelForSequenceClassification.from_pretrained(tmp_path / "s")
    teacher = T.AutoConfig.from_pretrained(keyword_model)
    assert student.config.id2label == teacher.id2label and student.config.hidden_size == 16
    res = CliRunner().invoke(cli, ["convert", str(tmp_path / "s"), "-t", "ort-fp32", "-o", str(tmp_path / "art"),
                                   "--latency-runs", "0"])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "art" / "manifest.json").read_text())["status"] == "passed"


def test_another_vocabulary_is_refused_before_any_model_loads(keyword_model, transfer, tmp_path, monkeypatch):
    import transformers as T

    import bertexport.students.distill as D

    small = tmp_path / "vocab.txt"
    small.write_text("\n".join(minilm_vocab().read_text().splitlines()[:3000]) + "\n")
    init = _init(tmp_path / "other-vocab", tmp_path, tokenizer=T.BertTokenizerFast(vocab_file=str(small)))
    (init / "model.safetensors").write_bytes(b"not weights")  # reading these would fail with another message

    def no_model(*a, **k):
        raise AssertionError("a model was loaded before the vocabulary was checked")

    monkeypatch.setattr(D, "load_model", no_model)
    monkeypatch.setattr(T.PreTrainedModel, "from_pretrained", classmethod(no_model))
    r = CliRunner().invoke(cli, ["distill", str(keyword_model), "--out", str(tmp_path / "s"), "--data", str(transfer),
                                 "--student-init", str(init)])
    assert r.exit_code == 2, r.output
    assert "vocabulary differs from the teacher's" in r.stderr and "3000 tokens against the teacher's 30522" in r.stderr
    assert "Traceback" not in r.output and not (tmp_path / "s").exists()
    # the same vocabulary with the ids moved is named as such
    moved = tmp_path / "moved.txt"
    lines = minilm_vocab().read_text().splitlines()
    lines[1000], lines[1001] = lines[1001], lines[1000]
    moved.write_text("\n".join(lines) + "\n")
    init2 = _init(tmp_path / "moved-vocab", tmp_path, tokenizer=T.BertTokenizerFast(vocab_file=str(moved)))
    r = CliRunner().invoke(cli, ["distill", str(keyword_model), "--out", str(tmp_path / "s"), "--data", str(transfer),
                                 "--student-init", str(init2)])
    assert r.exit_code == 2 and "2 tokens with other ids" in r.stderr, r.output


def test_other_refusals(keyword_model, tiny, transfer, tmp_path):
    from bertexport.building.checkpoint import resolve_checkpoint
    from bertexport.students.pretrained import check_student_init

    teacher = resolve_checkpoint(str(keyword_model))
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "empty").mkdir()
    cases = [
        (str(tmp_path / "file.txt"), "not a folder"),
        (str(tmp_path / "empty"), "no config.json"),
        (str(tmp_path / "missing"), "not found"),
        (str(tiny("roberta", "text-classification")), "vocabulary differs"),  # another family, another tokenizer
        (str(_init(tmp_path / "big", tmp_path, hidden=32, ffn=64, layers=2)), "not smaller than the teacher"),
        (str(_init(tmp_path / "ner", tmp_path, arch="AutoModelForTokenClassification", labels=["O", "B-X"])),
         "task mismatch: it is fine-tuned for token-classification"),
    ]
    for source, says in cases:
        with pytest.raises(UserError, match=says):
            check_student_init(source, teacher)
    embedder = resolve_checkpoint(str(keyword_model), "feature-extraction")
    with pytest.raises(UserError, match="output size"):
        check_student_init(str(_init(tmp_path / "narrow", tmp_path)), embedder)
    r = CliRunner().invoke(cli, ["distill", str(keyword_model), "--out", str(tmp_path / "s"), "--data", str(transfer),
                                 "--student-init", str(tmp_path / "big"), "--layers", "1"])
    assert r.exit_code == 2 and "does not go with --layers" in r.stderr, r.output


def test_head_kept_for_the_same_labels_fresh_for_others(keyword_model, tmp_path):
    import torch

    from bertexport.building.checkpoint import resolve_checkpoint
    from bertexport.students.pretrained import check_student_init, load_init_student
    from safetensors.torch import load_file

    teacher = resolve_checkpoint(str(keyword_model))
    same = _init(tmp_path / "same", tmp_path, arch="AutoModelForSequenceClassification", labels=["absent", "present"])
    other = _init(tmp_path / "other", tmp_path, arch="AutoModelForSequenceClassification", labels=["neg", "pos"])
    three = _init(tmp_path / "three", tmp_path, arch="AutoModelForSequenceClassification", labels=["a", "b", "c"])
    saved = load_file(same / "model.safetensors")["classifier.weight"]
    init = check_student_init(str(same), teacher)
    assert init.head == "kept"
    assert torch.equal(load_init_student(init, teacher).classifier.weight, saved)
    init = check_student_init(str(other), teacher)
    assert init.head.startswith("fresh: its head has other labels (neg, pos")
    torch.manual_seed(0)
    model = load_init_student(init, teacher)
    assert not torch.equal(model.classifier.weight, load_file(other / "model.safetensors")["classifier.weight"])
    assert torch.equal(model.bert.embeddings.word_embeddings.weight,
                       load_file(other / "model.safetensors")["bert.embeddings.word_embeddings.weight"])  # the body is kept
    model = load_init_student(check_student_init(str(three), teacher), teacher)
    assert model.classifier.weight.shape == (2, 16) and model.config.id2label == {0: "absent", 1: "present"}


def test_fresh_head_warm_started_from_the_teacher(keyword_model, tmp_path):
    """A head-less general checkpoint of the teacher's width starts from the teacher's pooler and
    classifier (where the shapes agree); its body stays its own."""
    import torch

    from bertexport.building.checkpoint import load_model, resolve_checkpoint
    from bertexport.students.pretrained import check_student_init, load_init_student
    from safetensors.torch import load_file

    teacher = resolve_checkpoint(str(keyword_model))
    teacher_model = load_model(teacher)
    width = teacher_model.config.hidden_size
    other = _init(tmp_path / "other", tmp_path, arch="AutoModelForSequenceClassification", labels=["neg", "pos"],
                  hidden=width, ffn=width)
    init = check_student_init(str(other), teacher)
    model = load_init_student(init, teacher, teacher_model)
    assert torch.equal(model.classifier.weight, teacher_model.classifier.weight)
    assert torch.equal(model.classifier.bias, teacher_model.classifier.bias)
    assert "classifier.weight" in model.warm_started
    assert torch.equal(model.bert.embeddings.word_embeddings.weight,
                       load_file(other / "model.safetensors")["bert.embeddings.word_embeddings.weight"])  # the body is kept
    assert not torch.equal(model.bert.embeddings.word_embeddings.weight, teacher_model.bert.embeddings.word_embeddings.weight)


def test_another_family_sharing_the_tokenizer(keyword_model, transfer, tmp_path):
    """A DistilBERT student of a BERT teacher (the same WordPiece vocabulary): both get the
    inputs both take (no token_type_ids), and the student keeps its own tokenizer class."""
    import transformers as T

    init = _init(tmp_path / "distil", tmp_path, family="distilbert", arch="AutoModelForMaskedLM", hidden=32, ffn=32)
    r = distill(str(keyword_model), tmp_path / "s", data=transfer, config=_cfg(init, epochs=1)).report
    assert r["student"]["init"]["input_names"] == ["input_ids", "attention_mask"]
    assert r["student"]["init"]["head"] == "fresh: its pre-training (masked-LM) head is dropped"
    assert T.AutoConfig.from_pretrained(tmp_path / "s").model_type == "distilbert"
    assert "token_type_ids" not in T.AutoTokenizer.from_pretrained(tmp_path / "s")("a text")
    assert r["final_eval"]["agreement"] > 0.5


# ------------------------------------------------------------------ optimize --student-init

@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    # 500 rows: the held-out slice must resolve the gate
    return write_keyword_jsonl(tmp_path_factory.mktemp("data") / "kw.jsonl", 17)


def test_optimize_judges_an_init_student_named_by_what_it_is(keyword_model, labelled, tmp_path, monkeypatch):
    """An init student competes in optimize: trained under the teacher's head, judged against the
    original, and (on an injected clock: tests never time) the fastest passing build wins."""
    from bertexport.judging.gates import Gates
    from bertexport.search.cost_model import CostModel, linear_macs
    from bertexport.search.optimize import optimize
    from bertexport.students.shapes import StudentShape
    from tests.searchclock import inject_search_clock

    teacher = StudentShape(2, 32, 2, 64)
    inject_search_clock(monkeypatch, lambda c: 0.5 if c.student else (2.0 if c.precision == "fp32" else 1.0 + 0.4 * len(c.keep_float)))
    monkeypatch.setattr(CostModel, "_time_builds", lambda self, builds: {
        n: 0.2 + 0.8 * linear_macs(shape, 1, 128) / linear_macs(teacher, 1, 128) for n, (shape, _) in builds.items()})
    init = _encoder_from(keyword_model, tmp_path / "mini", hidden=32)
    res = optimize(str(keyword_model), labelled, tmp_path / "o", budget="5m", student_init=[str(init)], distill_epochs=2,
                   backends={"onnxruntime"}, threads=1, gates=Gates(max_accuracy_drop=10.0), device="cpu")
    (student,) = res.report["students"]
    assert student["shape"] == "init:mini L1-H32" and student["init"]["head"].startswith("fresh")
    assert student["status"] == "passed" and student["device"] == {"used": "cpu", "requested": "cpu"}
    assert res.report["training_device"] == "cpu"
    w = res.report["winner"]
    assert w["candidate"]["student"] == "init:mini L1-H32" and w["name"].startswith("init:mini L1-H32/")
    assert "init:mini L1-H32" in (res.artifact / "search.md").read_text()
    r = CliRunner().invoke(cli, ["run", str(res.artifact), "an excellent film", "--json", "-"])
    assert r.exit_code == 0 and json.loads(r.stdout)["label"] in ("absent", "present")


def test_optimize_refuses_another_vocabulary_before_loading(keyword_model, labelled, tmp_path, monkeypatch):
    import transformers as T

    small = tmp_path / "vocab.txt"
    small.write_text("\n".join(minilm_vocab().read_text().splitlines()[:2000]) + "\n")
    init = _init(tmp_path / "other", tmp_path, tokenizer=T.BertTokenizerFast(vocab_file=str(small)))

    def no_model(*a, **k):
        raise AssertionError("a model was loaded before the vocabulary was checked")

    monkeypatch.setattr(T.PreTrainedModel, "from_pretrained", classmethod(no_model))
    monkeypatch.setattr("bertexport.building.checkpoint.load_model", no_model)
    r = CliRunner().invoke(cli, ["optimize", str(keyword_model), "--data", str(labelled), "-o", str(tmp_path / "o"),
                                 "--student-init", str(init)])
    assert r.exit_code == 2 and "2000 tokens against the teacher's 30522" in r.stderr, r.output
    assert not (tmp_path / "o").exists()


def test_init_shapes_in_the_search(keyword_model, tmp_path):
    """How the student search sees an init checkpoint: named by what it is, one per folder,
    never dominated nor dominating, its own family deciding first-token skipping."""
    from bertexport.building.checkpoint import resolve_checkpoint
    from bertexport.search.candidates import Candidate
    from bertexport.search.student_builds import student_candidates
    from bertexport.search.student_shapes import InitShape, PrunedShape, dominated, next_shape, plan_init_students
    from bertexport.students.shapes import StudentShape

    teacher = resolve_checkpoint(str(keyword_model))
    a = _init(tmp_path / "mini-a", tmp_path)
    b = _init(tmp_path / "mini-b", tmp_path, seed=4)
    shapes = plan_init_students([str(a), str(b), str(a)], teacher, ["an excellent film"])
    assert [s.name for s in shapes] == ["init:mini-a L1-H16", "init:mini-b L1-H16"]  # same dims, two students
    assert all(isinstance(s, InitShape) for s in shapes) and shapes[0] != shapes[1]
    assert shapes[0].to_dict()["name"] == "init:mini-a L1-H16" and shapes[0].ffn == 32
    big = StudentShape(2, 32, 2, 64)
    assert not dominated(shapes[0], big) and not dominated(big, shapes[0]) and dominated(StudentShape(1, 16, 1, 32), big)
    # pre-trained inits are trained first (bisected among themselves), pruned originals keep their place by latency
    pruned = PrunedShape(1, 24, 1, 48)
    for k, v in (("budget", 0.5), ("init", SimpleNamespace(path=tmp_path / "pruned-0.5"))):
        object.__setattr__(pruned, k, v)
    by_latency = [StudentShape(1, 8, 1, 16), shapes[0], StudentShape(1, 16, 1, 16), pruned, shapes[1], big]
    assert next_shape(by_latency) == shapes[1]  # the middle of the two inits
    assert next_shape([s for s in by_latency if s not in shapes]) == pruned  # no init left: the middle of all
    # then the shapes keeping the teacher's hidden size (32 here), then the rest with the pruned originals
    rest = [s for s in by_latency if s not in shapes]
    wide = PrunedShape(1, 32, 2, 48)  # a pruned original of the teacher's width stays in the last tier
    for k, v in (("budget", 0.75), ("init", SimpleNamespace(path=tmp_path / "pruned-0.75"))):
        object.__setattr__(wide, k, v)
    assert next_shape(rest + [wide], hidden=32) == big
    assert next_shape([s for s in rest if s != big] + [wide], hidden=32) == pruned  # the middle of all left
    base = Candidate("ort-int8", "onnxruntime", "int8", [{"type": "ort-dynamic-quantize"}], {})
    (cand,) = student_candidates(shapes[0], [base], skip=not shapes[0].skip)
    assert cand.student == "init:mini-a L1-H16" and cand.name.startswith("init:mini-a L1-H16/ort-int8")
    assert any(p["type"] == "first-token-skip" for p in cand.passes) == shapes[0].skip
