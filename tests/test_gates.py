"""The gate registry: every gate flag of every command is a registry flag with the
registry's range; JUnit failures come from verdict records; the int8 profiles' one rule
does not hinge on one text (a trained classifier with a decision on the boundary) and
still fails a collapsed build."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET

import click
import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from bertexport.building.profiles import list_profiles, load_profile, parse_profile
from bertexport.cli import cli
from bertexport.core.errors import UserError
from bertexport.core.textdata import builtin_calibration, builtin_samples, builtin_validation
from bertexport.judging import gates as G
from bertexport.judging.compare import write_junit

GATE_LIKE = re.compile(r"^--(min|max)-.*(cosine|agreement|accuracy-drop|macro-f1-drop|abs-diff)|^--confidence$")
INT8_PROFILES = [n for n in list_profiles() if load_profile(n).precision.startswith("int8")]


def _commands(group, prefix=""):
    for name, cmd in group.commands.items():
        yield f"{prefix}{name}", cmd
        if isinstance(cmd, click.Group):
            yield from _commands(cmd, f"{prefix}{name} ")


def test_every_gate_flag_of_every_command_is_the_registrys():
    specs = G.flag_specs()
    seen = set()
    for name, cmd in _commands(cli):
        for p in cmd.params:
            for flag in (o for o in getattr(p, "opts", []) if GATE_LIKE.search(o)):
                assert flag in specs, f"{name} {flag}: a gate flag the registry does not know"
                s = specs[flag]
                t = p.type
                assert isinstance(t, click.FloatRange), f"{name} {flag}: not a float range"
                assert (t.min, t.max, t.min_open, t.max_open) == (s.low, s.high, s.low_open, s.high_open), \
                    f"{name} {flag}: range {t} is not the registry's {s.range_text()}"
                assert p.name == s.name
                seen.add((name, flag))
    # the commands that gate really have the flags (the walk is not vacuous)
    for cmd in ("validate", "optimize"):
        assert {(cmd, f) for f in ("--min-agreement", "--min-cosine", "--max-accuracy-drop", "--max-macro-f1-drop",
                                   "--confidence")} <= seen


def test_one_confidence_range_and_gates_fields_take_the_registry_ranges():
    fields = {f.name: f.metadata for f in G.Gates.__dataclass_fields__.values()}
    for name, spec in list(G.GATES.items()) + [("confidence", G.CONFIDENCE)]:
        assert (fields[name]["min"], fields[name]["max"], fields[name]["min_open"]) == (spec.low, spec.high, spec.low_open)
    with pytest.raises(UserError, match="--confidence must be in"):
        G.Gates(min_agreement=0.9, confidence=0.3).check()
    with pytest.raises(UserError, match="--min-agreement must be in"):
        G.Gates(min_agreement=1.5).check()
    # the registry's defaults and rows rules
    assert G.default_gates(True).thresholds() == {"max_accuracy_drop": 1.0}
    assert G.default_gates(False).thresholds() == {"min_agreement": 0.98}
    assert G.rows_needed(G.Gates(min_agreement=0.98, max_accuracy_drop=1.0, min_cosine=0.9)) == \
        {"min_agreement": 100, "max_accuracy_drop": 200}


def test_a_gate_of_one_task_or_of_labels_is_refused_elsewhere_before_any_work():
    G.check_gates_fit(G.Gates(max_macro_f1_drop=1.0), "text-classification", True)
    with pytest.raises(UserError, match="--max-macro-f1-drop gates text-classification models; this one is feature-extraction"):
        G.check_gates_fit(G.Gates(max_macro_f1_drop=1.0), "feature-extraction", True)
    with pytest.raises(UserError, match=r"--max-macro-f1-drop needs labelled data \(a label column\) for a "
                                        "text-classification model$"):
        G.check_gates_fit(G.Gates(max_macro_f1_drop=1.0), "text-classification", False)
    with pytest.raises(UserError, match="--max-accuracy-drop needs labelled data .* text-classification or embedding"):
        G.check_gates_fit(G.Gates(max_accuracy_drop=1.0), "text-classification", False)
    for name in ("max_macro_f1_drop", "max_accuracy_drop"):  # nor in a profile's [validation]: its texts have no labels
        with pytest.raises(UserError, match=f"{name} needs labelled data"):
            parse_profile({"backend": "onnxruntime", "validation": {name: 1.0}}, "x.toml")


def test_the_agreement_a_gate_implies():
    assert G.implied_agreement(G.Gates(max_accuracy_drop=1.0), 0.5) == pytest.approx(0.995)
    assert G.implied_agreement(G.Gates(min_agreement=0.98, max_accuracy_drop=5.0), 0.5) == pytest.approx(0.99)
    assert G.implied_agreement(G.Gates(min_agreement=0.0), 0.5) == 0.5  # at least half
    assert G.implied_agreement(G.Gates(min_cosine=0.99), 0.5) is None  # a cosine does not bound disagreement
    # a rare class may hold all of the disagreement: agreement bounds no macro-F1 drop
    assert G.implied_agreement(G.Gates(max_accuracy_drop=1.0, max_macro_f1_drop=5.0), 0.5) is None


def _figures(agree: int, rows: int, cosine: float = 0.99) -> dict:
    from bertexport.judging import stats

    eq = np.arange(rows) < agree
    return {"agreement": agree / rows, "cosine_min": cosine, "max_abs_diff": 0.1, "samples": rows,
            "stats": {"agreement": stats.agreement(eq).to_dict()}}


def test_verdicts_are_records_with_interval_and_status():
    g = G.Gates(min_agreement=0.95, min_cosine=0.8, confidence=0.95)
    d = G.judge(_figures(530, 539), g, "real-lengths")
    a = next(v for v in d.verdicts if v.gate == "min_agreement")
    assert a.status == "passed" and a.low > 0.95 and a.high <= 1.0 and a.threshold == 0.95 and a.check == "real-lengths"
    d = G.judge(_figures(512, 539), g)
    assert d.status == "undecided" and d.verdicts[0].rows_needed > 539
    d = G.judge(_figures(300, 539, cosine=0.5), g)
    assert d.status == "failed" and {v.gate for v in d.verdicts if v.status == "failed"} == {"min_agreement", "min_cosine"}
    # without a confidence level the point estimate decides; a straddling interval is within noise
    d = G.judge(_figures(47, 48), G.Gates(min_agreement=0.96))
    assert d.verdicts[0].status == "within-noise" and d.within_noise and not d.failures
    # an estimate a hair from the threshold: the rows that would decide it are out of reach, and it says so
    d = G.judge(_figures(5131, 5400), g)
    a = next(v for v in d.verdicts if v.gate == "min_agreement")
    assert a.status == "undecided" and a.rows_needed > G.FAR_BEYOND * 5400
    assert "as good as on it" in a.message and f"about {a.rows_needed:,} rows" in a.message


def test_junit_failures_come_from_verdicts_not_message_words(tmp_path):
    g = G.Gates(min_agreement=0.95, min_cosine=0.8, confidence=0.95)
    d = G.judge(_figures(300, 539), g)
    # reword every message: the report must still put each failure on its own gate
    for v in d.verdicts:
        v.message = f"verdict #{id(v)}"
    path = tmp_path / "j.xml"
    write_junit("art", "text-classification", g, _figures(300, 539), d, path)
    suite = ET.parse(path).getroot()
    cases = {c.get("name"): c for c in suite.iter("testcase")}
    assert set(cases) == {"art:min_agreement", "art:min_cosine"} and suite.get("failures") == "1"
    fail = cases["art:min_agreement"].find("failure")
    assert fail is not None and fail.get("message") == d.verdicts[0].message and fail.get("type") == "failed"
    assert cases["art:min_cosine"].find("failure") is None
    props = {p.get("name"): p.get("value") for p in suite.iter("property")}
    assert props["verdict.min_agreement.status"] == "failed" and props["verdict.min_agreement.threshold"] == "0.95"
    assert float(props["verdict.min_agreement.high"]) < 0.95


def test_every_int8_profile_has_the_one_rule_and_says_so():
    assert {"ort-int8", "ort-int8-avx2", "ort-fused-int8", "ort-int8-arm64", "ort-int8-skip", "ort-static-int8",
            "openvino-int8", "tensorrt-int8"} <= set(INT8_PROFILES)
    for name in INT8_PROFILES:
        v = load_profile(name).validation
        assert v.rule == "int8-decisions" and v.gates() == G.INT8_RULE.gates, name
    from bertexport.building.describe import describe_text

    text = describe_text("ort-int8")
    assert "rule int8-decisions" in text and "undecided" in text and f"{len(builtin_validation())} built-in texts" in text
    with pytest.raises(UserError, match="rule 'int8-decisions' and thresholds"):
        parse_profile({"backend": "onnxruntime", "validation": {"rule": "int8-decisions", "min_cosine": 0.9}}, "x.toml")


def test_builtin_validation_texts_resolve_the_rule_and_are_not_calibration_text():
    texts = builtin_validation()
    assert len(texts) >= 400 and len(set(texts)) == len(texts)
    assert not set(texts) & set(builtin_calibration())
    assert set(builtin_samples()) <= set(texts)
    for check in ("min_agreement",):
        assert len(texts) >= 4 * G.rows_needed(G.INT8_RULE.gates)[check]


# -- the acceptance test: a trained classifier with one decision on the boundary -------------------

def _long_or_question(text: str) -> int:
    return int("?" in text or len(text.split()) > 12)


@pytest.fixture(scope="module")
def boundary(tmp_path_factory):
    """A tiny BERT classifier trained (on the calibration text, a few seconds) to tell
    questions and long sentences from the rest — its decisions on the built-in texts are
    spread on both sides of the boundary — with its head's bias then moved so that one
    built-in sample sentence sits on the decision boundary (logit margin 1e-4)."""
    import torch
    import transformers as T

    from tests.tinymodels import CONFIGS, make_tokenizer

    root = tmp_path_factory.mktemp("boundary")
    tok = make_tokenizer("bert", root / "tokenizer")
    cfg = T.BertConfig(vocab_size=len(tok), pad_token_id=tok.pad_token_id, **(CONFIGS["bert"] | {"initializer_range": 0.02}),
                       id2label={0: "other", 1: "long-or-question"}, label2id={"other": 0, "long-or-question": 1})
    torch.manual_seed(0)
    model = T.BertForSequenceClassification(cfg)
    texts = builtin_calibration(False)
    labels = np.array([_long_or_question(t) for t in texts])
    rng = np.random.default_rng(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(60):
        idx = rng.integers(0, len(texts), 32)
        enc = tok([texts[i] for i in idx], padding=True, truncation=True, max_length=64, return_tensors="pt")
        model(**enc, labels=torch.tensor(labels[idx])).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    samples = builtin_samples()
    with torch.no_grad():
        logits = model(**tok(samples, padding=True, return_tensors="pt")).logits
    margin = (logits[:, 1] - logits[:, 0]).numpy()
    i = int(np.argmin(np.abs(margin)))
    with torch.no_grad():
        model.classifier.bias[1] -= float(margin[i]) - 1e-4
        m2 = model(**tok([samples[i]], return_tensors="pt")).logits
    assert 0 < float(m2[0, 1] - m2[0, 0]) < 1e-3  # on the boundary, decided 'long-or-question' by a hair
    ckpt = root / "model"
    model.save_pretrained(ckpt, safe_serialization=True)
    tok.save_pretrained(ckpt)
    return {"ckpt": ckpt, "text": samples[i], "root": root}


class _Forced:
    """A real runner whose decision on one text is forced to agree with, or differ from,
    the original's (by swapping the two logits of that row only)."""

    def __init__(self, runner, encode, text: str, reference_class: int, agree: bool):
        self.runner, self.agree, self.cls = runner, agree, reference_class
        self.ids = list(encode([text], padding="longest")["input_ids"][0])

    def infer(self, feeds):
        out = dict(self.runner.infer(feeds))
        logits = np.array(out["logits"], copy=True)
        for i, (row, mask) in enumerate(zip(feeds["input_ids"], feeds["attention_mask"])):
            if list(row[mask.astype(bool)]) == self.ids and (int(logits[i].argmax()) == self.cls) != self.agree:
                logits[i] = logits[i][::-1]
        out["logits"] = logits
        return out


