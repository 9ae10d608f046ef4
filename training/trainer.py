"""The `rayft train` driver: checks, datasets, the TorchTrainer, progress, export and plots."""

from __future__ import annotations

import io
import json
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rayft.training import storage
from rayft.training.data import DataError, build_datasets, check_rows
from rayft.training.run_dir import JOB_FILE, RunDir, curve, read_metrics

__all__ = ["JOB_FILE", "curve", "read_metrics"]  # their home is rayft.training.run_dir; many callers import them here

if TYPE_CHECKING:
    from rayft.training.config import TrainJob

DATA_CPU_HEADROOM = 0.5  # logical CPUs left free beside the workers so Ray Data stages can always run


class TrainError(Exception):
    """A run that cannot start or did not finish; the message says what to do."""

    error_kind = "training"  # what `rayft` calls it ("training error ..."); rayft.training.run_dir.user_error


@dataclass
class TrainResult:
    run_dir: str
    steps: int
    final_dir: str | None
    metrics: dict
    checkpoint_path: str | None


def required_cpus(job: TrainJob) -> float:
    return job.scaling.num_workers * job.scaling.cpus_per_worker + DATA_CPU_HEADROOM


def check_cluster(job: TrainJob, can_grow: bool = False) -> str | None:
    """Refuse, before waiting forever, a run that the cluster cannot place. On a cluster that can grow
    (one joined by address, which may autoscale) a shortfall is returned as a warning instead."""
    import ray

    total = ray.cluster_resources()
    s = job.scaling
    problems = []
    if s.placement_strategy == "STRICT_SPREAD":
        nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
        if nodes < s.num_workers:
            problems.append(
                f"scaling.placement_strategy STRICT_SPREAD puts each of the {s.num_workers} workers on its own "
                f"node, but the cluster has {nodes}; add nodes or use SPREAD"
            )
    need_cpu = required_cpus(job)
    if total.get("CPU", 0) < need_cpu:
        problems.append(
            f"{s.num_workers} workers x {s.cpus_per_worker} CPUs + {DATA_CPU_HEADROOM} for data = {need_cpu:g} CPUs, "
            f"but the cluster has {total.get('CPU', 0):g}; lower scaling.num_workers or scaling.cpus_per_worker"
        )
    if s.use_gpu and total.get("GPU", 0) < s.num_workers * s.gpus_per_worker:
        problems.append(
            f"{s.num_workers} workers x {s.gpus_per_worker} GPUs needed, the cluster has {total.get('GPU', 0):g}; "
            "lower scaling.num_workers or set scaling.use_gpu: false"
        )
    for name, amount in s.resources_per_worker.items():
        if total.get(name, 0) < amount * s.num_workers:
            problems.append(
                f"resource {name!r}: {amount * s.num_workers:g} needed, the cluster has {total.get(name, 0):g}"
            )
    if not problems:
        return None
    if can_grow:
        return "the cluster is short of resources for now; the run waits for them:\n  " + "\n  ".join(problems)
    raise TrainError("the cluster cannot fit this run:\n  " + "\n  ".join(problems))


def prepare_run_dir(job: TrainJob, restart: bool) -> bool:
    """Create the run dir (local, NFS or cloud); with restart, move an earlier run aside. Returns True when
    resuming."""
    run_dir = job.run_dir
    try:
        existed = bool(storage.listdir(run_dir))
        if existed and restart:
            storage.move_aside(run_dir, f"{run_dir.rstrip('/')}.prev-{time.strftime('%Y%m%d-%H%M%S')}")
            existed = False
        existed = existed and RunDir(run_dir).has_run()
        storage.makedirs(run_dir)
        probe = storage.join(run_dir, ".write-test")
        storage.write_text(probe, "ok")
        storage.remove(probe)
    except OSError as e:
        raise TrainError(
            f"cannot write to the run directory {run_dir}: {e.strerror or e}; set run.storage_path to a writable place"
        ) from None
    except storage.StorageError as e:
        raise TrainError(f"{e}; set run.storage_path to a place this machine can write") from None
    return existed


def job_record(job: TrainJob) -> dict:
    """What a run keeps and logs of its job: the training job's own sections (model, data, training, scaling, run,
    export, eval), never the sections of the job file that other commands read (sweep, serve, submit with its
    env_vars), with every credential shown as *** (rayft.training.redact)."""
    from rayft.training.config import TrainJob
    from rayft.training.redact import redacted

    return redacted(job.model_dump(mode="json", include=set(TrainJob.model_fields)))


def save_job(job: TrainJob) -> None:
    """The resolved job file (job_record), kept with the run: `rayft export` and a later resume read it."""
    import yaml

    text = yaml.safe_dump(job_record(job), sort_keys=False)
    head = "# The resolved job file of this run (written by rayft train).\n"
    storage.write_text(RunDir(job.run_dir).job_file, head + text)


