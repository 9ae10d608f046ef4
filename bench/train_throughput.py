"""Training throughput of `rayft train` against a single-process PyTorch + PEFT loop, on CPU.

    python bench/train_throughput.py                  # 20 optimizer steps per contender (several minutes on 2 cores)
    python bench/train_throughput.py --quick          # 4 steps of 4 rows, to check that everything runs
    python bench/train_throughput.py --model smollm2 --steps 6   # the built-in SmolLM2-135M (much slower)

One run trains the same model on the same data for the same number of optimizer steps four times
(`rayft train` first, then (c), (b), (a)):

1. `rayft train` (training.trainer.run_training): Ray Data tokenizes and packs
   examples/quickstart/train.jsonl, 2 Ray Train workers (gloo) run DeepSpeed ZeRO-2 with LoRA;
2. baseline (a), how most finetuning scripts run: one process, torch.set_num_threads(2), PEFT LoRA,
   torch AdamW, the model's own forward (logits at every position), micro-batches of examples padded
   to the longest in the batch;
3. baseline (b): the same single-process loop fed packed rows (training.formats.pack_examples);
4. (c): (b) with rayft's training forward (logits and loss only at trained positions), so that
   rayft / (c) is the cost of Ray and DeepSpeed alone.

Each optimizer step of (a) trains as many examples as the same step of (b), taken in data order,
and (b) trains as many packed rows per step as `rayft train`. The first 2 steps of each are warm-up
and not timed. Figures are non-pad tokens per second (tokens of real examples over step time);
rayft's steps are timed by wall clock between its step records, so they include metrics logging
and reporting to Ray.

Ray runs its workers at niceness 15 (RAY_worker_niceness); the baselines run at the same niceness, so
that other work on a shared machine slows every contender alike. Targets on 2 cores: rayft >= 1.5x
(a), rayft >= 0.85x (b), and rayft workers waiting for data < 5% of step time. The figures are
printed and appended to bench/RESULTS.md; missing a target is reported, not failed: the exit
status is 0.

The default model is a 4-layer Llama with SmolLM2's tokenizer, built with random weights, so a
step takes seconds rather than a minute; throughput ratios do not depend on the weights' values.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # a checkout that is not pip-installed; appended so PYTHONPATH still wins
    sys.path.append(str(ROOT))

# Ray workers inherit the environment; a tokenizer used before a fork would otherwise warn in each of them.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Ray is started and stopped explicitly. A Ray object collected after ray.shutdown() would otherwise start a
# second local Ray, whose daemons would then share the cores with the baselines.
os.environ.setdefault("RAY_ENABLE_AUTO_CONNECT", "0")

NAME = "train_throughput"
BUILTIN = "smollm2-135m-instruct"
DATA = ROOT / "examples" / "quickstart" / "train.jsonl"
MAX_SEQ_LEN = 512
WORKERS = 2
THREADS = 2  # the single-process baselines use every core the two workers use
WARMUP_STEPS = 2
SEED = 42
LR = 2e-4
TARGET_VS_PADDED = 1.5
TARGET_VS_PACKED = 0.85
TARGET_WAIT_SHARE = 0.05
# The trainer's per-step phases (mean over ranks, s/step), as training.loop.PHASES records them.
PHASES = ("forward_s", "backward_s", "grad_sync_s", "optimizer_s")


# --------------------------------------------------------------------------- model and data


def small_model(out: Path, tokenizer) -> str:
    """A 4-layer Llama (hidden 256) with SmolLM2's tokenizer and chat template, saved as a model dir."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        tie_word_embeddings=True,  # as in SmolLM2: the vocab projection is the frozen embedding
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(cfg).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


