"""ZeRO-3 partitions the model as it loads: right after from_pretrained, and after the engine is built, each of
2 ranks holds about half of every parameter, never the whole model (real DeepSpeed, gloo, full and LoRA), and a
training step still runs on the partitioned model. Later steps keep it divided: on CPU a forward releases each
layer's gathered weights after use, also once DeepSpeed's parameter trace is complete."""

from __future__ import annotations

import pytest

from helpers import loop_config, run_ranks


def _load_and_step(rank: int, world: int, model_dir: str, method: str) -> dict:
    import numpy as np
    import torch
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    from rayft.training.config import TrainingConfig
    from rayft.training.model_setup import build_engine, build_model
    from rayft.training.objectives import Sft, StepContext, forward
    from rayft.training.step_metrics import StepClock

    training = TrainingConfig(
        method=method,
        zero_stage=3,
        lr=1e-3,
        micro_batch_size=1,
        global_batch_size=world,
        # the tiny model's weights are all below DeepSpeed's 1e5-element threshold for always-gathered ones
        ds_config={"zero_optimization": {"stage3_param_persistence_threshold": 0}},
    )
    cfg = loop_config(model_dir, training)
    model = build_model(cfg)
    params = list(model.parameters())
    loaded = {
        "partitioned": all(hasattr(p, "ds_id") for p in params if not _is_lora(p, model)),
        "held": sum(p.numel() for p in params if not _is_lora(p, model)),  # the placeholders are empty
        "local": sum(p.ds_tensor.numel() for p in params if hasattr(p, "ds_tensor")),
        "total": sum(p.ds_numel for p in params if hasattr(p, "ds_numel")),
    }
    engine = build_engine(model, cfg)
    built = engine.module.parameters()
    after = {"local": 0, "total": 0, "all_partitioned": True}
    for p in built:
        after["all_partitioned"] &= hasattr(p, "ds_tensor")
        after["local"] += p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel()
        after["total"] += p.ds_numel if hasattr(p, "ds_numel") else p.numel()
    rng = np.random.default_rng(rank)
    ids = rng.integers(5, 1000, size=24)
    row = {"input_ids": ids, "labels": np.where(np.arange(24) >= 12, ids, -100)}
    cpu = torch.device("cpu")
    ctx = StepContext(engine=engine, device=cpu, pad_id=0, world=world, grad_accum=1, clock=StepClock(cpu))
    first = Sft(cfg).step(ctx, [([row], [])])
    Sft(cfg).step(ctx, [([row], [])])  # the trace is complete after step 1
    loss_sum, _ = forward(engine, [row], cpu, 0)
    gathered = sum(p.ds_numel for p in engine.module.parameters() if p.ds_status == ZeroParamStatus.AVAILABLE)
    engine.backward(loss_sum)
    engine.step()
    return {
        "loaded": loaded,
        "built": after,
        "loss": first.loss_sum / first.loss_count,
        "gathered_after_forward": gathered / after["total"],
    }


def _is_lora(p, model) -> bool:
    return any(p is q for n, q in model.named_parameters() if "lora_" in n)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_zero3_partitions_the_weights_as_they_load(tiny_model_dir, method):
    ranks = run_ranks(_load_and_step, 2, str(tiny_model_dir), method)
    for r in ranks:
        loaded, built = r["loaded"], r["built"]
        assert loaded["partitioned"] and loaded["held"] == 0  # from_pretrained left only empty placeholders
        assert loaded["total"] > 0 and 0.45 < loaded["local"] / loaded["total"] < 0.55  # about total / world
        assert built["all_partitioned"]  # the LoRA adapters too, once the engine is built
        assert 0.45 < built["local"] / built["total"] < 0.55
        assert 0 < r["loss"] < 20
        if method == "full":  # DeepSpeed's defaults (prefetching, a 1e9-element reuse window) kept them all gathered
            assert r["gathered_after_forward"] < 0.05
