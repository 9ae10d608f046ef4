"""Run every CPU benchmark in bench/ in one go, then print the Summary table they rewrote (`make bench`).

    python bench/run_all.py            # the full runs, about 70 minutes on 2 idle cores
    python bench/run_all.py --quick    # smoke versions (about 3 minutes), written to bench/out/RESULTS-quick.md

Each benchmark runs in its own process, one after the other, so none shares the cores with another.
Each prints its ratios against a baseline measured in the same run and rewrites its rows of the
Summary table at the top of the results file, keeping the history below. A missed target is
reported, not failed; the exit status is 1 only when a benchmark crashed.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# In the order they run: the data pipeline first, then training and its memory, serving, and sweeps (the slowest
# to start).
BENCHMARKS = (
    "data_pipeline",
    "train_throughput",
    "memory_scaling",
    "serve_load",
    "serve_constrained",
    "sweep_overhead",
)
# A benchmark that is a part of another's script: (script, its arguments).
PARTS = {"serve_constrained": ("serve_load", ["--part", "constrained"])}
QUICK_RESULTS = ROOT / "bench" / "out" / "RESULTS-quick.md"


def summary_table(path: Path) -> str:
    """The Summary section of a results file (empty if there is none)."""
    if not path.exists():
        return ""
    m = re.search(r"(?ms)^## Summary\n(.*?)(?=^## |\Z)", path.read_text(encoding="utf-8"))
    return m.group(1).strip() if m else ""


README = ROOT / "README.md"
BENCHMARKS_PAGE = ROOT / "docs" / "benchmarks.md"
README_BEGIN = "<!-- the Summary of bench/RESULTS.md, copied by bench/run_all.py: edit RESULTS.md, not this -->"
README_END = "<!-- end of the Summary -->"
# The rows the README shows as its headline figures (docs/benchmarks.md shows every row): the start of each
# one's benchmark cell.
HEADLINES = (
    "trl_peer: rayft train vs TRL SFTTrainer",
    "trl_peer: quality after",
    "dpo_peer: rayft DPO vs TRL DPOTrainer",
    "grpo_peer: rayft GRPO vs TRL GRPOTrainer",
    "grpo_peer: held-out reward after",
    "train_throughput: rayft train vs padded single process",
    "memory_scaling: ZeRO-3 worker memory",
    "serve_load: batching vs no batching",
    "serve_load: tokens/s vs transformers serve",
    "serve_constrained: time per token",
)


def readme_table(results: Path, only: tuple[str, ...] | None = None) -> str:
    """The Summary of a results file as the docs show it: every column but the command; with `only`, the
    header and the rows whose benchmark starts with one of those strings."""
    lines = []
    for row in summary_table(results).splitlines():
        if row.startswith("|"):
            cells = [c.strip() for c in row.strip().strip("|").split("|")]
            if only is None or len(lines) < 2 or cells[0].startswith(only):
                lines.append("| " + " | ".join(cells[:-1]) + " |")
    return "\n".join(lines)


def update_readme(results: Path, readme: Path = README, only: tuple[str, ...] | None = None) -> None:
    """Replace a page's copy of the Summary (the README's headline rows, or every row) with the current one."""
    text = readme.read_text(encoding="utf-8")
    start, end = text.index(README_BEGIN) + len(README_BEGIN), text.index(README_END)
    readme.write_text(text[:start] + "\n" + readme_table(results, only) + "\n" + text[end:], encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke versions, results to bench/out/RESULTS-quick.md")
    p.add_argument("--only", nargs="+", choices=BENCHMARKS, help="run these benchmarks only")
    p.add_argument("--results", type=Path, help="results file (default bench/RESULTS.md; quick: bench/out/...)")
    args = p.parse_args(argv)
    results = args.results or (QUICK_RESULTS if args.quick else ROOT / "bench" / "RESULTS.md")
    results.parent.mkdir(parents=True, exist_ok=True)

    times: list[tuple[str, float, int]] = []
    start = time.perf_counter()
    for name in args.only or BENCHMARKS:
        # Paths relative to the checkout: each script records its command line in the results.
        script, extra = PARTS.get(name, (name, []))
        out = results.resolve()
        out_arg = str(out.relative_to(ROOT)) if out.is_relative_to(ROOT) else str(out)
        cmd = [sys.executable, f"bench/{script}.py", *extra, "--results", out_arg]
        if args.quick:
            cmd.append("--quick")
        print(f"\n==== {name}: {' '.join(cmd[1:])}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.call(cmd, cwd=ROOT)
        times.append((name, time.perf_counter() - t0, rc))
    total = time.perf_counter() - start

    if results.resolve() == (ROOT / "bench" / "RESULTS.md").resolve():
        # The README and docs/benchmarks.md show the figures RESULTS.md holds, never others.
        update_readme(results, README, HEADLINES)
        update_readme(results, BENCHMARKS_PAGE, None)
    print(f"\n==== Summary of {results}\n")
    print(summary_table(results))
    print()
    for name, sec, rc in times:
        print(f"{name:18} {sec / 60:5.1f} min  {'ok' if rc == 0 else f'FAILED (exit status {rc})'}")
    print(f"{'all':18} {total / 60:5.1f} min")
    return 0 if all(rc == 0 for _, _, rc in times) else 1


if __name__ == "__main__":
    sys.exit(main())
