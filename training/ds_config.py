"""The DeepSpeed config generated from the job file (plus the `training.ds_config` passthrough)."""

from __future__ import annotations

import copy
from typing import Any

from rayft.training.config import TrainingConfig


def resolve_precision(training: TrainingConfig, use_gpu: bool) -> str:
    """bf16 on GPU and fp32 on CPU unless the job file says otherwise; "fast": bf16 on GPU and on a CPU with
    native bf16, else fp32. Resolved where it runs (each worker, the exporting driver)."""
    if training.precision == "fast":
        from rayft.training.models import cpu_has_native_bf16

        return "bf16" if use_gpu or cpu_has_native_bf16() else "fp32"
    if training.precision != "auto":
        return training.precision
    return "bf16" if use_gpu else "fp32"


def build_ds_config(training: TrainingConfig, micro_batch_size: int, grad_accum: int, use_gpu: bool) -> dict:
    precision = resolve_precision(training, use_gpu)
    zero: dict[str, Any] = {"stage": training.zero_stage}
    if training.zero_stage >= 1:
        zero.update(overlap_comm=use_gpu, contiguous_gradients=True, reduce_bucket_size=50_000_000)
    if training.zero_stage == 3:
        # Exports and evaluations need whole weights; gather them layer by layer on save.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
        if not use_gpu and training.method == "full":
            # Prefetching overlaps the next layers' gathers with compute on a GPU's side stream; on CPU there
            # is nothing to overlap it with, and once the parameter trace is complete (from the second step
            # on) it keeps ~90% of the gathered weights live from the forward into the backward (measured on
            # a 0.5B model, 2 ranks): every rank then holds about a whole copy of the model. Without it, and
            # with no reuse window, each layer's weights are released right after use and gathered again in
            # the backward, as on the first step. (LoRA keeps DeepSpeed's defaults: with them off, a resumed
            # LoRA run failed DeepSpeed's check that each step fetches parameters in the traced order.)
            zero.update(stage3_prefetch_bucket_size=0, stage3_max_reuse_distance=0)
    if training.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": use_gpu}
    if training.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": use_gpu}
    optimizer: dict[str, Any] = {
        "lr": training.lr,
        "betas": [0.9, 0.999],
        "eps": 1e-8,
        "weight_decay": training.weight_decay,
    }
    if not training.offload_optimizer:
        # PyTorch's fused AdamW (CUDA and CPU kernels). DeepSpeed's own FusedAdam is compiled with nvcc on a GPU
        # node's first run: a minute or more of start-up, and a failure on GPU nodes without the CUDA toolkit;
        # on CPU it is a C++ op whose loading probes the CPU in two subprocesses (~2 s per worker per run).
        # An offloaded optimizer keeps DeepSpeed's CPU Adam.
        optimizer |= {"torch_adam": True, "fused": True}
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": training.grad_clip,
        "zero_optimization": zero,
        "optimizer": {"type": "AdamW", "params": optimizer},
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "steps_per_print": 10**9,  # rayft reports progress itself
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
    }
    return deep_merge(config, training.ds_config)


def deep_merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in override.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def lr_lambda(step: int, total_steps: int, warmup_ratio: float, schedule: str) -> float:
    """Multiplier of the peak lr at an optimizer step: linear warm-up, then cosine/linear decay to 10%."""
    import math

    warmup = int(round(total_steps * warmup_ratio))
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    if schedule == "linear":
        return 1.0 - 0.9 * progress
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))
