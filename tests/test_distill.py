"""Distillation on a tiny, learnable task: a 2-layer teacher that detects a keyword,
distilled to 1 layer. Loss falls, agreement rises well above chance, resume works;
intermediate-layer losses (hidden states through a projection, MiniLMv2 Q/K/V relations)
fall; teacher-labelled expansion adds rows whose teacher outputs are computed once."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from click.testing import CliRunner

from bertexport.cli import cli
from bertexport.students.distill import distill
from bertexport.students.distill_config import DistillConfig, check_config
from bertexport.students.shapes import keep_every
from bertexport.core.errors import UserError
from tests.tinymodels import keyword_sentence


@pytest.fixture(scope="module")
def transfer(tmp_path_factory):
    rng = np.random.default_rng(3)
    path = tmp_path_factory.mktemp("transfer") / "transfer.txt"
    path.write_text("\n".join(keyword_sentence(rng, int(rng.integers(4, 24)), "excellent" if rng.random() < 0.5 else None)
                              for _ in range(480)))
    return path


def _cfg(**kw):
    base = dict(layers=1, epochs=3, batch_size=16, lr=2e-3, checkpoint_every=10, seed=0, augment=0)
    return DistillConfig(**(base | kw))


def test_keep_every():
    assert keep_every(12, 6) == [1, 3, 5, 7, 9, 11] and keep_every(6, 3) == [1, 3, 5] and keep_every(2, 1) == [1]
    with pytest.raises(UserError):
        keep_every(6, 6)


def test_distill_learns_and_reports(keyword_model, transfer, tmp_path):
    r = distill(str(keyword_model), tmp_path / "student", data=transfer, config=_cfg()).report
    assert r["student"]["layers"] == 1 and r["teacher"]["layers"] == 2
    assert r["student"]["parameters"] < r["teacher"]["parameters"]
    assert r["loss_last_10pct"] < r["loss_first_10pct"]
    assert r["final_eval"]["agreement"] >= 0.85  # chance is ~0.5 on this balanced task
    assert r["final_eval"]["agreement"] >= r["initial_eval"]["agreement"]
    cb = r["class_balance"]  # the teacher-predicted classes of the training rows and their loss weights
    assert cb["power"] == 0.5 and sum(v["rows"] for v in cb["classes"].values()) == r["data"]["train_texts"]
    assert cb["applied"] and all(v["weight"] > 0 for v in cb["classes"].values())
    assert (tmp_path / "student" / "model.safetensors").is_file() and (tmp_path / "student" / "tokenizer.json").is_file()
    assert not (tmp_path / ".student.distill").exists()


def test_a_run_interrupted_before_its_first_checkpoint_leaves_no_work_folder(keyword_model, transfer, tmp_path):
    def interrupt(step, loss):
        if step == 3:  # checkpoints come every 10 steps here
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        distill(str(keyword_model), tmp_path / "s", data=transfer, config=_cfg(), on_step=interrupt)
    assert not list(tmp_path.iterdir())  # no student, no resume state without a checkpoint


def test_a_run_interrupted_while_its_shaped_student_is_built_leaves_no_work_folder(keyword_model, transfer, tmp_path,
                                                                                   monkeypatch):
    """The layer choice and importance scores write to the work folder before training starts (a
    SIGTERM there once left .OUT.distill/teacher-shape.npz behind): interrupted then, nothing stays."""
    import bertexport.students.distill as D

    def interrupt(*args, **kwargs):
        assert (tmp_path / ".s.distill" / "teacher-shape.npz").is_file()  # the work folder had begun
        raise KeyboardInterrupt

    monkeypatch.setattr(D.students, "make_student", interrupt)
    with pytest.raises(KeyboardInterrupt):
        distill(str(keyword_model), tmp_path / "s", data=transfer, config=_cfg(layers=None, shape="L1-H16"))
    assert not list(tmp_path.iterdir())


def test_interrupted_run_resumes(keyword_model, transfer, tmp_path):
    out = tmp_path / "s"

    def interrupt(step, loss):
        if step == 25:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        distill(str(keyword_model), out, data=transfer, config=_cfg(), on_step=interrupt)
    assert not out.exists()  # no half-written student
    assert (tmp_path / ".s.distill" / "checkpoint.pt").is_file()
    r = distill(str(keyword_model), out, data=transfer, config=_cfg(), resume=True).report
    assert r["resumed_from_step"] == 20  # the last checkpoint before the interruption
    assert r["steps"] == 3 * 27  # 432 training texts / 16 per batch, 3 epochs
    assert r["final_eval"]["agreement"] >= 0.85


def test_a_work_folder_is_resumed_whatever_ran_the_teacher_before_and_another_runs_is_refused_by_name(tmp_path):
    """The work folder's stamp names the teacher by its checkpoint digest (or its config without
    runtime flags): a teacher whose loaded config gained ``output_attentions`` in this process
    (another step ran it) still resumes its own checkpoint; other data is refused, saying so."""
    from types import SimpleNamespace

    from bertexport.students.training import _inputs_digest, _inputs_parts, _prepare_work

    config = SimpleNamespace(to_dict=lambda: {"model_type": "bert", "hidden_size": 32, "output_attentions": False})
    ran = SimpleNamespace(to_dict=lambda: {"model_type": "bert", "hidden_size": 32, "output_attentions": True,
                                           "return_dict": False, "_attn_implementation_autoset": True})
    teacher, used = SimpleNamespace(config=config), SimpleNamespace(config=ran)
    cfg, texts = DistillConfig(), ["a film", "another film"]
    assert _inputs_digest(teacher, texts, [0, 1], "text-classification", cfg) == \
        _inputs_digest(used, texts, [0, 1], "text-classification", cfg)
    assert _inputs_digest(teacher, texts, [0, 1], "text-classification", cfg, "sha-a") != \
        _inputs_digest(teacher, texts, [0, 1], "text-classification", cfg, "sha-b")
    work = tmp_path / "w.work"
    parts = _inputs_parts(teacher, texts, [0, 1], "text-classification", cfg, "sha-a")
    _prepare_work(work, _inputs_digest(teacher, texts, [0, 1], "text-classification", cfg, "sha-a"), parts)
    (work / "checkpoint.pt").write_bytes(b"state")
    _prepare_work(work, _inputs_digest(used, texts, [0, 1], "text-classification", cfg, "sha-a"), parts)  # resumes
    assert (work / "checkpoint.pt").is_file()
    other = _inputs_parts(teacher, texts, [1, 0], "text-classification", cfg, "sha-a")
    with pytest.raises(UserError, match=r"holds an interrupted run on other labels;"):
        _prepare_work(work, _inputs_digest(teacher, texts, [1, 0], "text-classification", cfg, "sha-a"), other)
    # the search's own cache (keyed by its inputs already): a stale stamp is an older bertexport's, started again
    _prepare_work(work, _inputs_digest(teacher, texts, [1, 0], "text-classification", cfg, "sha-a"), other, True)
    assert not (work / "checkpoint.pt").exists() and (work / "inputs.json").is_file()


def test_bad_inputs(keyword_model, transfer, tmp_path, tiny):
    with pytest.raises(UserError, match="between 1 and 1"):
        distill(str(keyword_model), tmp_path / "a", data=transfer, config=_cfg(layers=2))
    with pytest.raises(UserError, match="not smaller"):
        distill(str(keyword_model), tmp_path / "a", data=transfer, config=_cfg(layers=None, keep_layers=[0, 1]))
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(UserError, match="no usable text"):
        distill(str(keyword_model), tmp_path / "a", data=tmp_path / "empty.txt", config=_cfg())
    with pytest.raises(UserError, match="out of memory"):
        distill(str(keyword_model), tmp_path / "a", data=transfer, config=_cfg(batch_size=4096, max_length=512))
    with pytest.raises(UserError, match="vocabulary differs"):  # another family, another tokenizer
        distill(str(keyword_model), tmp_path / "a", data=transfer,
                config=_cfg(layers=None, student=str(tiny("roberta", "text-classification"))))
    # a BERT student whose tokenizer has another vocabulary
    import shutil

    import transformers as T

    from tests.tinymodels import minilm_vocab

    other = tmp_path / "other"
    shutil.copytree(tiny("bert", "text-classification"), other)
    for f in other.glob("*"):
        if f.name.startswith(("tokenizer", "vocab", "special_tokens")):
            f.unlink()
    small_vocab = tmp_path / "vocab.txt"
    small_vocab.write_text("\n".join(minilm_vocab().read_text().splitlines()[:3000]) + "\n")
    T.BertTokenizerFast(vocab_file=str(small_vocab)).save_pretrained(other)
    with pytest.raises(UserError, match="3000 tokens against the teacher's"):
        distill(str(keyword_model), tmp_path / "a", data=transfer, config=_cfg(layers=None, student=str(other)))
    r = CliRunner().invoke(cli, ["distill", str(tmp_path / "gpt"), "--out", str(tmp_path / "b"), "--layers", "1"])
    assert r.exit_code == 2 and "model path not found" in r.output
    r = CliRunner().invoke(cli, ["distill", str(keyword_model), "--out", str(tmp_path / "b"), "--resume"])
    assert r.exit_code == 2 and "nothing to resume" in r.output


def test_convert_with_distill(keyword_model, transfer, tmp_path):
    r = CliRunner().invoke(cli, ["convert", str(keyword_model), "-t", "ort-fp32", "-o", str(tmp_path / "art"),
                                 "--distill", "1", "--distill-data", str(transfer), "--distill-epochs", "1",
                                 "--latency-runs", "0"])
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "art" / "manifest.json").read_text())
    assert m["distillation"]["student"]["layers"] == 1 and m["distillation"]["teacher"]["layers"] == 2


# ------------------------------------------------------------------ intermediate-layer losses

def _teacher(path):
    import transformers as T

    return T.AutoModelForSequenceClassification.from_pretrained(path).eval(), T.AutoTokenizer.from_pretrained(path)


def _texts(n, seed=11):
    rng = np.random.default_rng(seed)
    labels = [int(rng.random() < 0.5) for _ in range(n)]
    return [keyword_sentence(rng, int(rng.integers(4, 20)), "excellent" if y else None) for y in labels], labels


def _falls(part):
    return part["last_10pct"] < part["first_10pct"]


def test_relation_heads_and_loss():
    import torch

    from bertexport.students.losses import relation_heads, relation_loss

    assert relation_heads(384, 384, 12) == 12 and relation_heads(256, 384, 12) == 8 and relation_heads(16, 32, 2) == 2
    with pytest.raises(UserError, match="do not divide"):
        relation_heads(256, 384, 12, wanted=12)
    g = torch.Generator().manual_seed(0)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    t = [torch.randn(2, 5, 32, generator=g) for _ in range(3)]
    s = [torch.randn(2, 5, 16, generator=g) for _ in range(3)]  # another width: relations still compare
    assert float(relation_loss(t, t, mask, 4)) == pytest.approx(0.0, abs=1e-6)
    loss = float(relation_loss(s, t, mask, 4))
    assert loss > 0.01
    padded = [x.clone() for x in s]
    for x in padded:
        x[0, 3:] = 100.0  # padding tokens must not count, as keys or as queries
    assert float(relation_loss(padded, t, mask, 4)) == pytest.approx(loss, rel=1e-5)


def test_class_weights_give_a_rare_class_its_share_to_the_minus_power_and_the_loss_weighs_rows_by_them():
    import torch

    from bertexport.students.losses import _loss, class_weights

    def logits(classes):
        out = np.zeros((len(classes), 3), dtype=np.float32)
        out[np.arange(len(classes)), classes] = 5.0
        return {"logits": out}

    teacher = [logits([0] * 40 + [1] * 5), logits([0] * 41 + [1] * 4 + [2])]  # shares 81, 9, 1 of 91 rows
    weights, record = class_weights(teacher, 0.5)
    w = np.concatenate(weights)
    assert record["applied"] and {c: v["rows"] for c, v in record["classes"].items()} == {0: 81, 1: 9, 2: 1}
    assert w.mean() == pytest.approx(1.0, rel=1e-5)  # the loss keeps its scale
    by_class = {c: v["weight"] for c, v in record["classes"].items()}
    assert by_class[2] / by_class[0] == pytest.approx(9.0, rel=1e-3) and by_class[1] / by_class[0] == pytest.approx(3.0, rel=1e-3)
    assert w[-1] == pytest.approx(by_class[2], rel=1e-3) and w[0] == pytest.approx(by_class[0], rel=1e-3)
    inverse = np.concatenate(class_weights(teacher, 1.0)[0])  # each class then weighs the same in total
    assert [inverse[np.concatenate([np.argmax(t["logits"], -1) for t in teacher]) == c].sum() for c in range(3)] == \
        pytest.approx([91 / 3] * 3, rel=1e-4)
    assert class_weights(teacher, 0.0)[0] is None and not class_weights(teacher, 0.0)[1]["applied"]
    assert class_weights([logits([1] * 8)], 0.5)[0] is None  # one class: nothing to balance

    # the weighted loss is the rows' KL and cross-entropy, each row times its weight, averaged
    cfg = DistillConfig(layers=1, temperature=2.0, alpha_kd=1.0, alpha_ce=0.5)
    g = torch.Generator().manual_seed(0)
    student = type("Out", (), {"logits": torch.randn(4, 3, generator=g)})()
    t = {"logits": torch.randn(4, 3, generator=g).numpy()}
    batch = {"inputs": {"attention_mask": torch.ones(4, 6)}, "labels": torch.tensor([0, -100, 2, 1])}
    rw = np.array([0.5, 1.0, 3.0, 0.25], dtype=np.float32)
    parts = _loss(student, t, batch, "text-classification", cfg, rw)
    kl = torch.nn.functional.kl_div(torch.log_softmax(student.logits / 2, -1), torch.softmax(torch.as_tensor(t["logits"]) / 2, -1),
                                    reduction="none").sum(-1) * 4
    assert float(parts["kd"]) == pytest.approx(float((kl * torch.as_tensor(rw)).mean()), rel=1e-5)
    ce = torch.nn.functional.cross_entropy(student.logits[[0, 2, 3]], torch.tensor([0, 2, 1]), reduction="none")
    assert float(parts["ce"]) == pytest.approx(0.5 * float((ce * torch.tensor([0.5, 3.0, 0.25])).mean()), rel=1e-5)
    plain = _loss(student, t, batch, "text-classification", cfg)
    assert float(plain["kd"]) == pytest.approx(float(kl.mean()), rel=1e-5)


@pytest.mark.parametrize("narrow", [False, True], ids=["equal-width", "narrow-projection"])
def test_intermediate_losses_fall(keyword_model, narrow, tmp_path):
    from safetensors.torch import load_file

    from bertexport.students.shapes import shrink
    from bertexport.students.training import train_student
    from bertexport.core.progress import Reporter

    teacher, tok = _teacher(keyword_model)
    if narrow:
        from bertexport.students.shapes import StudentShape, make_student

        student = make_student(teacher, StudentShape(1, 16, 1, 32), [1], None)  # hidden 32 -> 16: projected
    else:
        student = shrink(teacher, [1])
    texts, labels = _texts(200)
    cfg = _cfg(epochs=4, alpha_hidden=1.0, alpha_attention=1.0)
    best, r = train_student(teacher, student, tok, texts, labels, "text-classification", cfg, tmp_path / "w", Reporter())
    assert r["layer_map"] == [1] and r["intermediate"]["projection"] is narrow
    assert r["intermediate"]["relation_heads"] == 2 and r["intermediate"]["attention_layers"] == {"student": 0, "teacher": 1}
    parts = r["loss_parts"]
    assert {"kd", "ce", "hidden", "attention"} <= set(parts) and parts["hidden"]["steps"] == r["steps"] == 4 * 12
    assert _falls(parts["hidden"]) and _falls(parts["attention"]) and _falls(parts["kd"])
    assert r["loss_last_10pct"] < r["loss_first_10pct"]
    assert r["final_eval"]["agreement"] >= 0.8
    # the projection trained with the student and was discarded: the kept student is a plain model
    saved = load_file(tmp_path / "w" / "best" / "model.safetensors")
    assert set(saved) <= set(type(student)(student.config).state_dict())
    assert best.config.hidden_size == (16 if narrow else 32)
    assert not any("projection" in k for k in saved)


def test_intermediate_losses_off(keyword_model, tmp_path):
    from bertexport.students.shapes import shrink
    from bertexport.students.training import train_student

    teacher, tok = _teacher(keyword_model)
    texts, labels = _texts(64)
    _, r = train_student(teacher, shrink(teacher, [1]), tok, texts, labels, "text-classification",
                         _cfg(epochs=1, alpha_hidden=0, alpha_attention=0), tmp_path / "w")
    assert set(r["loss_parts"]) == {"kd", "ce"} and r["intermediate"]["relation_heads"] is None


# ------------------------------------------------------------------ teacher-labelled expansion

def test_expansion_adds_teacher_labelled_rows_computed_once(keyword_model, tmp_path):
    import torch

    from bertexport.students.augment import variants
    from bertexport.students.shapes import shrink
    from bertexport.students.training import train_student
    from bertexport.students.training_data import length_batches, split_eval
    from bertexport.core.progress import Reporter

    teacher, tok = _teacher(keyword_model)
    texts, labels = _texts(96)
    cfg = _cfg(epochs=1, augment=3, augment_below=5000, alpha_attention=0)
    work = tmp_path / "w"
    rep = Reporter()
    _, r = train_student(teacher, shrink(teacher, [1]), tok, texts, labels, "text-classification", cfg, work, rep)
    train_idx, eval_idx = split_eval(len(texts), cfg)
    train_texts, eval_texts = [texts[i] for i in train_idx], [texts[i] for i in eval_idx]
    expected = variants(train_texts, 3, cfg.seed, exclude=set(eval_texts))
    d = r["data"]
    assert d["train_texts"] == len(train_idx) == 87 and d["eval_texts"] == 9  # held-out: originals only
    assert d["augmented"] == len(expected) > 2 * len(train_idx) and d["augment_per_text"] == 3
    assert d["teacher_labelled_rows"] == d["train_texts"] + d["augmented"]
    assert not set(expected) & set(texts)  # variants differ from every original
    assert r["steps"] == -(-d["teacher_labelled_rows"] // cfg.batch_size)  # training ran over the expanded rows
    assert "ce" in r["loss_parts"]  # originals keep their labels; variants learn the teacher's soft outputs only
    # the teacher's outputs exist for every expanded row and are its real outputs on them
    cache = work / "teacher-train.npz"
    data = np.load(cache)
    assert sum(data[k].shape[0] for k in data.files) == d["teacher_labelled_rows"]
    batches = length_batches(tok, train_texts + expected, None, cfg.batch_size, cfg.max_length, cfg.seed)
    with torch.inference_mode():
        for i in (0, len(batches) - 1):
            np.testing.assert_allclose(data[f"{i}:logits"], teacher(**batches[i]["inputs"]).logits.numpy(), atol=1e-5)
    assert any(e[0] == "log" and "computed for" in e[1] and "teacher-train.npz" in e[1] for e in rep.events)
    # a second run on the same work folder reads them from the cache: nothing recomputed
    stamp = cache.stat().st_mtime_ns
    rep2 = Reporter()
    _, r2 = train_student(teacher, shrink(teacher, [1]), tok, texts, labels, "text-classification", cfg, work, rep2)
    assert cache.stat().st_mtime_ns == stamp
    logs = [e[1] for e in rep2.events if e[0] == "log"]
    assert any("loaded from teacher-train.npz" in m for m in logs) and not any("computed for" in m for m in logs)
    assert r2["resumed_from_step"] == r["steps"] and r2["data"] == d
    # another setting on the same work folder is refused, not silently mixed
    with pytest.raises(UserError, match="other"):
        train_student(teacher, shrink(teacher, [1]), tok, texts, labels, "text-classification", _cfg(epochs=2, augment=3,
                      alpha_attention=0), work, Reporter())


def test_no_expansion_on_large_data(keyword_model, tmp_path):
    from bertexport.students.shapes import shrink
    from bertexport.students.training import train_student

    teacher, tok = _teacher(keyword_model)
    texts, _ = _texts(64)
    _, r = train_student(teacher, shrink(teacher, [1]), tok, texts, None, "text-classification",
                         _cfg(epochs=1, augment=4, augment_below=64, alpha_hidden=0, alpha_attention=0), tmp_path / "w")
    assert r["data"]["augmented"] == 0 and r["data"]["teacher_labelled_rows"] == r["data"]["train_texts"]
    assert not r["data"]["labelled"] and "ce" not in r["loss_parts"]  # unlabelled text: the teacher labels it all


# ------------------------------------------------------------------ the command

def test_distill_shape_cli(keyword_model, tmp_path):
    import transformers as T

    texts, labels = _texts(80)
    data = tmp_path / "d.csv"
    data.write_text("text,label\n" + "\n".join(f"{t},{['absent', 'present'][y]}" for t, y in zip(texts, labels)) + "\n")
    r = CliRunner().invoke(cli, ["distill", str(keyword_model), "--out", str(tmp_path / "s"), "--data", str(data),
                                 "--shape", "L1-H16", "--alpha-hidden", "0.5", "--alpha-attention", "0", "--augment", "2",
                                 "--epochs", "2", "--batch-size", "16", "--lr", "2e-3"])
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "s" / "distill_report.json").read_text())
    assert rep["student"]["shape"]["name"] == "L1-H16-A1-F64" and rep["student"]["layers"] == 1
    assert rep["config"]["alpha_hidden"] == 0.5 and rep["config"]["alpha_attention"] == 0 and rep["config"]["augment"] == 2
    assert set(rep["loss_parts"]) == {"kd", "ce", "hidden"} and rep["intermediate"]["projection"] is True
    assert rep["data"]["augmented"] > rep["data"]["train_texts"] and rep["layer_map"] == [1]
    assert len(rep["student"]["kept_teacher_layers"]) == 1 and rep["student"]["layer_choice"]
    for part in rep["loss_parts"].values():
        assert {"first_10pct", "last_10pct"} <= set(part)
    student = T.AutoModelForSequenceClassification.from_pretrained(tmp_path / "s")
    assert student.config.hidden_size == 16 and student.config.num_attention_heads == 1
    assert not (tmp_path / ".s.distill").exists()


def test_distill_options_checked_before_the_teacher_loads(keyword_model, transfer, tmp_path, monkeypatch):
    import bertexport.students.distill as D

    def no_loading(*a, **k):
        raise AssertionError("the teacher was loaded before the options were checked")

    monkeypatch.setattr(D, "load_model", no_loading)
    base = ["distill", str(keyword_model), "--out", str(tmp_path / "s"), "--data", str(transfer)]
    for extra, message in ((["--shape", "L9"], "larger than the teacher"), (["--shape", "X3"], "is not like"),
                           (["--shape", "L1-H20"], "multiple of the teacher's head size"),
                           (["--shape", "L1", "--layers", "2"], "contradicts"),
                           (["--shape", "L1", "--student", str(keyword_model)], "does not go with"),
                           (["--layers", "1", "--augment", "-1"], "-1"), (["--layers", "1", "--alpha-hidden", "-0.5"], "-0.5"),
                           (["--keep-layers", "0,a"], "'a' is not a valid integer")):
        r = CliRunner().invoke(cli, base + extra)
        assert r.exit_code == 2 and message in r.output, (extra, r.output)
    r = CliRunner().invoke(cli, base + ["--task", "feature-extraction", "--shape", "L1-H16"])
    assert r.exit_code == 2 and "output size" in r.output, r.output  # embeddings keep their dimension


def test_narrow_student_resumes_with_its_projection(keyword_model, tmp_path):
    import torch

    from bertexport.students.training import train_student
    from bertexport.students.shapes import StudentShape, make_student

    teacher, tok = _teacher(keyword_model)
    texts, labels = _texts(100)
    cfg = _cfg(epochs=2, checkpoint_every=3, alpha_hidden=1.0, eval_every=6)  # 6 steps an epoch; hidden loss forced on

    def interrupt(step, loss):
        if step == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_student(teacher, make_student(teacher, StudentShape(1, 16, 1, 32), [1]), tok, texts, labels,
                      "text-classification", cfg, tmp_path / "w", on_step=interrupt)
    saved = torch.load(tmp_path / "w" / "checkpoint.pt", weights_only=False)
    assert saved["state"]["step"] == 3 and len(saved["projections"]) == 2 * 2  # embeddings + 1 layer, weight and bias each
    _, r = train_student(teacher, make_student(teacher, StudentShape(1, 16, 1, 32), [1]), tok, texts, labels,
                         "text-classification", cfg, tmp_path / "w")
    assert r["resumed_from_step"] == 3 and r["steps"] == 2 * 6 and r["loss_parts"]["hidden"]["steps"] == r["steps"]


# ------------------------------------------------------------------ converging within the budget

def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_training_stops_on_a_plateau_and_keeps_the_best_state(keyword_model, tmp_path):
    import torch

    from bertexport.students.shapes import shrink
    from bertexport.students.training import train_student

    teacher, tok = _teacher(keyword_model)
    texts, labels = _texts(160)
    cap = 40
    cfg = _cfg(patience=2, max_epochs=cap, eval_every=3, alpha_attention=0, cooldown=0)  # stop at once
    best, r = train_student(teacher, shrink(teacher, [1]), tok, texts, labels, "text-classification", cfg, tmp_path / "w")
    steps_per_epoch = r["schedule"]["steps_per_epoch"]
    assert r["stopped"] == "plateau" and r["steps"] < cap * steps_per_epoch  # stopped well before the cap
    assert r["schedule"]["cooldown"] is None
    assert r["schedule"]["total_steps"] == cap * steps_per_epoch and r["schedule"]["eval_every"] == 3
    assert [e["step"] for e in r["evals"]] == list(range(3, r["steps"] + 1, 3))
    scores = [e["score"] for e in r["evals"]]
    top = scores.index(max(scores))  # the first evaluation reaching the best score
    assert r["best_step"] == r["evals"][top]["step"] < r["steps"]
    assert len(scores) - 1 - top == cfg.patience  # exactly `patience` evaluations without a better score, then stop
    # the student returned is the best state, not the last one
    assert r["final_eval"]["score"] == pytest.approx(max(scores))
    last = torch.load(tmp_path / "w" / "checkpoint.pt", weights_only=False)
    assert last["state"]["step"] == r["steps"]
    assert any(not torch.equal(v, last["model"][k]) for k, v in _weights(best).items())
    assert r["initial_eval"]["score"] < max(scores)


def test_training_stops_when_the_held_out_score_reaches_its_target(keyword_model, tmp_path):
    from bertexport.students.shapes import shrink
    from bertexport.students.training import train_student

    teacher, tok = _teacher(keyword_model)
    texts, labels = _texts(160)
    cfg = _cfg(patience=50, max_epochs=40, eval_every=3, alpha_attention=0, stop_at_score=0.9)
    _, r = train_student(teacher, shrink(teacher, [1]), tok, texts, labels, "text-classification", cfg, tmp_path / "w")
    scores = [e["score"] for e in r["evals"]]
    assert r["stopped"] == "target" and scores[-1] >= 0.9 and all(sc < 0.9 for sc in scores[:-1])
    assert r["kept_step"] == r["best_step"] == r["evals"][-1]["step"] == r["steps"]  # the state that reached it is kept
    assert r["final_eval"]["score"] == pytest.approx(scores[-1]) and r["steps"] < 40 * r["schedule"]["steps_per_epoch"]
    with pytest.raises(UserError, match="stop_at_score"):
        check_config(_cfg(stop_at_score=1.5))


def test_a_plateau_cools_the_rate_down_to_zero_then_stops(keyword_model, tmp_path):
    """Patience run out: the rate decays linearly from where it stood to 0 over ``cooldown`` of
    the steps run (at least two evaluations), evaluated at its end, then training stops."""
    import math

    import torch

    from bertexport.students.distill_config import cooldown_steps
    from bertexport.students.shapes import shrink
    from bertexport.students.training import train_student

    teacher, tok = _teacher(keyword_model)
    texts, labels = _texts(160)
    cap = 40
    cfg = _cfg(patience=2, max_epochs=cap, eval_every=3, alpha_attention=0, cooldown=0.5)
    work = tmp_path / "w"
    best, r = train_student(teacher, shrink(teacher, [1]), tok, texts, labels, "text-classification", cfg, work)
    cool = r["schedule"]["cooldown"]
    assert r["stopped"] == "plateau" and cool is not None
    start = cool["from_step"]
    scores_before = [e["score"] for e in r["evals"] if e["step"] <= start]
    top = scores_before.index(max(scores_before))
    assert len(scores_before) - 1 - top == cfg.patience  # it began where patience ran out
    assert cool["steps"] == max(2 * 3, math.ceil(0.5 * start)) == cooldown_steps(cfg, start, 3, cap * r["schedule"]["steps_per_epoch"])
    assert r["steps"] == start + cool["steps"] and r["evals"][-1]["step"] == r["steps"]  # evaluated at its end
    assert 0 < cool["lr_from"] <= cfg.lr
    last = torch.load(work / "checkpoint.pt", weights_only=False)
    assert last["optimizer"]["param_groups"][0]["lr"] == 0.0  # cooled down to 0
    # the tiny model's held-out score is 1.0 from the first evaluation: the annealed end is kept,
    # not the first state to reach it (``kept_state``: no earlier state was better beyond noise)
    assert r["best_step"] < r["steps"] and r["kept_step"] == r["steps"]
    choice = r["annealed_choice"]
    assert choice["keep"] == "end" and choice["kept_step"] == r["best_step"] and choice["difference"]["low"] <= 0
    assert all(torch.equal(v, last["model"][k]) for k, v in _weights(best).items())  # the weights returned are the end's
    assert r["final_eval"]["score"] == pytest.approx(r["evals"][-1]["score"])
    # none without patience, with cooldown 0, or with less than one evaluation left
    assert cooldown_steps(_cfg(), 30, 3, 100) == 0 and cooldown_steps(_cfg(patience=2, cooldown=0), 30, 3, 100) == 0
    assert cooldown_steps(_cfg(patience=2), 98, 3, 100) == 0 and cooldown_steps(_cfg(patience=2), 95, 3, 100) == 5
    with pytest.raises(UserError, match="cooldown"):
        check_config(_cfg(patience=2, cooldown=1.5))


def test_the_annealed_end_is_kept_unless_the_earlier_state_was_better_beyond_noise():
    from bertexport.students.training import kept_state

    rng = np.random.default_rng(0)
    same = (rng.random(400) < 0.9).astype(float)
    assert kept_state(same, same)["keep"] == "end"  # a tie: the annealed end
    worse = same.copy()
    worse[np.flatnonzero(same)[:3]] = 0.0  # 3 rows fewer: within the noise of 400
    c = kept_state(same, worse)
    assert c["keep"] == "end" and c["difference"]["estimate"] == pytest.approx(3 / 400) and c["difference"]["low"] < 0
    much_worse = same.copy()
    much_worse[np.flatnonzero(same)[:40]] = 0.0  # 40 rows fewer: beyond it
    c = kept_state(same, much_worse)
    assert c["keep"] == "best" and c["difference"]["low"] > 0 and c["difference"]["rows"] == 400
    cosines = rng.uniform(0.9, 1.0, 300)  # a per-row figure: bootstrap over rows
    assert kept_state(cosines, cosines - 0.05)["keep"] == "best"
    assert kept_state(cosines, cosines - rng.normal(0, 0.01, 300))["keep"] == "end"
    assert kept_state(None, same)["keep"] == "end"  # a run from before the rule: nothing to pair


def test_a_deadline_cools_the_rate_down_before_it_and_a_resumed_run_goes_back_on_the_schedule(keyword_model, tmp_path,
                                                                                                monkeypatch):
    """With patience and a time cap, the cooldown starts when the time left would just fit it
    (a fake clock: one unit a step), so the student the time stops is judged annealed; the next
    call continues the run with the rate back on its schedule."""
    import torch

    from bertexport.students import training
    from bertexport.students.shapes import shrink

    teacher, tok = _teacher(keyword_model)
    texts, labels = _texts(160)
    cfg = _cfg(patience=50, max_epochs=40, eval_every=3, alpha_attention=0)  # no plateau: the time decides
    clock = {"t": 0.0}

    def tick():
        clock["t"] += 1.0
        return clock["t"]

    monkeypatch.setattr(training.time, "monotonic", tick)
    work = tmp_path / "w"
    _, r = training.train_student(teacher, shrink(teacher, [1]), tok, texts, labels, "text-classification", cfg, work,
                                  seconds=60)
    cool = r["schedule"]["cooldown"]
    assert r["stopped"] == "time" and cool["why"] == "time"
    assert r["steps"] == cool["from_step"] + cool["steps"] <= 60  # annealed within the time, evaluated at the end
    assert cool["steps"] == max(2 * 3, -(-cool["from_step"] // 5)) and r["evals"][-1]["step"] == r["steps"]
    saved = torch.load(work / "checkpoint.pt", weights_only=False)
    assert saved["optimizer"]["param_groups"][0]["lr"] == 0.0

    def stop_after_one(step, loss):
        if step == r["steps"] + 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # one step of the next call, checkpointed: the rate is back up
        training.train_student(teacher, shrink(teacher, [1]), tok, texts, labels, "text-classification",
                               dataclasses.replace(cfg, checkpoint_every=1), work, seconds=12, on_step=stop_after_one)
    resumed = torch.load(work / "checkpoint.pt", weights_only=False)
    assert resumed["state"]["step"] == r["steps"] + 1 and resumed["optimizer"]["param_groups"][0]["lr"] > 0.5 * cool["lr_from"]
    _, r2 = training.train_student(teacher, shrink(teacher, [1]), tok, texts, labels, "text-classification", cfg, work,
                                   seconds=12)
    assert r2["resumed_from_step"] == r["steps"] + 1 and r2["schedule"]["earlier_cooldowns"] == [cool]
    assert r2["steps"] > r["steps"] and r2["stopped"] == "time"


def test_a_resumed_run_continues_from_the_saved_step_and_matches_an_uninterrupted_one(keyword_model, tmp_path):
    import torch

    from bertexport.students.shapes import shrink
    from bertexport.students.training import train_student

    teacher, tok = _teacher(keyword_model)
    texts, labels = _texts(120)
    cfg = _cfg(patience=2, max_epochs=6, eval_every=4, checkpoint_every=5)  # 7 steps an epoch
    full_best, full = train_student(teacher, shrink(teacher, [1]), tok, texts, labels, "text-classification", cfg,
                                    tmp_path / "a")

    def interrupt(step, loss):
        if step == 7:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_student(teacher, shrink(teacher, [1]), tok, texts, labels, "text-classification", cfg, tmp_path / "b",
                      on_step=interrupt)
    saved = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)
    assert saved["state"]["step"] == 5 and [e["step"] for e in saved["state"]["evals"]] == [4]
    best, resumed = train_student(teacher, shrink(teacher, [1]), tok, texts, labels, "text-classification", cfg,
                                  tmp_path / "b")
    assert resumed["resumed_from_step"] == 5 and full["resumed_from_step"] is None
    # the same run as the uninterrupted one: same evaluations, same stop, same kept state (float noise at most)
    assert (resumed["steps"], resumed["stopped"], resumed["best_step"]) == (full["steps"], full["stopped"], full["best_step"])
    assert [e["step"] for e in resumed["evals"]] == [e["step"] for e in full["evals"]]
    assert [e["score"] for e in resumed["evals"]] == pytest.approx([e["score"] for e in full["evals"]])
    assert resumed["loss_last_10pct"] == pytest.approx(full["loss_last_10pct"], rel=1e-5)
    a, b = _weights(full_best), _weights(best)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    # interrupted inside the plateau's cooldown: resumed, the same cooldown and the same end
    cool = full["schedule"]["cooldown"]
    assert cool is not None and cool["steps"] >= 3

    def interrupt_cooling(step, loss):
        if step == cool["from_step"] + 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_student(teacher, shrink(teacher, [1]), tok, texts, labels, "text-classification", cfg, tmp_path / "c",
                      on_step=interrupt_cooling)
    _, cooled = train_student(teacher, shrink(teacher, [1]), tok, texts, labels, "text-classification", cfg, tmp_path / "c")
    assert cooled["schedule"]["cooldown"] == pytest.approx(cool) and cooled["steps"] == full["steps"]
    assert [e["score"] for e in cooled["evals"]] == pytest.approx([e["score"] for e in full["evals"]])


def test_a_time_capped_run_stops_evaluated_and_continues_from_that_step(keyword_model, tmp_path):
    import time

    from bertexport.students.shapes import shrink
    from bertexport.students.training import train_student

    teacher, tok = _teacher(keyword_model)
    texts, labels = _texts(64)
    cfg = _cfg(epochs=2, alpha_attention=0)
    work = tmp_path / "w"
    _, r = train_student(teacher, shrink(teacher, [1]), tok, texts, labels, "text-classification", cfg, work,
                         deadline=time.monotonic() - 1)  # already past: stops after the first step
    assert r["stopped"] == "time" and r["steps"] == 1 and [e["step"] for e in r["evals"]] == [1] and r["best_step"] == 1
    _, r2 = train_student(teacher, shrink(teacher, [1]), tok, texts, labels, "text-classification", cfg, work)
    assert r2["resumed_from_step"] == 1 and r2["stopped"] == "epochs" and r2["steps"] == 2 * r2["schedule"]["steps_per_epoch"]
    assert r2["evals"][0] == r["evals"][0]  # the evaluations before the stop are kept


def test_a_run_s_seconds_start_after_the_teacher_outputs(keyword_model, tmp_path, monkeypatch):
    """``seconds`` is this run's training time: computing the teacher's outputs (once, shared by every
    student on the data) is not charged to it; ``deadline`` stays absolute. A fake clock: only the
    teacher outputs take time (100 s each), training none."""
    import types

    from bertexport.students import training
    from bertexport.students.shapes import shrink
    from bertexport.students.training import train_student
    from bertexport.students.training_data import TeacherOutputs

    clock = {"now": 1000.0}
    monkeypatch.setattr(training, "time", types.SimpleNamespace(monotonic=lambda: clock["now"],
                                                                perf_counter=lambda: clock["now"]))
    compute = TeacherOutputs.load_or_compute

    def slow(self, *a, **kw):
        clock["now"] += 100.0
        return compute(self, *a, **kw)

    monkeypatch.setattr(TeacherOutputs, "load_or_compute", slow)
    teacher, tok = _teacher(keyword_model)
    texts, labels = _texts(64)
    cfg = _cfg(epochs=2, alpha_attention=0)
    run = lambda work, **kw: train_student(teacher, shrink(teacher, [1]), tok, texts, labels, "text-classification", cfg,
                                           tmp_path / work, **kw)[1]
    r = run("a", seconds=50.0)  # 200 s of teacher outputs > 50 s: not counted, the run trains to its end
    assert r["stopped"] == "epochs" and r["steps"] == 2 * r["schedule"]["steps_per_epoch"]
    r = run("b", seconds=0.0)  # no training time: one step, evaluated, resumable
    assert r["stopped"] == "time" and r["steps"] == 1
    r = run("c", deadline=clock["now"] + 50.0, seconds=1e6)  # the deadline counts everything: passed by the teacher outputs
    assert r["stopped"] == "time" and r["steps"] == 1


def test_sequence_length_comes_from_the_data(keyword_model, tmp_path):
    from bertexport.students.shapes import shrink
    from bertexport.students.training import train_student
    from bertexport.students.training_data import sequence_length

    teacher, tok = _teacher(keyword_model)
    texts, labels = _texts(100)  # 4..19 words
    lengths = [len(tok(t)["input_ids"]) for t in texts]
    expected = int(np.ceil(np.percentile(lengths, 99)))
    assert max(8, expected) == sequence_length(tok, texts, DistillConfig(), teacher.config) < 128
    long = [" ".join(["word"] * 300)] * 60 + texts[:40]  # most texts longer than the model takes: its limit
    assert sequence_length(tok, long, DistillConfig(), teacher.config) == 128  # max_position_embeddings
    assert sequence_length(tok, texts, DistillConfig(max_length=16), teacher.config) == 16
    assert sequence_length(tok, texts, DistillConfig(max_length=4096), teacher.config) == 128
    _, r = train_student(teacher, shrink(teacher, [1]), tok, texts, labels, "text-classification",
                         _cfg(epochs=1, alpha_attention=0), tmp_path / "w")
    assert r["max_length"] == max(8, expected) and r["max_length_source"] == "p99 of the data"


def test_losses_are_chosen_by_data_size(keyword_model, tmp_path):
    from bertexport.students.distill_config import hidden_loss_weight
    from bertexport.students.shapes import shrink
    from bertexport.students.training import train_student

    assert hidden_loss_weight(DistillConfig(), 9_999)[0] == 0.0 and hidden_loss_weight(DistillConfig(), 10_000)[0] == 1.0
    assert hidden_loss_weight(DistillConfig(alpha_hidden=0.5), 10) == (0.5, "given")
    teacher, tok = _teacher(keyword_model)
    texts, labels = _texts(64)  # 56 training texts
    _, small = train_student(teacher, shrink(teacher, [1]), tok, texts, labels, "text-classification", _cfg(epochs=1),
                             tmp_path / "a")
    assert set(small["loss_parts"]) == {"kd", "ce", "attention"}  # logits + the last layer's relations only
    assert small["intermediate"]["alpha_hidden"] == 0 and "56 training texts < 10000" in small["intermediate"]["hidden_rule"]
    _, enough = train_student(teacher, shrink(teacher, [1]), tok, texts, labels, "text-classification",
                              _cfg(epochs=1, hidden_loss_min_texts=50), tmp_path / "b")
    assert set(enough["loss_parts"]) == {"kd", "ce", "hidden", "attention"} and enough["intermediate"]["alpha_hidden"] == 1.0


def test_distill_patience_cli(keyword_model, transfer, tmp_path):
    base = ["distill", str(keyword_model), "--data", str(transfer), "--layers", "1", "--augment", "0", "--batch-size", "16",
            "--lr", "2e-3"]
    for extra, says in ((["--patience", "2", "--epochs", "2"], "fixed count"), (["--max-epochs", "2"], "--patience")):
        r = CliRunner().invoke(cli, base + ["--out", str(tmp_path / "x")] + extra)
        assert r.exit_code == 2 and says in r.output, r.output
    assert not (tmp_path / "x").exists()
    r = CliRunner().invoke(cli, base + ["--out", str(tmp_path / "s"), "--patience", "1", "--max-epochs", "2", "--json", "-"])
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "s" / "distill_report.json").read_text())
    assert rep["config"]["patience"] == 1 and rep["config"]["max_epochs"] == 2 and rep["config"]["lr"] == 2e-3
    assert rep["stopped"] in ("plateau", "max_epochs") and rep["steps"] <= 2 * rep["schedule"]["steps_per_epoch"]
    assert rep["evals"] and rep["best_step"] in [e["step"] for e in rep["evals"]]
    assert rep["kept_step"] in [e["step"] for e in rep["evals"]] and f"kept the state of step {rep['kept_step']}" in r.output
