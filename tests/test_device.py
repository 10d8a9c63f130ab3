"""``--device auto|cpu|cuda``: where students train (``bertexport.students.device``). The CPU
paths run here; ``cuda`` without a GPU is refused (exit 2) before any model loads; the GPU
run is skipped on machines without one (distillation on a GPU: not verified here)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from bertexport.cli import cli
from bertexport.core.errors import UserError
from bertexport.students.device import training_device
from tests.tinymodels import keyword_sentence

GPU = torch.cuda.is_available()


@pytest.fixture(scope="module")
def transfer(tmp_path_factory):
    rng = np.random.default_rng(9)
    path = tmp_path_factory.mktemp("transfer") / "kw.txt"
    path.write_text("\n".join(keyword_sentence(rng, int(rng.integers(4, 20)), "excellent" if rng.random() < 0.5 else None)
                              for _ in range(64)) + "\n")
    return path


def test_the_device_chosen(monkeypatch):
    assert training_device("cpu") == "cpu"
    assert training_device("auto") == ("cuda" if GPU else "cpu")
    with pytest.raises(UserError, match="choose one of auto, cpu, cuda"):
        training_device("tpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # what auto does where torch sees a GPU
    assert training_device("auto") == "cuda" and training_device("cuda") == "cuda" and training_device("cpu") == "cpu"


@pytest.mark.skipif(GPU, reason="this machine has a GPU")
def test_cuda_without_a_gpu_is_refused_before_any_model_loads(keyword_model, transfer, tmp_path, monkeypatch):
    import bertexport.students.distill as D

    def no_model(*a, **k):
        raise AssertionError("a model was loaded before --device was checked")

    monkeypatch.setattr(D, "load_model", no_model)
    monkeypatch.setattr("bertexport.building.checkpoint.load_model", no_model)
    r = CliRunner().invoke(cli, ["distill", str(keyword_model), "--out", str(tmp_path / "s"), "--data", str(transfer),
                                 "--layers", "1", "--device", "cuda"])
    assert r.exit_code == 2 and "--device cuda: torch sees no GPU" in r.stderr and "Traceback" not in r.output, r.output
    assert not (tmp_path / "s").exists()
    r = CliRunner().invoke(cli, ["optimize", str(keyword_model), "--data", str(transfer), "-o", str(tmp_path / "o"),
                                 "--distill", "1", "--device", "cuda"])
    assert r.exit_code == 2 and "--device cuda: torch sees no GPU" in r.stderr, r.output
    assert not (tmp_path / "o").exists()


def test_cpu_training_records_its_device(keyword_model, transfer, tmp_path):
    r = CliRunner().invoke(cli, ["distill", str(keyword_model), "--out", str(tmp_path / "s"), "--data", str(transfer),
                                 "--layers", "1", "--epochs", "1", "--augment", "0", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert "trained on cpu" in r.output
    report = json.loads((tmp_path / "s" / "distill_report.json").read_text())
    assert report["device"] == {"used": "cpu", "requested": "cpu"} and report["config"]["device"] == "cpu"


@pytest.mark.skipif(not GPU, reason="no GPU: distillation on a GPU is not verified here")
def test_distillation_on_a_gpu(keyword_model, transfer, tmp_path):
    import transformers as T

    from bertexport.students.distill import distill
    from bertexport.students.distill_config import DistillConfig

    cfg = DistillConfig(layers=1, epochs=2, batch_size=16, lr=2e-3, augment=0, device="cuda")
    r = distill(str(keyword_model), tmp_path / "s", data=transfer, config=cfg).report
    assert r["device"]["used"] == "cuda" and r["device"]["name"]
    assert r["loss_last_10pct"] < r["loss_first_10pct"]
    student = T.AutoModelForSequenceClassification.from_pretrained(tmp_path / "s")  # saved from the GPU, loads on the CPU
    assert next(student.parameters()).device.type == "cpu"
