import io
import tarfile

import pytest
from click.testing import CliRunner

from bertexport.cli import cli
from bertexport.building.convert import convert
from bertexport.core.errors import UserError
from bertexport.shipping.packing import inspect, pack, unpack


@pytest.fixture(scope="module")
def art(tiny, tmp_path_factory):
    return convert(str(tiny("bert", "text-classification")), "ort-fp32", tmp_path_factory.mktemp("p") / "a",
                   latency_runs=3).artifact


def test_pack_unpack_round_trip(art, tmp_path):
    p = pack(art, tmp_path / "a.tar.gz")
    with tarfile.open(p) as t:
        assert t.getnames()[0] == "manifest.json"
    info = inspect(p)
    assert info["checksums_ok"] is True and info["task"] == "text-classification" and info["latency_p50_ms"]
    out = unpack(p, tmp_path / "u")
    assert (out / "model" / "model.onnx").is_file()
    r = CliRunner().invoke(cli, ["inspect", str(p)])
    assert r.exit_code == 0 and "ort-fp32" in r.output
    r = CliRunner().invoke(cli, ["run", str(out), "nice"])
    assert r.exit_code == 0


def test_corrupted_pack_refused(art, tmp_path):
    p = pack(art, tmp_path / "a.tar.gz")
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF
    p.write_bytes(bytes(data))
    with pytest.raises(UserError, match="does not match its .sha256"):
        unpack(p, tmp_path / "u")


def _evil(tmp_path, member: tarfile.TarInfo, payload=b"x"):
    p = tmp_path / "evil.tar.gz"
    with tarfile.open(p, "w:gz") as t:
        info = tarfile.TarInfo("manifest.json")
        info.size = 2
        t.addfile(info, io.BytesIO(b"{}"))
        if member.isfile():
            member.size = len(payload)
            t.addfile(member, io.BytesIO(payload))
        else:
            t.addfile(member)
    return p


def test_traversal_and_escaping_links_refused(tmp_path):
    dotdot = tarfile.TarInfo("../outside.txt")
    with pytest.raises(UserError, match="outside the folder"):
        unpack(_evil(tmp_path, dotdot), tmp_path / "u1")
    link = tarfile.TarInfo("model/link")
    link.type, link.linkname = tarfile.SYMTYPE, "../../../etc/passwd"
    with pytest.raises(UserError, match="leaves the folder"):
        unpack(_evil(tmp_path, link), tmp_path / "u2")
    absolute = tarfile.TarInfo("/tmp/abs.txt")
    with pytest.raises(UserError, match="outside the folder"):
        unpack(_evil(tmp_path, absolute), tmp_path / "u3")
    assert not (tmp_path / "outside.txt").exists()
    assert not any(p.name.startswith(".u") for p in tmp_path.iterdir())
