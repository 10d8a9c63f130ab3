"""The failure contract, through the real CLI: every bad input exits 2 with one clear line
and no traceback, before any model loads; a bug exits 3 with its traceback in a log file;
Ctrl-C / SIGTERM exit 130 / 143 with staging and work folders removed; nothing the user
owns is ever changed (checked by listing the folder tree before and after)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

import bertexport.building.convert as convert_mod
from bertexport.cli import cli


def tree(root: Path) -> dict[str, str]:
    """Every file and folder below ``root`` with a digest of its content."""
    out = {}
    for p in sorted(Path(root).rglob("*")):
        rel = p.relative_to(root).as_posix()
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def work_folders() -> list[str]:
    work = Path(os.environ["BERTEXPORT_CACHE"]) / "work"
    return sorted(p.name for p in work.iterdir()) if work.is_dir() else []


@pytest.fixture()
def no_model_load(monkeypatch):
    """Fails the test if a model gets loaded: bad input must be refused before that."""
    calls = []
    monkeypatch.setattr(convert_mod, "load_model", lambda *a, **k: calls.append(a) or (_ for _ in ()).throw(AssertionError("model loaded")))
    return calls


def cli_run(*args, **kw):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False, **kw)


def assert_refused(r, *needles, code=2):
    assert r.exit_code == code, r.output
    assert "Traceback" not in r.output, r.output
    err = [line for line in r.stderr.strip().splitlines() if line.strip()]
    assert len(err) == 1, f"expected one line, got: {r.stderr!r}"
    for n in needles:
        assert n in r.stderr, r.stderr


@pytest.fixture()
def user_ckpt(tiny, tmp_path):
    """A private copy of a tiny checkpoint inside a folder of the user's own files."""
    home = tmp_path / "user"
    ckpt = home / "models" / "bert"
    shutil.copytree(tiny("bert", "text-classification"), ckpt)
    (home / "notes.txt").write_text("my notes\n")
    return home, ckpt


# -- never destroy what the user owns ------------------------------------------------

@pytest.mark.parametrize("where", ["source", "parent", "inside", "user-folder", "cwd"])
def test_force_never_replaces_what_the_user_owns(user_ckpt, where, no_model_load, monkeypatch):
    home, ckpt = user_ckpt
    (home / "docs").mkdir()
    (home / "docs" / "thesis.tex").write_text("\\documentclass{article}")
    out = {"source": ckpt, "parent": ckpt.parent, "inside": ckpt / "artifact", "user-folder": home / "docs",
           "cwd": home}[where]
    monkeypatch.chdir(home)
    before = tree(home)
    r = cli_run("convert", ckpt, "--target", "ort-fp32", "--out", out, "--force")
    assert_refused(r, "refusing")
    assert tree(home) == before and not no_model_load


def test_force_replaces_a_bertexport_artifact_atomically(user_ckpt, tmp_path):
    home, ckpt = user_ckpt
    out = tmp_path / "art"
    assert cli_run("convert", ckpt, "-t", "ort-fp32", "-o", out, "--latency-runs", "0").exit_code == 0
    first = json.loads((out / "manifest.json").read_text())["created"]
    before = tree(home)
    r = cli_run("convert", ckpt, "-t", "ort-fp32", "-o", out, "--latency-runs", "0", "--force")
    assert r.exit_code == 0, r.output
    assert json.loads((out / "manifest.json").read_text())["created"] >= first
    assert tree(home) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art", "user"]  # no staging or .old left
    assert work_folders() == []


def test_pack_and_benchmark_never_replace_user_files(fp32_artifact, tmp_path):
    art = fp32_artifact("bert", "text-classification").artifact  # shared: read only
    mine = tmp_path / "mine.tar.gz"
    mine.write_bytes(b"my own archive")
    assert_refused(cli_run("pack", art, "--out", mine, "--force"), "did not make")
    assert mine.read_bytes() == b"my own archive"
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "paper.md").write_text("mine")
    assert_refused(cli_run("benchmark", art, "--out", folder, "--force"), "did not make")
    assert (folder / "paper.md").read_text() == "mine"
    assert_refused(cli_run("unpack", mine, "--out", folder, "--force"), "did not make")


# -- bad input refused before any model loads ----------------------------------------

