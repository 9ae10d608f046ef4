"""Throughput of the Ray Data instruction pipeline against `datasets.map`, and against a CPU train step.

    python bench/data_pipeline.py            # 100k generated rows (several minutes on 2 cores)
    python bench/data_pipeline.py --quick    # 3k rows, one timed train step
    python bench/data_pipeline.py --rows 50000 --results /tmp/RESULTS.md

One run measures, on the same generated `messages` JSONL file:

1. `datasets.Dataset.from_json(...).map(...)` (num_proc=2) doing the same per-row work as the
   pipeline: normalize -> Renderer.render -> tokenize_rendered (+ truncation to max_seq_len);
2. `training.data.tokenized(...)` (Ray Data, unpacked), from dataset creation to the last row consumed;
3. `training.data.build_datasets(...)["train"]` with packing on;
4. one LoRA train step of the built-in model on CPU (4 x 512 random tokens).

Targets: pipeline >= 0.7x datasets.map tokens/s, and >= 20x the tokens/s a CPU train step consumes.
The figures are printed and appended to bench/RESULTS.md, whose Summary table keeps the latest figure
per benchmark. Missing a target is reported, not failed: the exit status is 0.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # a checkout that is not pip-installed; appended so PYTHONPATH still wins
    sys.path.append(str(ROOT))

MODEL = "smollm2-135m-instruct"
MAX_SEQ_LEN = 1024
SEED = 1234
TARGET_VS_DATASETS = 0.7
TARGET_VS_TRAIN = 20.0
TRAIN_BATCH, TRAIN_SEQ = 4, 512
NAME = "data_pipeline"

WORDS = (
    "the a an of to in for on with at by from about into over after before under between through during "
    "without within along across behind beyond near order account device battery screen cable charger "
    "warranty refund invoice payment delivery package address customer support team manager engineer "
    "report update version release server network database query cache memory disk file folder backup "
    "login password email message phone call meeting schedule project budget plan goal result problem "
    "solution reason question answer example detail summary step method process system service product "
    "feature setting option error warning issue bug fix test review change request response value number "
    "small large quick slow new old simple complex clear careful useful important possible different "
    "available recent similar specific general public private local remote daily weekly monthly yearly "
    "check explain describe compare install configure restart upgrade remove replace return send receive "
    "open close start stop read write build run deploy measure improve reduce increase keep follow "
    "please thanks sorry because however therefore although while unless since until also only still "
    "usually often sometimes never always really quite very rather almost nearly exactly probably "
    "Python Ray dataset tokenizer model training evaluation adapter gradient optimizer batch sequence "
    "kettle lamp earbuds heater purifier bottle band bank weather travel recipe garden music movie"
).split()


# --------------------------------------------------------------------------- data


def _sentence(rng: random.Random, n: int) -> str:
    words = [rng.choice(WORDS) for _ in range(n)]
    if rng.random() < 0.3:  # digits tokenize differently from words; keep some in the mix
        words[rng.randrange(n)] = str(rng.randint(1, 99999))
    if n > 6 and rng.random() < 0.4:
        words[rng.randrange(2, n - 1)] += ","
    return words[0].capitalize() + " " + " ".join(words[1:]) + rng.choice(".....?!")


def _text(rng: random.Random, n_words: int) -> str:
    parts, left = [], n_words
    while left > 0:
        n = min(left, rng.randint(5, 16))
        n = max(n, 2)
        parts.append(_sentence(rng, n))
        left -= n
    return " ".join(parts)


def generate(path: Path, rows: int, seed: int = SEED) -> None:
    """A deterministic `messages` file, system + user + assistant, about 60-250 tokens per row."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(rows):
            budget = rng.randint(30, 170)  # words; the chat template adds ~15 tokens around them
            system = rng.randint(4, 14)
            user = max(3, int((budget - system) * rng.uniform(0.2, 0.55)))
            assistant = max(3, budget - system - user)
            row = {
                "messages": [
                    {"role": "system", "content": _text(rng, system)},
                    {"role": "user", "content": _text(rng, user)},
                    {"role": "assistant", "content": _text(rng, assistant)},
                ]
            }
            f.write(json.dumps(row) + "\n")


# --------------------------------------------------------------------------- datasets.map baseline

# One tokenizer and renderer per worker process, created on first use there. The pid check keeps a
# forked worker from reusing an object created in the parent.
_WORKER: tuple[int, object, object] | None = None


def _worker_state():
    global _WORKER
    if _WORKER is None or _WORKER[0] != os.getpid():
        from rayft.training.formats import Renderer
        from rayft.training.models import load_tokenizer

        tok = load_tokenizer(MODEL)
        _WORKER = (os.getpid(), tok, Renderer(tok, None, False))
    return _WORKER[1], _WORKER[2]


