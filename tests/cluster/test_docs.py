"""The docs mirror the code: each page under docs/ starts with a one-line summary that links back to the README,
the README links every page, every relative link (and its #anchor) resolves, and every `rayft` and `make`
command in a code block parses with the real CLI and Makefile: its options exist, the job files and folders it
names exist, its --set keys are config keys, and a command that needs a Ray cluster says so."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from helpers import ROOT

DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [ROOT / "README.md", ROOT / "CHANGELOG.md", *DOCS]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)


def ids(path: Path) -> str:
    return str(path.relative_to(ROOT))


def prose(text: str) -> str:
    """A page without its code blocks (their `#` lines are comments, their brackets code)."""
    return FENCE.sub("", text)


def anchors(page: Path) -> set[str]:
    """GitHub's ids of a page's headings: lower case, punctuation dropped, spaces as hyphens."""
    out = set()
    for line in prose(page.read_text(encoding="utf-8")).splitlines():
        if m := re.match(r"#{1,6} (.*)", line):
            out.add(re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-"))
    return out


def test_there_is_a_page_per_stage():
    names = {p.stem for p in DOCS}
    assert {"data", "training", "dpo", "evaluation", "sweeps", "serving", "fine-tuning-api", "cluster"} <= names
    assert {"tracking-and-playground", "benchmarks", "config", "quickstart"} <= names


@pytest.mark.parametrize("page", DOCS, ids=ids)
def test_each_page_starts_with_a_summary_line_and_links_back(page):
    lines = page.read_text(encoding="utf-8").splitlines()
    assert lines[0].startswith("# ") and lines[1] == "", "a title, then a blank line"
    assert lines[2].endswith(".") and "[README](../README.md)" in lines[2], "then one line: summary and README link"


def test_the_readme_is_a_front_page_that_links_every_page():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 250
    missing = [p.name for p in DOCS if f"](docs/{p.name})" not in readme]
    assert missing == [], f"the README links no {missing}"
    assert "](CHANGELOG.md)" in readme and "](bench/RESULTS.md)" in readme


@pytest.mark.parametrize("page", PAGES, ids=ids)
def test_every_relative_link_resolves(page):
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", prose(page.read_text(encoding="utf-8"))):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(target)
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(target)
    assert broken == []


def shown_commands(prefix: str) -> list[tuple[Path, str, str]]:
    """(page, command line, the text just before its code block) of each line in a shell code block that runs
    `prefix`."""
    out = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for m in FENCE.finditer(text):
            if m.group(1) not in ("bash", "sh", ""):
                continue
            before = text[max(0, m.start() - 300) : m.start()]
            out += [(page, line.strip(), before) for line in m.group(2).splitlines() if line.startswith(prefix)]
    return out


def parse(args: list[str]) -> tuple[list[str], dict]:
    """The rayft (sub)command a command line names and its parsed parameters; the CLI's parser raises on an
    unknown command or option, a missing argument or a bad value."""
    import typer.main

    from rayft.cluster.cli import app

    cmd = typer.main.get_command(app)  # typer's own copy of click: duck-typed below
    ctx, names = None, []
    while hasattr(cmd, "get_command"):
        name, args = args[0], args[1:]
        ctx = cmd.context_class(cmd, info_name=name, parent=ctx)
        sub = cmd.get_command(ctx, name)
        assert sub is not None, f"rayft has no command {' '.join([*names, name])}"
        cmd, names = sub, [*names, name]
    return names, cmd.make_context(" ".join(names), list(args), parent=ctx).params


RAYFT_LINES = shown_commands("rayft ")


def test_the_docs_show_rayft_commands():
    assert len(RAYFT_LINES) > 20


@pytest.mark.parametrize("page,line,before", RAYFT_LINES, ids=[f"{ids(p)}: {line[:60]}" for p, line, _ in RAYFT_LINES])
def test_every_shown_rayft_command_parses(page, line, before):
    from rayft.cluster.config import config_reference

    names, params = parse(shlex.split(line, comments=True)[1:])
    keys = {key for key, _, _ in config_reference()}
    for setting in params.get("set_") or []:
        key = setting.split("=", 1)[0]
        assert key in keys or any(k.startswith(key + ".") for k in keys), f"--set {key}: no such config key"
    for value in (params.get(p) for p in ("config", "target", "docs_dir")):
        if value and str(value).startswith(("configs/", "examples/")):
            assert (ROOT / str(value)).exists(), f"{value} does not exist"
    if (names[0] == "submit" and not params.get("dry_run")) or names[0] == "jobs":
        assert "needs a Ray cluster" in line or re.search(r"needs a (running )?Ray cluster", before), (
            "mark a command that needs a cluster: (needs a Ray cluster)"
        )


def test_every_shown_make_target_exists():
    targets = set(re.findall(r"^([a-z][\w-]*):", (ROOT / "Makefile").read_text(), re.M))
    shown = {line.split()[1] for _, line, _ in shown_commands("make ")}
    assert shown and shown <= targets, shown - targets
