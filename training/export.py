"""Export a training checkpoint as Hugging Face model directories.

LoRA: final/adapter/ (adapter_model.safetensors + adapter_config.json) and, with export.merge,
the merged model in final/. Full finetunes: the model in final/. Always with the tokenizer and
chat template, so `AutoModelForCausalLM.from_pretrained(final)` (and vLLM) load it as-is.
Works offline from any kept checkpoint: DeepSpeed's ZeRO shards are consolidated on the CPU.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tempfile
from typing import TYPE_CHECKING

from rayft.training import storage
from rayft.training.loop import DS_TAG, STATE_FILE

if TYPE_CHECKING:
    from rayft.training.config import TrainJob


class ExportError(Exception):
    """A checkpoint that cannot be exported; the message says why."""


def consolidated_state_dict(ckpt_dir: str, zero_stage: int, lora: bool) -> dict:
    """The weights of a DeepSpeed checkpoint (only the trained ones for LoRA). Under ZeRO the values are
    DeepSpeed's lazy tensors: each is assembled from the ranks' fp32 partitions only when it is copied into
    the model (load_weights), so the driver never holds a second, whole fp32 copy of the model."""
    import torch

    tag_dir = os.path.join(ckpt_dir, DS_TAG)
    if not os.path.isdir(tag_dir):
        raise ExportError(f"{ckpt_dir} is not a rayft checkpoint (no {DS_TAG}/ directory)")
    if zero_stage == 0:
        states = torch.load(os.path.join(tag_dir, "mp_rank_00_model_states.pt"), map_location="cpu", weights_only=False)
        return {k: v.float() for k, v in states["module"].items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(
        ckpt_dir, tag=DS_TAG, exclude_frozen_parameters=lora, lazy_mode=True
    )


def load_weights(model, state: dict) -> tuple[list[str], list[str]]:
    """Copy `state` into the model's own tensors one weight at a time (cast to the model's dtype), like
    load_state_dict(strict=False); returns (missing, unexpected) names."""
    import torch

    own = model.state_dict()
    unexpected = [k for k in state if k not in own]
    with torch.no_grad():
        for name, value in state.items():
            if name in own:
                tensor = value if isinstance(value, torch.Tensor) else value.contiguous()
                own[name].copy_(tensor.view(own[name].shape))
                del tensor
    return [k for k in own if k not in state], unexpected


def export_checkpoint(ckpt_dir: str, job: TrainJob, out_dir: str) -> str:
    """Write final/ (see module doc) from a checkpoint directory; returns out_dir."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the driver's console keeps to rayft's own lines
    source = ckpt_dir if storage.is_remote(ckpt_dir) else os.path.abspath(ckpt_dir)
    with warnings.catch_warnings(), storage.local_copy(ckpt_dir) as local_ckpt:
        warnings.simplefilter("ignore", FutureWarning)  # deprecation notices from peft/transformers internals
        if not storage.is_remote(out_dir):
            return _export(local_ckpt, job, out_dir, source)
        with tempfile.TemporaryDirectory(prefix="rayft-export-") as tmp:
            _export(local_ckpt, job, os.path.join(tmp, "final"), source)
            storage.remove(out_dir)
            storage.upload(os.path.join(tmp, "final"), out_dir)
    return out_dir


def _export(ckpt_dir: str, job: TrainJob, out_dir: str, source: str) -> str:
    import torch
    from transformers import AutoModelForCausalLM

    from rayft.training.ds_config import resolve_precision
    from rayft.training.loop import apply_lora
    from rayft.training.models import load_tokenizer, resolve_model

    lora = job.training.method == "lora"
    with contextlib.redirect_stdout(io.StringIO()):  # DeepSpeed's consolidation prints progress lines
        state = consolidated_state_dict(ckpt_dir, job.training.zero_stage, lora)
    if not state:
        raise ExportError(f"{ckpt_dir}: the checkpoint holds no weights")
    precision = job.export.dtype if job.export.dtype != "auto" else resolve_precision(job.training, job.scaling.use_gpu)
    dtype = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}.get(
        precision, torch.float32
    )
    # The base loads in the exported dtype: the trained weights are cast as they are copied in, and LoRA merges in
    # the model's dtype (PEFT keeps the adapter itself in fp32), so no fp32 copy of the whole model is made.
    base_path = resolve_model(job.model.name)
    model = AutoModelForCausalLM.from_pretrained(
        base_path, dtype=dtype, trust_remote_code=job.model.trust_remote_code, revision=job.model.revision
    )
    if lora:
        model = apply_lora(model, job.training)
        model.peft_config["default"].revision = job.model.revision  # PEFT's own record of the base's revision
    missing, unexpected = load_weights(model, state)
    del state
    if unexpected:
        raise ExportError(f"{ckpt_dir}: checkpoint weights the model does not have: {unexpected[:5]}")
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    not_loaded = sorted(trained & set(missing))
    if not_loaded:
        raise ExportError(f"{ckpt_dir}: checkpoint lacks trained weights: {not_loaded[:5]}")
    tokenizer = load_tokenizer(job.model.name, job.model.revision)
    tmp = out_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    if lora:
        adapter_dir = os.path.join(tmp, "adapter") if job.export.merge else tmp
        model.save_pretrained(adapter_dir)
        tokenizer.save_pretrained(adapter_dir)
        if job.export.merge:
            merged = model.merge_and_unload().to(dtype)
            merged.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    else:
        model.to(dtype).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    info = {
        "base_model": job.model.name,
        "base_revision": job.model.revision,  # an adapter is merged into, and served over, this exact base
        "method": job.training.method,
        "merged": bool(lora and job.export.merge),
        "checkpoint": source,
        "step": _checkpoint_step(ckpt_dir),
        "dtype": str(dtype).removeprefix("torch."),
    }
    with open(os.path.join(tmp, "rayft_export.json"), "w") as f:
        json.dump(info, f, indent=2)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return out_dir


def _checkpoint_step(ckpt_dir: str) -> int | None:
    for path in storage.glob(ckpt_dir, STATE_FILE.format(rank="*")):
        return json.loads(storage.read_text(path))["step"]
    return None


def committed_checkpoints(run_dir: str) -> list[dict] | None:
    """Ray Train's record of the checkpoints it registered (checkpoint_dir_name, metrics), from the run
    directory (local or cloud); None when the run has no such record yet."""
    try:
        snapshot = json.loads(storage.read_text(storage.join(run_dir, "checkpoint_manager_snapshot.json")))
        return [c for c in snapshot.get("checkpoint_results", []) if "checkpoint_dir_name" in c]
    except (FileNotFoundError, ValueError, AttributeError):
        return None


def list_checkpoints(run_dir: str) -> list[tuple[int | None, str]]:
    """(step, path) of every complete checkpoint kept in a run directory (local or cloud), oldest first.

    Complete: registered by Ray Train (its checkpoint_manager_snapshot.json), when the run has that record. A
    directory a killed worker left half-written is never offered for export."""
    results = committed_checkpoints(run_dir)
    committed = None if results is None else {c["checkpoint_dir_name"] for c in results}
    out = []
    for path in storage.glob(run_dir, "checkpoint_*"):
        if committed is not None and storage.basename(path) not in committed or not storage.is_dir(path):
            continue
        out.append((_checkpoint_step(path), path))
    return sorted(out, key=lambda x: (x[0] is None, x[0] or 0))
