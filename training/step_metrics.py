"""What a training step costs and what rank 0 writes down: the step's phase clock (forward, backward, gradient
reduction, optimizer), host and GPU memory probes, the per-step figures summed or averaged over ranks, and the
metrics log (metrics.jsonl and TensorBoard events in the run directory, or a do-nothing log on other ranks)."""

from __future__ import annotations

import json
import os
import tempfile
import time

import numpy as np

from rayft.training.formats import IGNORE_INDEX as IGNORE
from rayft.training.run_dir import METRICS_FILE

PHASES = ("forward_s", "backward_s", "grad_sync_s", "optimizer_s")


class StepClock:
    """Wall time of each phase of a micro-batch: forward, backward, the gradient reduction DeepSpeed runs at
    the end of backward, and the optimizer step. On a GPU each lap waits for the queued kernels first, so a
    phase is charged its own GPU time rather than the next phase's (a few microseconds per lap)."""

    def __init__(self, device):
        import torch

        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self.phases: dict[str, float] = dict.fromkeys(PHASES, 0.0)
        self.t = time.perf_counter()

    def start(self) -> None:
        self.sync()
        self.t = time.perf_counter()

    def lap(self, phase: str) -> None:
        self.sync()
        now = time.perf_counter()
        self.phases[phase] += now - self.t
        self.t = now

    def take(self) -> dict[str, float]:
        """This micro-batch's phases; the clock starts over."""
        out = self.phases
        self.phases = dict.fromkeys(PHASES, 0.0)
        return out


def time_grad_sync(engine, clock: StepClock) -> None:
    """Time DeepSpeed's end-of-backward gradient reduction (ZeRO's reduce-scatter, or the all-reduce
    without ZeRO) as its own phase, taken out of backward_s. Reductions that overlap the backward pass
    (overlap_comm on GPU) stay in backward_s."""
    inner = engine.allreduce_gradients

    def timed(*args, **kwargs):
        clock.lap("backward_s")
        try:
            return inner(*args, **kwargs)
        finally:
            clock.lap("grad_sync_s")

    engine.allreduce_gradients = timed


