"""The README's device install, for real: the wheel built on this machine installs into a
fresh virtualenv with the runtime (and signing) extras under constraints.txt (so tokenizers
matches the build), without torch; a signed pack unpacks there only with the trusted key
and serves the same answers as the build machine."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from bertexport.building.convert import convert

REPO = Path(__file__).resolve().parents[1]


def test_wheel_installs_and_runs_on_a_torch_free_device(tiny, tmp_path):
    art = convert(str(tiny("bert", "text-classification")), "ort-fp32", tmp_path / "art", latency_runs=0).artifact
    signing = importlib.util.find_spec("model_signing") is not None
    if signing:
        from tests.test_signing import _keypair

        from bertexport.shipping.packing import pack
        from bertexport.shipping.signing import sign

        priv, pub = _keypair(tmp_path, "ci")
        sign(art, priv)
        packed = pack(art, tmp_path / "art.tar.gz")
    dist = tmp_path / "dist"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dist), str(REPO)],
                           capture_output=True, text=True)
    if build.returncode != 0 and "No matching distribution" in build.stderr:
        pytest.skip("the build backend (hatchling) cannot be fetched here")
    assert build.returncode == 0, build.stderr
    (wheel,) = dist.glob("bertexport-*.whl")
    venv = tmp_path / "device"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    extras = "runtime,sign" if signing else "runtime"
    pip = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "-c", str(REPO / "constraints.txt"), f"{wheel}[{extras}]"],
                         capture_output=True, text=True)
    assert pip.returncode == 0, pip.stderr
    probe = subprocess.run([str(venv / "bin" / "python"), "-c", "import torch"], capture_output=True, text=True)
    assert probe.returncode != 0, "torch must not be installed on the device"
    texts = ["a gripping, beautifully shot film", "dull and far too long"]
    served = art
    if signing:  # pack -> unpack -> run, each step checking the signature with the trusted key
        served = tmp_path / "on-device"
        bx = str(venv / "bin" / "bertexport")
        un = subprocess.run([bx, "unpack", str(packed), "--out", str(served), "--trusted-key", str(pub)], capture_output=True, text=True)
        assert un.returncode == 0, un.stderr
    device = subprocess.run([str(venv / "bin" / "bertexport"), "run", str(served), *texts, "--json", "-"]
                            + (["--trusted-key", str(pub)] if signing else []), capture_output=True, text=True)
    assert device.returncode == 0, device.stderr
    assert "warning" not in device.stderr  # same tokenizers version as the build
    here = subprocess.run([sys.executable, "-m", "bertexport.cli", "run", str(art), *texts, "--json", "-"],
                          capture_output=True, text=True, check=True)
    assert [json.loads(l) for l in device.stdout.splitlines()] == [json.loads(l) for l in here.stdout.splitlines()]
    targets = subprocess.run([str(venv / "bin" / "bertexport"), "targets"], capture_output=True, text=True)
    assert "ort-int8" in targets.stdout  # profiles ship inside the wheel