def _profile_verdicts(reference, candidate, encode, texts, profiles, gates=None):
    """Every profile's verdict (by its own gate) on one pair of parity checks, as convert
    judges them; all int8 profiles share one confidence level, so the checks are run once."""
    from bertexport.judging.compare import parity_checks

    all_gates = {n: load_profile(n).validation.gates() for n in profiles} if gates is None else {"given": gates}
    levels = {g.level for g in all_gates.values()}
    assert len(levels) == 1
    checks = parity_checks(reference, candidate, encode, texts, "text-classification", 64, levels.pop())
    return {n: G.profile_status(G.judge_checks(checks, g)) for n, g in all_gates.items()}, checks


@pytest.mark.parametrize("target", ["ort-int8", "openvino-int8"])
def test_int8_profile_verdict_does_not_hinge_on_one_boundary_text(boundary, tmp_path, target):
    from bertexport.building.convert import convert
    from bertexport.judging.compare import reference_for_manifest
    from bertexport.shipping.runtime import Artifact

    if target.startswith("openvino"):
        pytest.importorskip("openvino")
    res = convert(str(boundary["ckpt"]), target, tmp_path / "a", latency_runs=0)  # the profile's own gate
    assert res.verdict == "passed" and res.manifest["parity"]["rule"] == "int8-decisions"
    texts = builtin_validation()
    art = Artifact(res.artifact, threads=1)
    _, ref = reference_for_manifest(art.manifest)
    encode = art.encoder.encode
    with art, ref:
        verdicts = {}
        for agree in (True, False):
            forced = _Forced(art, encode, boundary["text"], 1, agree)
            statuses, checks = _profile_verdicts(ref, forced, encode, texts, INT8_PROFILES)
            for name, status in statuses.items():
                verdicts.setdefault(name, set()).add(status)
            flips = checks["padded-batch"]["stats"]["agreement"]["discordant"]
            assert (flips >= 1) == (not agree)  # the forced flip is really there
        assert all(v == {"passed"} for v in verdicts.values()), verdicts
        # the old rule (agreement 0.98 on the 48 samples, point estimate) hinged on that one text
        old = G.Gates(min_agreement=0.98, min_cosine=0.8)
        statuses = {_profile_verdicts(ref, _Forced(art, encode, boundary["text"], 1, agree), encode, builtin_samples(), [],
                                      old)[0]["given"] for agree in (True, False)}
        assert statuses == {"passed", "failed"}


