"""Export a training checkpoint as Hugging Face model directories.

LoRA: final/adapter/ (adapter_model.safetensors + adapter_config.json) and, with export.merge,
the merged model in final/. Full finetunes: the model in final/. Always with the tokenizer and
chat template, so `AutoModelForCausalLM.from_pretrained(final)` (and vLLM) load it as-is.
Works offline from any kept checkpoint: DeepSpeed's ZeRO shards are consolidated on the CPU. A full
finetune is converted weight by weight into sharded safetensors (export.max_shard_gb), so the exporting
process holds about one weight at a time; a LoRA run holds the base once, in the exported dtype.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import shutil
import tempfile
from typing import TYPE_CHECKING

from rayft.training import storage
from rayft.training.checkpoints import DS_TAG
from rayft.training.run_dir import ADAPTER_DIR, FINAL_DIR, RunDir, checkpoint_step

if TYPE_CHECKING:
    from rayft.training.config import TrainJob


class ExportError(Exception):
    """A checkpoint that cannot be exported; the message says why."""


def consolidated_state_dict(ckpt_dir: str, zero_stage: int, lora: bool) -> dict | None:
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
    with warnings.catch_warnings(), storage.local_copy(ckpt_dir, skip=checkpoint_files_not_read(job)) as local_ckpt:
        warnings.simplefilter("ignore", FutureWarning)  # deprecation notices from peft/transformers internals
        if not storage.is_remote(out_dir):
            return _export(local_ckpt, job, out_dir, source)
        with tempfile.TemporaryDirectory(prefix="rayft-export-") as tmp:
            _export(local_ckpt, job, os.path.join(tmp, FINAL_DIR), source)
            storage.remove(out_dir)
            storage.upload(os.path.join(tmp, FINAL_DIR), out_dir)
    return out_dir


def export_dtype(job: TrainJob):
    """(torch dtype, its name) the export writes: export.dtype, or the precision the run trained in."""
    import torch

    from rayft.training.ds_config import resolve_precision

    precision = job.export.dtype if job.export.dtype != "auto" else resolve_precision(job.training, job.scaling.use_gpu)
    names = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "float16": "float16"}
    name = names.get(precision, "float32")
    return getattr(torch, name), name


def checkpoint_files_not_read(job: TrainJob) -> tuple[str, ...]:
    """Glob patterns of checkpoint files the export does not read (skipped when downloading one): a full
    finetune under ZeRO-1/2 whose saved weights are as precise as the export needs no optimizer files."""
    from rayft.training.ds_config import resolve_precision
    from rayft.training.zero_weights import OPTIM_FILES, module_is_exact

    t = job.training
    if t.method == "full" and 1 <= t.zero_stage <= 2:
        if module_is_exact(resolve_precision(t, job.scaling.use_gpu), export_dtype(job)[1]):
            return (f"{DS_TAG}/{OPTIM_FILES}",)
    return ()


def _export(ckpt_dir: str, job: TrainJob, out_dir: str, source: str) -> str:
    from rayft.training.models import load_tokenizer

    dtype, dtype_name = export_dtype(job)
    tmp = out_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    if job.training.method == "lora":
        _export_lora(ckpt_dir, job, tmp, dtype)
    else:
        _export_full(ckpt_dir, job, tmp, dtype, dtype_name)
    load_tokenizer(job.model.name, job.model.revision).save_pretrained(tmp)
    if job.training.method == "lora" and job.export.merge:
        load_tokenizer(job.model.name, job.model.revision).save_pretrained(os.path.join(tmp, ADAPTER_DIR))
    info = {
        "base_model": job.model.name,
        "base_revision": job.model.revision,  # an adapter is merged into, and served over, this exact base
        "method": job.training.method,
        "merged": bool(job.training.method == "lora" and job.export.merge),
        "checkpoint": source,
        "step": checkpoint_step(ckpt_dir),
        "dtype": dtype_name,
    }
    with open(os.path.join(tmp, "rayft_export.json"), "w") as f:
        json.dump(info, f, indent=2)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return out_dir


def _export_lora(ckpt_dir: str, job: TrainJob, out: str, dtype) -> None:
    """The adapter (and with export.merge the merged model): the base loads in the exported dtype, the
    trained adapter weights are copied in, and LoRA merges in the model's dtype."""
    from transformers import AutoModelForCausalLM

    from rayft.training.model_setup import apply_lora
    from rayft.training.models import resolve_model

    with contextlib.redirect_stdout(io.StringIO()):  # DeepSpeed's consolidation prints progress lines
        state = consolidated_state_dict(ckpt_dir, job.training.zero_stage, lora=True)
    if not state:
        raise ExportError(f"{ckpt_dir}: the checkpoint holds no weights")
    model = AutoModelForCausalLM.from_pretrained(
        resolve_model(job.model.name),
        dtype=dtype,
        trust_remote_code=job.model.trust_remote_code,
        revision=job.model.revision,
    )
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
    model.save_pretrained(os.path.join(out, ADAPTER_DIR) if job.export.merge else out)
    if job.export.merge:
        merged = model.merge_and_unload()  # PEFT types it as an nn.Module: the transformers model it is
        merged.to(dtype).save_pretrained(out)  # pyright: ignore[reportCallIssue]