def read_again(job: TrainJob, split: str, rows: int) -> bool:
    """Whether the run reads `split` more than once, so that tokenizing it once up front (data.cache_max_mb)
    saves work: training past one epoch (an epoch-based run also counts its rows first), or evaluating
    more than once. A run that stops within its first epoch streams, tokenizing only what it trains on."""
    t = job.training
    if split == "train":
        return not t.max_steps or t.max_steps * t.global_batch_size > rows
    if not t.eval_every_steps:
        return False  # evaluated once at most, at the end
    return not t.max_steps or t.max_steps // t.eval_every_steps + int(t.eval_at_end) > 1


def count_steps(job: TrainJob, train_rows: int) -> int:
    t = job.training
    if t.max_steps:
        return t.max_steps
    return max(1, math.floor(t.epochs * train_rows / t.global_batch_size))


def run_training(
    job: TrainJob,
    restart: bool = False,
    on_event: Callable[[dict], None] | None = None,
    callbacks: list | None = None,
    cluster_can_grow: bool = False,
    tracking_parent: str | None = None,
    tracking_params: dict | None = None,
) -> TrainResult:
    """Run one finetune to the end (or resume it) and export <run>/final/. Ray must be connected.
    `callbacks` are Ray Train callbacks (a sweep's trial passes the one that reports to Tune).
    `cluster_can_grow`: a cluster joined by address may autoscale, so a resource shortfall waits.
    With run.tracking set, the run is tracked (rayft.training.tracking); a sweep's trial passes its sweep's
    directory as `tracking_parent` and its searched values as `tracking_params`.
    The run's outcome is kept in <run>/status.json (rayft.training.run_dir): "running" once the run dir is
    prepared, "succeeded" at the end, "failed" with the kind of error and its message when anything ends it."""
    # The run dir first (a dir that cannot be written fails here, with nowhere to say so), so that every check
    # after it (the cluster, the model, the data) leaves its verdict in status.json: a caller that sees only the
    # driver's exit (the fine-tuning API) reads there why it ended.
    resuming = prepare_run_dir(job, restart)
    run = RunDir(job.run_dir)
    tracked: list = []  # the run's Tracker once open, until the run ends
    try:
        run.write_status("running")
        result = _run_training(
            job, resuming, on_event, callbacks, cluster_can_grow, tracking_parent, tracking_params, tracked
        )
        run.write_status("succeeded")
        return result
    except BaseException as e:
        for tracker in tracked:
            tracker.fail(e)
        run.record_failure(e)
        raise


def open_tracker(job: TrainJob, parent: str | None = None, params: dict | None = None, resuming: bool = False):
    """The run's Tracker (None when run.tracking tracks nothing): the tracked run started or resumed, the job
    (job_record) and `params` logged as params, and on a resume the steps logged that no earlier driver logged."""
    from rayft.training.tracking import Tracker

    tracking = job.run.tracking
    if not tracking.enabled:
        return None
    tags = {"rayft.objective": job.training.objective, "rayft.method": job.training.method}
    everything = job_record(job) | ({"trial": params} if params else {})
    tracker = Tracker.open(tracking, job.run_dir, job.run.name, everything, parent_dir=parent, tags=tags)
    if tracker and resuming:
        tracker.catch_up(read_metrics(job.run_dir))
    return tracker


