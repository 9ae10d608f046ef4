"""Memory of a full finetune as workers are added, and of its export, on CPU: does ZeRO-3 divide the model?

    python bench/memory_scaling.py            # a 0.5B random-weight Llama, 4 runs (about 15 minutes on 2 cores)
    python bench/memory_scaling.py --quick    # a 30M model, to check that everything runs (make bench QUICK=1)

One run builds a Llama with random weights (hidden 1536, 16 layers, 0.50B parameters; the --quick one is far
smaller), saves it as a model directory, then trains it with `rayft train` (full finetune, fp32 on CPU, 2
optimizer steps of 128-token rows, one row per worker per step) four times: ZeRO-3 and ZeRO-2, each with 1
and 2 workers. After each run, `rayft export`'s conversion of the final checkpoint runs in a process of
its own.

Measured:
- each worker's peak resident memory above its size before the model loaded (the worker process with
  torch, transformers, DeepSpeed and peft imported), the largest over the workers, read from the run's own
  records (metrics.jsonl's end event, which includes the final checkpoint's save);
- the exporting process's peak resident memory above its size before the export began (the same
  imports), against the bytes of the model it wrote.
Beside each measured peak stands `rayft train --dry-run`'s estimate for the same job
(rayft.training.memory_plan), without its fixed per-process overhead, which the measurement subtracts too.

Targets (the model must be divided, not copied): ZeRO-3, 2 workers <= 0.6x the peak of 1 worker (ideal
0.5x); the export's peak <= 1.3x the exported model's bytes. ZeRO-2 is measured in the same run for
comparison: it partitions gradients and optimizer states, but every worker holds all the weights.
The figures are printed and appended to bench/RESULTS.md; a missed target is reported, not failed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # a checkout that is not pip-installed; appended so PYTHONPATH still wins
    sys.path.append(str(ROOT))

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

NAME = "memory_scaling"
TARGET_ZERO3_SCALING = 0.6
TARGET_EXPORT = 1.3
SEQ_LEN = 128
STEPS = 2
GIB = 2**30

# What the exporting process runs: its size after the imports, then the conversion, then its peak.
EXPORT_PROBE = """
import json, sys, threading, time
import deepspeed, peft, torch, transformers
from rayft.cluster.config import load_config
from rayft.training.export import export_checkpoint, list_checkpoints
from rayft.training.step_metrics import host_peak_rss, host_rss
job = load_config(sys.argv[1])
ckpt = list_checkpoints(job.run_dir)[-1][1]
peaks = {"RssAnon": 0, "RssFile": 0}
def sample():  # which kind of memory the peak is: anonymous (the process's own) or mapped file pages
    while True:
        for line in open("/proc/self/status"):
            key = line.split(":")[0]
            if key in peaks:
                peaks[key] = max(peaks[key], int(line.split()[1]) * 1024)
        time.sleep(0.02)
threading.Thread(target=sample, daemon=True).start()
time.sleep(0.1)
start, base = host_rss(), dict(peaks)
export_checkpoint(ckpt, job, sys.argv[2])
print(json.dumps({"start": start, "peak": host_peak_rss(), "base": base, "peaks": peaks}))
"""


def sizes(quick: bool):
    from bench.gpu_check import SIZES

    base = SIZES["tiny"]
    if quick:  # 4 layers of 512: about 30M parameters
        return replace(base, hidden=512, intermediate=1536, layers=4, heads=8, kv_heads=4, vocab=8000, seq_len=SEQ_LEN)
    # 16 layers of 1536, MLP 4096, vocabulary 32,000, untied: 0.50B parameters
    return replace(base, hidden=1536, intermediate=4096, layers=16, heads=12, kv_heads=4, vocab=32000, seq_len=SEQ_LEN)


def job_file(work: Path, model_dir: Path, data: Path, stage: int, workers: int) -> Path:
    import yaml

    name = f"zero{stage}-{workers}w"
    job = {
        "model": {"name": str(model_dir)},
        "data": {"train": str(data), "max_seq_len": SEQ_LEN, "packing": True, "shuffle": False},
        "training": {
            "method": "full",
            "zero_stage": stage,
            "micro_batch_size": 1,
            "global_batch_size": workers,
            "max_steps": STEPS,
            "lr": 1e-5,
            "eval_at_end": False,
        },
        "scaling": {"num_workers": workers, "cpus_per_worker": 1},
        "run": {"name": name, "storage_path": str(work / "runs"), "checkpoints_to_keep": 1},
    }
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    return path


def estimate(path: Path) -> dict | None:
    """The dry-run plan's per-worker bytes without the fixed process overhead, and with it."""
    try:
        from rayft.cluster.config import load_config
        from rayft.training.memory_plan import estimate as plan_of
    except ImportError:
        return None
    plan = plan_of(load_config(path))
    return {
        "above_start": plan.per_worker_total - plan.per_worker.get("overhead", 0),
        "total": plan.per_worker_total,
        "parts": dict(plan.per_worker),
    }


