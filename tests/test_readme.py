"""The README a newcomer reads: short, its first two commands exactly the ones CI runs, every
`bertexport` command it shows a real command with real options, and every relative link in
it and in docs/ pointing at a file (and heading) that exists."""

from __future__ import annotations

import re
import shlex
import unicodedata
from pathlib import Path

import click
import pytest

from bertexport.cli import cli

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = REPO / "docs"

FIRST_COMMAND = ("bash scripts/install.sh && .venv/bin/bertexport convert --target ort-int8 "
                 "--out ~/.cache/bertexport/artifacts/minilm-ort-int8 --force")
TEST_COMMAND = "bash scripts/install.sh compile,openvino,sign,ray,serve,test && .venv/bin/python -m pytest -q"

_FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
_INLINE = re.compile(r"`([^`\n]+)`")
_SHELL_BREAKS = {"&&", "||", "|", ";", "&", ">", ">>", "<", "2>", "2>&1"}


def fenced_blocks(text: str) -> list[str]:
    return _FENCE.findall(text)


def github_slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lower case, punctuation removed
    (word characters, hyphens and spaces kept), spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text only
    text = text.replace("`", "").replace("*", "").strip().lower()
    kept = []
    for ch in text:
        if ch in "-_ " or ch.isalnum() or unicodedata.category(ch).startswith("M"):
            kept.append(ch)
    return "".join(kept).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a Markdown file (outside code fences), duplicates numbered as GitHub does."""
    seen: dict[str, int] = {}
    out = set()
    text = _FENCE.sub("", path.read_text(encoding="utf-8"))
    for line in text.splitlines():
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        slug = github_slug(m.group(1))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def relative_links(path: Path) -> list[str]:
    text = _FENCE.sub("", path.read_text(encoding="utf-8"))
    text = re.sub(r"`[^`\n]*`", "", text)  # code spans are not links
    return [t for t in _LINK.findall(text) if not re.match(r"^[a-z][a-z0-9+.-]*:", t)]


def bertexport_invocations(text: str) -> list[list[str]]:
    """Every `bertexport COMMAND ...` in the README's code (fenced blocks and inline code spans),
    as tokens from the command name up to the end of that shell command."""
    lines = []
    for block in fenced_blocks(text):
        lines += block.splitlines()
    prose = _FENCE.sub("", text)
    lines += _INLINE.findall(prose)
    found = []
    for line in lines:
        line = line.split(" #")[0] if not line.lstrip().startswith("#") else ""
        try:
            tokens = shlex.split(line, comments=False)
        except ValueError:  # unbalanced quotes: still look at the words
            tokens = line.split()
        for i, tok in enumerate(tokens):
            if tok == "bertexport" or tok.endswith("/bertexport"):
                rest = []
                for t in tokens[i + 1:]:
                    if t in _SHELL_BREAKS:
                        break
                    rest.append(t)
                found.append(rest)
    return found


def test_readme_is_short():
    n = len(README.read_text(encoding="utf-8").splitlines())
    assert n <= 250, f"README.md has {n} lines (at most 250: reference goes to docs/)"


def test_readme_starts_with_the_two_commands():
    blocks = fenced_blocks(README.read_text(encoding="utf-8"))
    assert len(blocks) >= 2
    assert blocks[0] == FIRST_COMMAND + "\n"
    assert blocks[1] == TEST_COMMAND + "\n"


def test_ci_runs_the_readme_test_command():
    ci = (REPO / ".ci" / "run").read_text()
    extras = TEST_COMMAND.split("&&")[0].split()[-1]
    assert f"scripts/install.sh {extras}" in ci and "-m pytest -q" in ci


def broken_links(page: Path) -> list[str]:
    broken = []
    for link in relative_links(page):
        target, _, anchor = link.partition("#")
        dest = (page.parent / target).resolve() if target else page
        if not dest.exists():
            broken.append(f"{link}: no file {dest.relative_to(REPO) if dest.is_relative_to(REPO) else dest}")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{link}: no heading #{anchor} in {dest.name}")
    return broken


@pytest.mark.parametrize("page", [README, *sorted(DOCS.glob("*.md"))], ids=lambda p: p.name)
def test_relative_links_resolve(page):
    broken = broken_links(page)
    assert not broken, f"{page.name}: " + "; ".join(broken)


def test_link_check_catches_missing_files_and_headings(tmp_path):
    (tmp_path / "b.md").write_text("# Title\n\n## The ORT anchor, measured (2026-12-01)\n\n```\n# not a heading\n```\n")
    page = tmp_path / "a.md"
    page.write_text("[ok](b.md#the-ort-anchor-measured-2026-12-01) [self](#top) [gone](c.md) "
                    "[bad](b.md#not-a-heading) [web](https://example.com/x.md) `[code](nowhere.md)`\n\n# Top\n")
    assert broken_links(page) == ["c.md: no file " + str(tmp_path / "c.md"), "b.md#not-a-heading: no heading #not-a-heading in b.md"]


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(README.parent / link.partition("#")[0]).resolve() for link in relative_links(README)}
    orphans = [p.name for p in DOCS.glob("*.md") if p.resolve() not in linked]
    assert not orphans, f"docs pages a README reader cannot find: {orphans}"


def _options(command: click.Command) -> set[str]:
    names = {"--help", "-h"}
    for param in command.params:
        if isinstance(param, click.Option):
            names.update(param.opts)
            names.update(param.secondary_opts)
    return names


def command_problems(text: str) -> tuple[list[str], set[str]]:
    """(what is wrong with the `bertexport` commands in text, the command names shown)."""
    ctx = click.Context(cli)
    shown: set[str] = set()
    problems = []
    for tokens in bertexport_invocations(text):
        if not tokens or tokens[0].isupper():  # `bertexport COMMAND --help` in prose
            continue
        name = tokens[0]
        command = cli.get_command(ctx, name)
        if command is None:
            problems.append(f"`bertexport {' '.join(tokens)}`: no command {name!r}")
            continue
        shown.add(name)
        options = _options(command)
        for tok in tokens[1:]:
            if tok.startswith("-") and tok != "-":
                opt = tok.split("=", 1)[0]
                if opt not in options:
                    problems.append(f"`bertexport {' '.join(tokens)}`: {name} has no option {opt}")
    return problems, shown


def test_readme_shows_only_real_commands_and_options():
    problems, shown = command_problems(README.read_text(encoding="utf-8"))
    assert not problems, "\n".join(problems)
    # one example per workflow: every command appears in an example
    real = set(cli.list_commands(click.Context(cli)))
    assert real <= shown, f"commands the README never shows: {sorted(real - shown)}"


@pytest.mark.parametrize("page", sorted(DOCS.glob("*.md")), ids=lambda p: p.name)
def test_docs_show_only_real_commands_and_options(page):
    problems, _ = command_problems(page.read_text(encoding="utf-8"))
    assert not problems, f"{page.name}: " + "\n".join(problems)


def test_command_check_catches_unknown_commands_and_options():
    text = ("```bash\n.venv/bin/bertexport convert --target ort-int8 --no-such-flag\n"
            "bertexport frobnicate art\n.venv/bin/bertexport run art --out=x.jsonl --ray\n```\n")
    problems, shown = command_problems(text)
    assert len(problems) == 2 and "--no-such-flag" in problems[0] and "frobnicate" in problems[1], problems
    assert shown == {"convert", "run"}


def test_readme_command_table_lists_every_command():
    text = README.read_text(encoding="utf-8")
    rows = re.findall(r"^\| `([a-z-]+)` \|", text, re.M)
    ctx = click.Context(cli)
    assert sorted(rows) == sorted(cli.list_commands(ctx))


def test_invocation_parser_sees_options_and_stops_at_shell_breaks():
    text = "```bash\nx && .venv/bin/bertexport run art --file a.txt --out b.jsonl & curl -d x # c --nope\n```\n"
    assert bertexport_invocations(text) == [["run", "art", "--file", "a.txt", "--out", "b.jsonl"]]
    assert github_slug("The ORT anchor, measured (2026-12-01)") == "the-ort-anchor-measured-2026-12-01"
    assert github_slug("Rotten Tomatoes sentiment, MiniLM — `bench/rotten_tomatoes.py`") == \
        "rotten-tomatoes-sentiment-minilm--benchrotten_tomatoespy"