def hf_tokenize(batch: dict) -> dict:
    """The pipeline's per-row work (training.data.Tokenize with overlong=truncate), as a datasets.map fn."""
    from rayft.training.formats import normalize, tokenize_rendered

    tok, renderer = _worker_state()
    texts, spans = [], []
    for messages in batch["messages"]:
        text, sp = renderer.render(normalize({"messages": messages}))
        texts.append(text)
        spans.append(sp)
    out: dict[str, list] = {"input_ids": [], "labels": [], "num_tokens": []}
    for ids, labels in tokenize_rendered(tok, texts, spans):
        out["num_tokens"].append(len(ids))
        out["input_ids"].append(ids[:MAX_SEQ_LEN])
        out["labels"].append(labels[:MAX_SEQ_LEN])
    return out


@dataclass
class Measure:
    seconds: float
    rows: int
    tokens: int
    extra: str = ""

    @property
    def rows_s(self) -> float:
        return self.rows / self.seconds

    @property
    def tokens_s(self) -> float:
        return self.tokens / self.seconds


def bench_datasets_map(path: Path, cache: Path) -> Measure:
    import datasets

    datasets.disable_caching()  # recompute every time; nothing reused from an earlier run
    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    t0 = time.perf_counter()
    ds = datasets.Dataset.from_json(str(path), cache_dir=str(cache))
    out = ds.map(hf_tokenize, batched=True, batch_size=256, num_proc=2, remove_columns=ds.column_names)
    seconds = time.perf_counter() - t0
    return Measure(seconds, len(out), int(sum(out["num_tokens"])))


# --------------------------------------------------------------------------- Ray Data pipeline


def _data_cfg(path: Path, packing: bool):
    from rayft.training.config import DataConfig

    return DataConfig(
        train=str(path),
        max_seq_len=MAX_SEQ_LEN,
        packing=packing,
        shuffle=False,
        tokenizer_tasks=2,
        cpus_per_data_task=0.25,
    )


def bench_pipeline(path: Path) -> Measure:
    from rayft.training.config import ModelConfig
    from rayft.training.data import tokenized

    t0 = time.perf_counter()
    ds = tokenized(ModelConfig(name=MODEL), _data_cfg(path, packing=False), "train")
    rows = tokens = 0
    first = None
    for batch in ds.iter_batches(batch_size=1024, batch_format="numpy"):
        # How long a trainer would wait for its first batch: throughput alone hides a pipeline that
        # delivers everything at the end.
        first = first if first is not None else time.perf_counter() - t0
        rows += len(batch["num_tokens"])
        tokens += int(batch["num_tokens"].sum())
    return Measure(time.perf_counter() - t0, rows, tokens, f"first batch after {first or 0:.1f}s")


def bench_packed(path: Path) -> Measure:
    from rayft.training.config import ModelConfig
    from rayft.training.data import build_datasets

    t0 = time.perf_counter()
    ds = build_datasets(ModelConfig(name=MODEL), _data_cfg(path, packing=True))["train"]
    examples = tokens = packed = 0
    for batch in ds.iter_batches(batch_size=1024, batch_format="numpy"):
        packed += len(batch["num_examples"])
        examples += int(batch["num_examples"].sum())
        tokens += sum(len(ids) for ids in batch["input_ids"])
    fill = tokens / (packed * MAX_SEQ_LEN) if packed else 0.0
    return Measure(time.perf_counter() - t0, examples, tokens, f"{packed} packed rows, {fill:.0%} full")


# --------------------------------------------------------------------------- train step


def bench_train_step(steps: int) -> tuple[float, float]:
    """(tokens/s, seconds per step) of one LoRA forward+backward+AdamW step on CPU."""
    import torch
    from peft import LoraConfig, get_peft_model

    from rayft.training.models import load_model

    torch.set_num_threads(2)
    torch.manual_seed(SEED)
    model = load_model(MODEL, device="cpu")
    lora = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": "all-linear"}  # rayft defaults
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **lora))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    ids = torch.randint(0, model.config.vocab_size, (TRAIN_BATCH, TRAIN_SEQ))

    def step() -> None:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up: first-call allocations and optimizer state creation
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    per_step = (time.perf_counter() - t0) / steps
    return TRAIN_BATCH * TRAIN_SEQ / per_step, per_step


# --------------------------------------------------------------------------- reporting


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram = "? GiB"
    try:
        kb = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))
        ram = f"{kb / 2**20:.1f} GiB"
    except (OSError, AttributeError):
        pass
    ncpu = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"nproc {ncpu}, {cpu}, {ram} RAM, Python {platform.python_version()}, {platform.system()}"


def machine_label() -> str:
    """The machine in a few words, for the Summary table: core count and CPU model, or the GPU's name."""
    cpu = machine().split(", ")[1]  # machine() reads the CPU model once, the same way
    ncpu = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{ncpu} cores, {cpu}"


