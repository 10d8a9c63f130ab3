"""The device runtime: task post-processing, long-text windows, tamper detection, the
torch-free import check, and `bertexport run` against the PyTorch original."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from bertexport.cli import cli
from bertexport.building.convert import convert
from bertexport.core.errors import UserError
from bertexport.shipping.runtime import Artifact, Predictor
from bertexport.shipping.runtime import SEGMENT_CHARS, segments
from tests.torchfree import ASSERT_TORCH_FREE, BLOCK_TORCH
from tests.tinymodels import keyword_sentence

TEXTS = ["The film was a delight from start to finish.", "Paris is the capital of France.", "ok"]


def _torch(ckpt, task, texts, pairs=None):
    import torch
    import transformers as T

    from tests.tinymodels import TASK_AUTO

    model = getattr(T, TASK_AUTO[task]).from_pretrained(ckpt).eval()
    tok = T.AutoTokenizer.from_pretrained(ckpt)
    enc = tok(texts, pairs, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**enc), enc


@pytest.fixture(scope="module")
def artifacts(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("runtime")
    out = {}
    for task in ("text-classification", "feature-extraction", "token-classification", "question-answering", "fill-mask"):
        ckpt = tiny("bert", task)
        out[task] = (ckpt, convert(str(ckpt), "ort-fp32", root / task, latency_runs=0).artifact)
    return out


def test_classification_matches_pytorch(artifacts):
    ckpt, art = artifacts["text-classification"]
    with Artifact(art) as a:
        res = Predictor(a, top_k=3).predict(TEXTS)
    out, _ = _torch(ckpt, "text-classification", TEXTS)
    probs = out.logits.softmax(-1).numpy()
    tol = 1e-4
    for r, p in zip(res, probs):
        got = {s["label"]: s["score"] for s in r["scores"]}
        labels = ["negative", "neutral", "positive"]
        assert np.allclose([got[l] for l in labels], p, atol=tol)
        assert r["label"] == labels[int(p.argmax())]


def test_embeddings_match_pytorch_mean_pooling(artifacts):
    ckpt, art = artifacts["feature-extraction"]
    with Artifact(art) as a:
        res = Predictor(a).predict(TEXTS)
    out, enc = _torch(ckpt, "feature-extraction", TEXTS)
    m = enc["attention_mask"].unsqueeze(-1).float()
    ref = ((out.last_hidden_state * m).sum(1) / m.sum(1)).numpy()
    assert np.allclose(np.array([r["embedding"] for r in res]), ref, atol=1e-4)


def test_entities_map_to_character_offsets(artifacts):
    _, art = artifacts["token-classification"]
    text = "Maria Schmidt flew from Berlin to Lisbon on Tuesday."
    with Artifact(art) as a:
        ents = Predictor(a).predict([text])[0]["entities"]
    for e in ents:  # whatever a random head tags, spans must point at the right characters
        assert text[e["start"]:e["end"]] == e["word"] and e["word"].strip() == e["word"] and e["word"]
        assert e["entity"] in ("PER", "LOC")


def test_answer_is_a_span_of_the_context(artifacts):
    _, art = artifacts["question-answering"]
    context = "The museum opened in 1897 and holds more than two thousand paintings from the Renaissance."
    with Artifact(art) as a:
        res = Predictor(a).predict(["When did the museum open?"], [context])[0]
    assert res["answer"] == context[res["start"]:res["end"]] and res["end"] > res["start"]


def test_fill_mask_top_tokens_match_pytorch(artifacts):
    ckpt, art = artifacts["fill-mask"]
    text = "The capital of France is [MASK]."
    with Artifact(art) as a:
        masks = Predictor(a, top_k=5).predict([text])[0]["masks"]
    assert len(masks) == 1 and text[masks[0]["start"]:masks[0]["end"]] == "[MASK]"
    out, enc = _torch(ckpt, "fill-mask", [text])
    pos = int((enc["input_ids"][0] == 103).nonzero()[0])
    import transformers as T

    tok = T.AutoTokenizer.from_pretrained(ckpt)
    assert masks[0]["tokens"][0]["token"] == tok.convert_ids_to_tokens(int(out.logits[0, pos].argmax()))


def test_long_text_windows_find_the_keyword(keyword_model, tmp_path):
    """A text far over the max length (128) with the keyword near its end: windows with
    'max' aggregation find it; reading only the first window (truncation) would not."""
    art = convert(str(keyword_model), "ort-fp32", tmp_path / "kw", latency_runs=0).artifact
    rng = np.random.default_rng(1)
    head = keyword_sentence(rng, 500, None)
    text = head + " " + keyword_sentence(rng, 20, "excellent")
    with Artifact(art) as a:
        pred = Predictor(a, stride=32, aggregation="max")
        res = pred.predict([text, head])
        first_window_only = Predictor(a, max_length=128).predict([text[:400]])[0]
    assert res[0]["windows"] > 4
    assert res[0]["label"] == "present" and res[1]["label"] == "absent"
    assert first_window_only["label"] == "absent"
    # a text several segments long (processed one segment at a time, bounded memory):
    # the keyword in its last words is still found, and absent stays absent
    long_head = keyword_sentence(rng, 20000, None)
    assert len(long_head) > 3 * SEGMENT_CHARS
    with Artifact(art) as a:
        found, absent = Predictor(a, batch_size=64, aggregation="max").predict(
            [long_head + " " + keyword_sentence(rng, 10, "excellent"), long_head])
    assert found["windows"] > 100 and found["label"] == "present" and absent["label"] == "absent"


def test_segments_cover_the_text_with_overlap():
    text = " ".join(f"w{i}" for i in range(30000))
    pieces = list(segments(text, size=5000, overlap=500))
    assert pieces[0][0] == 0 and len(pieces) > 30
    for (s0, p0), (s1, p1) in zip(pieces, pieces[1:]):
        assert text[s0:s0 + len(p0)] == p0 and s1 < s0 + len(p0)  # each overlaps the one before
    assert pieces[-1][0] + len(pieces[-1][1]) == len(text)


def test_entity_offsets_in_later_segments_point_into_the_text(artifacts):
    _, art = artifacts["token-classification"]
    text = " ".join(["Paris and Berlin are cities"] * 2500)  # ~70k characters: several segments
    with Artifact(art) as a:
        (res,) = Predictor(a, batch_size=64).predict([text])
    ents = res["entities"]
    assert ents and all(text[e["start"]:e["end"]] == e["word"] for e in ents)
    # the random head tags the repeated words the same way everywhere: entities come from
    # every segment, at exact offsets
    assert max(e["end"] for e in ents) > 3 * SEGMENT_CHARS and max(e["end"] for e in ents) <= len(text)


def test_tampered_artifact_refused(artifacts, tmp_path):
    import shutil

    _, art = artifacts["text-classification"]
    bad = tmp_path / "bad"
    shutil.copytree(art, bad)
    with open(bad / "model" / "model.onnx", "r+b") as f:
        f.seek(200)
        f.write(b"\x00\x01\x02\x03")
    with pytest.raises(UserError, match="checksum mismatch"):
        Artifact(bad)
    r = CliRunner().invoke(cli, ["run", str(bad), "hello"])
    assert r.exit_code == 2 and "checksum" in r.output and "Traceback" not in r.output


def test_cli_run_json_and_bad_inputs(artifacts, tmp_path):
    _, art = artifacts["text-classification"]
    r = CliRunner().invoke(cli, ["run", str(art), "good film", "bad film", "--json", "-"])
    assert r.exit_code == 0, r.output
    lines = [json.loads(l) for l in r.output.strip().splitlines()]
    assert [l["text_prefix"] for l in lines] == ["good film", "bad film"] and all(0 <= l["score"] <= 1 for l in lines)
    r = CliRunner().invoke(cli, ["run", str(art), "   "])
    assert r.exit_code == 2 and "empty text" in r.output
    f = tmp_path / "bad.txt"
    f.write_bytes(b"fine line\n\xff\xfe\n")
    r = CliRunner().invoke(cli, ["run", str(art), "--file", str(f)])
    assert r.exit_code == 2 and "bad.txt:2 is not valid UTF-8" in r.output
    big = tmp_path / "many.txt"
    big.write_text("\n".join(f"line {i}" for i in range(600)))
    r = CliRunner().invoke(cli, ["run", str(art), "--file", str(big)])
    assert r.exit_code == 0 and len(r.output.strip().splitlines()) == 600


def test_runtime_imports_neither_torch_nor_transformers(artifacts):
    _, art = artifacts["text-classification"]
    code = BLOCK_TORCH + f"""
