"""Every command's options are made from its typed settings record (bertexport.cli.settings)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from bertexport.cli import cli
from bertexport.cli.settings import SHARED, fields, options_from, settings_from, settings_of
from bertexport.core.errors import UserError
from bertexport.core.options import option
from bertexport.judging.gates import GATES, Gates


def _field_default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


@pytest.mark.parametrize("name", sorted(cli.commands))
def test_every_option_of_every_command_comes_from_its_settings_record(name):
    command = cli.commands[name]
    record = settings_of(command)
    assert record is not None and dataclasses.is_dataclass(record), f"{name} has no settings record"
    by_name = {p.name: p for p in command.params}
    made = {f.name: (f, tp) for f, tp in fields(record)}
    assert set(by_name) - set(SHARED) == set(made), f"{name}: options outside its record"
    for field_name, (f, _) in made.items():
        param, meta = by_name[field_name], dict(f.metadata)
        assert param.help == (meta.get("help") or None) if isinstance(param, click.Option) else True
        if isinstance(param, click.Option):
            want = meta.get("flag") or ("--" + field_name.replace("_", "-"),)
            assert tuple(param.opts + param.secondary_opts) == tuple(o for w in want for o in w.split("/")), field_name
        default = _field_default(f)
        if default is dataclasses.MISSING:
            assert param.required, field_name
        elif isinstance(default, list):
            sep = meta.get("separator")
            assert param.default == (sep.join(map(str, default)) if sep else tuple(default)), field_name
        elif default is not None:
            assert param.default == default, field_name
        lo, hi = meta.get("min"), meta.get("max")
        if (lo is not None or hi is not None) and not meta.get("separator"):
            assert (param.type.min, param.type.max) == (lo, hi), field_name


# what a command needs beyond its required values to pass its own rules
NEEDS = {"validate": {"report_only": True}}  # a gate, or --report-only


@pytest.mark.parametrize("name", sorted(cli.commands))
def test_every_record_is_checked_when_built_from_its_defaults(name):
    """A record built from its command's defaults (the required values given) passes its own checks."""
    import typing

    record = settings_of(cli.commands[name])
    values = {}
    for f, tp in fields(record):
        default = _field_default(f)
        if default is dataclasses.MISSING:
            one = Path("x") if Path in (tp, *typing.get_args(tp)) else "x"
            values[f.name] = [one] if typing.get_origin(tp) is list else one
        else:
            values[f.name] = default
    built = settings_from(record, values | NEEDS.get(name, {}), name)
    assert isinstance(built, record)
    if name in NEEDS:  # and without it, the rule refuses (exit 2)
        with pytest.raises(UserError):
            settings_from(record, values, name)


# -- the generator on a record made for the test --------------------------------------------

@dataclass(kw_only=True)
class _Inner:
    min_cosine: float | None = GATES["min_cosine"].field()


@dataclass(kw_only=True)
class _Record:
    source: str = option("default-source", "Where.", argument=True)
    out: Path = option(help="Out.", flag=("--out", "-o"))
    count: int = option(3, "How many.", min=1, max=5)
    ratio: float | None = option(None, "A ratio.", min=0.0, max=1.0, min_open=True)
    layers: list[int] | None = option(None, "Layers.", min=1, separator=",")
    tag: list[str] = option(help="Repeatable.", default_factory=list)
    mode: str = option("fast", "Mode.", choices=("fast", "slow"))
    loud: bool = option(False, "Flag.")
    gates: _Inner = option(help="Gates.", default_factory=_Inner)

    def validate(self):
        if self.loud and self.mode == "slow":
            raise UserError("--loud does not go with --mode slow")


@click.command()
@options_from(_Record)
def _command(**values):
    s = settings_from(_Record, values, "test")
    click.echo(repr(s))


def _run(*args):
    return CliRunner().invoke(_command, list(args), standalone_mode=True)


def test_generated_options_parse_into_the_typed_record():
    r = _run("src", "-o", "o", "--count", "5", "--ratio", "1", "--layers", "2, 4", "--tag", "a", "--tag", "b",
             "--loud", "--min-cosine", "0.5")
    assert r.exit_code == 0, r.output
    assert ("_Record(source='src', out=PosixPath('o'), count=5, ratio=1.0, layers=[2, 4], tag=['a', 'b'], mode='fast', "
            "loud=True, gates=_Inner(min_cosine=0.5))") in r.output


def test_defaults_come_from_the_record():
    r = _run("-o", "o")
    assert r.exit_code == 0, r.output
    assert "source='default-source'" in r.output and "count=3" in r.output and "layers=None" in r.output
    assert "tag=[]" in r.output and "gates=_Inner(min_cosine=None)" in r.output


@pytest.mark.parametrize("args", [
    ("--count", "6"),  # above max
    ("--count", "0"),  # below min
    ("--ratio", "0"),  # open lower bound
    ("--layers", "2,x"),  # not an integer
    ("--layers", "2,,4"),  # an empty part
    ("--layers", "0"),  # each part range-checked
    ("--mode", "medium"),  # not a choice
    ("--min-cosine", "1.5"),  # the registry's range
])
def test_values_outside_the_record_are_refused_with_exit_2(args):
    r = _run("-o", "o", *args)
    assert r.exit_code == 2, r.output


def test_a_required_field_is_required():
    r = _run()
    assert r.exit_code == 2 and "--out" in r.output


def test_the_records_own_rules_run_when_built():
    with pytest.raises(UserError, match="--loud does not go with --mode slow"):
        settings_from(_Record, {"out": Path("o"), "loud": True, "mode": "slow"}, "test")


def test_a_record_built_in_code_is_checked_like_the_command_line():
    with pytest.raises(UserError, match="count"):
        settings_from(_Record, {"out": Path("o"), "count": 9}, "test")


def test_a_setting_twice_on_the_command_line_is_a_definition_error():
    @dataclass(kw_only=True)
    class Twice:
        min_cosine: float | None = option(None, "x")
        gates: Gates = option(help="g", default_factory=Gates)

    with pytest.raises(TypeError, match="min_cosine"):
        fields(Twice)
