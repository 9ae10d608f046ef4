"""GPU check: what one GPU does with rayft, in tokens/s, MFU and serving throughput (run by bench/gpu_check.sh).

    bench/gpu_check.sh                 # on a machine with one H100/H200: about 6 minutes, at most 8
    bench/gpu_check.sh --dry-run       # the same path on CPU with tiny sizes (a test runs this)

Measured, in this order, each in the same run:

1. Peak bf16 matmul rate of the card: an 8192 x 8192 x 8192 bf16 matrix product, 3 warm-ups, then
   10 products timed with CUDA events. This is the MFU denominator (measured, not the datasheet's).
2. `rayft train` (training.trainer.run_training, the CLI's own path) on 1 GPU, twice: a ZeRO-2 full
   finetune and a ZeRO-2 LoRA (r 16, all linear layers) of a Llama-architecture model built from a
   config with random weights (no download is possible: the machine is offline). Default size: the
   TinyLlama-1.1B shape (hidden 2048, 22 layers, 32 heads, 4 KV heads, MLP 5632, vocabulary 32000,
   untied head). bf16, SDPA attention, packed rows of 2,048 tokens (attention stays within each
   example), micro-batch 8 rows, no gradient checkpointing. The data is generated chat text in a
   generated tokenizer's words, so nothing is read from a hub.
   Tokens/s counts the real (non-pad) tokens of the timed steps over their summed step times (the
   first steps are warm-up). MFU = (6 x N x tokens/s + attention FLOP/s) / peak, N = every weight
   matrix of the model (the input embedding, a lookup, is left out), attention = 12 x layers x hidden
   x the mean example length (fwd + bwd of QK^T and AV, PaLM's convention, per example because packing
   keeps attention within examples). For LoRA the backward of the frozen weights still runs for the
   input gradients but their weight gradients do not: its MFU by the same formula is an upper bound of
   work done, and its tokens/s is the figure to compare. rayft projects to the vocabulary only at
   trained positions, so it does less work than 6 x N counts; the "hardware" MFU column counts the head
   only where it ran. Peak GPU memory is the largest of the trainer's own reading
   (torch.cuda.max_memory_allocated) and nvidia-smi's, polled every 0.5 s.
3. GRPO (`training.objective: grpo`, LoRA, ZeRO-2) on the same model: each step samples 8 completions of up to
   64 tokens for each of 8 prompts with rayft's batching engine on the live policy on the GPU (the GPU rollout
   path), grades them in a Ray task (a string_check grader) and trains on them; completions/s and the step's
   split into generate / grade / train / weight-gather seconds. No target: the first GPU figures of the path.
4. Serving: `rayft serve`'s app (transformers engine, dynamic batching up to 32) on the GPU with the
   same model, streamed chat requests with 1 client and with 32 concurrent clients; completion
   tokens/s of each and their ratio (the batching gain).

Targets (issue 8): full-finetune MFU >= 40% on an H100 for the 1B model; LoRA tokens/s >= 1.3x full
finetune's; serving batching gain >= 8x at 32 clients. A table is printed last; full logs (this
script's output, every run's metrics.jsonl, Ray's logs, nvidia-smi) are written to --out.
--dry-run runs every step on CPU with a 2-layer model, so the whole path is checked anywhere; its
figures mean nothing about a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
if str(ROOT / "bench") not in sys.path:
    sys.path.insert(0, str(ROOT / "bench"))

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_ENABLE_AUTO_CONNECT", "0")

NAME = "gpu_check"
TARGET_MFU = 0.40
TARGET_LORA_VS_FULL = 1.3
TARGET_BATCHING = 8.0


@dataclass(frozen=True)
class Size:
    """Model, data and run sizes of one check."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    seq_len: int
    micro_batch: int
    steps: int
    warmup: int
    matmul: int
    serve_clients: int
    serve_requests: int
    serve_tokens: int


SIZES = {
    # The TinyLlama-1.1B shape: 1.10B parameters.
    "1b": Size(2048, 5632, 22, 32, 4, 32000, 2048, 8, 20, 5, 8192, 32, 2, 128),
    # The dry run: the same code path on CPU in about two minutes.
    "tiny": Size(64, 172, 2, 4, 2, 2048, 256, 2, 6, 2, 512, 32, 1, 8),
}

