"""What a sweep costs beyond its trials: scheduling overhead and trial start-up, measured in one run.

N short trials of a tiny model (a 2-layer Llama built from a config, 1 DeepSpeed worker each, FIFO, no
early stopping) run as one `rayft sweep`, C at a time. Figures:

- worker-slot occupancy: the sum of the trials' own times (each trial function's wall time, from
  Tune) over C x the sweep's wall time. Target >= 80%.
- scheduling overhead: sweep wall time minus (sum of trial times / C).
- trial start-up: from a trial's start to its first optimizer step (Ray Train workers, DeepSpeed
  engine, the Ray Data pipeline), averaged over trials.
- baseline: the same job run once with `rayft train`'s code outside Tune, in the same run, so the
  cost of running inside a Tune trial shows as a ratio.

Usage: python bench/sweep_overhead.py [--trials 4] [--concurrency 2] [--steps 8] [--quick] [--no-write] [--results PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from data_pipeline import command, load_average, results_section, verdict, write_results  # noqa: E402

NAME = "sweep_overhead"


def tiny_model(out: Path) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from rayft.training.models import load_tokenizer

    tok = load_tokenizer("smollm2-135m-instruct")
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def job_file(work: Path, model: Path, trials: int, concurrency: int, steps: int) -> Path:
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"Ticket {i}: my lamp is broken"},
                {"role": "assistant", "content": json.dumps({"product": "lamp", "id": i % 4})},
            ]
        }
        for i in range(32)
    ]
    (work / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (work / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:4]))
    lrs = [5e-3 / (2**i) for i in range(trials)]
    text = f"""# python bench/sweep_overhead.py
model: {{name: {model}}}
data: {{train: train.jsonl, eval: eval.jsonl, max_seq_len: 128}}
training: {{lr: 5.0e-3, micro_batch_size: 2, global_batch_size: 4, warmup_ratio: 0.0, max_steps: {steps},
           eval_every_steps: {max(1, steps // 2)}}}
scaling: {{num_workers: 1}}
run: {{name: bench, storage_path: {work / "runs"}}}
sweep:
  name: overhead
  space: {{training.lr: {{grid: {json.dumps(lrs)}}}}}
  num_samples: 1
  max_concurrent_trials: {concurrency}
  scheduler: {{type: fifo}}
"""
    path = work / "job.yaml"
    path.write_text(text)
    return path


def first_step_s(run_dir: str, started: float) -> float | None:
    from rayft.training.trainer import read_metrics

    steps = [r["time"] for r in read_metrics(run_dir) if "loss" in r and "time" in r]
    return min(steps) - started if steps else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=4)
    ap.add_argument("--concurrency", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8, help="optimizer steps per trial")
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 trials of 2 steps, no baseline")
    ap.add_argument("--no-write", action="store_true", help="print the results only")
    ap.add_argument("--results", type=Path, default=ROOT / "bench" / "RESULTS.md", help="file to append to")
    args = ap.parse_args(argv)
    if args.quick:
        args.trials, args.steps = 2, 2

    import ray

    from rayft.cluster.config import load_config
    from rayft.cluster.runtime import connect
    from rayft.training.trainer import run_training
    from rayft.tuning.sweep import run_sweep, sweep_cpus

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    load = load_average()
    with tempfile.TemporaryDirectory(prefix="rayft-sweep-bench-") as tmp:
        work = Path(tmp)
        model = tiny_model(work / "tiny")
        job = load_config(job_file(work, model, args.trials, args.concurrency, args.steps))
        connect(need_cpus=sweep_cpus(job), dashboard=True)

        baseline_s = baseline_startup = None
        if not args.quick:  # the smoke run leaves out the info-only baseline: one start-up fewer
            base_job = load_config(work / "job.yaml", ["run.name=baseline"])
            t0 = time.time()
            base = run_training(base_job)
            baseline_s = time.time() - t0
            baseline_startup = first_step_s(base.run_dir, t0)

        t0 = time.time()
        result = run_sweep(job)
        wall = time.time() - t0
        ray.shutdown()

        trial_s = [r.wall_s for r in result.rows]
        startups = []
        for r in result.rows:
            from rayft.training.trainer import read_metrics

            records = read_metrics(r.run_dir)
            last = max((m["time"] for m in records if "time" in m), default=None)
            if last is not None:  # the trial's start: its last record's time minus its own duration
                s = first_step_s(r.run_dir, last - r.wall_s)
                if s is not None:
                    startups.append(s)
    busy = sum(trial_s) / (args.concurrency * wall)
    overhead = wall - sum(trial_s) / args.concurrency
    mean_trial = sum(trial_s) / len(trial_s)
    startup = sum(startups) / len(startups) if startups else float("nan")
    in_tune = f"{mean_trial / baseline_s:.2f}x" if baseline_s else "- (not run with --quick)"

    notes = [
        f"{args.trials} trials x {args.steps} optimizer steps of a 2-layer Llama (hidden 64), 1 DeepSpeed ZeRO-2 "
        f"worker each, {args.concurrency} at a time, FIFO; baseline = the same job once through `rayft train`'s "
        "run_training outside Tune",
        f"statuses: {', '.join(sorted(r.status for r in result.rows))}",
        f"load average (1 min) at start: {load}",
    ]
    head = ("figure", "value")
    rows = [
        ("sweep wall time", f"{wall:.1f} s"),
        ("sum of trial times", f"{sum(trial_s):.1f} s"),
        ("mean trial time", f"{mean_trial:.1f} s"),
        ("scheduling overhead (wall - sum/C)", f"{overhead:.1f} s"),
        ("mean trial start-up (start to first step)", f"{startup:.1f} s"),
        ("baseline run time (no Tune)", f"{baseline_s:.1f} s" if baseline_s else "-"),
        ("baseline start-up (call to first step)", f"{baseline_startup:.1f} s" if baseline_startup else "-"),
    ]
    ratios = [
        ("worker-slot occupancy", f"{busy * 100:.0f}%", ">= 80%", verdict(busy >= 0.8)),
        ("trial time in Tune / baseline run", in_tune, "", ""),
    ]
    now = datetime.now(UTC)
    cmd = command()
    section = results_section(NAME, now, cmd, notes, head, rows, ratios)
    print(section)
    if not args.no_write:
        summary = [
            f"| {NAME}: worker-slot occupancy, {args.trials} trials x {args.concurrency} at a time | "
            f"{sum(trial_s):,.0f} s of trials in {wall:,.0f} s | {busy * 100:.0f}% | >= 80%, {verdict(busy >= 0.8)} | "
            f"{now:%Y-%m-%d} | `{cmd}` |"
        ]
        write_results(args.results, section, summary, name=NAME)
    return 0


if __name__ == "__main__":
    sys.exit(main())