from bertexport.shipping.runtime import Artifact, Predictor
from bertexport.cli import cli
with Artifact({str(art)!r}) as a:
    print(Predictor(a).predict(['a fine film'])[0]['label'])
try:
    cli(['run', {str(art)!r}, 'another film', '--json', '-'], standalone_mode=False)
except SystemExit:
    pass
""" + ASSERT_TORCH_FREE + """
print('torch-free OK')
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "torch-free OK" in r.stdout


def test_artifact_for_missing_backend_is_a_clear_error(artifacts):
    _, art = artifacts["text-classification"]
    code = (f"import sys; sys.modules['onnxruntime'] = None\nfrom bertexport.cli import cli\n"
            f"cli(['run', {str(art)!r}, 'x'])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 2 and "onnxruntime" in r.stderr and "Traceback" not in r.stderr


def test_runner_checks_feeds_against_the_declared_inputs(artifacts):
    _, art = artifacts["text-classification"]
    with Artifact(art) as a:
        feeds = a.encoder.encode(["a film"])
        a.infer(feeds)
        with pytest.raises(ValueError, match="input_ids is int32, the model declares int64"):
            a.infer({k: v.astype(np.int32) for k, v in feeds.items()})
        with pytest.raises(ValueError, match="has 1 dimensions, the model declares 2"):
            a.infer({k: v[0] for k, v in feeds.items()})
        with pytest.raises(ValueError, match="missing input"):
            a.infer({"input_ids": feeds["input_ids"]})


def test_every_pass_has_a_capability_and_described_options():
    from bertexport.core.options import describe
    from bertexport.building.passes import CATALOG, get_pass

    for name in CATALOG:
        cls = get_pass(name)
        # "any": ONNX-to-ONNX rewrites every backend runs (first-token skip, int8 embeddings)
        assert cls.capability.backend in ("onnxruntime", "openvino", "tensorrt", "any") and cls.__doc__
        assert all(row["help"] for row in describe(cls.Config)), name
