"""The CLI through Click's runner: bad inputs get one clear line and exit 2, with
nothing written; a failed gate exits 1 and publishes nothing as good."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from bertexport import __version__
from bertexport.cli import cli


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def assert_usage_error(result, *needles):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    for n in needles:
        assert n in result.output, result.output


def test_version_and_help():
    assert __version__ in run("--version").output
    out = run("--help").output
    assert "convert" in out and "targets" in out


def test_targets_lists_builtin_profiles():
    out = run("targets").output
    assert "ort-fp32" in out and "ort-int8" in out


def test_missing_path(tmp_path):
    r = run("convert", tmp_path / "nope", "--target", "ort-fp32", "--out", tmp_path / "out")
    assert_usage_error(r, "model path not found")
    assert not (tmp_path / "out").exists()


def test_folder_without_config(tmp_path):
    (tmp_path / "m").mkdir()
    r = run("convert", tmp_path / "m", "-t", "ort-fp32", "-o", tmp_path / "out")
    assert_usage_error(r, "no config.json")


def test_folder_without_weights(tiny, tmp_path):
    src = tiny("bert")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text((src / "config.json").read_text())
    r = run("convert", tmp_path / "m", "-t", "ort-fp32", "-o", tmp_path / "out")
    assert_usage_error(r, "no weights")


@pytest.mark.parametrize("model_type", ["gpt2", "t5"])
def test_non_bert_family(tmp_path, model_type):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"model_type": model_type}))
    r = run("convert", tmp_path / "m", "-t", "ort-fp32", "-o", tmp_path / "out")
    assert_usage_error(r, f"'{model_type}' is not a supported", "distilbert", "deberta-v2")


def test_pickle_weights_need_a_flag(tiny, tmp_path):
    import torch
    from safetensors.torch import load_file

    src = tiny("bert")
    m = tmp_path / "m"
    m.mkdir()
    (m / "config.json").write_text((src / "config.json").read_text())
    torch.save(load_file(src / "model.safetensors"), m / "pytorch_model.bin")
    r = run("convert", m, "-t", "ort-fp32", "-o", tmp_path / "out")
    assert_usage_error(r, "pickle", "--allow-pickle")


def test_unknown_target(tiny, tmp_path):
    r = run("convert", tiny("bert"), "-t", "no-such-target", "-o", tmp_path / "out")
    assert_usage_error(r, "unknown target profile", "ort-fp32")


@pytest.mark.parametrize("text,needle", [
    ("backend = [", "invalid profile"),
    ('backend = "tpu"', "backend must be one of"),
    ('backend = "onnxruntime"\ncolour = "red"', "unknown key"),
    ('backend = "onnxruntime"\n[[passes]]\ntype = "magic"', "unknown pass"),
    ('backend = "onnxruntime"\n[[passes]]\ntype = "ort-dynamic-quantize"\nisa = "z80"', "isa must be one of"),
    ('backend = "onnxruntime"\n[shapes]\nbatch = [8, 4, 2]', "min <= opt <= max"),
])
def test_invalid_profile_file(tiny, tmp_path, text, needle):
    prof = tmp_path / "p.toml"
    prof.write_text(text)
    r = run("convert", tiny("bert"), "-t", prof, "-o", tmp_path / "out")
    assert_usage_error(r, needle)
    assert not (tmp_path / "out").exists()


def test_task_the_checkpoint_cannot_serve(tiny, tmp_path):
    r = run("convert", tiny("bert"), "-t", "ort-fp32", "-o", tmp_path / "out", "--task", "text-classification")
    assert_usage_error(r, "needs a trained text-classification head", "feature-extraction")


def test_output_exists_needs_force(tiny, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    r = run("convert", tiny("bert"), "-t", "ort-fp32", "-o", out)
    assert_usage_error(r, "already exists", "--force")
    assert (out / "keep.txt").exists()
    r = run("convert", tiny("bert"), "-t", "ort-fp32", "-o", out, "--force", "--latency-runs", "3")
    assert_usage_error(r, "did not make")  # --force never replaces a folder of someone's files
    assert (out / "keep.txt").exists()
    (out / "keep.txt").unlink()  # an empty folder holds nothing to lose
    r = run("convert", tiny("bert"), "-t", "ort-fp32", "-o", out, "--latency-runs", "3", "--force")
    assert r.exit_code == 0, r.output
    assert "PASSED" in r.output
    assert json.loads((out / "manifest.json").read_text())["latency"]["artifact"]["count"] == 3
    v = run("verify", out)
    assert v.exit_code == 0 and "PASSED" in v.output


def test_gate_failure_exits_1_and_publishes_rejected(tiny, tmp_path):
    prof = tmp_path / "strict.toml"
    prof.write_text('backend = "onnxruntime"\n[validation]\nmin_cosine = 1.0\nmax_abs_diff = 1e-12\n[latency]\nruns = 0\n')
    out = tmp_path / "out"
    r = run("convert", tiny("bert"), "-t", prof, "-o", out)
    assert r.exit_code == 1, r.output
    assert "FAILED" in r.output and "max_abs_diff" in r.output
    assert not out.exists()
    rejected = tmp_path / "out.rejected"
    assert json.loads((rejected / "manifest.json").read_text())["status"] == "rejected"


def test_every_option_has_help_and_every_command_states_exit_codes():
    import click

    for name, cmd in cli.commands.items():
        for p in cmd.params:
            if isinstance(p, click.Option):
                assert p.help, f"{name} {p.opts} has no help text"
    assert "Exit codes" in run("--help").output and "130/143" in run("convert", "--help").output


def test_tokenizers_version_mismatch_is_reported():
    from bertexport.shipping.runtime import version_warnings

    assert version_warnings({"versions": {"tokenizers": "0.1.0"}})[0].startswith("this artifact was built")
    import importlib.metadata

    assert version_warnings({"versions": {"tokenizers": importlib.metadata.version("tokenizers")}}) == []


def test_task_choices_are_the_task_registry():
    from bertexport.core.tasks import TASKS

    tasks = [p for c in cli.commands.values() for p in c.params if p.name == "task"]
    assert len(tasks) >= 3  # convert, distill, optimize
    assert all(list(p.type.choices) == list(TASKS) for p in tasks)
