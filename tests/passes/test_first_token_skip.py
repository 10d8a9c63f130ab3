"""first-token-skip: the rewritten last layer gives the unskipped model's logits (PyTorch,
ONNX Runtime, OpenVINO; eager and SDPA attention; every mask form a layer receives; width-
pruned shapes), really computes its FFN on one token, feeds the later passes, and refuses
what it does not serve with one line (exit 2) before any model loads."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from bertexport.cli import cli
from bertexport.building.convert import convert
from bertexport.core.errors import UserError
from bertexport.building.passes import first_token_skip as fts
from bertexport.building.profiles import parse_profile
from tests.tinymodels import tiny_int8_gates

TEXTS = ["short", "a somewhat longer sentence that pads the others in its batch", "middle length text here",
         "one more of another length, with punctuation!"]
TC = "text-classification"


def _load(path, impl="eager"):
    import transformers as T

    return T.AutoModelForSequenceClassification.from_pretrained(path, attn_implementation=impl).eval()


def _batch(path):
    import transformers as T

    return T.AutoTokenizer.from_pretrained(path)(TEXTS, padding=True, return_tensors="pt")


@pytest.mark.parametrize("family,impl", [("bert", "eager"), ("bert", "sdpa"), ("roberta", "eager"), ("roberta", "sdpa"),
                                         ("xlm-roberta", "sdpa"), ("electra", "eager"), ("distilbert", "eager"),
                                         ("distilbert", "sdpa")])
def test_rewritten_model_matches_original_in_pytorch(tiny, family, impl):
    path = tiny(family, TC)
    model, enc = _load(path, impl), _batch(path)
    assert (enc["attention_mask"] == 0).any()  # a padded, mixed-length batch
    with torch.inference_mode():
        plain = model(**enc).logits
        alone = model(input_ids=enc["input_ids"][:1, :4]).logits  # no mask at all (SDPA: None reaches the layer)
        with fts.first_token_only(model):
            assert fts.is_rewritten(model)
            skipped = model(**enc).logits
            skipped_alone = model(input_ids=enc["input_ids"][:1, :4]).logits
            out = model(**enc, output_hidden_states=True)
        again = model(**enc).logits
    assert not fts.is_rewritten(model)
    torch.testing.assert_close(skipped, plain, atol=1e-5, rtol=0)
    torch.testing.assert_close(skipped_alone, alone, atol=1e-5, rtol=0)
    assert out.hidden_states[-1].shape[1] == 1 and out.hidden_states[-2].shape[1] == enc["input_ids"].shape[1]
    assert torch.equal(again, plain)  # restored: the original code path again


def _layer_masks(batch_mask, dtype=torch.float32):
    """The mask forms transformers 4.57 hands a layer, from a [B, S] 0/1 mask."""
    b, s = batch_mask.shape
    keep4 = batch_mask[:, None, None, :].bool().expand(b, 1, s, s)
    additive = lambda keep: torch.zeros(keep.shape, dtype=dtype).masked_fill(~keep, torch.finfo(dtype).min)  # noqa: E731
    return {"2d": batch_mask, "2d-bool": batch_mask.bool(), "4d-row": additive(batch_mask[:, None, None, :].bool()),
            "4d-square": additive(keep4), "4d-bool": keep4, "none": None}


@pytest.mark.parametrize("family", ["bert", "distilbert"])
def test_every_mask_form_gives_the_original_first_token(tiny, family):
    """Layer level: the rewritten last layer's output equals the original layer's first
    token for each mask form, the original run with the form its attention takes."""
    path = tiny(family, TC)
    enc = _batch(path)
    eager, sdpa = _load(path, "eager"), _load(path, "sdpa")
    torch.manual_seed(0)
    h = torch.randn(enc["input_ids"].shape + (32,))
    masks = _layer_masks(enc["attention_mask"])
    for name, mask in masks.items():
        if family == "bert" and name.startswith("2d"):
            continue  # BertModel never hands a layer a [B, S] mask
        # eager BERT adds the mask; eager DistilBERT reads a [B, S] keep-mask; SDPA takes the rest
        original = eager if (family == "bert" and name.startswith("4d-") and name != "4d-bool") or \
            (family == "distilbert" and name.startswith("2d")) else sdpa
        layer = fts.layers_of(original)[-1]
        # the hidden state: BertLayer returns it first (eager: then the probabilities), DistilBERT last
        call = (lambda m, x: layer(x, m)[0]) if family == "bert" else (lambda m, x: layer(x, attn_mask=m)[-1])
        with torch.inference_mode():
            want = call(mask, h)[:, :1]
            with fts.first_token_only(original):
                got = call(mask, h)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0, msg=f"mask form {name}")


@pytest.mark.parametrize("family", ["bert", "distilbert"])
def test_width_pruned_shapes(family):
    """Head count and head size come from the modules: a student with 3 heads of 16 and an
    FFN of 40 (not the teacher's 12 x 64) is rewritten exactly."""
    import transformers as T

    cfg = (T.BertConfig(vocab_size=120, hidden_size=48, num_attention_heads=3, intermediate_size=40, num_hidden_layers=2)
           if family == "bert" else T.DistilBertConfig(vocab_size=120, dim=48, n_heads=3, hidden_dim=40, n_layers=2))
    torch.manual_seed(0)
    model = T.AutoModelForSequenceClassification.from_config(cfg, attn_implementation="eager").eval()
    ids = torch.randint(5, 120, (3, 9))
    mask = torch.ones_like(ids)
    mask[0, 4:] = 0
    mask[2, 7:] = 0
    with torch.inference_mode():
        plain = model(input_ids=ids, attention_mask=mask).logits
        with fts.first_token_only(model):
            skipped = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(skipped, plain, atol=1e-5, rtol=0)


def _profile(backend: str, passes: list[dict], **gate):
    runtime = {"inference_precision": "f32"} if backend == "openvino" else {}
    return parse_profile({"backend": backend, "passes": passes, "runtime": runtime,
                          "validation": gate or {"min_cosine": 0.99999, "max_abs_diff": 1e-4, "min_agreement": 1.0}}, "test")


def _outputs_of(onnx_path, names: list[str], feeds: dict) -> dict:
    """Run the graph with the outputs of the named nodes added as graph outputs."""
    import onnx
    import onnxruntime as ort

    m = onnx.load(str(onnx_path))
    nodes = {n.name: n for n in m.graph.node}
    wanted = {nodes[n].output[0]: n for n in names}
    m.graph.output.extend(onnx.ValueInfoProto(name=o) for o in wanted)
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    got = sess.run(list(wanted), feeds)
    return {wanted[o]: v for o, v in zip(wanted, got)}


# node names of the plain export, per family: (first layer's FFN in, last layer's FFN in, last layer's key projection)
_NODES = {"bert": ("/bert/encoder/layer.0/intermediate/dense/MatMul", "/bert/encoder/layer.1/intermediate/dense/MatMul",
                   "/bert/encoder/layer.1/attention/self/key/MatMul"),
          "roberta": ("/roberta/encoder/layer.0/intermediate/dense/MatMul", "/roberta/encoder/layer.1/intermediate/dense/MatMul",
                      "/roberta/encoder/layer.1/attention/self/key/MatMul"),
          "distilbert": ("/distilbert/transformer/layer.0/ffn/lin1/MatMul", "/distilbert/transformer/layer.1/ffn/lin1/MatMul",
                         "/distilbert/transformer/layer.1/attention/k_lin/MatMul")}


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
@pytest.mark.parametrize("family", ["bert", "roberta", "distilbert"])
def test_convert_matches_the_unskipped_model(tiny, tmp_path, family, backend):
    """Through convert, real runs: the skipped artifact's logits match the unskipped PyTorch
    original to float tolerance on real-length and padded batches (the parity check feeds
    mixed lengths), and the PyTorch original is left unskipped."""
    passes = [{"type": "first-token-skip"}] + ([{"type": "openvino-convert"}] if backend == "openvino" else [])
    res = convert(str(tiny(family, TC)), _profile(backend, passes), tmp_path / "a", latency_runs=0)
    checks = res.manifest["parity"]["checks"]
    assert res.passed and set(checks) >= {"real-lengths", "padded-batch"}
    for check in checks.values():
        assert check["max_abs_diff"] <= 1e-5 and check["agreement"] == 1.0
    notes = res.manifest["target"]["passes"][0]["notes"]
    assert notes["first_token_skip"] and notes["layer"] == 1 and notes["check"]["max_abs_logit_diff"] <= 1e-5
    if backend != "onnxruntime":
        return
    # the graph: the last layer's FFN runs on one token, its keys on all, the first layer on all
    model_path = next((res.artifact / "model").glob("*.onnx"))
    first_ffn, last_ffn, last_key = _NODES[family]
    ids = np.array([[5, 6, 7, 8, 9, 10, 11], [5, 6, 7, 0, 0, 0, 0]], dtype=np.int64)
    known = {"input_ids": ids, "attention_mask": (ids > 0).astype(np.int64), "token_type_ids": np.zeros_like(ids)}
    feeds = {i["name"]: known[i["name"]] for i in res.manifest["inputs"]}
    got = _outputs_of(model_path, [first_ffn, last_ffn, last_key], feeds)
    assert got[last_ffn].shape[:2] == (2, 1)
    assert got[first_ffn].shape[:2] == (2, 7) and got[last_key].shape[:2] == (2, 7)


def test_later_passes_run_on_the_skipped_graph(tiny, tmp_path):
    """The fused + int8 ORT recipe runs on the skipped export: every fusion but the last
    layer's Attention (its queries come from one token) happens."""
    gates = tiny_int8_gates()
    prof = _profile("onnxruntime", [{"type": "first-token-skip"}, {"type": "ort-transformers-optimize"},
                                    {"type": "ort-dynamic-quantize", "op_types": ["MatMul", "Attention"]}],
                    min_cosine=gates.min_cosine, min_agreement=gates.min_agreement)
    res = convert(str(tiny("bert", TC)), prof, tmp_path / "a", latency_runs=0)
    history = res.manifest["target"]["passes"]
    assert [h["type"] for h in history] == ["first-token-skip", "ort-transformers-optimize", "ort-dynamic-quantize"]
    fused = history[1]["notes"]["fused_operators"]
    assert fused.get("Attention") == 1 and fused.get("SkipLayerNormalization") == 4
    assert res.passed


def test_ort_int8_skip_profile_on_a_trained_classifier(keyword_model, tmp_path):
    """The built-in ort-int8-skip profile (skip, then ort-int8's dynamic int8 and fallback)
    on a trained classifier: passes its gate with every decision kept."""
    res = convert(str(keyword_model), "ort-int8-skip", tmp_path / "a", latency_runs=0)
    history = res.manifest["target"]["passes"]
    assert [h["type"] for h in history] == ["first-token-skip", "ort-dynamic-quantize"] and history[0]["notes"]["first_token_skip"]
    assert res.passed and all(c["agreement"] == 1.0 for c in res.manifest["parity"]["checks"].values())


def test_openvino_from_pytorch_converts_the_rewrite(tiny, tmp_path):
    """openvino-convert source=pytorch behind first-token-skip converts the rewritten
    PyTorch model (not the unskipped one): the last layer's FFN is [batch, 1, ffn]."""
    import openvino as ov

    prof = _profile("openvino", [{"type": "first-token-skip"}, {"type": "openvino-convert", "source": "pytorch"}])
    res = convert(str(tiny("bert", TC)), prof, tmp_path / "a", latency_runs=0)
    assert res.passed and max(c["max_abs_diff"] for c in res.manifest["parity"]["checks"].values()) <= 1e-5
    ir = ov.Core().read_model(str(next((res.artifact / "model").glob("*.xml"))))
    ffn = [op for op in ir.get_ops() if op.get_type_name() == "MatMul" and "layer.1.intermediate.dense" in op.get_friendly_name()]
    assert ffn and all(op.get_output_partial_shape(0)[1].get_max_length() == 1 for op in ffn)  # [?, ..1, 64]


def _cli(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


@pytest.mark.parametrize("family,task,needle", [("bert", "feature-extraction", "serves text-classification only"),
                                                ("deberta-v2", TC, "does not support deberta-v2 (its relative-position"),
                                                ("albert", TC, "does not support albert"),
                                                ("mpnet", TC, "does not support mpnet")])
def test_refusals_exit_2_before_the_model_loads(tiny, tmp_path, monkeypatch, family, task, needle):
    import bertexport.building.convert as conv

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the refusal")

    monkeypatch.setattr(conv, "load_model", no_load)
    prof = tmp_path / "skip.toml"
    prof.write_text('backend = "onnxruntime"\n[[passes]]\ntype = "first-token-skip"\n')
    r = _cli("convert", tiny(family, task), "--target", prof, "--out", tmp_path / "out")
    assert r.exit_code == 2 and needle in r.output, r.output
    assert "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_must_be_the_first_pass_and_options_are_described(tmp_path):
    with pytest.raises(UserError, match="must be the first pass"):
        parse_profile({"backend": "onnxruntime", "passes": [{"type": "int8-embeddings"}, {"type": "first-token-skip"}]}, "t")
    with pytest.raises(UserError, match="unknown key"):
        parse_profile({"backend": "onnxruntime", "passes": [{"type": "first-token-skip", "layers": 2}]}, "t")
    out = _cli("targets", "--describe", "first-token-skip").output
    assert "check_texts" in out and "tolerance" in out and "capability: runs on any" in out
    with pytest.raises(UserError, match="absolute position embeddings"):
        fts.check_supported("bert", TC, {"position_embedding_type": "relative_key"})