def test_a_collapsed_build_fails_every_int8_profile(boundary, tmp_path):
    """A deliberately destroyed graph (every weight matrix replaced by noise of its own
    scale) still fails the one rule, on ONNX Runtime."""
    from bertexport.backends.onnxruntime.runner import OrtRunner
    from bertexport.building.convert import convert
    from bertexport.judging.compare import reference_for_manifest
    from bertexport.shipping.runtime import Artifact

    res = convert(str(boundary["ckpt"]), "ort-fp32", tmp_path / "fp32", latency_runs=0)
    model_path = res.artifact / res.manifest["model"]["path"]
    graph = onnx.load(str(model_path))
    rng = np.random.default_rng(0)
    for init in graph.graph.initializer:
        w = numpy_helper.to_array(init)
        if w.ndim == 2 and w.dtype == np.float32 and min(w.shape) > 2:
            init.CopyFrom(numpy_helper.from_array((rng.normal(size=w.shape) * w.std()).astype(np.float32), init.name))
    destroyed = tmp_path / "destroyed.onnx"
    onnx.save(graph, str(destroyed))
    art = Artifact(res.artifact, threads=1)
    _, ref = reference_for_manifest(art.manifest)
    with ref, OrtRunner(destroyed, threads=1) as bad:
        statuses, checks = _profile_verdicts(ref, bad, art.encoder.encode, builtin_validation(), INT8_PROFILES)
    assert set(statuses.values()) == {"failed"}, {k: (c["agreement"], c["cosine_min"]) for k, c in checks.items()}


