"""``serve``'s settings record (bertexport/shipping/settings.py) and library entry
(bertexport/shipping/serve_command.py): the rules between options refuse before anything loads."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from bertexport.cli import cli
from bertexport.cli.settings import settings_from
from bertexport.core.errors import UserError
from bertexport.shipping.serve_command import serve_command
from bertexport.shipping.settings import ServeSettings


@pytest.mark.parametrize("args, message", [
    (["--replicas", "2"], "--replicas, --min-replicas and --max-replicas are for --ray"),
    (["--min-replicas", "0", "--max-replicas", "2"], "are for --ray"),
    (["--api-key", "k", "--api-key-file", "key.txt"], "not both"),
    (["--model-name", "a", "--model-name", "b"], "2 --model-name for 1 artifact"),
])
def test_option_rules_refuse_before_anything_loads(tmp_path, args, message):
    r = CliRunner().invoke(cli, ["serve", str(tmp_path / "no-artifact"), *args])
    assert r.exit_code == 2, r.output
    assert message in r.output and "not found" not in r.output


def test_ray_options_are_fields_of_the_record():
    s = settings_from(ServeSettings, {"artifacts": [Path("a")], "ray_address": "local", "min_replicas": 0,
                                      "max_replicas": 3}, "serve")
    assert (s.ray_address, s.replicas, s.min_replicas, s.max_replicas) == ("local", None, 0, 3)
    with pytest.raises(UserError, match="are for --ray"):
        settings_from(ServeSettings, {"artifacts": [Path("a")], "replicas": 2}, "serve")


def test_the_library_entry_checks_the_artifacts_before_the_port_opens(tmp_path):
    heard = []
    with pytest.raises(UserError, match="artifact not found"):
        serve_command(settings_from(ServeSettings, {"artifacts": [tmp_path / "none"], "port": 0}, "serve"),
                      on_listening=lambda url, what: heard.append(url))
    assert heard == []