def train(path: Path) -> dict:
    """`rayft train` in a process of its own (its own local Ray); the workers' memory from its records."""
    from rayft.cluster.config import load_config
    from rayft.training.trainer import read_metrics

    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "rayft.cluster.cli", "train", str(path), "--restart"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"rayft train {path.name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    run_dir = load_config(path).run_dir
    records = read_metrics(run_dir)
    end = [r for r in records if r.get("event") == "end"][-1]
    steps = [r for r in records if "loss" in r and not r.get("final")]
    return {
        "run_dir": run_dir,
        "wall_s": wall,
        "peak_gib": end["host_mem_peak_gib"],
        "above_start_gib": end["host_mem_peak_above_start_gib"],
        "step_s": sum(r["step_time_s"] for r in steps) / max(len(steps), 1),
        "loss": [round(r["loss"], 3) for r in steps],
    }


def export(path: Path, out: Path) -> dict:
    """The export's conversion in a fresh process: its peak above its size before it began."""
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", EXPORT_PROBE, str(path), str(out)], cwd=ROOT, capture_output=True, text=True
    )
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"export of {path.name} failed:\n{proc.stderr[-3000:]}")
    figures = json.loads(proc.stdout.strip().splitlines()[-1])
    written = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    print(
        f"  export: anonymous {figures['base']['RssAnon'] / GIB:.2f} -> {figures['peaks']['RssAnon'] / GIB:.2f} GiB, "
        f"mapped files {figures['base']['RssFile'] / GIB:.2f} -> {figures['peaks']['RssFile'] / GIB:.2f} GiB (peaks)"
    )
    return {
        "wall_s": wall,
        "above_start_gib": (figures["peak"] - figures["start"]) / GIB,
        "peak_gib": figures["peak"] / GIB,
        "model_gib": written / GIB,
    }


