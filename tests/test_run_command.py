"""``run``'s settings record and library entry (bertexport/shipping/run_command.py): every rule
between options refuses before anything loads, and texts come back in input order."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from bertexport.cli import cli
from bertexport.cli.settings import settings_from
from bertexport.core.errors import UserError
from bertexport.shipping.run_command import run_command
from bertexport.shipping.settings import RunSettings


@pytest.mark.parametrize("args, message", [
    (["hello", "--text-column", "body"], "--text-column names a column of --file"),
    (["hello", "--file", "in.txt", "--out", "o.jsonl"], "bulk mode (--out/--ray) takes --file and --out only"),
    (["--file", "in.txt", "--out", "o.jsonl", "--context", "c"], "bulk mode (--out/--ray) takes --file and --out only"),
    (["--out", "o.jsonl"], "bulk mode (--out/--ray) takes --file and --out only"),
    (["--file", "in.txt", "--out", "o.jsonl", "--json", "-"], "bulk mode (--out/--ray) takes --file and --out only"),
    (["--file", "in.txt", "--ray"], "--ray writes to --out"),
    ([], "give TEXTS or --file"),
])
def test_option_rules_refuse_before_anything_loads(tmp_path, args, message):
    missing = tmp_path / "no-artifact"  # never opened: the rule refuses first
    r = CliRunner().invoke(cli, ["run", str(missing), *args])
    assert r.exit_code == 2, r.output
    assert message in r.output and "not found" not in r.output and not (tmp_path / "o.jsonl").exists()


def test_a_record_built_in_code_is_checked_like_the_command_line():
    with pytest.raises(UserError, match="--ray writes to --out"):
        settings_from(RunSettings, {"artifact": Path("a"), "file_": Path("in.txt"), "ray_address": "local"}, "run")
    s = settings_from(RunSettings, {"artifact": Path("a"), "file_": Path("in.txt"), "ray_address": "local",
                                    "out_file": Path("o.jsonl")}, "run")
    assert s.bulk and s.ray_address == "local" and s.predictor_options()["aggregation"] == "mean"


def test_texts_then_the_file_come_back_in_order_after_the_input_is_checked(fp32_artifact, tmp_path):
    art = fp32_artifact("bert", "text-classification").artifact
    data = tmp_path / "in.txt"
    data.write_text("from the file\nand another\n")
    events = []
    settings = settings_from(RunSettings, {"artifact": art, "texts": ["first", "second"], "file_": data}, "run")
    returned = run_command(settings, lambda i, text, res: events.append((i, text, res["label"])),
                           on_ready=lambda: events.append("ready"))
    assert returned is None
    assert events[0] == "ready"
    assert [(i, t) for i, t, _ in events[1:]] == [(0, "first"), (1, "second"), (2, "from the file"), (3, "and another")]

    bad = tmp_path / "in.csv"
    bad.write_text("body\nx\n")  # no text column
    ready = []
    with pytest.raises(UserError):
        run_command(settings_from(RunSettings, {"artifact": art, "file_": bad}, "run"), on_ready=lambda: ready.append(1))
    assert ready == []  # refused before the place results go was opened (and before the model loaded)
