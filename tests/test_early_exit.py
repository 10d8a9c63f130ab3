"""Early exit (bertexport/students/early_exit.py, shipping/runtime.EarlyExitRunner): exit heads on
a tiny trained keyword classifier and a tiny 4-layer random classifier, exported as ONNX
segments and run through `run`, bulk `run --file --out` and `serve` (a real server process).
Threshold 1.0 must give the no-exit model's numbers, 0.0 must take every row out at the first
exit, and a batch whose rows leave at different exits must give each row's answer alone."""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from bertexport.cli import cli
from bertexport.core.errors import UserError
from bertexport.students import early_exit as E
from bertexport.shipping.runtime import Artifact
from tests.tinymodels import keyword_sentence

TEXTS = ["the film was excellent from start to finish", "dull", "an excellent excellent film", "of the a and to in",
         "Maria flew from Berlin to Lisbon on Tuesday", "they had not been there excellent", "so no more"]


def _softmax(x):
    z = np.exp(x - x.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


def _keyword_rows(seed: int, n: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        y = int(rng.random() < 0.5)
        rows.append({"text": keyword_sentence(rng, int(rng.integers(4, 30)), "excellent" if y else None),
                     "label": ["absent", "present"][y]})
    return rows


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("ee-data") / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _keyword_rows(1, 100)))
    return path


@pytest.fixture(scope="module")
def plain(keyword_model, data, tmp_path_factory):
    """The keyword classifier without exits (ort-fp32): what threshold 1.0 must give."""
    from bertexport.building.convert import convert

    return convert(str(keyword_model), "ort-fp32", tmp_path_factory.mktemp("ee-plain") / "plain", samples=data,
                   latency_runs=0).artifact


@pytest.fixture(scope="module")
def chosen(keyword_model, data, tmp_path_factory):
    """Built by the CLI: threshold chosen on held-out rows, latency per row measured."""
    out = tmp_path_factory.mktemp("ee-cli") / "chosen"
    r = CliRunner().invoke(cli, ["convert", str(keyword_model), "-t", "ort-fp32", "--out", str(out), "--early-exit", str(data),
                                 "--data", str(data), "--latency-runs", "1", "--json", "-"])
    assert r.exit_code == 0, r.output
    return out


@pytest.fixture(scope="module")
def fixed(keyword_model, data, tmp_path_factory):
    """fixed(threshold) -> an early-exit artifact of the keyword classifier with that threshold
    in its manifest (the heads are the same in each: same data, same seed)."""
    root = tmp_path_factory.mktemp("ee-fixed")
    built = {}

    def get(threshold: float) -> Path:
        if threshold not in built:
            built[threshold] = E.build_early_exit(str(keyword_model), "ort-fp32", root / f"t{threshold:.9f}", data,
                                                  config=E.EarlyExitConfig(threshold=threshold), samples=data,
                                                  latency_runs=0).artifact
        return built[threshold]

    return get


@pytest.fixture(scope="module")
def midway(fixed):
    """A threshold between the first exit's confidences on TEXTS: some rows leave, others go on."""
    with Artifact(fixed(1.0)) as art:
        exits, _ = art.runner.every_exit(art.encoder.encode(TEXTS))
    conf = np.unique(_softmax(exits[0].astype(np.float64)).max(-1))
    assert len(conf) >= 2, conf
    k = len(conf) // 2
    return float((conf[k - 1] + conf[k]) / 2)


def _infer(folder, texts, threshold=None):
    with Artifact(folder, exit_threshold=threshold) as art:
        return art.infer(art.encoder.encode(texts))


# -- the library ------------------------------------------------------------------------------------

def test_threshold_one_gives_the_no_exit_model(plain, fixed):
    with Artifact(plain) as art:
        ref = art.infer(art.encoder.encode(TEXTS))["logits"]
    out = _infer(fixed(1.0), TEXTS)
    assert (out["exit_layer"] == 2).all()
    np.testing.assert_allclose(out["logits"], ref, atol=1e-5, rtol=0)
    np.testing.assert_allclose(_softmax(out["logits"]), _softmax(ref), atol=1e-6, rtol=0)