def release_freed_memory() -> None:
    """Hand the heap's free pages back to the system (glibc's malloc_trim; a no-op elsewhere). Loading a
    checkpoint and partitioning it under ZeRO free a whole model's worth of tensors, most of them below
    malloc's mmap threshold: without this they stay resident in every rank, whatever the number of ranks."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def host_rss() -> int:
    """Resident bytes of this process now (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def host_peak_rss() -> int:
    """The largest resident set this process has had, in bytes: Linux's VmHWM, which starts afresh when the
    process execs (getrusage's ru_maxrss does not: a child forked from a large process inherits its peak)."""
    import resource
    import sys

    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def memory_peaks(device, host_start: int) -> dict:
    """The largest any rank has held since the run started: GPU memory, and the host memory of the worker
    process (its peak resident set, and that peak above the process's size before the model loaded)."""
    import torch
    import torch.distributed as dist

    gpu = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    host = host_peak_rss()
    peaks = torch.tensor([gpu / 2**30, host / 2**30, (host - host_start) / 2**30], device=device)
    if dist.is_initialized():
        dist.all_reduce(peaks, op=dist.ReduceOp.MAX)
    gpu_gib, host_gib, host_above_gib = peaks.tolist()
    memory = {"host_mem_peak_gib": round(host_gib, 3), "host_mem_peak_above_start_gib": round(host_above_gib, 3)}
    if device.type == "cuda":
        memory["gpu_mem_peak_gib"] = round(gpu_gib, 2)
    return memory


class StepAccumulator:
    """One optimizer step's figures on this rank; `reduce` sums or averages them over ranks."""

    def __init__(self):
        self.tokens = self.real = self.trained = self.examples = 0.0
        self.loss_sum, self.loss_tokens, self.wait_s = 0.0, 1, 0.0
        self.phases = dict.fromkeys(PHASES, 0.0)
        self.t0 = time.perf_counter()

    def add(self, rows: list[dict], examples: int, one_row: bool = False) -> None:
        """A micro-batch's token figures. Pairs (DPO) run as a row per pair (chosen and rejected end to end),
        padded to the longest pair, or with `one_row` all in a single row (preference.pair_batch)."""
        from rayft.training.formats import padded_length

        seqs = [(r["input_ids"], r["labels"]) for r in rows]
        seqs += [(r["rejected_ids"], r["rejected_labels"]) for r in rows if "rejected_ids" in r]  # pairs: both answers
        lengths = [len(ids) for ids, _ in seqs]
        self.examples += examples
        self.real += sum(lengths)
        if len(seqs) > len(rows):  # pairs
            pairs = [a + b for a, b in zip(lengths[: len(rows)], lengths[len(rows) :], strict=True)]
            self.tokens += padded_length(sum(pairs)) if one_row else padded_length(max(pairs)) * len(pairs)
        else:
            self.tokens += padded_length(max(lengths)) * len(seqs)
        self.trained += sum(int((np.asarray(labels) != IGNORE).sum()) for _, labels in seqs)

    def finish(self, loss_sum: float, loss_tokens: int, wait_s: float, phases: dict[str, float]) -> None:
        """The step's summed loss on this rank, the trained tokens of the whole step (all ranks), the data
        wait and the phase times."""
        self.loss_sum, self.loss_tokens, self.wait_s, self.phases = loss_sum, max(loss_tokens, 1), wait_s, phases

    def reduce(self, device, world: int, host_start: int = 0) -> dict:
        """The step's figures over all ranks; host_start: this process's resident bytes before the model."""
        import torch
        import torch.distributed as dist

        step_s = time.perf_counter() - self.t0
        sums = [self.tokens, self.real, self.trained, self.examples, self.loss_sum]  # summed over ranks
        means = [self.wait_s, step_s, *self.phases.values()]  # averaged over ranks
        v = torch.tensor(sums + means, dtype=torch.float64, device=device)
        if dist.is_initialized():
            dist.all_reduce(v)
            v[len(sums) :] /= world
        tokens, real, trained, examples, loss_sum, wait_s, step_s, *phases = v.tolist()
        return memory_peaks(device, host_start) | {
            "loss": loss_sum / self.loss_tokens,  # the mean over the step's trained tokens, as eval_loss is
            "examples": int(examples),
            "tokens": int(tokens),
            "nonpad_tokens": int(real),
            "trained_tokens": int(trained),
            "tokens_per_s": tokens / step_s,
            "nonpad_tokens_per_s": real / step_s,
            "step_time_s": step_s,
            "data_wait_s": wait_s,
            **dict(zip(PHASES, phases, strict=True)),
        }


class MetricsLog:
    """Rank 0's metrics: <run>/metrics.jsonl (the driver tails it for progress) and TensorBoard events.

    With the run directory in cloud storage they are written to a local directory and uploaded as they grow
    (at most every SYNC_S seconds, and at once on events such as a checkpoint or the end); a resumed rank 0
    first downloads what an earlier one wrote, so the file keeps the whole history."""

    SYNC_S = 1.0

    def __init__(self, run_dir: str):
        from rayft.training import storage

        self.run_dir, self.remote = run_dir, storage.is_remote(run_dir)
        self.local = tempfile.mkdtemp(prefix="rayft-metrics-") if self.remote else run_dir
        os.makedirs(self.local, exist_ok=True)
        self.path = os.path.join(self.local, METRICS_FILE)
        if self.remote and storage.exists(storage.join(run_dir, METRICS_FILE)):
            storage.download(storage.join(run_dir, METRICS_FILE), self.path)
        self.synced = 0.0
        try:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(os.path.join(self.local, "tensorboard"))
        except ImportError:  # pragma: no cover - tensorboardX ships with ray[tune]
            self.tb = None

    def event(self, record: dict) -> None:
        self._append(record)
        self.sync(force=True)

    def write(self, metrics: dict) -> None:
        self._append(metrics)
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and k not in ("step", "epoch"):
                    self.tb.add_scalar(("eval/" if k.startswith("eval_") else "train/") + k, v, metrics["step"])
            self.tb.flush()
        self.sync()

    def _append(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"time": time.time(), **record}) + "\n")

    def sync(self, force: bool = False) -> None:
        """Upload the metrics and TensorBoard events (cloud run directories only)."""
        if not self.remote or (not force and time.time() - self.synced < self.SYNC_S):
            return
        from rayft.training import storage

        storage.upload(self.path, storage.join(self.run_dir, METRICS_FILE))
        if os.path.isdir(os.path.join(self.local, "tensorboard")):
            storage.upload(os.path.join(self.local, "tensorboard"), storage.join(self.run_dir, "tensorboard"))
        self.synced = time.time()


class NullLog:
    def event(self, record: dict) -> None:
        pass

    def write(self, metrics: dict) -> None:
        pass

    def sync(self, force: bool = False) -> None:
        pass