def load_examples(tokenizer, path: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    """(input_ids, labels) per row, made by the pipeline's own per-row functions (truncate, drop untrained)."""
    from rayft.training.formats import IGNORE_INDEX, Renderer, normalize, parse_json_line, tokenize_rendered

    renderer = Renderer(tokenizer, None, False)
    with open(path, encoding="utf-8") as f:
        rendered = [renderer.render(normalize(parse_json_line(line))) for line in f if line.strip()]
    out = []
    for ids, labels in tokenize_rendered(tokenizer, [t for t, _ in rendered], [s for _, s in rendered]):
        ids, labels = ids[:MAX_SEQ_LEN], labels[:MAX_SEQ_LEN]
        if (labels != IGNORE_INDEX).any():
            out.append((ids, labels))
    order = np.random.default_rng(SEED).permutation(len(out))
    return [out[i] for i in order]


def pack(examples: list[tuple[np.ndarray, np.ndarray]]) -> list[dict]:
    """Packed rows as the pipeline makes them: first-fit-decreasing within windows of PACK_WINDOW_ROWS examples.
    `members` holds indices into `examples`."""
    from rayft.training.data import PACK_WINDOW_ROWS
    from rayft.training.formats import pack_examples

    rows = []
    for start in range(0, len(examples), PACK_WINDOW_ROWS):
        for r in pack_examples(examples[start : start + PACK_WINDOW_ROWS], MAX_SEQ_LEN):
            r["members"] = [start + m for m in r["members"]]
            rows.append(r)
    return rows


@dataclass
class Plan:
    """Per optimizer step, the micro-batches of each baseline (lists of rows for training.formats.collate)."""

    padded: list[list[list[dict]]] = field(default_factory=list)
    packed: list[list[list[dict]]] = field(default_factory=list)


def plan_steps(examples, rows: list[dict], steps: int, global_batch: int, micro: int, pad_batch: int) -> Plan:
    plan = Plan()
    cursor = 0
    for s in range(steps):
        # Past the last row the data starts over, as a second epoch would.
        step_rows = [rows[(s * global_batch + i) % len(rows)] for i in range(global_batch)]
        plan.packed.append([step_rows[i : i + micro] for i in range(0, global_batch, micro)])
        # (a) trains on as many examples per step, taken in data order. Not the examples of this step's
        # rows: first-fit-decreasing fills rows longest first, so neighbouring rows hold examples of
        # similar length, and padding those would hide the padding a plain script pays.
        n = sum(len(r["members"]) for r in step_rows)
        taken = [examples[(cursor + i) % len(examples)] for i in range(n)]
        cursor += n
        unpacked = [{"input_ids": ids, "labels": labels} for ids, labels in taken]
        plan.padded.append([unpacked[i : i + pad_batch] for i in range(0, n, pad_batch)])
    return plan


# --------------------------------------------------------------------------- contenders


@dataclass
class Run:
    name: str
    steps: list[dict]  # per timed step: nonpad_tokens, padded_tokens, examples, seconds (+ rayft-only fields)
    note: str = ""

    def total(self, key: str) -> float:
        return float(sum(s[key] for s in self.steps))

    @property
    def nonpad_tokens_s(self) -> float:
        return self.total("nonpad_tokens") / self.total("seconds")

    def per_step(self, key: str) -> float:
        return self.total(key) / len(self.steps)

    @property
    def median_tokens_s(self) -> float:
        """Per-step tokens/s, median over steps: a neighbour's burst on a shared machine moves it less."""
        return float(np.median([s["nonpad_tokens"] / s["seconds"] for s in self.steps]))


def loop_config(model_name: str, global_batch: int, micro: int, steps: int, run_dir: str, skip_untrained_logits: bool):
    from rayft.training.config import DataConfig, ModelConfig, TrainingConfig
    from rayft.training.loop import LoopConfig

    return LoopConfig(
        model=ModelConfig(name=model_name),
        data=DataConfig(train=str(DATA), max_seq_len=MAX_SEQ_LEN, packing=True),
        training=TrainingConfig(
            method="lora",
            micro_batch_size=micro,
            global_batch_size=global_batch,
            max_steps=steps,
            lr=LR,
            skip_untrained_logits=skip_untrained_logits,
        ),
        grad_accum=1,
        total_steps=steps,
        has_eval=False,
        use_gpu=False,
        run_dir=run_dir,
    )


def run_single_process(name: str, cfg, batches: list[list[list[dict]]]) -> Run:
    """The plain loop: forward/backward per micro-batch, then clip + AdamW, in this process with THREADS threads."""
    import torch

    from rayft.training.formats import collate, padded_length
    from rayft.training.loop import build_model

    torch.set_num_threads(THREADS)
    torch.manual_seed(SEED)
    model = build_model(cfg)  # the workers' own model set-up: sdpa attention, fp32 on CPU, the same LoRA adapters
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    timed = []
    for i, micro_batches in enumerate(batches):
        t0 = time.perf_counter()
        step_loss = 0.0
        for rows in micro_batches:
            loss = model(**collate(rows, pad_id), use_cache=False).loss / len(micro_batches)
            loss.backward()
            step_loss += loss.item()
        torch.nn.utils.clip_grad_norm_(params, cfg.training.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - t0
        print(f"  {name} step {i + 1}/{len(batches)}: {seconds:.2f}s, loss {step_loss:.3f}", flush=True)
        if i < WARMUP_STEPS:
            continue
        rows = [r for mb in micro_batches for r in mb]
        padded = [padded_length(max(len(r["input_ids"]) for r in mb)) * len(mb) for mb in micro_batches]
        timed.append(
            {
                "nonpad_tokens": sum(len(r["input_ids"]) for r in rows),
                "padded_tokens": sum(padded),
                "examples": sum(len(r["members"]) if "members" in r else 1 for r in rows),
                "seconds": seconds,
            }
        )
    return Run(name, timed)


def run_rayft(model_name: str, tmp: Path, steps: int, global_batch: int, micro: int) -> tuple[Run, float, int]:
    """`rayft train` on a local Ray; returns its timed steps (from metrics.jsonl), its whole wall time and the
    workers' niceness."""
    import ray
    import yaml

    from rayft.cluster.config import load_config
    from rayft.cluster.runtime import connect
    from rayft.training.trainer import read_metrics, run_training

    job_file = tmp / "job.yaml"
    job = {
        "model": {"name": model_name},
        "data": {"train": str(DATA), "max_seq_len": MAX_SEQ_LEN, "packing": True},
        "training": {
            "method": "lora",
            "zero_stage": 2,
            "micro_batch_size": micro,
            "global_batch_size": global_batch,
            "max_steps": steps,
            "lr": LR,
        },
        "scaling": {"num_workers": WORKERS},
        "run": {"name": "train-throughput", "storage_path": str(tmp / "runs")},
        "export": {"merge": False},  # export runs after the timed steps; merging would only lengthen the run
    }
    job_file.write_text(yaml.safe_dump(job, sort_keys=False))
    cfg = load_config(job_file)
    # 4 logical CPUs on 2 cores: each worker holds one, the data stages (fractional CPUs) take the rest.
    connect(num_cpus=4)

    niceness: list[int] = []

    def progress(event: dict) -> None:
        if event.get("event") == "start":  # the workers' pids: read their scheduling priority while they run
            for pid in event.get("pids") or []:
                try:
                    niceness.append(os.getpriority(os.PRIO_PROCESS, pid))
                except OSError:
                    pass
        if "loss" in event:
            print(
                f"  rayft step {event['step']}/{steps}: {event['step_time_s']:.2f}s "
                f"(data wait {event['data_wait_s']:.3f}s), loss {event['loss']:.3f}",
                flush=True,
            )

    t0 = time.perf_counter()
    try:
        run_training(cfg, restart=True, on_event=progress)
    finally:
        wall = time.perf_counter() - t0
        ray.shutdown()
    records = [r for r in read_metrics(cfg.run_dir) if "loss" in r and not r.get("final")]
    first_wait = records[0]["data_wait_s"] if records else 0.0
    timed = []
    for prev, r in zip(records, records[1:], strict=False):
        if r["step"] > WARMUP_STEPS:
            timed.append(
                {
                    "nonpad_tokens": r["nonpad_tokens"],
                    "padded_tokens": r["tokens"],
                    "examples": r["examples"],
                    # Timed by wall clock between two step records: the step itself plus what happens between
                    # steps (metrics file, TensorBoard, ray.train.report), so nothing the product does is left out.
                    "seconds": r["time"] - prev["time"],
                    "inside_s": r["step_time_s"],
                    "data_wait_s": r["data_wait_s"],
                    **{k: r[k] for k in PHASES},
                }
            )
    return Run("rayft train", timed, f"first step waited {first_wait:.1f}s for data"), wall, max(niceness, default=0)


# --------------------------------------------------------------------------- reporting


def main(argv: list[str] | None = None) -> int:
    from bench.data_pipeline import command, load_average, machine, results_section, verdict, write_results

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, help="optimizer steps per contender, 2 of them warm-up (default 20; 4 quick)")
    p.add_argument("--quick", action="store_true", help="4 steps of 4 rows (micro-batch 2)")
    p.add_argument("--model", choices=("small", "smollm2"), default="small", help="4-layer Llama or SmolLM2-135M")
    p.add_argument("--global-batch", type=int, default=8, help="packed rows per optimizer step (default 8)")
    p.add_argument("--micro-batch", type=int, default=4, help="packed rows per worker micro-batch (default 4)")
    p.add_argument("--pad-batch", type=int, default=8, help="examples per padded micro-batch in (a) (default 8)")
    p.add_argument("--results", type=Path, default=ROOT / "bench" / "RESULTS.md", help="file to append to")
    args = p.parse_args(argv)
    steps = args.steps or (4 if args.quick else 20)
    if args.quick:
        args.global_batch, args.micro_batch, args.pad_batch = 4, 2, 4
    if steps <= WARMUP_STEPS:
        p.error(f"--steps must be more than the {WARMUP_STEPS} warm-up steps")
    if args.global_batch % (args.micro_batch * WORKERS):
        p.error(f"--global-batch must be a multiple of --micro-batch x {WORKERS} workers")

    from rayft.training.models import load_tokenizer

    load_start = load_average()
    print(f"{NAME}: {steps} steps per contender; {machine()}; load {load_start}", flush=True)
    tokenizer = load_tokenizer(BUILTIN)  # converts the built-in model into the cache once, outside all timings

    with tempfile.TemporaryDirectory(prefix="rayft-bench-") as tmp_s:
        tmp = Path(tmp_s)
        if args.model == "small":
            model_name = small_model(tmp / "small-llama", tokenizer)
            model_desc = "4-layer Llama (hidden 256, intermediate 688, 4 heads), SmolLM2 tokenizer, random weights"
        else:
            model_name, model_desc = BUILTIN, "SmolLM2-135M-Instruct (built-in)"
        examples = load_examples(tokenizer, DATA)
        rows = pack(examples)
        plan = plan_steps(examples, rows, steps, args.global_batch, args.micro_batch, args.pad_batch)
        # (b) accumulates per-worker-sized micro-batches, so each forward pass has the shape a worker sees.
        # (a) and (b) use the model's own forward (logits at every position), as plain training scripts do;
        # (c) is (b) with rayft's forward (logits only where labels carry loss): rayft / (c) isolates the cost
        # of Ray and DeepSpeed.
        plain = loop_config(model_name, args.global_batch, args.micro_batch, steps, str(tmp / "b"), False)
        same_forward = loop_config(model_name, args.global_batch, args.micro_batch, steps, str(tmp / "c"), True)

        # (b) runs right after rayft: the closest comparison is then the least exposed to a change in machine load.
        print("rayft train", flush=True)
        rayft, rayft_wall, worker_nice = run_rayft(model_name, tmp, steps, args.global_batch, args.micro_batch)
        # Ray runs its workers at a lower priority (RAY_worker_niceness, 15 by default). The baselines take the
        # same one, so that other work on a shared machine takes as much CPU from each contender.
        if worker_nice > os.nice(0):
            os.nice(worker_nice - os.nice(0))
        print("baseline (c): single process, packed, rayft's forward", flush=True)
        same = run_single_process("packed+rayft forward", same_forward, plan.packed)
        print("baseline (b): single process, packed", flush=True)
        packed = run_single_process("packed", plain, plan.packed)
        print("baseline (a): single process, padded", flush=True)
        padded = run_single_process("padded", plain, plan.padded)
    load_end = load_average()

    vs_padded = rayft.nonpad_tokens_s / padded.nonpad_tokens_s
    vs_packed = rayft.nonpad_tokens_s / packed.nonpad_tokens_s
    vs_same = rayft.nonpad_tokens_s / same.nonpad_tokens_s
    pad_share = padded.total("nonpad_tokens") / padded.total("padded_tokens")
    pack_share = rayft.total("nonpad_tokens") / rayft.total("padded_tokens")
    wait_share = float(np.mean([s["data_wait_s"] / s["seconds"] for s in rayft.steps]))
    ok_padded, ok_packed, ok_wait = (
        vs_padded >= TARGET_VS_PADDED,
        vs_packed >= TARGET_VS_PACKED,
        wait_share < TARGET_WAIT_SHARE,
    )

    def row(name: str, r: Run) -> tuple[str, ...]:
        return (
            name,
            f"{len(r.steps)}",
            f"{r.per_step('examples'):.1f}",
            f"{r.per_step('nonpad_tokens'):,.0f}",
            f"{r.total('nonpad_tokens') / r.total('padded_tokens'):.0%}",
            f"{r.per_step('seconds'):.2f}",
            f"{min(x['seconds'] for x in r.steps):.2f}-{max(x['seconds'] for x in r.steps):.2f}",
            f"{r.nonpad_tokens_s:,.0f}",
        )

    table = [
        row(f"rayft train ({WORKERS} workers, ZeRO-2, LoRA, packed)", rayft),
        row(f"(a) single process, padded, {args.pad_batch} examples/micro-batch", padded),
        row(f"(b) single process, packed, {args.micro_batch} rows/micro-batch", packed),
        row("(c) = (b) with rayft's forward (logits at trained positions only)", same),
    ]
    head = (
        "contender",
        "timed steps",
        "examples/step",
        "non-pad tokens/step",
        "non-pad share",
        "s/step",
        "min-max",
        "tokens/s",
    )
    ratios = [
        ("rayft / (a) padded, non-pad tokens/s", f"{vs_padded:.2f}x", f">= {TARGET_VS_PADDED}x", verdict(ok_padded)),
        ("rayft / (b) packed, non-pad tokens/s", f"{vs_packed:.2f}x", f">= {TARGET_VS_PACKED}x", verdict(ok_packed)),
        ("rayft data wait / step time", f"{wait_share:.1%}", f"< {TARGET_WAIT_SHARE:.0%}", verdict(ok_wait)),
        ("rayft / (c): cost of Ray + DeepSpeed", f"{vs_same:.2f}x", "(info)", ""),
        ("packing: real tokens / tokens computed, rayft", f"{pack_share:.1%}", "(info)", ""),
        ("padding: real tokens / tokens computed, (a)", f"{pad_share:.1%}", "(info)", ""),
    ]
    wait = rayft.per_step("data_wait_s")
    inside = rayft.per_step("inside_s")
    between = rayft.per_step("seconds") - inside
    phase = {k: rayft.per_step(k) for k in PHASES}
    # Inside the step but in none of the phases: metrics of each micro-batch and the per-step all-reduce of them.
    other = inside - wait - sum(phase.values())
    wall_step = rayft.per_step("seconds")
    split = [
        ("data wait", wait),
        ("forward", phase["forward_s"]),
        ("backward", phase["backward_s"]),
        ("gradient reduce-scatter (ZeRO-2, gloo)", phase["grad_sync_s"]),
        ("optimizer step", phase["optimizer_s"]),
        ("step bookkeeping (batch metrics, their all-reduce)", other),
        ("between steps (metrics file, TensorBoard, ray.train.report)", between),
    ]
    # Packing efficiency: the share of each max_seq_len row holding real tokens, for the packed rows, and the
    # non-pad share of (a)'s padded micro-batches, the same examples without packing.
    row_fill = float(np.mean([len(r["input_ids"]) for r in rows]) / MAX_SEQ_LEN)
    notes = [
        f"model: {model_desc}; LoRA r16 all-linear, AdamW lr {LR}, fp32, grad clip 1.0",
        f"data: {DATA.relative_to(ROOT)}, {len(examples)} examples, "
        f"{sum(len(e[0]) for e in examples) / len(examples):.0f} tokens each, max_seq_len {MAX_SEQ_LEN}, "
        f"{len(rows)} packed rows ({np.mean([len(r['input_ids']) for r in rows]) / MAX_SEQ_LEN:.0%} full)",
        f"per optimizer step: {args.global_batch} packed rows (rayft: micro-batch {args.micro_batch} x {WORKERS} "
        f"workers; (b): {args.global_batch // args.micro_batch} micro-batches of {args.micro_batch}); (a): as many "
        f"examples as (b), in data order, in micro-batches of {args.pad_batch}; {steps} steps, the first "
        f"{WARMUP_STEPS} untimed",
        "rayft step split (mean over ranks and timed steps, s/step, share of the wall-clock step): "
        + ", ".join(f"{name} {sec:.3f} ({sec / wall_step:.0%})" for name, sec in split)
        + f"; wall-clock step {wall_step:.2f}s. rayft's figure is timed by wall clock between step records, so it "
        "includes the time between steps",
        f"packing efficiency of the quickstart set: {len(examples)} examples in {len(rows)} rows of {MAX_SEQ_LEN} "
        f"tokens, {row_fill:.1%} full (first-fit-decreasing within windows of rows); the micro-batches rayft "
        f"computed were {pack_share:.1%} real tokens, (a)'s padded micro-batches {pad_share:.1%}",
        f"rayft train wall time {rayft_wall:.0f}s for {steps} steps (Ray start, datasets, workers, DeepSpeed and "
        f"export included); {rayft.note} (untimed)",
        f"median of per-step non-pad tokens/s: rayft {rayft.median_tokens_s:,.0f}, (a) {padded.median_tokens_s:,.0f}, "
        f"(b) {packed.median_tokens_s:,.0f}; ratios {rayft.median_tokens_s / padded.median_tokens_s:.2f}x (a), "
        f"{rayft.median_tokens_s / packed.median_tokens_s:.2f}x (b)",
        f"niceness: rayft workers {worker_nice}, baselines {os.nice(0)}",
        f"load average (1 min) at start / end: {load_start} / {load_end}",
    ]

    print()
    widths = [max(len(h), *(len(r[i]) for r in table)) for i, h in enumerate(head)]
    for line in (head, *table):
        print(
            "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths, strict=True)))
        )
    print()
    for name, value, target, ok in ratios:
        print(f"{name:40} {value:>8} {target:>8}  {ok}")
    print()
    for n in notes:
        print(n)
    print()
    print("rayft step split (s/step)")
    for name, sec in split:
        print(f"  {name:62} {sec:7.3f}  {sec / wall_step:5.1%}")

    now = datetime.now(UTC)
    cmd = command()
    section = results_section(NAME, now, cmd, notes, head, table, ratios)
    date = f"{now:%Y-%m-%d}"
    r_tps, a_tps, b_tps = rayft.nonpad_tokens_s, padded.nonpad_tokens_s, packed.nonpad_tokens_s
    summary = [
        f"| {NAME}: rayft train vs padded single process | {r_tps:,.0f} vs {a_tps:,.0f} non-pad tokens/s "
        f"| {vs_padded:.2f}x | >= {TARGET_VS_PADDED}x, {verdict(ok_padded)} | {date} | `{cmd}` |",
        f"| {NAME}: rayft train vs packed single process | {r_tps:,.0f} vs {b_tps:,.0f} non-pad tokens/s "
        f"| {vs_packed:.2f}x | >= {TARGET_VS_PACKED}x, {verdict(ok_packed)} | {date} | `{cmd}` |",
        f"| {NAME}: rayft data wait | {wait:.3f} of {inside:.2f} s/step | {wait_share:.1%} "
        f"| < {TARGET_WAIT_SHARE:.0%}, {verdict(ok_wait)} | {date} | `{cmd}` |",
    ]
    write_results(args.results, section, summary, name=NAME)
    print(f"\nappended to {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