WORDS = (
    "the a of to and in is for on with that this it as be by are was from or at an not have has can will "
    "order parcel refund charge battery kettle lamp screen cable router account password invoice support "
    "ticket customer reply delivery warranty repair replace return store update setting button light sound "
    "please thank sorry check try reset restart open close send receive today tomorrow week month day "
    "first next last new old small large quick clear simple short long good bad right wrong help answer"
).split()


# --------------------------------------------------------------------------- environment


def log(msg: str) -> None:
    print(f"[{datetime.now(UTC):%H:%M:%S}] {msg}", flush=True)


def environment(out: Path, dry_run: bool) -> dict:
    """Versions and the device, written to env.txt."""
    import deepspeed
    import ray
    import torch
    import transformers

    info = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "ray": ray.__version__,
        "deepspeed": deepspeed.__version__,
        "ray_location": os.path.dirname(ray.__file__),
        "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU",
        "dry_run": dry_run,
    }
    smi = shutil.which("nvidia-smi")
    text = json.dumps(info, indent=2) + "\n"
    if smi:
        text += subprocess.run([smi], capture_output=True, text=True).stdout
    (out / "env.txt").write_text(text)
    return info


def peak_matmul(n: int, use_gpu: bool) -> float:
    """FLOP/s of an n x n x n product: bf16 with CUDA events on a GPU, fp32 on CPU (dry run)."""
    import torch

    if not use_gpu:
        # A peak is the best rate seen: the best of 10 timed rounds of 5 products each, after 3 warm-ups,
        # so that a moment of contention on a shared CPU does not lower the denominator.
        a, b = torch.randn(n, n), torch.randn(n, n)
        for _ in range(3):
            a @ b
        best = float("inf")
        for _ in range(10):
            t0 = time.perf_counter()
            for _ in range(5):
                a @ b
            best = min(best, time.perf_counter() - t0)
        return 2 * n**3 * 5 / best
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(10):
        a @ b
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1000
    del a, b
    torch.cuda.empty_cache()
    return 2 * n**3 * 10 / seconds


class MemoryPoll:
    """Largest GPU memory use nvidia-smi reports while the block runs (0 without nvidia-smi)."""

    def __init__(self):
        self.smi = shutil.which("nvidia-smi")
        self.peak_mib = 0
        self._stop = threading.Event()

    def __enter__(self):
        if self.smi:
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def _poll(self) -> None:
        cmd = [self.smi, "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"]
        while not self._stop.is_set():
            try:
                used = int(subprocess.run(cmd, capture_output=True, text=True, timeout=5).stdout.split()[0])
                self.peak_mib = max(self.peak_mib, used)
            except (OSError, ValueError, IndexError, subprocess.SubprocessError):
                pass
            self._stop.wait(0.5)

    def __exit__(self, *exc):
        self._stop.set()
        if self.smi:
            self._thread.join(timeout=10)


# --------------------------------------------------------------------------- model, tokenizer, data


def make_tokenizer(vocab: int):
    """A word-level tokenizer with ChatML special tokens and chat template, `vocab` entries in all: the
    words the generated data uses, then filler words, so every id the model can emit decodes."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<pad>", "<|im_start|>", "<|im_end|>"]
    names = ["system", "user", "assistant", *WORDS]
    names += [f"w{i}" for i in range(vocab - len(specials) - len(names))]
    table = {t: i for i, t in enumerate(specials + names)}
    tok = Tokenizer(models.WordLevel(table, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    fast.chat_template = (
        "{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
        "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}"
    )
    return fast


def make_model(out: Path, size: Size, tokenizer, use_gpu: bool) -> int:
    """Save a randomly initialised Llama of `size` (bf16 on GPU) with the tokenizer; returns its parameter count."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=size.vocab,
        hidden_size=size.hidden,
        intermediate_size=size.intermediate,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        num_key_value_heads=size.kv_heads,
        max_position_embeddings=max(2048, size.seq_len),
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    dtype = torch.bfloat16 if use_gpu else torch.float32
    with torch.device("cuda" if use_gpu else "cpu"):  # random init on the GPU: seconds instead of a minute
        model = LlamaForCausalLM(cfg).to(dtype)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    n = sum(p.numel() for p in model.parameters())
    del model
    if use_gpu:
        torch.cuda.empty_cache()
    return n


