import pytest

from bertexport.core.errors import UserError
from bertexport.building.profiles import list_profiles, load_profile


def test_every_builtin_profile_parses():
    names = list_profiles()
    assert {"ort-fp32", "ort-fused", "ort-int8"} <= set(names)
    for name in names:
        p = load_profile(name)
        assert p.name == name
        assert p.validation.min_cosine <= 1.0
        assert p.batch.min <= p.batch.opt <= p.batch.max


def test_int8_tolerances_are_looser_than_fp32():
    assert load_profile("ort-int8").validation.min_cosine < load_profile("ort-fp32").validation.min_cosine


def test_profile_by_path_and_missing(tmp_path):
    f = tmp_path / "mine.toml"
    f.write_text('backend = "onnxruntime"\n[validation]\nmin_cosine = 0.9\n')
    p = load_profile(f)
    assert p.name == "mine" and p.validation.min_cosine == 0.9
    with pytest.raises(UserError, match="not found"):
        load_profile(tmp_path / "absent.toml")


def test_profile_rule_gives_the_registry_gate(tmp_path):
    from bertexport.judging.gates import INT8_RULE

    f = tmp_path / "mine.toml"
    f.write_text('backend = "onnxruntime"\n[validation]\nrule = "int8-decisions"\npadded_length = 32\n')
    v = load_profile(f).validation
    assert v.gates() == INT8_RULE.gates and v.padded_length == 32
    f.write_text('backend = "onnxruntime"\n[validation]\nrule = "no-such-rule"\n')
    with pytest.raises(UserError, match="rule must be one of int8-decisions"):
        load_profile(f)