def _profile(tmp_path, extra: str) -> Path:
    p = tmp_path / "mine.toml"
    p.write_text('backend = "onnxruntime"\n' + extra)
    return p


@pytest.mark.parametrize("extra,needle", [
    ('[validation]\nmin_cosine = "high"\n', "must be a number"),
    ("[validation]\nmin_cosine = -0.5\n", "min_cosine must be > 0"),
    ("[validation]\nmin_cosine = 1.5\n", "min_cosine must be <= 1"),
    ("[validation]\nmax_abs_diff = -1\n", "max_abs_diff must be > 0"),
    ("[validation]\nmin_top1_agreement = 2\n", "min_agreement must be <= 1"),
    ("[latency]\nbatch = 0\n", "batch must be >= 1"),
    ("[latency]\nruns = -1\n", "runs must be >= 0"),
    ("[shapes]\nsequence = { min = 64, opt = 32, max = 128 }\n", "min <= opt <= max"),
    ('[runtime]\ngraph_optimization = "max"\n', "graph_optimization must be one of"),
    ("[runtime]\nthreads = 4\n", "unknown key(s) threads"),
    ('[[passes]]\ntype = "ort-dynamic-quantize"\nper_channel = "yes"\n', "per_channel must be true or false"),
    ('[[passes]]\ntype = "ort-dynamic-quantize"\ntarget_min_cosine = 1.5\n', "target_min_cosine"),
    ('[[passes]]\ntype = "nope"\n', "unknown pass"),
    ('opset = "18"\n', "opset must be an integer"),
])
def test_bad_profile_refused_before_work(user_ckpt, tmp_path, extra, needle, no_model_load):
    _, ckpt = user_ckpt
    profile = _profile(tmp_path, extra)
    before = tree(tmp_path)
    r = cli_run("convert", ckpt, "-t", profile, "-o", tmp_path / "out")
    assert_refused(r, needle)
    assert tree(tmp_path) == before and not no_model_load


@pytest.mark.parametrize("damage,needle", [
    ("heads", "not a multiple of num_attention_heads"),
    ("truncated", "truncated or corrupt"),
    ("random", "not a valid safetensors file"),
    ("no-tokenizer", "no tokenizer files"),
    ("bad-tokenizer", "tokenizer.json is corrupt"),
    ("auto_map", "custom model code (config.json:auto_map)"),
    ("py-file", "modeling_evil.py"),
])
def test_damaged_checkpoint_refused_before_load(user_ckpt, tmp_path, damage, needle, no_model_load):
    home, ckpt = user_ckpt
    cfg = json.loads((ckpt / "config.json").read_text())
    weights = ckpt / "model.safetensors"
    if damage == "heads":
        (ckpt / "config.json").write_text(json.dumps(cfg | {"num_attention_heads": 3}))
    elif damage == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "random":
        weights.write_bytes(os.urandom(4096))
    elif damage == "no-tokenizer":
        for f in ("tokenizer.json", "vocab.txt"):
            (ckpt / f).unlink(missing_ok=True)
    elif damage == "bad-tokenizer":
        (ckpt / "tokenizer.json").write_text("{not json")
    elif damage == "auto_map":
        (ckpt / "config.json").write_text(json.dumps(cfg | {"auto_map": {"AutoModel": "modeling_x.Model"}}))
    elif damage == "py-file":
        (ckpt / "modeling_evil.py").write_text("import os\n")
    before = tree(home)
    r = cli_run("convert", ckpt, "-t", "ort-fp32", "-o", tmp_path / "out")
    assert_refused(r, needle)
    assert tree(home) == before and not (tmp_path / "out").exists() and not no_model_load


def test_remote_code_flag_and_code_files_key_the_export_cache(user_ckpt):
    from bertexport.building.checkpoint import resolve_checkpoint
    from bertexport.building.export import _cache_key

    _, ckpt = user_ckpt
    (ckpt / "modeling_x.py").write_text("VERSION = 1\n")
    a = resolve_checkpoint(str(ckpt), trust_remote_code=True)
    (ckpt / "modeling_x.py").write_text("VERSION = 2\n")
    b = resolve_checkpoint(str(ckpt), trust_remote_code=True)
    assert a.sha256 != b.sha256 and a.code_files == ("modeling_x.py",)
    (ckpt / "modeling_x.py").unlink()
    plain = resolve_checkpoint(str(ckpt))
    trusted = resolve_checkpoint(str(ckpt), trust_remote_code=True)
    assert _cache_key(plain, 18) != _cache_key(trusted, 18)