def test_threshold_zero_leaves_at_the_first_exit(fixed, plain):
    out = _infer(fixed(0.0), TEXTS)
    assert (out["exit_layer"] == 1).all()
    with Artifact(fixed(0.0)) as art:
        exits, final = art.runner.every_exit(art.encoder.encode(TEXTS))
    np.testing.assert_array_equal(out["logits"], exits[0])  # the first exit's own numbers
    assert np.abs(_softmax(exits[0]) - _softmax(final)).max() > 1e-6  # ... which are not the full model's
    # a run-time threshold overrides the manifest's: the 1.0 artifact at 0.0 is the 0.0 artifact
    np.testing.assert_array_equal(_infer(fixed(1.0), TEXTS, threshold=0.0)["logits"], out["logits"])


def test_rows_leaving_a_batch_midway_equal_each_row_alone(fixed, midway):
    art_dir = fixed(1.0)
    batch = _infer(art_dir, TEXTS, midway)
    assert set(batch["exit_layer"].tolist()) == {1, 2}, batch["exit_layer"]
    for i, text in enumerate(TEXTS):
        alone = _infer(art_dir, [text], midway)
        assert alone["exit_layer"][0] == batch["exit_layer"][i]
        np.testing.assert_allclose(alone["logits"][0], batch["logits"][i], atol=1e-5, rtol=0)


def test_threshold_choice_keeps_the_gate_and_the_manifest_says_it(chosen):
    import jsonschema

    manifest = json.loads((chosen / "manifest.json").read_text())
    schema = json.loads(Path(E.__file__).parent.parent.joinpath("core", "manifest.schema.json").read_text())
    jsonschema.Draft202012Validator(schema).validate(manifest)
    early = manifest["early_exit"]
    assert early["exit_layers"] == [1] and early["layers"] == 2 and len(early["segments"]) == 2
    assert early["choice"]["agreement"] >= early["agreement_gate"] == 0.99
    assert 0.0 <= early["threshold"] < 1.0 and early["choice"]["rows"] == early["data"]["heldout"] == 30
    lat = early["latency"]
    assert lat["rows"] == 30 and {"mean", "p90"} <= set(lat["at_threshold"]) and {"mean", "p90"} <= set(lat["no_exit"])
    assert manifest["parity"]["passed"] and manifest["parity"]["checks"]["real-lengths"]["max_abs_diff"] < 1e-4
    assert "## Early exit" in (chosen / "report.md").read_text()
    r = CliRunner().invoke(cli, ["verify", str(chosen)])
    assert r.exit_code == 0, r.output