def _export_full(ckpt_dir: str, job: TrainJob, out: str, dtype, dtype_name: str) -> None:
    """A full finetune, converted weight by weight: each is assembled from the checkpoint's partitions, cast
    to the export dtype and streamed into its safetensors shard. The model itself is never built: the
    exporting process holds about one weight at a time, whatever the model's size."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    from rayft.training.ds_config import resolve_precision
    from rayft.training.models import resolve_model
    from rayft.training.zero_weights import CheckpointWeights, module_is_exact

    base = resolve_model(job.model.name)
    remote_code = {"trust_remote_code": job.model.trust_remote_code, "revision": job.model.revision}
    config = AutoConfig.from_pretrained(base, **remote_code)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=job.model.trust_remote_code)
    every = skeleton.state_dict(keep_vars=True)
    expected, dtypes, seen = {}, {}, set()
    for name, value in every.items():
        if id(value) in seen:  # a tied alias (lm_head = embed_tokens) is saved once, as save_pretrained does
            continue
        seen.add(id(value))
        expected[name] = value.shape
        dtypes[name] = dtype if value.is_floating_point() else value.dtype
    exact = module_is_exact(resolve_precision(job.training, job.scaling.use_gpu), dtype_name)
    try:
        weights = CheckpointWeights(ckpt_dir, job.training.zero_stage, masters=not exact)
    except (FileNotFoundError, KeyError) as e:
        raise ExportError(f"{ckpt_dir}: not a complete DeepSpeed checkpoint ({e})") from None
    saved = weights.names()
    lacking = [n for n in expected if n not in saved]
    if lacking:
        raise ExportError(f"{ckpt_dir}: checkpoint lacks trained weights: {lacking[:5]}")
    unknown = [n for n in saved if n not in every]
    if unknown:
        raise ExportError(f"{ckpt_dir}: checkpoint weights the model does not have: {unknown[:5]}")
    wrong = [f"{n} {tuple(saved[n])} != {tuple(s)}" for n, s in expected.items() if tuple(saved[n]) != tuple(s)]
    if wrong:
        raise ExportError(f"{ckpt_dir}: checkpoint weights of another shape than {base}'s: {wrong[:3]}")

    write_safetensors(out, expected, dtypes, weights.tensor, int(job.export.max_shard_gb * 1e9))
    config.dtype = dtype
    config.save_pretrained(out)
    with contextlib.suppress(OSError):
        GenerationConfig.from_pretrained(base, revision=job.model.revision or "main").save_pretrained(out)
    if job.model.trust_remote_code:  # the model's own code travels with it, as save_pretrained does
        for f in os.listdir(base):
            if f.endswith(".py"):
                shutil.copy2(os.path.join(base, f), out)


SAFETENSORS_DTYPES = {
    "float32": "F32",
    "bfloat16": "BF16",
    "float16": "F16",
    "int64": "I64",
    "int32": "I32",
    "bool": "BOOL",
    "uint8": "U8",
    "int8": "I8",
    "float64": "F64",
}


def write_safetensors(out: str, shapes: dict, dtypes: dict, tensor, max_shard_bytes: int) -> list[str]:
    """Write the tensors named in `shapes` (in that order) as safetensors files under `out`, each at most
    max_shard_bytes (one larger tensor gets a file of its own), fetching each with tensor(name) only while
    its bytes are written. One file is model.safetensors; more are model-0000k-of-0000n.safetensors with
    model.safetensors.index.json, the layout from_pretrained, the hub and vLLM read. Returns the file names."""
    import struct

    import torch

    size = {n: math.prod(s) * torch.empty((), dtype=dtypes[n]).element_size() for n, s in shapes.items()}
    shards: list[list[str]] = [[]]
    used = 0
    for name in shapes:
        if shards[-1] and used + size[name] > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += size[name]
    files = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    )
    for file, names in zip(files, shards, strict=True):
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        for n in names:
            header[n] = {
                "dtype": SAFETENSORS_DTYPES[str(dtypes[n]).removeprefix("torch.")],
                "shape": list(shapes[n]),
                "data_offsets": [offset, offset + size[n]],
            }
            offset += size[n]
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
        with open(os.path.join(out, file), "wb") as f:
            f.write(struct.pack("<Q", len(text)))
            f.write(text)
            for n in names:
                t = tensor(n).to(dtypes[n]).contiguous().reshape(-1)
                f.write(memoryview(t.view(torch.uint8).numpy()))
                del t
    if len(files) > 1:
        index = {"metadata": {"total_size": sum(size.values())}, "weight_map": {}}
        for file, names in zip(files, shards, strict=True):
            index["weight_map"].update(dict.fromkeys(names, file))
        with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f, indent=2)
    return files


def committed_checkpoints(run_dir: str) -> list[dict] | None:
    """RunDir.committed_checkpoints: Ray Train's record of the checkpoints it registered, None before it has one."""
    return RunDir(run_dir).committed_checkpoints()


def list_checkpoints(run_dir: str) -> list[tuple[int | None, str]]:
    """RunDir.checkpoints: (step, path) of every complete checkpoint kept in a run directory, oldest first."""
    return RunDir(run_dir).checkpoints()
