"""The training loop: one function that every Ray Train worker runs, top to bottom.

setup (model, DeepSpeed engine, objective, resume state) -> loop (micro-batches from the Ray Data shard, the
objective's step, metrics, eval, checkpoint) -> final eval and checkpoint.
Every rank calls `ray.train.report` the same number of times; each passes its own checkpoint
files (DeepSpeed writes one file set per rank) and Ray merges them into one directory.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from rayft.training.checkpoints import report_with_checkpoint, resume
from rayft.training.config import LoopConfig
from rayft.training.grpo import Grpo
from rayft.training.model_setup import build_engine, build_model
from rayft.training.objectives import Objective, Sft, StepContext, all_ranks_have, micro_batches
from rayft.training.preference import Dpo
from rayft.training.rollout import sample_seed
from rayft.training.step_metrics import (
    MetricsLog,
    NullLog,
    StepAccumulator,
    StepClock,
    host_rss,
    memory_peaks,
    release_freed_memory,
    time_grad_sync,
)

# training.objective -> what the loop steps and evaluates, built once per worker as cls(cfg, engine)
OBJECTIVES: dict[str, Callable[[LoopConfig, Any], Objective]] = {"sft": Sft, "dpo": Dpo, "grpo": Grpo}


def train_loop(config: dict[str, Any]) -> None:
    """The Ray Train worker function (also runnable in a single process for debugging)."""
    import ray.train
    import torch
    import torch.distributed as dist

    cfg = LoopConfig.model_validate(config)
    t = cfg.training
    rank, world = ray.train.get_context().get_world_rank(), ray.train.get_context().get_world_size()
    torch.manual_seed(t.seed)
    np.random.seed(t.seed)
    device = torch.device("cuda", torch.cuda.current_device()) if cfg.use_gpu else torch.device("cpu")
    import deepspeed  # noqa: F401  (imported before the baseline below, as transformers and peft are)
    import peft  # noqa: F401
    import transformers  # noqa: F401

    host_start = host_rss()  # the worker process before any weight exists

    # ---- setup
    model = build_model(cfg)
    release_freed_memory()
    engine = build_engine(model, cfg)
    release_freed_memory()
    objective = OBJECTIVES[t.objective](cfg, engine)  # DPO builds its reference model here, GRPO its sampler
    step, epoch, consumed = resume(engine, cfg.run_dir, rank, world, lora=t.method == "lora")
    log = MetricsLog(cfg.run_dir) if rank == 0 else NullLog()
    start = {"event": "start", "step": step, "total_steps": cfg.total_steps, "workers": world, "resumed": step > 0}
    log.event(start | gather_workers(world))  # pids and nodes: so operators (and the failure tests) find each worker
    train_shard = ray.train.get_dataset_shard("train")
    eval_shard = ray.train.get_dataset_shard("eval") if cfg.has_eval else None

    # ---- loop
    ctx = StepContext(
        engine=engine,
        device=device,
        pad_id=model.config.pad_token_id if model.config.pad_token_id is not None else 0,
        world=world,
        grad_accum=cfg.grad_accum,
        clock=StepClock(device),
        # Host memory holds the training state: hand the heap's freed pages back at every optimizer step too.
        trim_heap=device.type == "cpu" or t.offload_optimizer or t.offload_params,
    )
    time_grad_sync(engine, ctx.clock)
    if eval_shard is not None and t.eval_at_start and step == 0:
        log.write({"step": 0, "epoch": 0} | objective.evaluate(ctx, eval_shard))  # the base model's figures
    acc = StepAccumulator()
    last_eval: dict = {}
    while step < cfg.total_steps:
        steps_this_epoch = 0
        resumed_mid_epoch = bool(consumed)
        batches = micro_batches(train_shard, t.micro_batch_size, skip=consumed)
        while step < cfg.total_steps:
            t_wait = time.perf_counter()
            group = list(itertools.islice(batches, cfg.grad_accum))
            wait_s = time.perf_counter() - t_wait
            if not all_ranks_have(len(group) == cfg.grad_accum, device):
                break  # some rank cannot fill another optimizer step: the epoch ends for everyone together
            # Dropout draws from torch's generator: seeded per step and rank, so a run resumed at a checkpoint
            # drops what the uninterrupted run dropped (a generator's state carried from step 1 is not saved).
            torch.manual_seed(sample_seed(t.seed, step + 1, rank))
            outcome = objective.step(ctx, group, step + 1)
            for rows, row_ids in group:
                consumed.update(row_ids)
                acc.add(rows, len(row_ids), one_row=objective.one_row)
            acc.finish(outcome.loss_sum, outcome.loss_count, wait_s, ctx.clock.take())
            step += 1
            steps_this_epoch += 1
            metrics = acc.reduce(device, world, host_start) | {
                "step": step,
                "epoch": epoch,
                "lr": engine.get_lr()[0],
                "grad_norm": _float(engine.get_global_grad_norm()),
            }
            metrics |= objective.outcome_metrics(outcome, device)  # DPO: loss per pair, reward accuracy, rewards
            is_last = step >= cfg.total_steps
            evaluated = eval_shard is not None and t.eval_every_steps and step % t.eval_every_steps == 0
            if evaluated and not is_last:
                last_eval = objective.evaluate(ctx, eval_shard)
                metrics |= last_eval
            log.write(metrics)
            if t.checkpoint_every_steps and step % t.checkpoint_every_steps == 0 and not is_last:
                log.sync(force=True)  # the bucket's history reaches this step before a resume can start from it
                report_with_checkpoint(engine, metrics | last_eval, step, epoch, consumed, rank, t.method == "lora")
            elif step % t.log_every_steps == 0 or (evaluated and not is_last):  # every eval reaches Train (and Tune)
                ray.train.report(metrics)
            acc = StepAccumulator()  # after eval and checkpoint, so step times are training only
        if step < cfg.total_steps:
            # A checkpoint taken in an epoch's last step resumes into an epoch with nothing left: it just ends.
            if steps_this_epoch == 0 and not resumed_mid_epoch:
                raise RuntimeError("the training data yields no optimizer step; check data.train and batch sizes")
            epoch, consumed = epoch + 1, set()
            log.event({"event": "epoch_end", "epoch": epoch, "step": step})

    # ---- final eval and checkpoint
    final = {"step": step, "epoch": epoch, "final": True}
    if eval_shard is not None and t.eval_at_end:
        final |= objective.evaluate(ctx, eval_shard)
        log.write(final)
    report_with_checkpoint(engine, final, step, epoch, consumed, rank, t.method == "lora")
    log.event({"event": "end", "step": step, **memory_peaks(device, host_start)})  # the final save included
    if dist.is_initialized():
        dist.barrier()


def gather_workers(world: int) -> dict[str, list]:
    """Each rank's process id ("pids") and Ray node id ("nodes"), in rank order."""
    import ray
    import torch.distributed as dist

    mine = (os.getpid(), ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local")
    everyone: list = [None] * world
    if dist.is_initialized():
        dist.all_gather_object(everyone, mine)
    else:
        everyone = [mine]
    return {"pids": [pid for pid, _ in everyone], "nodes": [node for _, node in everyone]}


def _float(x) -> float | None:
    if x is None:
        return None
    return float(x.item() if hasattr(x, "item") else x)