def command() -> str:
    exe = Path(sys.executable)
    try:
        exe_s = str(exe.relative_to(Path.cwd()))  # .venv/bin/python from the repo root
    except ValueError:
        exe_s = "python"
    return shlex.join([exe_s, *sys.argv])


def verdict(ok: bool) -> str:
    return "MET" if ok else "MISSED"


HEADER = """# Benchmark results

Each section below is one run of a script in `bench/`, appended by the script itself. Ratios compare
against baselines measured in the same run on the same machine, so they are the figures to track;
absolute times on shared CI-class machines drift from run to run (noisy neighbours, CPU model, turbo),
so compare them only within one section. The Summary table holds the latest figure per benchmark.
"""

SUMMARY_COLUMNS = ("benchmark", "figure", "ratio", "target", "date", "machine", "command")
SUMMARY_HEAD = "| " + " | ".join(SUMMARY_COLUMNS) + " |\n" + "| --- " * len(SUMMARY_COLUMNS) + "|"


def results_section(name: str, now: datetime, cmd: str, notes: list[str], head, rows, ratios) -> str:
    """One run's section of RESULTS.md: machine, command, notes, the measurement table and the ratios."""
    return "\n".join(
        [
            f"## {name} — {now:%Y-%m-%d %H:%M} UTC",
            "",
            f"- machine: {machine()}",
            f"- command: `{cmd}`",
            *[f"- {n}" for n in notes],
            "",
            "| " + " | ".join(head) + " |",
            "| --- " + "| ---: " * (len(head) - 1) + "|",
            *["| " + " | ".join(r) + " |" for r in rows],
            "",
            "| ratio | value | target | result |",
            "| --- | ---: | ---: | --- |",
            *[f"| {n} | {v} | {t} | {ok} |" for n, v, t, ok in ratios],
        ]
    )


def _with_machine(row: str, label: str) -> str:
    """A Summary row with its machine cell: rows are written as benchmark | figure | ratio | target | date |
    command, and the machine goes before the command (rows from before the column existed get "-")."""
    cells = [c.strip() for c in row.strip().strip("|").split(" | ")]
    if len(cells) == len(SUMMARY_COLUMNS) - 1:
        cells.insert(len(cells) - 1, label)
    return "| " + " | ".join(cells) + " |"


def write_results(
    path: Path, section: str, summary_rows: list[str], name: str = NAME, machine: str | None = None
) -> None:
    """Append `section` and replace benchmark `name`'s rows in the Summary table, keeping everything else.
    `machine` labels the new rows (default: this machine's cores and CPU model)."""
    summary_rows = [_with_machine(r, machine or machine_label()) for r in summary_rows]
    text = path.read_text(encoding="utf-8") if path.exists() else HEADER
    # Split into the preamble (before the first "## ") and the "## " sections, in file order.
    chunks = re.split(r"(?m)^(?=## )", text)
    preamble, sections = chunks[0], chunks[1:]
    kept_rows: list[str] = []
    history: list[str] = []
    for s in sections:
        if s.startswith("## Summary"):
            for line in s.splitlines():
                cells = [c.strip() for c in line.strip().strip("|").split("|")]
                if line.startswith("|") and cells[0] not in ("benchmark", "---"):
                    if not cells[0].startswith(name):
                        kept_rows.append(_with_machine(line, "-"))
        else:
            history.append(s.rstrip() + "\n")
    summary = "## Summary\n\n" + SUMMARY_HEAD + "\n" + "\n".join(kept_rows + summary_rows) + "\n"
    body = [preamble.rstrip() + "\n", summary, *history, section.rstrip() + "\n"]
    path.write_text("\n".join(body), encoding="utf-8")


# --------------------------------------------------------------------------- main