def test_docs_hold_the_registry_table():
    from pathlib import Path

    text = (Path(__file__).parents[1] / "docs" / "gates.md").read_text()
    assert G.registry_markdown() in text


def test_convert_data_too_small_for_the_profile_gate_is_refused_before_any_work(tiny, tmp_path):
    from click.testing import CliRunner

    small = tmp_path / "mine.txt"
    small.write_text("\n".join(f"text number {i}" for i in range(10)) + "\n")
    r = CliRunner().invoke(cli, ["convert", str(tiny("bert", "text-classification")), "--target", "ort-int8",
                                 "--out", str(tmp_path / "a"), "--data", str(small)])
    assert r.exit_code == 2 and "10 rows" in r.output and "needs >= 40 rows" in r.output, r.output
    assert not (tmp_path / "a").exists()


def test_convert_data_judges_the_profile_gate_on_the_users_texts(boundary, tmp_path):
    from bertexport.building.convert import convert

    data = tmp_path / "mine.csv"
    texts = builtin_calibration(False)[:120]  # any texts of the user's: here 120 rows of a CSV column
    data.write_text("id,body\n" + "\n".join(f'{i},"{t.replace(chr(34), "")}"' for i, t in enumerate(texts)) + "\n")
    res = convert(str(boundary["ckpt"]), "ort-int8", tmp_path / "a", latency_runs=0, samples=data, text_column="body")
    parity = res.manifest["parity"]
    assert parity["source"] == str(data) and parity["rule"] == "int8-decisions"
    assert all(c["samples"] == 120 for c in parity["checks"].values())
    assert {v["check"] for v in parity["verdicts"]} == {"real-lengths", "padded-batch"} and res.verdict == "passed"