def make_data(path: Path, size: Size, rows_needed: int, seed: int = 0) -> tuple[int, float]:
    """Chat examples of varied length, enough to fill `rows_needed` packed rows of seq_len tokens.
    Returns (examples, mean over tokens of the example length: sum n^2 / sum n, for attention FLOPs)."""
    rng = random.Random(seed)
    target = int(rows_needed * size.seq_len * 1.15)  # packing leaves a little of each row empty
    total, sq, n = 0, 0, 0
    with open(path, "w", encoding="utf-8") as f:
        while total < target:
            q_len = rng.randint(size.seq_len // 32, size.seq_len // 8)
            a_len = rng.randint(size.seq_len // 16, size.seq_len // 3)
            question = " ".join(rng.choice(WORDS) for _ in range(q_len))
            answer = " ".join(rng.choice(WORDS) for _ in range(a_len))
            messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
            f.write(json.dumps({"messages": messages}) + "\n")
            tokens = q_len + a_len + 8  # + role names and special tokens of the template
            total, sq, n = total + tokens, sq + tokens**2, n + 1
    return n, sq / total


# --------------------------------------------------------------------------- training


def train(method: str, model_dir: Path, data: Path, size: Size, work: Path, use_gpu: bool) -> dict:
    """One `rayft train` run; returns its timed steps' figures."""
    import yaml

    from rayft.cluster.config import load_config
    from rayft.training.trainer import read_metrics, run_training

    global_batch = size.micro_batch  # 1 worker, no accumulation
    job = {
        "model": {"name": str(model_dir)},
        "data": {"train": str(data), "max_seq_len": size.seq_len, "packing": True, "shuffle": False},
        "training": {
            "method": method,
            "zero_stage": 2,
            "micro_batch_size": size.micro_batch,
            "global_batch_size": global_batch,
            "max_steps": size.steps,
            "lr": 1e-4 if method == "full" else 2e-4,
            "warmup_ratio": 0.0,
            "eval_at_end": False,
            "log_every_steps": size.steps,
        },
        "scaling": {"num_workers": 1, "use_gpu": use_gpu, "cpus_per_worker": 1},
        "run": {"name": f"gpu-check-{method}", "storage_path": str(work / "runs")},
        "export": {"merge": False},
    }
    path = work / f"{method}.yaml"
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    cfg = load_config(path)

    def progress(event: dict) -> None:
        if "loss" in event:
            log(
                f"  {method} step {event['step']}/{size.steps}: {event['step_time_s']:.3f}s, "
                f"{event['nonpad_tokens_per_s']:,.0f} tokens/s, loss {event['loss']:.3f}"
            )

    log(f"rayft train, {method}: {size.steps} steps of {global_batch} x {size.seq_len} tokens")
    t0 = time.perf_counter()
    with MemoryPoll() as mem:
        run_training(cfg, restart=True, on_event=progress)
    wall = time.perf_counter() - t0
    records = [r for r in read_metrics(cfg.run_dir) if "loss" in r and not r.get("final")]
    timed = [r for r in records if r["step"] > size.warmup]
    if not timed:
        raise RuntimeError(f"{method}: no timed steps in {cfg.run_dir}/metrics.jsonl")
    seconds = sum(r["step_time_s"] for r in timed)
    shutil.copy(os.path.join(cfg.run_dir, "metrics.jsonl"), work.parent / f"metrics-{method}.jsonl")
    return {
        "method": method,
        "steps": len(timed),
        "tokens_per_s": sum(r["nonpad_tokens"] for r in timed) / seconds,
        "trained_per_s": sum(r["trained_tokens"] for r in timed) / seconds,
        "step_s": seconds / len(timed),
        "split": {k: sum(r.get(k, 0.0) for r in timed) / len(timed) for k in PHASES_WITH_WAIT},
        "peak_mem_gib": max(max((r.get("gpu_mem_peak_gib") or 0.0) for r in timed), mem.peak_mib / 1024),
        "loss": (records[0]["loss"], records[-1]["loss"]),
        "wall_s": wall,
    }


PHASES_WITH_WAIT = ("data_wait_s", "forward_s", "backward_s", "grad_sync_s", "optimizer_s")
GRPO_TIMING = ("timing/generate", "timing/grade", "timing/train", "timing/sync")


def train_grpo(model_dir: Path, data: Path, size: Size, work: Path, use_gpu: bool) -> dict:
    """One `rayft train` GRPO run (LoRA, ZeRO-2, 1 worker) on the prompts of the generated chat rows; returns its
    timed steps' figures. Rollouts run on the device the worker trains on: on a GPU run, the GPU rollout path."""
    import yaml

    from rayft.cluster.config import load_config
    from rayft.training.trainer import read_metrics, run_training

    prompts, samples, new_tokens, steps, warmup = (8, 8, 64, 8, 2) if use_gpu else (2, 4, 8, 3, 1)
    rows = []
    for line in data.read_text(encoding="utf-8").splitlines()[: prompts * steps]:
        question = json.loads(line)["messages"][0]
        rows.append({"messages": [question], "topic": question["content"].split()[0]})
    prompt_file = work / "prompts.jsonl"
    prompt_file.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    grader = {
        "type": "string_check",
        "name": "mentions_the",
        "input": "{{sample.output_text}}",
        "reference": "the",
        "operation": "like",  # the answer contains "the": some samples do, some do not
    }
    job = {
        "model": {"name": str(model_dir)},
        "data": {"train": str(prompt_file), "max_seq_len": size.seq_len, "shuffle": False},
        "training": {
            "objective": "grpo",
            "method": "lora",
            "zero_stage": 2,
            "micro_batch_size": prompts,
            "global_batch_size": prompts,
            "max_steps": steps,
            "lr": 2e-4,
            "warmup_ratio": 0.0,
            "eval_at_end": False,
            "rl": {
                "samples_per_prompt": samples,
                "max_new_tokens": new_tokens,
                "grader": grader,
            },
        },
        "scaling": {"num_workers": 1, "use_gpu": use_gpu, "cpus_per_worker": 1},
        "run": {"name": "gpu-check-grpo", "storage_path": str(work / "runs")},
        "export": {"merge": False},
    }
    path = work / "grpo.yaml"
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    cfg = load_config(path)

    def progress(event: dict) -> None:
        if "reward" in event and "completions_per_s" in event:
            log(
                f"  grpo step {event['step']}/{steps}: {event['step_time_s']:.3f}s, "
                f"{event['completions_per_s']:.1f} completions/s, reward {event['reward']:.3f}"
            )

    log(f"rayft train, grpo: {steps} steps of {prompts} prompts x {samples} completions of <= {new_tokens} tokens")
    t0 = time.perf_counter()
    with MemoryPoll() as mem:
        run_training(cfg, restart=True, on_event=progress)
    wall = time.perf_counter() - t0
    records = [r for r in read_metrics(cfg.run_dir) if "reward" in r and "loss" in r and not r.get("final")]
    timed = [r for r in records if r["step"] > warmup]
    if not timed:
        raise RuntimeError(f"grpo: no timed steps in {cfg.run_dir}/metrics.jsonl")
    seconds = sum(r["step_time_s"] for r in timed)
    shutil.copy(os.path.join(cfg.run_dir, "metrics.jsonl"), work.parent / "metrics-grpo.jsonl")
    return {
        "steps": len(timed),
        "completions_per_s": sum(r["completions"] for r in timed) / seconds,
        "tokens_per_s": sum(r["nonpad_tokens"] for r in timed) / seconds,
        "completion_length": sum(r["completion_length"] for r in timed) / len(timed),
        "step_s": seconds / len(timed),
        "split": {k: sum(r.get(k, 0.0) for r in timed) / len(timed) for k in GRPO_TIMING},
        "peak_mem_gib": max(max((r.get("gpu_mem_peak_gib") or 0.0) for r in timed), mem.peak_mib / 1024),
        "reward": (records[0]["reward"], records[-1]["reward"]),
        "shape": (prompts, samples, new_tokens),
        "wall_s": wall,
    }


def model_flops(size: Size, params: int, mean_len: float, trained_share: float) -> tuple[float, float]:
    """(FLOPs per token by the MFU convention, FLOPs per token of the work rayft does): 6 x weights (the
    input embedding left out) + attention 12 x layers x hidden x mean example length; the second counts the
    vocabulary projection only at trained positions."""
    matrices = params - size.vocab * size.hidden  # every weight but the embedding lookup (norms are noise)
    attention = 12 * size.layers * size.hidden * mean_len
    head = 6 * size.vocab * size.hidden
    return 6 * matrices + attention, 6 * matrices - head + head * trained_share + attention


# --------------------------------------------------------------------------- serving


def serve(model_dir: Path, size: Size, use_gpu: bool) -> dict:
    """Completion tokens/s of the served model with 1 client and with size.serve_clients clients."""
    from ray import serve as ray_serve
    from serve_load import load

    from rayft.serving.config import ServeConfig
    from rayft.serving.deploy import deploy
    from rayft.serving.spec import build_spec

    clients = size.serve_clients
    cfg = ServeConfig(
        max_batch_size=clients,
        max_ongoing_requests=clients,
        max_queued_requests=4 * clients,
        batch_wait_timeout_s=0.01,
        gpus_per_replica=1.0 if use_gpu else 0.0,
        cpus_per_replica=1.0,
        max_tokens_limit=max(1024, size.serve_tokens),
        port=free_port(),
    )
    spec = build_spec(str(model_dir), cfg)
    log(f"rayft serve: transformers engine, {'GPU' if use_gpu else 'CPU'}, batches of up to {clients}")
    base = deploy(spec)
    load(base, 2, 1, 4)  # warm-up: first kernels, first batch
    one = load(base, 1, size.serve_requests * 2, size.serve_tokens)
    log(f"  1 client: {one['tokens_per_s']:,.1f} tokens/s")
    many = load(base, clients, size.serve_requests, size.serve_tokens)
    log(f"  {clients} clients: {many['tokens_per_s']:,.1f} tokens/s")
    ray_serve.delete("rayft")
    ray_serve.shutdown()
    return {"one": one, "many": many, "clients": clients}


def fmt_params(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: check the whole path without a GPU")
    p.add_argument("--out", type=Path, help="folder for logs and the summary (default bench/out/gpu_check-<time>)")
    p.add_argument("--results", type=Path, help="also record the figures in this RESULTS.md (Summary + a section)")
    p.add_argument("--steps", type=int, help="optimizer steps per training run (default 20; dry run 6)")
    p.add_argument("--keep-work", action="store_true", help="keep the generated model and the runs in <out>/work")
    p.add_argument(
        "--skip", nargs="+", default=[], choices=("full", "lora", "grpo", "serve"), help="parts to leave out"
    )
    args = p.parse_args(argv)

    import torch

    use_gpu = not args.dry_run
    if use_gpu and not torch.cuda.is_available():
        p.error("no CUDA GPU is visible to torch; run with --dry-run to check the path on CPU")
    size = SIZES["tiny" if args.dry_run else "1b"]
    if args.steps:
        if args.steps <= size.warmup:
            p.error(f"--steps must be more than the {size.warmup} warm-up steps")
        size = Size(**{**size.__dict__, "steps": args.steps})
    out = (args.out or ROOT / "bench" / "out" / f"gpu_check-{datetime.now(UTC):%Y%m%d-%H%M%S}").resolve()
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    info = environment(out, args.dry_run)
    log(f"{NAME}: {info['device']}; torch {info['torch']}, ray {info['ray']}, deepspeed {info['deepspeed']}")
    peak = peak_matmul(size.matmul, use_gpu)
    log(f"peak {'bf16' if use_gpu else 'fp32 (CPU)'} matmul: {peak / 1e12:,.1f} TFLOP/s")

    tokenizer = make_tokenizer(size.vocab)
    model_dir = work / "model"
    params = make_model(model_dir, size, tokenizer, use_gpu)
    data = work / "train.jsonl"
    examples, mean_len = make_data(data, size, size.steps * size.micro_batch)
    log(f"model: {fmt_params(params)} parameters; data: {examples} examples, mean example length {mean_len:.0f}")

    from rayft.cluster.runtime import connect

    # One worker holds one logical CPU; Ray Data's read and tokenizer stages take fractions of the rest.
    connect(num_cpus=max(4, os.cpu_count() or 1))
    runs: dict[str, dict] = {}
    serving: dict | None = None
    grpo: dict | None = None
    try:
        for method in ("full", "lora"):
            if method not in args.skip:
                runs[method] = train(method, model_dir, data, size, work, use_gpu)
        if "grpo" not in args.skip:
            grpo = train_grpo(model_dir, data, size, work, use_gpu)
        if "serve" not in args.skip:
            serving = serve(model_dir, size, use_gpu)
    finally:
        collect_ray_logs(out)
        import ray

        ray.shutdown()
        if not args.keep_work:  # the model and the full finetune's checkpoint take tens of GB on a GPU run
            for name in ("model", "runs"):
                shutil.rmtree(work / name, ignore_errors=True)

    rows, ratios, summary = report(info, size, params, mean_len, peak, runs, serving, use_gpu, grpo)
    elapsed = time.perf_counter() - started
    text = render(info, size, params, examples, mean_len, peak, rows, ratios, elapsed, args.dry_run)
    (out / "summary.md").write_text(text)
    if args.results:
        record(args.results, info, text, summary, args.dry_run)
    print()
    print(text)
    print(f"logs: {out}")
    return 0


def report(info, size, params, mean_len, peak, runs, serving, use_gpu, grpo=None):
    from data_pipeline import verdict

    rows, ratios, summary = [], [], []
    for method, r in runs.items():
        trained_share = r["trained_per_s"] / r["tokens_per_s"]
        per_token, per_token_done = model_flops(size, params, mean_len, trained_share)
        r["mfu"] = per_token * r["tokens_per_s"] / peak
        r["mfu_done"] = per_token_done * r["tokens_per_s"] / peak
        split = r["split"]
        rows.append(
            (
                f"rayft train, {method} (ZeRO-2, bf16)" if use_gpu else f"rayft train, {method} (ZeRO-2, fp32, CPU)",
                f"{r['tokens_per_s']:,.0f}",
                f"{r['mfu']:.1%}",
                f"{r['mfu_done']:.1%}",
                f"{r['step_s']:.3f}",
                " / ".join(f"{split[k]:.3f}" for k in PHASES_WITH_WAIT),
                f"{r['peak_mem_gib']:.1f}" if r["peak_mem_gib"] else "n/a",
                f"{r['loss'][0]:.2f} -> {r['loss'][1]:.2f}",
            )
        )
    if "full" in runs:
        ok = runs["full"]["mfu"] >= TARGET_MFU
        ratios.append(("full-finetune MFU", f"{runs['full']['mfu']:.1%}", f">= {TARGET_MFU:.0%}", verdict(ok)))
        summary.append(
            (
                "full finetune MFU, 1.1B Llama, 1 GPU",
                f"{runs['full']['tokens_per_s']:,.0f} tokens/s at {peak / 1e12:,.0f} TFLOP/s peak",
                f"{runs['full']['mfu']:.1%}",
                f">= {TARGET_MFU:.0%}, {verdict(ok)}",
            )
        )
    if "full" in runs and "lora" in runs:
        gain = runs["lora"]["tokens_per_s"] / runs["full"]["tokens_per_s"]
        ok = gain >= TARGET_LORA_VS_FULL
        ratios.append(("LoRA / full tokens/s", f"{gain:.2f}x", f">= {TARGET_LORA_VS_FULL}x", verdict(ok)))
        summary.append(
            (
                "LoRA vs full finetune",
                f"{runs['lora']['tokens_per_s']:,.0f} vs {runs['full']['tokens_per_s']:,.0f} tokens/s",
                f"{gain:.2f}x",
                f">= {TARGET_LORA_VS_FULL}x, {verdict(ok)}",
            )
        )
    if grpo:
        prompts, samples, new_tokens = grpo["shape"]
        split = grpo["split"]
        rows.append(
            (
                "rayft train, grpo LoRA (rollouts on the " + ("GPU)" if use_gpu else "CPU)"),
                f"{grpo['tokens_per_s']:,.0f}",
                "",
                "",
                f"{grpo['step_s']:.3f}",
                "generate / grade / train / sync " + " / ".join(f"{split[k]:.3f}" for k in GRPO_TIMING),
                f"{grpo['peak_mem_gib']:.1f}" if grpo["peak_mem_gib"] else "n/a",
                f"reward {grpo['reward'][0]:.2f} -> {grpo['reward'][1]:.2f}",
            )
        )
        ratios.append(("GRPO completions/s", f"{grpo['completions_per_s']:,.1f}", "(info)", ""))
        summary.append(
            (
                "GRPO rollouts + training, LoRA, 1 GPU",
                f"{grpo['completions_per_s']:,.1f} completions/s ({prompts} prompts x {samples}, <= {new_tokens} "
                f"tokens, mean {grpo['completion_length']:.0f})",
                "-",
                "(info)",
            )
        )
    if serving:
        one, many, c = serving["one"], serving["many"], serving["clients"]
        gain = many["tokens_per_s"] / one["tokens_per_s"]
        ok = gain >= TARGET_BATCHING
        for label, s in (("serve, 1 client", one), (f"serve, {c} clients", many)):
            rows.append(
                (
                    label,
                    f"{s['tokens_per_s']:,.1f}",
                    "",
                    "",
                    f"p50 {s['p50']:.2f}",
                    f"TTFT p50 {s['ttft_p50']:.2f}",
                    "",
                    f"{s['tokens']} tokens",
                )
            )
        ratios.append(
            (f"serving batching gain, {c} clients", f"{gain:.2f}x", f">= {TARGET_BATCHING:.0f}x", verdict(ok))
        )
        summary.append(
            (
                f"serving, {c} clients vs 1",
                f"{many['tokens_per_s']:,.0f} vs {one['tokens_per_s']:,.0f} tokens/s",
                f"{gain:.2f}x",
                f">= {TARGET_BATCHING:.0f}x, {verdict(ok)}",
            )
        )
    return rows, ratios, summary


HEAD = (
    "run",
    "tokens/s",
    "MFU",
    "MFU, head where run",
    "s/step",
    "data wait / fwd / bwd / grad sync / optim s",
    "peak GPU GiB",
    "loss / tokens",
)


def render(info, size, params, examples, mean_len, peak, rows, ratios, elapsed, dry_run) -> str:
    lines = [
        f"## {NAME} — {datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        "",
        f"- device: {info['device']}; torch {info['torch']} (CUDA {info['cuda']}), transformers "
        f"{info['transformers']}, ray {info['ray']}, deepspeed {info['deepspeed']}, Python {info['python']}",
        f"- peak {'bf16' if not dry_run else 'fp32 CPU'} matmul ({size.matmul}^3, measured): "
        f"{peak / 1e12:,.1f} TFLOP/s",
        f"- model: Llama, hidden {size.hidden}, {size.layers} layers, {size.heads} heads ({size.kv_heads} KV), MLP "
        f"{size.intermediate}, vocabulary {size.vocab}, {fmt_params(params)} parameters, random weights",
        f"- data: {examples} generated chat examples, mean example length {mean_len:.0f} tokens (token-weighted), "
        f"packed into {size.seq_len}-token rows; micro-batch {size.micro_batch} rows, 1 worker, {size.steps} steps, "
        f"the first {size.warmup} untimed",
        f"- check wall time {elapsed:.0f} s",
    ]
    if dry_run:
        lines.append("- DRY RUN on CPU with tiny sizes: the path is checked end to end; no figure is a GPU's")
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(HEAD)]
    lines += ["", "| " + " | ".join(HEAD) + " |", "| --- " + "| ---: " * (len(HEAD) - 1) + "|"]
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in rows]
    lines += ["", "| ratio | value | target | result |", "| --- | ---: | ---: | --- |"]
    lines += [f"| {n} | {v} | {t} | {'not judged (dry run)' if dry_run else ok} |" for n, v, t, ok in ratios]
    return "\n".join(lines) + "\n"


def record(results: Path, info: dict, section: str, summary: list[tuple], dry_run: bool) -> None:
    from data_pipeline import command, write_results

    date = f"{datetime.now(UTC):%Y-%m-%d}"
    cmd = os.environ.get("GPU_CHECK_COMMAND") or command()  # the shell script's command line, when it ran this
    if dry_run:
        rows = [
            f"| {NAME}: {label} | GPU figure pending: dry run on CPU only | - | {target.split(',')[0]}, "
            f"not measured | {date} | `{cmd}` |"
            for label, _, _, target in summary
        ]
        machine = "CPU (dry run)"
    else:
        rows = [f"| {NAME}: {a} | {b} | {c} | {d} | {date} | `{cmd}` |" for a, b, c, d in summary]
        machine = info["device"]
    write_results(results, section, rows, name=NAME, machine=machine)


def collect_ray_logs(out: Path) -> None:
    """Copy this Ray session's logs (workers, Serve, raylet) next to the summary."""
    import ray

    try:
        session = Path(ray._private.worker._global_node.get_session_dir_path())
    except Exception:  # noqa: BLE001 - Ray already down or never started: nothing to copy
        return
    if (session / "logs").is_dir():
        shutil.copytree(session / "logs", out / "ray-logs", dirs_exist_ok=True, ignore=shutil.ignore_patterns("*.sock"))


if __name__ == "__main__":
    sys.exit(main())