def load_average() -> str:
    """1-minute load average: other processes on the same cores skew absolute times, so it is recorded."""
    try:
        return Path("/proc/loadavg").read_text().split()[0]
    except OSError:
        return "?"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, help="generated rows (default 100000; 3000 with --quick)")
    p.add_argument("--quick", action="store_true", help="3k rows and one timed train step")
    p.add_argument("--train-steps", type=int, help="timed train steps (default 2; 1 with --quick)")
    p.add_argument("--results", type=Path, default=ROOT / "bench" / "RESULTS.md", help="file to append to")
    args = p.parse_args(argv)
    rows = args.rows or (3_000 if args.quick else 100_000)
    steps = args.train_steps or (1 if args.quick else 2)

    from rayft.cluster.runtime import connect
    from rayft.training.models import load_tokenizer

    load_start = load_average()
    print(f"{NAME}: {rows} rows, max_seq_len {MAX_SEQ_LEN}; {machine()}; load {load_start}", flush=True)
    load_tokenizer(MODEL)  # one-time conversion of the built-in model into the cache, outside all timings

    with tempfile.TemporaryDirectory(prefix="rayft-bench-") as tmp:
        data = Path(tmp) / "train.jsonl"
        t0 = time.perf_counter()
        generate(data, rows)
        size = data.stat().st_size / 2**20
        print(f"generated {size:.1f} MiB in {time.perf_counter() - t0:.1f}s", flush=True)

        # The baseline runs before Ray starts: Ray's daemons then do not share its two cores, and
        # its forked workers do not inherit a process that has Ray's threads running.
        hf = bench_datasets_map(data, Path(tmp) / "hf-cache")
        print(f"datasets.map        {hf.seconds:7.1f}s", flush=True)

        import ray

        t0 = time.perf_counter()
        connect(num_cpus=2)
        ray_start = time.perf_counter() - t0
        try:
            pipe = bench_pipeline(data)
            print(f"Ray Data tokenized  {pipe.seconds:7.1f}s ({pipe.extra})", flush=True)
            packed = bench_packed(data)
            print(f"Ray Data packed     {packed.seconds:7.1f}s", flush=True)
        finally:
            ray.shutdown()

    train_tps, step_s = bench_train_step(steps)
    print(f"train step          {step_s:7.1f}s", flush=True)
    load_end = load_average()

    if (pipe.rows, pipe.tokens) != (hf.rows, hf.tokens):  # both sides must have done the same work
        print(f"warning: pipeline {pipe.rows} rows/{pipe.tokens} tokens, datasets.map {hf.rows}/{hf.tokens}")
    vs_hf = pipe.tokens_s / hf.tokens_s
    vs_train = pipe.tokens_s / train_tps
    ok_hf, ok_tr = vs_hf >= TARGET_VS_DATASETS, vs_train >= TARGET_VS_TRAIN

    def row(name: str, m: Measure) -> tuple[str, str, str, str]:
        return name, f"{m.rows_s:,.0f}", f"{m.tokens_s:,.0f}", f"{m.seconds:.1f}"

    table = [
        row("Ray Data pipeline (tokenized)", pipe),
        row("datasets.map (num_proc=2)", hf),
        row("Ray Data packed (build_datasets)", packed),
        (f"CPU LoRA train step ({TRAIN_BATCH}x{TRAIN_SEQ})", "", f"{train_tps:,.0f}", f"{step_s:.1f}/step"),
    ]
    ratios = [
        ("pipeline / datasets.map, tokens/s", f"{vs_hf:.2f}x", f">= {TARGET_VS_DATASETS}x", verdict(ok_hf)),
        ("pipeline / train step, tokens/s", f"{vs_train:,.0f}x", f">= {TARGET_VS_TRAIN:g}x", verdict(ok_tr)),
    ]
    per_row = pipe.tokens / max(pipe.rows, 1)
    notes = [
        f"data: {rows} generated `messages` rows, {pipe.tokens:,} tokens ({per_row:.0f}/row), "
        f"max_seq_len {MAX_SEQ_LEN}, tokenizer_tasks 2, cpus_per_data_task 0.25",
        f"Ray start-up {ray_start:.1f}s (excluded); pipeline {pipe.extra}; packed: {packed.extra}",
        f"load average (1 min) at start / end: {load_start} / {load_end}",
    ]

    print()
    print(f"{'':36} {'rows/s':>9} {'tokens/s':>11} {'seconds':>14}")
    for name, r, t, sec in table:
        print(f"{name:36} {r:>9} {t:>11} {sec:>14}")
    print()
    print(f"{'':36} {'ratio':>9} {'target':>11} {'':>14}")
    for name, value, target, ok in ratios:
        print(f"{name:36} {value:>9} {target:>11} {ok:>14}")
    print()
    for n in notes:
        print(n)

    now = datetime.now(UTC)
    cmd = command()
    section = results_section(NAME, now, cmd, notes, ("measurement", "rows/s", "tokens/s", "seconds"), table, ratios)
    date = f"{now:%Y-%m-%d}"
    summary = [
        f"| {NAME}: Ray Data vs datasets.map | {pipe.tokens_s:,.0f} vs {hf.tokens_s:,.0f} tokens/s "
        f"| {vs_hf:.2f}x | >= {TARGET_VS_DATASETS}x, {verdict(ok_hf)} | {date} | `{cmd}` |",
        f"| {NAME}: Ray Data vs CPU train step | {pipe.tokens_s:,.0f} vs {train_tps:,.0f} tokens/s "
        f"| {vs_train:,.0f}x | >= {TARGET_VS_TRAIN:.0f}x, {verdict(ok_tr)} | {date} | `{cmd}` |",
    ]
    write_results(args.results, section, summary)
    print(f"\nappended to {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
