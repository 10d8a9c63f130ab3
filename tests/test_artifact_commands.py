"""The library entries of verify/pack/cache (bertexport/shipping/artifact_commands.py), each
taking its settings record."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

from bertexport.cli import cli
from bertexport.cli.settings import settings_from
from bertexport.core.errors import UserError
from bertexport.shipping.artifact_commands import VerificationFailed, cache_command, verify_command
from bertexport.shipping.settings import CacheSettings, PackSettings, VerifySettings


def test_verify_reports_the_problems_and_still_writes_its_json(fp32_artifact, tmp_path):
    art = tmp_path / "art"
    shutil.copytree(fp32_artifact("bert", "feature-extraction").artifact, art)
    ok = verify_command(VerifySettings(artifact=art))
    assert ok.passed and ok.files > 0 and not ok.signed and ok.payload()["passed"] is True
    labels = next(p for p in art.iterdir() if p.suffix == ".json" and p.name != "manifest.json")
    labels.write_text(labels.read_text() + " ")
    with pytest.raises(VerificationFailed) as failed:
        verify_command(VerifySettings(artifact=art))
    assert labels.name in " ".join(failed.value.verification.problems)
    r = CliRunner().invoke(cli, ["verify", str(art), "--json", "-"])
    assert r.exit_code == 2
    payload = json.loads(r.stdout[r.stdout.index("{"):r.stdout.rindex("}") + 1])
    assert payload["passed"] is False and payload["problems"] and "failed verification" in r.output


def test_triton_options_need_the_triton_format(tmp_path):
    with pytest.raises(UserError, match="--model-name: only with --format triton"):
        settings_from(PackSettings, {"artifact": tmp_path, "model_name": "e"}, "pack")
    s = settings_from(PackSettings, {"artifact": tmp_path, "fmt": "triton", "max_batch_size": 4}, "pack")
    assert s.triton_options() == {"max_batch_size": 4}
    r = CliRunner().invoke(cli, ["pack", str(tmp_path / "none"), "--max-batch-size", "4"])
    assert r.exit_code == 2 and "--max-batch-size: only with --format triton" in r.output


def test_cache_prunes_only_what_it_is_told(tmp_path, monkeypatch):
    monkeypatch.setenv("BERTEXPORT_CACHE", str(tmp_path / "cache"))
    listed = cache_command(CacheSettings())
    assert not listed.cleared and listed.pruned == [] and listed.summary["root"]
    cleared = cache_command(CacheSettings(clear=True, prune=True))  # --clear wins
    assert cleared.cleared and cleared.pruned == []
