"""What a student's training step runs with (``bertexport.students.step_cost``): its dropout
while training (set, then restored; the saved config untouched) and the precision of its
forward and losses (bf16 autocast only where the CPU has native bf16; refused where it would
be emulated)."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from bertexport.building.checkpoint import resolve_checkpoint
from bertexport.cli import cli
from bertexport.core.envinfo import native_bf16
from bertexport.core.errors import UserError
from bertexport.students import step_cost
from bertexport.students.step_cost import autocast, training_dropout, training_precision


def _dropout_rates(model) -> list[float]:
    rates = [m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    return rates + [m.dropout_prob for m in model.modules() if isinstance(getattr(m, "dropout_prob", None), float)]


@pytest.mark.parametrize("family", ["bert", "distilbert"])
def test_training_dropout_is_set_while_training_and_restored(tiny, family):
    from transformers import AutoModelForSequenceClassification

    path = tiny(family, "text-classification")
    model = AutoModelForSequenceClassification.from_pretrained(path).train()
    before, config_before = _dropout_rates(model), model.config.to_dict()
    assert before and max(before) > 0  # the tiny checkpoints keep their families' dropout
    x = torch.randint(5, 90, (4, 12))
    with training_dropout(model, 0.0):
        assert _dropout_rates(model) == [0.0] * len(before)
        with torch.no_grad():  # in train mode, no dropout left: two forwards give the same logits
            a, b = model(input_ids=x).logits, model(input_ids=x).logits
        assert torch.equal(a, b)
    assert _dropout_rates(model) == before and model.config.to_dict() == config_before
    with training_dropout(model, None):
        assert _dropout_rates(model) == before
    with pytest.raises(RuntimeError), training_dropout(model, 0.0):
        raise RuntimeError("a failed step")
    assert _dropout_rates(model) == before  # restored on the way out of a failure too


def test_the_training_precision_chosen(monkeypatch):
    assert training_precision("fp32", "cpu") == ("fp32", "asked for")
    with pytest.raises(UserError, match="choose one of auto, fp32, bf16"):
        training_precision("fp16", "cpu")
    monkeypatch.setattr("bertexport.core.envinfo.native_bf16", lambda: False)
    assert training_precision("auto", "cpu")[0] == "fp32"
    with pytest.raises(UserError, match="no native bf16"):
        training_precision("bf16", "cpu")
    monkeypatch.setattr("bertexport.core.envinfo.native_bf16", lambda: True)
    assert training_precision("auto", "cpu")[0] == "bf16" and training_precision("bf16", "cpu") == ("bf16", "asked for")


def test_autocast_runs_matmuls_in_bf16_and_losses_in_fp32():
    lin = torch.nn.Linear(8, 4)
    x, target = torch.randn(3, 8), torch.tensor([0, 1, 2])
    with autocast("bf16", "cpu"):
        y = lin(x)
        loss = torch.nn.functional.cross_entropy(y, target)
    assert y.dtype == torch.bfloat16 and loss.dtype == torch.float32
    with autocast("fp32", "cpu"):
        assert lin(x).dtype == torch.float32


@pytest.mark.parametrize("precision", ["auto", "fp32"])
def test_distill_reports_its_precision_and_dropout(keyword_model, tmp_path, precision):
    """A real distillation with dropout off, at the precision this CPU takes on ``auto`` and at
    fp32: both in distill_report.json; the published student's config keeps the teacher's dropout."""
    data = tmp_path / "kw.txt"
    from tests.tinymodels import keyword_texts

    data.write_text("\n".join(keyword_texts(3, 64)) + "\n")
    r = CliRunner().invoke(cli, ["distill", str(keyword_model), "--out", str(tmp_path / "s"), "--data", str(data),
                                 "--layers", "1", "--epochs", "1", "--train-precision", precision, "--train-dropout", "0"])
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "s" / "distill_report.json").read_text())
    expected = "bf16" if precision == "auto" and native_bf16() else "fp32"
    assert report["precision"]["used"] == expected and report["dropout"] == 0.0
    teacher = resolve_checkpoint(str(keyword_model)).config
    student = json.loads((tmp_path / "s" / "config.json").read_text())
    assert student["hidden_dropout_prob"] == teacher["hidden_dropout_prob"] > 0


def test_emulated_bf16_is_refused_before_any_model_loads(keyword_model, tmp_path, monkeypatch):
    monkeypatch.setattr("bertexport.core.envinfo.native_bf16", lambda: False)

    def no_model(*a, **k):
        raise AssertionError("a model was loaded before --train-precision was checked")

    monkeypatch.setattr("bertexport.students.distill.load_model", no_model)
    r = CliRunner().invoke(cli, ["distill", str(keyword_model), "--out", str(tmp_path / "s"), "--layers", "1",
                                 "--train-precision", "bf16"])
    assert r.exit_code == 2 and "no native bf16" in r.stderr and "Traceback" not in r.output, r.output
    assert not (tmp_path / "s").exists()
    r = CliRunner().invoke(cli, ["distill", str(keyword_model), "--out", str(tmp_path / "s"), "--layers", "1",
                                 "--train-dropout", "1.5"])
    assert r.exit_code == 2 and not (tmp_path / "s").exists(), r.output
    assert step_cost.PRECISIONS == ("auto", "fp32", "bf16")
