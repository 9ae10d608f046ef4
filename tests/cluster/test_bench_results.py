"""bench/RESULTS.md bookkeeping: a benchmark rewrites only its own Summary rows (now with the machine),
keeps every other benchmark's rows and the dated history, and `make bench` prints that table."""

from __future__ import annotations

import sys
from pathlib import Path

from helpers import ROOT

sys.path.insert(0, str(ROOT / "bench"))

from data_pipeline import write_results  # noqa: E402
from run_all import (  # noqa: E402
    BENCHMARKS_PAGE,
    HEADLINES,
    README,
    README_BEGIN,
    README_END,
    readme_table,
    summary_table,
    update_readme,
)

OLD = """# Benchmark results

Intro text.

## Summary

| benchmark | figure | ratio | target | date | command |
| --- | --- | --- | --- | --- | --- |
| alpha: speed | 10 vs 5 tokens/s | 2.00x | >= 1.5x, MET | 2026-11-01 | `python bench/alpha.py` |
| beta: latency | 3 vs 2 ms | 1.50x | <= 2x, MET | 2026-11-01 | `python bench/beta.py` |

## alpha — 2026-11-01 10:00 UTC

- an old alpha run

## beta — 2026-11-01 11:00 UTC

- an old beta run
"""


def test_a_run_replaces_its_rows_keeps_the_rest_and_records_the_machine(tmp_path):
    path = tmp_path / "RESULTS.md"
    path.write_text(OLD)
    new_row = "| alpha: speed | 12 vs 5 tokens/s | 2.40x | >= 1.5x, MET | 2026-11-28 | `python bench/alpha.py` |"
    write_results(path, "## alpha — 2026-11-28 09:00 UTC\n\n- the new run", [new_row], name="alpha", machine="H200")
    text = path.read_text()

    table = summary_table(path).splitlines()
    assert table[0] == "| benchmark | figure | ratio | target | date | machine | command |"
    rows = [r for r in table[2:] if r.startswith("|")]
    assert len(rows) == 2
    # beta's row stays (machine unknown for a row written before the column existed); alpha's is the new one.
    assert rows[0] == "| beta: latency | 3 vs 2 ms | 1.50x | <= 2x, MET | 2026-11-01 | - | `python bench/beta.py` |"
    assert rows[1].startswith("| alpha: speed | 12 vs 5 tokens/s | 2.40x |") and "| H200 |" in rows[1]
    # The history is kept in order, and the new section comes last.
    assert text.index("- an old alpha run") < text.index("- an old beta run") < text.index("- the new run")
    assert text.startswith("# Benchmark results\n\nIntro text.")

    # A second run keeps beta's row as it is (no second machine cell) and labels alpha's with this machine.
    write_results(path, "## alpha — 2026-11-28 10:00 UTC\n\n- alpha again", [new_row], name="alpha")
    rows = [r for r in summary_table(path).splitlines()[2:] if r.startswith("|")]
    assert rows[0] == "| beta: latency | 3 vs 2 ms | 1.50x | <= 2x, MET | 2026-11-01 | - | `python bench/beta.py` |"
    assert rows[1].count("|") == 8 and "cores, " in rows[1]


def shown_table(page: Path) -> str:
    text = page.read_text()
    return text[text.index(README_BEGIN) + len(README_BEGIN) : text.index(README_END)].strip()


def test_the_readme_and_the_benchmarks_page_show_the_figures_results_md_holds(tmp_path):
    results = ROOT / "bench" / "RESULTS.md"
    shown = shown_table(BENCHMARKS_PAGE)
    assert shown == readme_table(results), "docs/benchmarks.md figures differ from RESULTS.md"
    assert shown.count("\n") >= 3 and "| date |" in shown.splitlines()[0]
    headlines = shown_table(README)
    assert headlines == readme_table(results, HEADLINES), "README figures differ from RESULTS.md"
    rows = headlines.splitlines()[2:]
    assert all(any(r.startswith(f"| {h}") for r in rows) for h in HEADLINES), "a headline matches no Summary row"

    # make bench refreshes both copies from the results file it wrote: every row, or the headline rows
    (tmp_path / "RESULTS.md").write_text(OLD)
    (tmp_path / "README.md").write_text(f"# x\n\n{README_BEGIN}\nstale\n{README_END}\n\nmore\n")
    update_readme(tmp_path / "RESULTS.md", tmp_path / "README.md")
    text = (tmp_path / "README.md").read_text()
    assert "stale" not in text and "| alpha: speed | 10 vs 5 tokens/s | 2.00x | >= 1.5x, MET | 2026-11-01 |" in text
    assert "| beta: latency |" in text
    assert "python bench/alpha.py" not in text and text.endswith("more\n")
    update_readme(tmp_path / "RESULTS.md", tmp_path / "README.md", ("beta:",))
    text = (tmp_path / "README.md").read_text()
    assert "| beta: latency |" in text and "alpha" not in text and "| benchmark | figure |" in text