@pytest.mark.parametrize("option", ["--calib", "--samples"])
def test_binary_text_input_refused(user_ckpt, tmp_path, option, no_model_load):
    _, ckpt = user_ckpt
    r = cli_run("convert", ckpt, "-t", "openvino-int8-full", "-o", tmp_path / "out", option, sys.executable)
    assert_refused(r, "is not text", "NUL bytes")
    noisy = tmp_path / "noisy.txt"
    noisy.write_bytes(b"\n".join([b"a fine sentence"] * 20 + [b"\x1b\x07\x08 junk"] * 10))
    r = cli_run("convert", ckpt, "-t", "openvino-int8-full", "-o", tmp_path / "out", option, noisy)
    assert_refused(r, "noisy.txt:21 is not text", "control characters")  # the first bad line, named


def test_destination_problems_refused_before_load(user_ckpt, tmp_path, no_model_load):
    _, ckpt = user_ckpt
    assert_refused(cli_run("convert", ckpt, "-t", "ort-fp32", "-o", "/proc/bertexport-out"), "cannot write")
    (tmp_path / "file").write_text("x")
    assert_refused(cli_run("convert", ckpt, "-t", "ort-fp32", "-o", tmp_path / "file" / "out"), "is not a folder")


def _mount_tmpfs(path: Path, options: str) -> bool:
    path.mkdir()
    return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True).returncode == 0


@pytest.mark.parametrize("kind", ["read-only", "full"])
def test_read_only_or_full_filesystem_refused_before_load(user_ckpt, tmp_path, kind, no_model_load):
    _, ckpt = user_ckpt
    mnt = tmp_path / "mnt"
    if not _mount_tmpfs(mnt, "ro,size=1m" if kind == "read-only" else "size=64k"):
        pytest.skip("mounting a tmpfs needs root")
    try:
        r = cli_run("convert", ckpt, "-t", "ort-fp32", "-o", mnt / "out")
        assert_refused(r, "cannot write" if kind == "read-only" else "not enough free space")
        assert list(mnt.iterdir()) == []
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_cli_option_ranges_and_no_gate(tmp_path, user_ckpt, fp32_artifact):
    _, ckpt = user_ckpt
    r = cli_run("convert", ckpt, "-t", "ort-fp32", "-o", tmp_path / "o", "--latency-runs", "-3")
    assert r.exit_code == 2 and "Traceback" not in r.output
    art = fp32_artifact("bert", "text-classification").artifact  # shared: read only
    assert_refused(cli_run("validate", art), "no gate given")
    r = cli_run("validate", art, "--report-only", "--json", "-")
    assert r.exit_code == 0 and json.loads(r.stdout)["passed"] is True
    assert "REPORTED (no gate)" in r.stderr
    assert_refused(cli_run("run", art, "--file", tmp_path), "is a folder")
    assert_refused(cli_run("run", art, "--file", sys.executable), "is not text")
    assert_refused(cli_run("validate", art, "--min-agreement", "0.9", "--data", sys.executable), "is not text")


def test_run_json_does_not_echo_the_input(fp32_artifact):
    art = fp32_artifact("bert", "text-classification").artifact  # shared: read only
    long_text = "a remarkably long review " * 2000
    r = cli_run("run", art, "short one", long_text, "--json", "-")
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [x["index"] for x in rows] == [0, 1] and len(r.stdout) < 2000
    assert rows[1]["text_prefix"] == long_text[:40] and "text" not in rows[1]


# -- packs and integrity ---------------------------------------------------------------

