"""bench/gpu_check.sh --dry-run: the GPU check's whole path (matmul peak, `rayft train` full and LoRA, GRPO with
its rollouts, `rayft serve` at 1 and 32 clients, the report) run on CPU with tiny sizes, as a user would start it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from helpers import ROOT


@pytest.mark.cluster  # every part of the GPU check, on the CPU
@pytest.mark.slow
def test_gpu_check_dry_run_measures_every_part_and_records_them_as_pending(tmp_path):
    out, results = tmp_path / "out", tmp_path / "RESULTS.md"
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(
        ["bash", "bench/gpu_check.sh", "--dry-run", "--out", str(out), "--results", str(results)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]

    # The table comes last in the output and is kept in the folder with the logs.
    summary = (out / "summary.md").read_text()
    assert summary.strip() in proc.stdout
    assert "DRY RUN on CPU" in summary
    table = {line.split("|")[1].strip(): line for line in summary.splitlines() if line.startswith("| ")}
    for run in ("rayft train, full (ZeRO-2, fp32, CPU)", "rayft train, lora (ZeRO-2, fp32, CPU)"):
        cells = [c.strip() for c in table[run].strip("|").split("|")]
        assert float(cells[1].replace(",", "")) > 0  # tokens/s
        assert 0 < float(cells[2].rstrip("%")) < 100  # MFU against the CPU matmul peak measured in the same run
        assert len([float(x) for x in cells[5].split(" / ")]) == 5  # data wait / forward / backward / sync / optim
    grpo = [c.strip() for c in table["rayft train, grpo LoRA (rollouts on the CPU)"].strip("|").split("|")]
    assert float(grpo[1].replace(",", "")) > 0 and grpo[7].startswith("reward ")  # training tokens/s; reward
    assert len([float(x) for x in grpo[5].removeprefix("generate / grade / train / sync ").split(" / ")]) == 4
    for run in ("serve, 1 client", "serve, 32 clients"):
        assert float(table[run].split("|")[2].replace(",", "")) > 0
    for ratio in ("full-finetune MFU", "LoRA / full tokens/s", "serving batching gain, 32 clients"):
        assert ratio in table and "not judged (dry run)" in table[ratio]

    # Full logs: the environment, every run's metrics with the step split, and Ray's own logs.
    assert "deepspeed" in (out / "env.txt").read_text()
    grpo_steps = [json.loads(x) for x in (out / "metrics-grpo.jsonl").read_text().splitlines()]
    grpo_steps = [s for s in grpo_steps if "reward" in s and "loss" in s]
    assert len(grpo_steps) == 3 and all(s["completions"] == 8 and s["timing/generate"] > 0 for s in grpo_steps)
    for method in ("full", "lora"):
        steps = [json.loads(x) for x in (out / f"metrics-{method}.jsonl").read_text().splitlines()]
        steps = [s for s in steps if "loss" in s]
        assert len(steps) == 6 and all(s["forward_s"] > 0 and s["backward_s"] > 0 for s in steps)
    assert any((out / "ray-logs").glob("worker-*.out"))

    # RESULTS.md gets a section and Summary rows that say the GPU figures are still to be measured.
    text = results.read_text()
    assert "## gpu_check" in text
    pending = [line for line in text.splitlines() if line.startswith("| gpu_check:")]
    assert len(pending) == 4 and all("GPU figure pending" in line and "CPU (dry run)" in line for line in pending)