def main(argv: list[str] | None = None) -> int:
    from bench.data_pipeline import command, load_average, machine, results_section, verdict, write_results
    from bench.gpu_check import make_data, make_model, make_tokenizer

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a 30M-parameter model instead of 0.5B")
    p.add_argument("--results", type=Path, default=ROOT / "bench" / "RESULTS.md", help="file to append to")
    p.add_argument("--work", type=Path, help="working directory (default: a temporary one; needs ~15 GB)")
    args = p.parse_args(argv)
    size = sizes(args.quick)
    load_start = load_average()
    print(f"{NAME}: {machine()}; load {load_start}", flush=True)

    with tempfile.TemporaryDirectory(prefix="rayft-mem-", dir=args.work) as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        model_dir = work / "model"
        params = make_model(model_dir, size, make_tokenizer(size.vocab), use_gpu=False)
        model_bytes_fp32 = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
        print(
            f"model: {params / 1e9:.3f}B parameters, {model_bytes_fp32 / GIB:.2f} GiB fp32, built in "
            f"{time.perf_counter() - t0:.0f}s",
            flush=True,
        )
        data = work / "train.jsonl"
        make_data(data, size, rows_needed=2 * STEPS + 4)

        runs = {}
        for stage in (3, 2):
            for workers in (1, 2):
                path = job_file(work, model_dir, data, stage, workers)
                print(f"rayft train: ZeRO-{stage}, {workers} worker(s) ...", flush=True)
                r = train(path)
                r["estimate"] = estimate(path)
                r["export"] = export(path, work / f"export-{stage}-{workers}")
                shutil.rmtree(work / f"export-{stage}-{workers}", ignore_errors=True)
                shutil.rmtree(r["run_dir"], ignore_errors=True)  # a 0.5B checkpoint is ~8 GB
                runs[(stage, workers)] = r
                e = r["export"]
                print(
                    f"  worker peak {r['above_start_gib']:.2f} GiB above start ({r['peak_gib']:.2f} GiB RSS), "
                    f"{r['step_s']:.1f} s/step, run {r['wall_s']:.0f}s; export peak {e['above_start_gib']:.2f} GiB "
                    f"above start for a {e['model_gib']:.2f} GiB model ({e['wall_s']:.0f}s)",
                    flush=True,
                )

    def est(r, key):
        return f"{r['estimate'][key] / GIB:.2f}" if r["estimate"] else "n/a"

    rows = []
    for (stage, workers), r in runs.items():
        e = r["export"]
        rows.append(
            (
                f"ZeRO-{stage}, {workers} worker{'s' if workers > 1 else ''}",
                f"{r['above_start_gib']:.2f}",
                est(r, "above_start"),
                f"{r['peak_gib']:.2f}",
                est(r, "total"),
                f"{r['step_s']:.1f}",
                f"{e['above_start_gib']:.2f}",
                f"{e['model_gib']:.2f}",
                f"{e['above_start_gib'] / e['model_gib']:.2f}x",
            )
        )
    head = (
        "run",
        "worker peak above start, GiB",
        "dry-run estimate, GiB",
        "worker peak RSS, GiB",
        "dry-run estimate with overhead, GiB",
        "s/step",
        "export peak above start, GiB",
        "exported model, GiB",
        "export / model",
    )
    z3 = runs[(3, 2)]["above_start_gib"] / runs[(3, 1)]["above_start_gib"]
    z2 = runs[(2, 2)]["above_start_gib"] / runs[(2, 1)]["above_start_gib"]
    worst_export = max(r["export"]["above_start_gib"] / r["export"]["model_gib"] for r in runs.values())
    ok3, ok_export = z3 <= TARGET_ZERO3_SCALING, worst_export <= TARGET_EXPORT
    ratios = [
        ("ZeRO-3 worker peak, 2 workers / 1 worker", f"{z3:.2f}x", f"<= {TARGET_ZERO3_SCALING}x", verdict(ok3)),
        ("ZeRO-2 worker peak, 2 workers / 1 worker", f"{z2:.2f}x", "(comparison)", ""),
        (
            "export peak / exported model bytes, worst run",
            f"{worst_export:.2f}x",
            f"<= {TARGET_EXPORT}x",
            verdict(ok_export),
        ),
    ]
    now = datetime.now(UTC)
    notes = [
        f"model: random-weight Llama, {params / 1e9:.3f}B parameters (hidden {size.hidden}, {size.layers} layers, "
        f"vocabulary {size.vocab:,}, untied), full finetune in fp32, {STEPS} steps of one {SEQ_LEN}-token row "
        "per worker",
        "worker figures: the largest worker's peak resident set (and that above its size before the model "
        "loaded), from the run's end record; the export runs in a process of its own after each run",
        f"load average {load_start} at the start, {load_average()} at the end",
    ]
    section = results_section(NAME, now, command(), notes, head, rows, ratios)
    print("\n" + section, flush=True)
    summary = [
        f"| {NAME}: ZeRO-3 worker memory, 2 vs 1 workers | {runs[(3, 2)]['above_start_gib']:.2f} vs "
        f"{runs[(3, 1)]['above_start_gib']:.2f} GiB | {z3:.2f}x | <= {TARGET_ZERO3_SCALING}x, {verdict(ok3)} | "
        f"{now:%Y-%m-%d} | `{command()}` |",
        f"| {NAME}: export peak vs exported model | {max(r['export']['above_start_gib'] for r in runs.values()):.2f}"
        f" vs {runs[(3, 2)]['export']['model_gib']:.2f} GiB | {worst_export:.2f}x | <= {TARGET_EXPORT}x, "
        f"{verdict(ok_export)} | {now:%Y-%m-%d} | `{command()}` |",
    ]
    write_results(args.results, section, summary, name=NAME)
    return 0


if __name__ == "__main__":
    sys.exit(main())