def test_damaged_packs_and_edited_manifest(tmp_path, fp32_artifact):
    art = shutil.copytree(fp32_artifact("bert", "text-classification").artifact, tmp_path / "art")  # edited below: a copy
    assert cli_run("pack", art, "--out", tmp_path / "a.tar.gz").exit_code == 0
    data = (tmp_path / "a.tar.gz").read_bytes()
    (tmp_path / "cut.tar.gz").write_bytes(data[: len(data) // 2])  # a bad scp
    (tmp_path / "text.tar.gz").write_text("not gzip at all")
    for bad in ("cut.tar.gz", "text.tar.gz"):
        assert_refused(cli_run("unpack", tmp_path / bad, "--out", tmp_path / "u"), "not a readable pack")
        assert_refused(cli_run("inspect", tmp_path / bad), "not a readable pack")
    assert not (tmp_path / "u").exists()
    r = cli_run("inspect", art, "--json", "-")
    info = json.loads(r.stdout)
    assert info["manifest_digest_ok"] is True and len(info["manifest_sha256"]) == 64
    assert "manifest digest" in cli_run("inspect", art).stdout
    m = json.loads((art / "manifest.json").read_text())
    m["parity"]["checks"]["real-lengths"]["cosine_min"] = 1.0  # "improve" a recorded figure by hand
    (art / "manifest.json").write_text(json.dumps(m, indent=2))
    assert_refused(cli_run("verify", art), "manifest.json was edited")


# -- internal errors and signals -------------------------------------------------------

def test_internal_error_exits_3_with_a_log(user_ckpt, tmp_path, monkeypatch):
    _, ckpt = user_ckpt

    def bug(*a, **k):
        raise ZeroDivisionError("division by zero in a helper")

    monkeypatch.setattr(convert_mod, "plan_convert", bug)
    r = cli_run("convert", ckpt, "-t", "ort-fp32", "-o", tmp_path / "out")
    assert_refused(r, "internal error", "ZeroDivisionError", code=3)
    log = Path(r.stderr.split("full traceback in ")[1].strip())
    assert log.is_file() and "Traceback" in log.read_text() and "plan_convert" not in r.stderr


def _start_convert(ckpt, out, extra=()):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "bertexport.cli", "convert", str(ckpt), "-t", "ort-fp32", "-o", str(out),
                             "--latency-runs", "100000", *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)


@pytest.mark.parametrize("sig,code,word", [(signal.SIGTERM, 143, "terminated"), (signal.SIGINT, 130, "interrupted")])
def test_signal_during_convert_removes_everything(user_ckpt, tmp_path, sig, code, word):
    home, ckpt = user_ckpt
    before = tree(home)
    out_dir = tmp_path / "outs"
    out_dir.mkdir()
    proc = _start_convert(ckpt, out_dir / "art")
    deadline = time.time() + 120
    while time.time() < deadline and not any(p.name.startswith(".art.partial-") for p in out_dir.iterdir()):
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    time.sleep(1.0)  # well inside the build (latency timing runs for minutes)
    assert proc.poll() is None
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert word in err and "nothing written" in err and "Traceback" not in err
    assert list(out_dir.iterdir()) == []
    assert not [w for w in work_folders() if w.startswith(f"{proc.pid}-")]
    assert tree(home) == before


def test_orphans_of_kill_9_are_removed_by_the_next_run(user_ckpt, tmp_path):
    _, ckpt = user_ckpt
    dead = 4_000_000  # above pid_max: no such process
    out_dir = tmp_path / "outs"
    (out_dir / f".art.partial-{dead}").mkdir(parents=True)
    (out_dir / f".art.partial-{dead}" / "model.onnx").write_bytes(b"half")
    work = Path(os.environ["BERTEXPORT_CACHE"]) / "work" / f"{dead}-convert-x"
    work.mkdir(parents=True)
    r = cli_run("convert", ckpt, "-t", "ort-fp32", "-o", out_dir / "art", "--latency-runs", "0")
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in out_dir.iterdir()) == ["art"] and not work.exists()


def test_cache_command_lists_and_prunes(tmp_path):
    dead = Path(os.environ["BERTEXPORT_CACHE"]) / "work" / "4000001-job-x"
    dead.mkdir(parents=True)
    (dead / "f").write_bytes(b"x" * 1000)
    r = cli_run("cache", "--json", "-")
    info = json.loads(r.stdout)
    assert r.exit_code == 0 and info["kinds"]["work"]["entries"] >= 1 and "exports" in info["kinds"]
    r = cli_run("cache", "--prune", "--older-than", "36500")
    assert r.exit_code == 0 and "pruned" in r.output and not dead.exists()
