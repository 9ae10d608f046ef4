"""Checkpoint files: every rank saves its DeepSpeed shard (under the DS_TAG folder) and its data position
(run_dir.STATE_FILE), and reads them back on resume; in cloud storage a rank downloads only what it reads."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile

from rayft.training.run_dir import STATE_FILE

DS_TAG = "ds"


def report_with_checkpoint(engine, metrics: dict, step: int, epoch: int, consumed: set, rank: int, lora: bool):
    """Every rank saves its DeepSpeed shard plus its data position, then reports it."""
    import ray.train

    with tempfile.TemporaryDirectory(prefix="rayft-ckpt-") as tmp:
        # LoRA runs leave the frozen base weights out: the base is read from model.name on resume.
        engine.save_checkpoint(tmp, tag=DS_TAG, exclude_frozen_parameters=lora)
        with open(os.path.join(tmp, STATE_FILE.format(rank=rank)), "w") as f:
            json.dump({"step": step, "epoch": epoch, "consumed": sorted(consumed)}, f)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


@contextlib.contextmanager
def checkpoint_files(checkpoint, run_dir: str, rank: int, world: int):
    """This rank's local view of a checkpoint to resume from. On a local or shared filesystem, the directory
    itself. In cloud storage, a download of what this rank reads: the model states, every rank's data
    position and its own ZeRO partition, not the other ranks' (each is 1/world of the optimizer states;
    all of them are fetched only when the number of ranks changed)."""
    from rayft.training import storage

    if not storage.is_remote(run_dir):
        with checkpoint.as_directory() as local:
            yield local
        return
    uri = storage.join(run_dir, storage.basename(checkpoint.path))
    saved = storage.glob(storage.join(uri, DS_TAG), "*zero_pp_rank_*_mp_rank_*_optim_states.pt")
    skip: tuple[str, ...] = ()
    if len(saved) == world:
        skip = tuple(f"{DS_TAG}/*zero_pp_rank_{k}_mp_rank_*" for k in range(world) if k != rank)
    with storage.local_copy(uri, skip=skip) as local:
        yield local


def load_checkpoint(engine, ckpt_dir: str, lora: bool) -> tuple[int, int, set]:
    """Restore engine (weights, optimizer, scheduler) and the data position; returns (step, epoch, consumed)."""
    import glob

    engine.load_checkpoint(ckpt_dir, tag=DS_TAG, load_module_strict=not lora)
    step, epoch, consumed = 0, 0, set()
    for path in sorted(glob.glob(os.path.join(ckpt_dir, STATE_FILE.format(rank="*")))):
        with open(path) as f:
            state = json.load(f)
        step, epoch = state["step"], state["epoch"]
        consumed.update(state["consumed"])  # every rank's rows: shards may be dealt differently now
    return step, epoch, consumed


def resume(engine, run_dir: str, rank: int, world: int, lora: bool) -> tuple[int, int, set]:
    """Where this worker starts, (step, epoch, consumed): from the checkpoint Ray Train hands a restarted or
    resumed run (restored into the engine), else (0, 0, set())."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if not checkpoint:
        return 0, 0, set()
    with checkpoint_files(checkpoint, run_dir, rank, world) as ckpt_dir:
        return load_checkpoint(engine, ckpt_dir, lora=lora)