def test_other_commands_take_it_or_refuse_it(chosen, data, tmp_path):
    r = CliRunner().invoke(cli, ["validate", str(chosen), "--data", str(data), "--min-agreement", "0.95"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(cli, ["pack", str(chosen), "--format", "triton", "--out", str(tmp_path / "repo")])
    assert r.exit_code == 2 and "early-exit artifact" in r.output and not (tmp_path / "repo").exists()


# -- run, bulk, serve ---------------------------------------------------------------------------------

def _run(folder, texts):
    r = CliRunner().invoke(cli, ["run", str(folder), *texts, "--json", "-", "--top-k", "2"])
    assert r.exit_code == 0, r.output
    return [json.loads(line) for line in r.stdout.strip().splitlines()]


def _probs(results):
    return np.array([[s["score"] for s in sorted(r["scores"], key=lambda s: s["label"])] for r in results])


def _first_exit_probs(folder, texts):
    with Artifact(folder) as art:
        exits, _ = art.runner.every_exit(art.encoder.encode(texts))
    return _softmax(exits[0].astype(np.float64))[:, np.argsort([art.id2label[i] for i in range(exits[0].shape[1])])]


def test_run_at_one_zero_and_midway(plain, fixed, midway):
    np.testing.assert_allclose(_probs(_run(fixed(1.0), TEXTS)), _probs(_run(plain, TEXTS)), atol=1e-6, rtol=0)
    np.testing.assert_allclose(_probs(_run(fixed(0.0), TEXTS)), _first_exit_probs(fixed(0.0), TEXTS), atol=1e-7, rtol=0)
    mid = fixed(midway)
    together = _run(mid, TEXTS)
    alone = [_run(mid, [t])[0] for t in TEXTS]
    assert [r["label"] for r in together] == [r["label"] for r in alone]
    np.testing.assert_allclose(_probs(together), _probs(alone), atol=1e-6, rtol=0)


def test_bulk_at_one_zero_and_midway(plain, fixed, midway, tmp_path):
    from bertexport.shipping.bulk import run_local

    texts = [r["text"] for r in _keyword_rows(7, 40)] + TEXTS
    inp = tmp_path / "in.txt"
    inp.write_text("\n".join(texts) + "\n")

    def bulk(folder, batch_size=16):
        out = tmp_path / f"{Path(folder).name}-{batch_size}.jsonl"
        stats = run_local(folder, inp, out, batch_size=batch_size, predictor_options={"top_k": 2})
        assert stats["rows"] == len(texts)
        return [json.loads(line) for line in out.read_text().splitlines()]

    np.testing.assert_allclose(_probs(bulk(fixed(1.0))), _probs(bulk(plain)), atol=1e-6, rtol=0)
    np.testing.assert_allclose(_probs(bulk(fixed(0.0))), _first_exit_probs(fixed(0.0), texts), atol=1e-7, rtol=0)
    batched, one_by_one = bulk(fixed(midway)), bulk(fixed(midway), batch_size=1)
    assert [r["label"] for r in batched] == [r["label"] for r in one_by_one]
    np.testing.assert_allclose(_probs(batched), _probs(one_by_one), atol=1e-6, rtol=0)


def test_serve_at_one_zero_and_midway(plain, fixed, midway, tmp_path):
    from tests.test_serve import Server

    pytest.importorskip("uvicorn", reason="serve needs bertexport[serve]")
    names = {"plain": plain, "one": fixed(1.0), "zero": fixed(0.0), "mid": fixed(midway)}
    arts = []
    for name, folder in names.items():  # serve names a model by its folder
        arts.append(tmp_path / name)
        shutil.copytree(folder, arts[-1])
    server = Server(arts[0], *arts[1:], "--max-wait-ms", 20, "--top-k", 2, log=tmp_path / "serve.log").wait_listening()
    try:
        def served(model, texts):
            status, _, out = server.post("/v1/text-classification", {"model": model, "inputs": texts})
            assert status == 200, out
            return out["results"]

        np.testing.assert_allclose(_probs(served("one", TEXTS)), _probs(served("plain", TEXTS)), atol=1e-6, rtol=0)
        np.testing.assert_allclose(_probs(served("zero", TEXTS)), _first_exit_probs(fixed(0.0), TEXTS), atol=1e-7, rtol=0)
        together = served("mid", TEXTS)
        alone = [served("mid", [t])[0] for t in TEXTS]
        assert [r["label"] for r in together] == [r["label"] for r in alone]
        np.testing.assert_allclose(_probs(together), _probs(alone), atol=1e-6, rtol=0)
    finally:
        server.proc.send_signal(signal.SIGTERM)
        assert server.stop() == 143
    assert "torch-free: yes" in (tmp_path / "serve.log").read_text()


# -- several exits, other families ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def four_layers(tiny, tmp_path_factory):
    """A random-init 4-layer BERT classifier (spread-out confidences) and unlabelled texts."""
    import torch
    import transformers as T

    src = tiny("bert", "text-classification")
    out = tmp_path_factory.mktemp("ee-four") / "model"
    cfg = T.AutoConfig.from_pretrained(src)
    cfg.num_hidden_layers = 4
    torch.manual_seed(3)
    T.AutoModelForSequenceClassification.from_config(cfg).save_pretrained(out, safe_serialization=True)
    T.AutoTokenizer.from_pretrained(src).save_pretrained(out)
    texts = out.parent / "texts.txt"
    texts.write_text("\n".join(r["text"] for r in _keyword_rows(5, 60)) + "\n")
    return out, texts


def test_three_segments_rows_leave_at_different_exits(four_layers, tmp_path):
    import torch
    import transformers as T

    model, texts = four_layers
    art = E.build_early_exit(str(model), "ort-fp32", tmp_path / "art", texts, config=E.EarlyExitConfig(exit_layers=[1, 3]),
                             samples=texts, latency_runs=0).artifact
    lines = texts.read_text().splitlines()[:24]
    tm = T.AutoModelForSequenceClassification.from_pretrained(model, attn_implementation="eager").eval()
    with Artifact(art, exit_threshold=1.0) as a:
        feeds = a.encoder.encode(lines)
        with torch.no_grad():
            ref = tm(**{k: torch.from_numpy(v) for k, v in feeds.items()}).logits.numpy()
        np.testing.assert_allclose(a.infer(feeds)["logits"], ref, atol=1e-5, rtol=0)
        exits, _ = a.runner.every_exit(feeds)
    # a threshold between the two exits' confidences: rows leave after layer 1, after 3, and at the end
    c1, c3 = (_softmax(e.astype(np.float64)).max(-1) for e in exits)
    with Artifact(art) as a:
        for t in np.sort(np.concatenate([c1, c3]))[::-1]:
            a.runner.threshold = float(np.nextafter(t, 0))
            out = a.infer(a.encoder.encode(lines))
            if set(out["exit_layer"].tolist()) == {1, 3, 4}:
                for i, line in enumerate(lines):
                    alone = a.infer(a.encoder.encode([line]))
                    assert alone["exit_layer"][0] == out["exit_layer"][i]
                    np.testing.assert_allclose(alone["logits"][0], out["logits"][i], atol=1e-5, rtol=0)
                break
        else:
            pytest.fail("no threshold made rows leave at every exit")



# -- refusals before any model loads --------------------------------------------------------------------

def test_refused_at_plan_time(tiny, keyword_model, data, tmp_path, monkeypatch):
    import importlib

    import bertexport.building.checkpoint as checkpoint

    importlib.import_module("bertexport.building.convert")  # imported before the patch: it binds load_model at import

    def no_loading(*a, **k):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(checkpoint, "load_model", no_loading)
    few = tmp_path / "few.txt"
    few.write_text("one\ntwo\nthree\n")
    cases = [
        ([str(tiny("bert", "token-classification")), "-t", "ort-fp32", "--early-exit", str(data)], "text-classification only"),
        ([str(tiny("bert", "feature-extraction")), "-t", "ort-fp32", "--early-exit", str(data)], "text-classification only"),
        ([str(keyword_model), "-t", "ort-int8-skip", "--early-exit", str(data)], "has first-token-skip"),
        ([str(tiny("deberta-v2", "text-classification")), "-t", "openvino-int8", "--early-exit", str(data)],
         "converts DeBERTa-v2/v3 from PyTorch"),
        ([str(keyword_model), "-t", "ort-fp32", "--early-exit", str(data), "--exit-layers", "2"], "exit layers must be in [1, 1]"),
        ([str(keyword_model), "-t", "ort-fp32", "--early-exit", str(data), "--exit-layers", "one"], "takes values separated by ','"),
        ([str(keyword_model), "-t", "ort-fp32", "--early-exit", str(few)], "needs >= 20"),
        ([str(keyword_model), "-t", "ort-fp32", "--early-exit", str(data), "--distill", "1"], "does not take --distill"),
        ([str(keyword_model), "-t", "ort-fp32", "--exit-threshold", "0.5"], "go with --early-exit"),
        ([str(tiny("albert", "text-classification")), "-t", "ort-fp32", "--early-exit", str(data)], "one list of transformer layers"),
    ]
    for args, said in cases:
        out = tmp_path / "out"
        r = CliRunner().invoke(cli, ["convert", *args, "--out", str(out)])
        assert r.exit_code == 2 and said in r.output, (args, r.output)
        assert not out.exists()


def test_run_time_threshold_is_checked(plain, fixed):
    with pytest.raises(UserError, match="no early exits"):
        Artifact(plain, exit_threshold=0.5)
    for bad in (1.5, -0.1, True):
        with pytest.raises(UserError, match="exit threshold must be a probability"):
            Artifact(fixed(1.0), exit_threshold=bad)


# -- run/serve --exit-threshold ---------------------------------------------------------------------------

def test_exit_threshold_refused_for_a_normal_artifact_before_it_loads(plain, data, tmp_path, monkeypatch):
    from bertexport.shipping import runtime

    def no_loading(*a, **k):
        raise AssertionError("an artifact was opened before --exit-threshold was checked")

    monkeypatch.setattr(runtime, "Artifact", no_loading)
    texts = tmp_path / "in.txt"
    texts.write_text("a film\n")
    cases = [["run", str(plain), "a film", "--exit-threshold", "0.5"],
             ["run", str(plain), "--file", str(texts), "--out", str(tmp_path / "out.jsonl"), "--exit-threshold", "1"],
             ["serve", str(plain), "--port", "0", "--exit-threshold", "0.5"]]
    for args in cases:
        r = CliRunner().invoke(cli, args)
        assert r.exit_code == 2 and "has no early exits: --exit-threshold applies to an early-exit artifact" in r.output, \
            (args, r.output)
    assert not (tmp_path / "out.jsonl").exists()
    r = CliRunner().invoke(cli, ["run", str(plain), "a film", "--exit-threshold", "1.5"])
    assert r.exit_code == 2 and "1.5" in r.output


def test_bulk_exit_threshold_overrides_the_manifest(fixed, tmp_path):
    from bertexport.shipping.bulk import run_local

    inp = tmp_path / "in.txt"
    inp.write_text("\n".join(TEXTS) + "\n")
    run_local(fixed(1.0), inp, tmp_path / "over.jsonl", predictor_options={"top_k": 2, "exit_threshold": 0.0})
    run_local(fixed(0.0), inp, tmp_path / "zero.jsonl", predictor_options={"top_k": 2})
    rows = [[json.loads(line) for line in (tmp_path / f).read_text().splitlines()] for f in ("over.jsonl", "zero.jsonl")]
    assert [r["label"] for r in rows[0]] == [r["label"] for r in rows[1]]
    np.testing.assert_array_equal(_probs(rows[0]), _probs(rows[1]))
    sidecar = json.loads((tmp_path / ".over.jsonl.bulk.json").read_text())
    assert sidecar["options"]["exit_threshold"] == 0.0  # part of the output's identity (resume)


def test_serve_exit_threshold_overrides_the_manifest(fixed, tmp_path):
    from tests.test_serve import Server

    pytest.importorskip("uvicorn", reason="serve needs bertexport[serve]")
    art = tmp_path / "one"
    shutil.copytree(fixed(1.0), art)
    server = Server(art, "--exit-threshold", "0.0", "--top-k", 2, log=tmp_path / "serve.log").wait_listening()
    try:
        status, _, out = server.post("/v1/text-classification", {"model": "one", "inputs": TEXTS})
        assert status == 200, out
        np.testing.assert_allclose(_probs(out["results"]), _first_exit_probs(fixed(0.0), TEXTS), atol=1e-7, rtol=0)
    finally:
        server.proc.send_signal(signal.SIGTERM)
        assert server.stop() == 143


# -- int8 segments: ONNX Runtime and OpenVINO ---------------------------------------------------------------

INT8_TARGETS = {"ort-int8": ("onnxruntime", "onnx"), "ort-fused-int8": ("onnxruntime", "onnx"),
                "openvino-int8": ("openvino", "openvino-ir")}


@pytest.fixture(scope="module")
def int8_built(keyword_model, data, tmp_path_factory):
    """int8_built(target) -> an early-exit artifact of the keyword classifier compiled by that int8
    profile, its threshold chosen on the held-out rows."""
    root = tmp_path_factory.mktemp("ee-int8")
    samples = root / "samples.jsonl"  # enough rows for the int8 gate to decide, few for a fast parity check
    samples.write_text("".join(data.read_text().splitlines(keepends=True)[:48]))
    built = {}

    def get(target: str) -> Path:
        if target not in built:
            pytest.importorskip(INT8_TARGETS[target][0])
            built[target] = E.build_early_exit(str(keyword_model), target, root / target, data, samples=samples,
                                               latency_runs=0).artifact
        return built[target]

    return get


def _segment_ops(path: Path) -> set[str]:
    if path.suffix == ".onnx":
        import onnx

        return {n.op_type for n in onnx.load(str(path)).graph.node}
    import openvino as ov

    return {op.get_type_name() for op in ov.Core().read_model(str(path)).get_ops()}


@pytest.mark.parametrize("target", list(INT8_TARGETS))
def test_int8_segments_are_compiled_by_the_profile_and_pass_its_gate(int8_built, target):
    from bertexport.building.profiles import load_profile

    art = int8_built(target)
    manifest = json.loads((art / "manifest.json").read_text())
    early, profile = manifest["early_exit"], load_profile(target)
    backend, fmt = INT8_TARGETS[target]
    assert (early["backend"], early["precision"], early["format"]) == (backend, "int8", fmt)
    assert manifest["model"]["backend"] == backend and manifest["model"]["format"] == fmt
    assert [p["type"] for p in manifest["target"]["passes"]] == [p.type for p in profile.passes]
    quantized = {"onnx": "MatMulInteger", "openvino-ir": "FakeQuantize"}[fmt]
    for seg in early["segments"]:
        assert seg["format"] == fmt and [p["type"] for p in seg["passes"]] == [p.type for p in profile.passes]
        assert quantized in _segment_ops(art / seg["path"]), seg["path"]
    assert early["segments"][0]["outputs"] == ["hidden_states", "exit_logits"]
    # the no-exit path is judged by the profile's own int8 gate, as a normal build of it
    assert manifest["parity"]["rule"] == profile.validation.rule == "int8-decisions" and manifest["parity"]["passed"]
    assert manifest["calibration"]["count"] == early["data"]["train"]
    import jsonschema

    schema = json.loads(Path(E.__file__).parent.parent.joinpath("core", "manifest.schema.json").read_text())
    jsonschema.Draft202012Validator(schema).validate(manifest)
    r = CliRunner().invoke(cli, ["verify", str(art)])
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize("target", list(INT8_TARGETS))
def test_int8_threshold_is_chosen_on_the_int8_exits(int8_built, data, target):
    """The held-out rows run again through the artifact's own segments give the manifest's choice."""
    art = int8_built(target)
    early = json.loads((art / "manifest.json").read_text())["early_exit"]
    texts = [json.loads(line)["text"] for line in data.read_text().splitlines()]
    order = np.random.default_rng(0).permutation(len(texts))  # the build's held-out split (seed 0, 30 %)
    held = [texts[i] for i in sorted(order[:early["data"]["heldout"]].tolist())]
    with Artifact(art, threads=1) as a:
        exits, final = E.runner_outputs(a.runner, a.encoder.encode, held)
    again = E.choose_threshold(exits, final, early["exit_layers"], early["layers"], early["agreement_gate"])
    assert again["threshold"] == early["threshold"] and again["exits"] == early["choice"]["exits"]
    assert again["agreement"] == early["choice"]["agreement"] >= early["agreement_gate"]


@pytest.mark.parametrize("target", list(INT8_TARGETS))
def test_int8_one_zero_and_midway(int8_built, target):
    art = int8_built(target)
    with Artifact(art) as a:
        feeds = a.encoder.encode(TEXTS)
        exits, final = a.runner.every_exit(feeds)
        one, zero = a.runner.infer(feeds, 1.0), a.runner.infer(feeds, 0.0)
        assert (one["exit_layer"] == 2).all() and (zero["exit_layer"] == 1).all()
        np.testing.assert_array_equal(one["logits"], final)  # 1.0: the full int8 path of this artifact
        np.testing.assert_array_equal(zero["logits"], exits[0])  # 0.0: every row at the first exit
        alone = [a.runner.every_exit(a.encoder.encode([t])) for t in TEXTS]
        # the backend's batch tolerance on these texts: a row alone vs in the batch, none or all leaving
        tol = max(max(np.abs(e[0][0] - exits[0][i]).max(), np.abs(f[0] - final[i]).max()) for i, (e, f) in enumerate(alone))
        tol = 2 * tol + 1e-5
        # a threshold in the widest gap of the first exit's confidences: some rows leave, the others go on
        conf = np.sort(np.concatenate([_softmax(exits[0].astype(np.float64)).max(-1),
                                       [_softmax(e[0][0].astype(np.float64)).max() for e, _ in alone]]))
        k = int(np.argmax(np.diff(conf)))
        midway = float((conf[k] + conf[k + 1]) / 2)
        batch = a.runner.infer(feeds, midway)
        assert set(batch["exit_layer"].tolist()) == {1, 2}, batch["exit_layer"]
        for i, text in enumerate(TEXTS):
            one_row = a.runner.infer(a.encoder.encode([text]), midway)
            assert one_row["exit_layer"][0] == batch["exit_layer"][i]
            np.testing.assert_allclose(one_row["logits"][0], batch["logits"][i], atol=tol, rtol=0)
            assert one_row["logits"][0].argmax() == batch["logits"][i].argmax()


def _alone_probs(folder, texts, which: str):
    """Each text alone through every segment: the first exit's or the final probabilities, in label order."""
    with Artifact(folder) as art:
        rows = []
        for t in texts:
            exits, final = art.runner.every_exit(art.encoder.encode([t]))
            rows.append((exits[0] if which == "first" else final)[0])
        order = np.argsort([art.id2label[i] for i in range(len(rows[0]))])
    return _softmax(np.array(rows, dtype=np.float64))[:, order]


@pytest.mark.parametrize("target", list(INT8_TARGETS))
def test_int8_run_exit_threshold(int8_built, target):
    art = int8_built(target)

    def run(threshold):
        r = CliRunner().invoke(cli, ["run", str(art), *TEXTS, "--json", "-", "--top-k", "2", "--batch-size", "1",
                                     "--exit-threshold", threshold])
        assert r.exit_code == 0, r.output
        return _probs([json.loads(line) for line in r.stdout.strip().splitlines()])

    full, first = _alone_probs(art, TEXTS, "final"), _alone_probs(art, TEXTS, "first")
    assert np.abs(full - first).max() > 1e-6
    np.testing.assert_allclose(run("1.0"), full, atol=1e-6, rtol=0)  # no row exits
    np.testing.assert_allclose(run("0"), first, atol=1e-6, rtol=0)  # every row at the first exit
