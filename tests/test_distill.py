"""Distillation on a tiny, learnable task: a 2-layer teacher that detects a keyword,
distilled to 1 layer. Loss falls, agreement rises well above chance, resume works."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from bertexport.cli import cli
from bertexport.distill import DistillConfig, distill, keep_every
from bertexport.errors import UserError
from tests.tinymodels import keyword_sentence


@pytest.fixture(scope="module")
def transfer(tmp_path_factory):
    rng = np.random.default_rng(3)
    path = tmp_path_factory.mktemp("transfer") / "transfer.txt"
    path.write_text("\n".join(keyword_sentence(rng, int(rng.integers(4, 24)), "excellent" if rng.random() < 0.5 else None)
                              for _ in range(480)))
    return path


def _cfg(**kw):
    base = dict(layers=1, epochs=3, batch_size=16, lr=2e-3, checkpoint_every=10, seed=0)
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
    assert (tmp_path / "student" / "model.safetensors").is_file() and (tmp_path / "student" / "tokenizer.json").is_file()
    assert not (tmp_path / ".student.distill").exists()


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
    with pytest.raises(UserError, match="family roberta differs"):
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
    with pytest.raises(UserError, match="tokenizer differs"):
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