def _run_training(job, resuming, on_event, callbacks, cluster_can_grow, tracking_parent, tracking_params, tracked):
    import ray.train
    from ray.train.torch import TorchTrainer

    from rayft.training.config import LoopConfig
    from rayft.training.export import export_checkpoint
    from rayft.training.loop import train_loop
    from rayft.training.models import resolve_model
    from rayft.training.rewards import reward_sources

    run = RunDir(job.run_dir)
    warning = check_cluster(job, can_grow=cluster_can_grow)
    if warning and on_event:
        on_event({"event": "warning", "message": warning})
    resolve_model(job.model.name)  # a bad model reference fails here, not in every worker; converts the built-in once
    checks = check_rows(job.data)
    save_job(job)
    tracker = open_tracker(job, tracking_parent, tracking_params, resuming)
    if tracker:
        tracked.append(tracker)
    counts = {s: c.rows for s, c in checks.items()}
    again = frozenset(s for s, n in counts.items() if read_again(job, s, n))
    objective = job.training.objective
    datasets = build_datasets(job.model, job.data, counts, again, pairs=objective == "dpo", prompts=objective == "grpo")
    train_rows = 0 if job.training.max_steps else datasets["train"].count()
    total_steps = count_steps(job, train_rows)
    if not job.training.max_steps and train_rows < job.training.global_batch_size:
        raise DataError(
            f"data.train gives {train_rows} training rows, fewer than one global batch "
            f"({job.training.global_batch_size}); add data or lower training.global_batch_size"
        )
    loop_cfg = LoopConfig(
        model=job.model,
        data=job.data,
        training=job.training,
        grad_accum=job.grad_accum,
        total_steps=total_steps,
        has_eval="eval" in datasets,
        use_gpu=job.scaling.use_gpu,
        run_dir=job.run_dir,
        reward_sources=reward_sources(job.training.rl) if job.training.rl else {},
    )
    s = job.scaling
    resources = {"CPU": s.cpus_per_worker, **s.resources_per_worker}
    if s.use_gpu:
        resources["GPU"] = s.gpus_per_worker
    # keep the best checkpoints by eval loss, when every checkpoint carries one (the final one needs eval_at_end)
    scored = "eval" in datasets and job.training.eval_at_end
    best = ("eval_reward", "max") if objective == "grpo" else ("eval_loss", "min")
    score: dict[str, Any] = {"checkpoint_score_attribute": best[0], "checkpoint_score_order": best[1]} if scored else {}
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=loop_cfg.model_dump(mode="json"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=s.num_workers,
            use_gpu=s.use_gpu,
            resources_per_worker=resources,
            placement_strategy=s.placement_strategy,
        ),
        run_config=ray.train.RunConfig(
            name=job.run.name,
            storage_path=job.run.storage_path,
            failure_config=ray.train.FailureConfig(max_failures=job.run.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=job.run.checkpoints_to_keep, **score),
            callbacks=callbacks,
        ),
        datasets=datasets,
    )
    if on_event:
        on_event({"event": "planned", "total_steps": total_steps, "train_rows": train_rows, "resuming": resuming})

    def on_record(record: dict) -> None:
        if tracker:
            tracker.log_record(record)
        if on_event:
            on_event(record)

    tail = MetricsTail(run.metrics_file, on_record) if on_event or tracker else None
    try:
        result = trainer.fit()
    except Exception as e:  # Ray wraps worker errors; surface the worker's message
        raise TrainError(f"training failed: {_root_message(e)}") from e
    finally:
        if tail:
            tail.stop()
    if result.error:
        raise TrainError(f"training failed: {_root_message(result.error)}")
    metrics = dict(result.metrics or {})
    ckpt = result.checkpoint
    final_dir = run.final
    ckpt_path = storage.join(job.run_dir, storage.basename(ckpt.path)) if ckpt is not None else None
    if ckpt_path is not None:
        export_checkpoint(ckpt_path, job, final_dir)
    plot_losses(job.run_dir)
    if tracker:
        tracked.clear()
        tracker.log_artifact(run.loss_plot)
        tracker.log_artifact(run.job_file)  # save_job's, credentials hidden
        if ckpt is not None:
            tracker.set_tags({"rayft.final_dir": final_dir})
            if job.run.tracking.log_model:
                tracker.log_artifact(final_dir, "model")
        tracker.finish("FINISHED")
    return TrainResult(
        job.run_dir, int(metrics.get("step", total_steps)), final_dir if ckpt else None, metrics, ckpt_path
    )


def _root_message(e: BaseException) -> str:
    seen = 0
    while seen < 10 and (inner := e.__cause__ or getattr(e, "cause", None)):
        e = inner
        seen += 1
    return f"{type(e).__name__}: {e}".strip()[:4000]


class MetricsTail:
    """Follows <run>/metrics.jsonl (written by rank 0, local or in cloud storage) in a thread and hands each
    record to a callback."""

    def __init__(self, path: str, callback: Callable[[dict], None], interval_s: float | None = None):
        self.path, self.callback = path, callback
        self.interval_s = interval_s or (2.0 if storage.is_remote(path) else 0.5)
        self.offset = len(self._read())
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _read(self) -> bytes:
        try:
            return storage.read_bytes(self.path)
        except (FileNotFoundError, storage.StorageError):
            return b""

    def _run(self) -> None:
        while not self._stop.is_set():
            self._poll()
            self._stop.wait(self.interval_s)
        self._poll()

    def _poll(self) -> None:
        chunk = self._read()[self.offset :]
        complete = chunk[: chunk.rfind(b"\n") + 1]
        self.offset += len(complete)
        for line in complete.decode().splitlines():
            try:
                self.callback(json.loads(line))
            except (ValueError, KeyError):
                continue

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(timeout=10)


def plot_losses(run_dir: str) -> str | None:
    """<run>/loss.png: train loss per step and eval loss where it was measured."""
    run = RunDir(run_dir)
    records = run.metrics()
    train, evals = curve(records, "loss"), curve(records, "eval_loss")
    if not train:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([s for s, _ in train], [v for _, v in train], label="train loss", linewidth=1)
    if evals:
        ax.plot([s for s, _ in evals], [v for _, v in evals], "o-", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(storage.basename(run_dir))
    ax.grid(alpha=0.3)
    ax.legend()
    out = run.loss_plot
    fig.tight_layout()
    image = io.BytesIO()
    fig.savefig(image, format="png", dpi=110)
    plt.close(fig)
    storage.write_bytes(out, image.getvalue())
    return out
