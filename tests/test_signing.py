"""Signed artifacts: refused when unsigned, signed by another key, or changed in any byte —
including the edit checksums and the manifest digest cannot catch (a forger who rewrites
the manifest and recomputes its digest). Keys are generated here, never committed."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

from bertexport.cli import cli
from bertexport.building.convert import convert
from bertexport.core.errors import UserError
from bertexport.core.manifest import manifest_digest

pytest.importorskip("model_signing", reason="signing needs bertexport[sign]")


def _keypair(folder, name):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    priv, pub = folder / f"{name}.pem", folder / f"{name}.pub.pem"
    priv.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return priv, pub


@pytest.fixture(scope="module")
def signed(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("signed")
    priv, pub = _keypair(root, "ci")
    other_priv, other_pub = _keypair(root, "someone-else")
    art = convert(str(tiny("bert", "text-classification")), "ort-fp32", root / "art", latency_runs=0).artifact
    r = CliRunner().invoke(cli, ["sign", str(art), "--key", str(priv)])
    assert r.exit_code == 0, r.output
    return {"art": art, "pub": pub, "other_pub": other_pub, "other_priv": other_priv, "root": root}


def _copy(signed, tmp_path):
    return shutil.copytree(signed["art"], tmp_path / "copy")


def refused(args, *needles):
    r = CliRunner().invoke(cli, [str(a) for a in args])
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    for n in needles:
        assert n in r.stderr, r.stderr
    return r


def test_signed_artifact_verifies_and_runs(signed):
    r = CliRunner().invoke(cli, ["verify", str(signed["art"]), "--trusted-key", str(signed["pub"])])
    assert r.exit_code == 0 and "signature" in r.output
    r = CliRunner().invoke(cli, ["run", str(signed["art"]), "fine", "--trusted-key", str(signed["pub"]), "--json", "-"])
    assert r.exit_code == 0 and json.loads(r.stdout)["label"]


def test_relative_paths_sign_and_verify(signed, tmp_path, monkeypatch):
    """As the README types it: `sign art --key ci.pem`, `verify art --trusted-key ci.pub.pem`
    from the folder holding art (the signature file itself is never counted as added)."""
    shutil.copytree(signed["art"], tmp_path / "art")
    (tmp_path / "art" / "signature.sig").unlink()
    shutil.copy(signed["root"] / "ci.pem", tmp_path / "ci.pem")
    shutil.copy(signed["pub"], tmp_path / "ci.pub.pem")
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(cli, ["sign", "art", "--key", "ci.pem"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(cli, ["verify", "art", "--trusted-key", "ci.pub.pem"])
    assert r.exit_code == 0 and "signature" in r.output, r.output
    (tmp_path / "art" / "extra.txt").write_text("x")
    refused(["verify", "art", "--trusted-key", "ci.pub.pem"], "extra.txt")


def test_unsigned_and_foreign_signatures_refused(signed, tiny, tmp_path):
    unsigned = convert(str(tiny("bert", "text-classification")), "ort-fp32", tmp_path / "u", latency_runs=0).artifact
    refused(["run", unsigned, "x", "--trusted-key", signed["pub"]], "is not signed")
    refused(["verify", signed["art"], "--trusted-key", signed["other_pub"]], "signed by a different key")
    forged = _copy(signed, tmp_path)
    CliRunner().invoke(cli, ["sign", str(forged), "--key", str(signed["other_priv"])])  # re-signed by someone else
    refused(["run", forged, "x", "--trusted-key", signed["pub"]], "different key")


@pytest.mark.parametrize("what", ["model", "labels", "manifest"])
def test_any_changed_byte_refused(signed, tmp_path, what):
    art = _copy(signed, tmp_path)
    m = json.loads((art / "manifest.json").read_text())
    if what == "model":
        p = art / m["model"]["path"]
    elif what == "labels":
        p = art / "labels.json"
    if what in ("model", "labels"):
        data = bytearray(p.read_bytes())
        data[-2] ^= 1
        p.write_bytes(bytes(data))
        refused(["verify", art, "--trusted-key", signed["pub"]], "failed verification")
        # a forger who also fixes the file table and the manifest digest passes the
        # checksums, but not the signature
        from bertexport.core.hashing import sha256_file

        rel = p.relative_to(art).as_posix()
        m["files"][rel] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    else:
        m["parity"]["checks"]["real-lengths"]["cosine_min"] = 1.0
    m["manifest_sha256"] = manifest_digest(m)
    (art / "manifest.json").write_text(json.dumps(m, indent=2))
    assert CliRunner().invoke(cli, ["verify", str(art)]).exit_code == 0  # integrity alone is fooled
    refused(["verify", art, "--trusted-key", signed["pub"]], "changed after signing")
    refused(["run", art, "x", "--trusted-key", signed["pub"]], "changed after signing")


def test_signature_travels_in_the_pack_and_env_key(signed, tmp_path, monkeypatch):
    pack = tmp_path / "a.tar.gz"
    assert CliRunner().invoke(cli, ["pack", str(signed["art"]), "--out", str(pack)]).exit_code == 0
    monkeypatch.setenv("BERTEXPORT_TRUSTED_KEY", str(signed["pub"]))
    r = CliRunner().invoke(cli, ["unpack", str(pack), "--out", str(tmp_path / "u")])
    assert r.exit_code == 0, r.output
    assert CliRunner().invoke(cli, ["run", str(tmp_path / "u"), "fine"]).exit_code == 0
    monkeypatch.setenv("BERTEXPORT_TRUSTED_KEY", str(signed["other_pub"]))
    refused(["unpack", pack, "--out", tmp_path / "v"], "different key")
    assert not (tmp_path / "v").exists()


def test_bad_keys_are_refused_before_work(signed, tmp_path):
    (tmp_path / "not-a-key.pem").write_text("hello")
    refused(["sign", signed["art"], "--key", tmp_path / "not-a-key.pem"], "not a PEM key")
    refused(["sign", signed["art"], "--key", tmp_path / "missing.pem"], "private key not found")
    with pytest.raises(UserError, match="trusted key not found"):
        from bertexport.shipping.signing import verify_signature

        verify_signature(signed["art"], tmp_path / "missing.pub")


def test_failure_reasons_in_either_quoting():
    """model-signing reports inside a list's repr; the quoting depends on the digest bytes."""
    from bertexport.shipping.signing import _reason

    escaped = str(["Hash mismatch for 'manifest.json': Expected 'Digest(b\'\\x82\"x\')'"])
    plain = str(["Hash mismatch for 'model/model.onnx': Expected 'Digest(x)'"])
    assert "\\'" in escaped and "\\'" not in plain
    assert _reason(escaped) == "manifest.json changed after signing"
    assert _reason(plain) == "model/model.onnx changed after signing"
    assert _reason(str(["Extra files found in model 'art': extra.bin"])) == "files were added after signing: extra.bin"
    assert _reason("Key mismatch: whatever") == "it was signed by a different key than the trusted one"
