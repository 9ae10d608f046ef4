"""The memory plan (`rayft train --dry-run`, rayft.training.memory_plan.estimate): exact parameter counts from the
model's config, the documented ZeRO arithmetic, advice that really lowers the estimate, and a dry run that starts
no Ray."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import yaml

from helpers import ROOT, chat, rayft_cli, write_jsonl
from rayft.training.config import TrainJob
from rayft.training.memory_plan import GIB, PlanError, estimate


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A 0.85B-parameter Llama described by its config.json alone: the plan never reads weights, so none exist."""
    from transformers import LlamaConfig

    out = tmp_path_factory.mktemp("llama-config")
    LlamaConfig(
        vocab_size=32000,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=16,
        num_attention_heads=16,
        num_key_value_heads=4,
        tie_word_embeddings=False,
    ).save_pretrained(out)
    return out


def job(model_dir, **sections) -> TrainJob:
    raw = {"model": {"name": str(model_dir)}, "data": {"train": "unused.jsonl"}}
    for key, value in sections.items():
        raw[key] = value
    return TrainJob.model_validate(raw)


def gpu_job(model_dir, workers: int = 1, training: dict | None = None, data: dict | None = None) -> TrainJob:
    t = {"method": "full", "micro_batch_size": 1, "global_batch_size": workers, **(training or {})}
    return job(model_dir, training=t, scaling={"num_workers": workers, "use_gpu": True}, data=data or {"train": "x"})


def plan_of(j: TrainJob, **kw):
    if j.scaling.use_gpu:
        kw.setdefault("gpu_memory_gib", 1000.0)
    kw.setdefault("host_memory_gib", 10_000.0)
    kw.setdefault("workers_per_node", j.scaling.num_workers)
    return estimate(j, **kw)


# --------------------------------------------------------------------------- parameter counts


@pytest.mark.filterwarnings("ignore::FutureWarning")  # peft reads a transformers property deprecated in v5
def test_parameter_counts_are_the_real_models(tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    from rayft.training.model_setup import apply_lora

    full = plan_of(job(tiny_model_dir, training={"method": "full"}))
    real = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    n = sum(p.numel() for p in real.parameters())  # the tied lm_head once
    assert full.params == n and full.trainable == n

    for lora in ({}, {"last_layers": 1, "r": 4}):
        j = job(tiny_model_dir, training={"method": "lora", "lora": lora})
        plan = plan_of(j)
        peft_model = apply_lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32), j.training)
        trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
        assert 0 < plan.trainable == trainable < n
        assert plan.params == sum(p.numel() for p in peft_model.parameters())
    assert plan_of(job(tiny_model_dir, training={"method": "lora", "lora": {"last_layers": 1}})).trainable < (
        plan_of(job(tiny_model_dir, training={"method": "lora"})).trainable
    )


# --------------------------------------------------------------------------- the ZeRO arithmetic


def test_zero3_partitions_weights_gradients_and_optimizer_over_the_workers(llama_dir):
    one, two, four = (plan_of(gpu_job(llama_dir, w, {"zero_stage": 3})).per_worker for w in (1, 2, 4))
    n = plan_of(gpu_job(llama_dir)).params
    assert abs(two["optimizer"] - one["optimizer"] / 2) <= 8
    assert abs((one["gradients"] - two["gradients"]) - 2 * n / 2) <= 8  # bf16 gradient partitions: 2 B/param / w
    # the weight partition halves (2 B/param / w), and the weights kept gathered shrink with it
    assert two["weights"] - four["weights"] >= 2 * n / 2 - 2 * n / 4
    assert one["weights"] > two["weights"] > four["weights"]
    assert one["activations"] == two["activations"]


def test_zero2_partitions_gradients_and_optimizer_not_weights(llama_dir):
    one, two = (plan_of(gpu_job(llama_dir, w, {"zero_stage": 2})) for w in (1, 2))
    n = one.params
    assert two.per_worker["weights"] == one.per_worker["weights"] == 2 * n
    assert abs(two.per_worker["optimizer"] - 12 * n / 2) <= 8 and one.per_worker["optimizer"] == 12 * n
    assert abs((one.per_worker["gradients"] - two.per_worker["gradients"]) - 2 * n / 2) <= 8
    stage1 = plan_of(gpu_job(llama_dir, 2, {"zero_stage": 1})).per_worker
    assert stage1["optimizer"] == two.per_worker["optimizer"] and stage1["gradients"] > two.per_worker["gradients"]


def test_offload_optimizer_moves_its_bytes_to_host_ram(llama_dir):
    on_gpu = plan_of(gpu_job(llama_dir, 2, {"zero_stage": 2}))
    offloaded = plan_of(gpu_job(llama_dir, 2, {"zero_stage": 2, "offload_optimizer": True}))
    assert offloaded.per_worker["optimizer"] == 0 < on_gpu.per_worker["optimizer"]
    assert offloaded.per_worker_total < on_gpu.per_worker_total
    assert "offloaded_optimizer" not in on_gpu.host_per_node
    # both ranks of the node: their Adam states plus the fp32 gradients the CPU Adam reads, and a bf16 staging copy
    per_rank = (12 + 4 + 2) * offloaded.trainable // 2
    assert offloaded.host_per_node["offloaded_optimizer"] == 2 * per_rank
    assert offloaded.host_per_node_total - on_gpu.host_per_node_total == 2 * per_rank
    params = plan_of(gpu_job(llama_dir, 2, {"zero_stage": 3, "offload_params": True}))
    assert params.host_per_node["offloaded_params"] == 2 * (2 * params.params // 2)
    assert params.per_worker["weights"] < plan_of(gpu_job(llama_dir, 2, {"zero_stage": 3})).per_worker["weights"]


def test_fp32_and_bf16_bytes_per_parameter(llama_dir):
    for stage, fp32_optimizer in ((0, 8), (2, 12)):  # ZeRO's optimizer keeps its own fp32 copy even of fp32 weights
        bf16 = plan_of(gpu_job(llama_dir, 1, {"zero_stage": stage, "precision": "bf16"}))
        fp32 = plan_of(gpu_job(llama_dir, 1, {"zero_stage": stage, "precision": "fp32"}))
        n = bf16.params
        assert (bf16.precision, fp32.precision) == ("bf16", "fp32")
        assert bf16.per_worker["weights"] == 2 * n and fp32.per_worker["weights"] == 4 * n
        assert bf16.per_worker["optimizer"] == 12 * n and fp32.per_worker["optimizer"] == fp32_optimizer * n
        if stage == 0:  # no reduce buckets without ZeRO
            assert bf16.per_worker["gradients"] == 2 * n and fp32.per_worker["gradients"] == 4 * n
        assert fp32.per_worker["activations"] > bf16.per_worker["activations"]
    assert plan_of(gpu_job(llama_dir, training={"precision": "auto"})).precision == "bf16"  # auto on GPU


def test_activations_follow_checkpointing_and_sequence_length(llama_dir):
    def act(training=None, seq=1024):
        return plan_of(gpu_job(llama_dir, 1, training, {"train": "x", "max_seq_len": seq})).per_worker["activations"]

    assert act({"gradient_checkpointing": True}) < act() / 3
    assert act(seq=2048) >= 2 * act(seq=1024)
    assert act({"micro_batch_size": 4, "global_batch_size": 4}) >= 4 * act() * 0.99
    # LoRA on the last 4 of 16 layers: no gradient flows below them, so fewer activations are kept
    assert act({"method": "lora", "lora": {"last_layers": 4}}) < act({"method": "lora"})


# --------------------------------------------------------------------------- fit and advice

_SETTING = re.compile(r"set ([a-z_]+\.[a-z_]+): ([^\s()]+)")


def test_a_plan_too_big_says_so_and_its_advice_lowers_the_estimate(llama_dir):
    j = gpu_job(llama_dir, 8, {"zero_stage": 2, "micro_batch_size": 4, "global_batch_size": 32})
    j.data.max_seq_len = 2048
    plan = estimate(j, gpu_memory_gib=16, host_memory_gib=10_000, workers_per_node=8)
    assert plan.fits is False and plan.per_worker_total > 0.95 * 16 * GIB
    text = "\n".join(plan.advice)
    for setting in ("training.zero_stage: 3", "training.offload_optimizer: true", "training.gradient_checkpointing"):
        assert setting in text
    assert "will NOT fit" in plan.render() and "change: set " in plan.render()
    lowered = 0
    for advice in plan.advice:
        settings = _SETTING.findall(advice)
        if not settings or advice.startswith("more workers"):
            continue
        alt = j.model_copy(deep=True)
        for key, value in settings:
            section, name = key.split(".")
            setattr(getattr(alt, section), name, yaml.safe_load(value))
        again = estimate(alt, gpu_memory_gib=16, host_memory_gib=10_000, workers_per_node=8)
        assert again.per_worker_total < plan.per_worker_total, advice
        saving = re.search(r"-(\d+\.\d+) GiB per GPU", advice)
        if saving:  # the stated saving is the re-estimate's
            assert abs(float(saving.group(1)) - (plan.per_worker_total - again.per_worker_total) / GIB) < 0.06
        if "enough alone" in advice or "fits)" in advice:
            assert again.fits is True, advice
        lowered += 1
    assert lowered >= 4
    assert estimate(j, gpu_memory_gib=1000, host_memory_gib=10_000).fits is True


def test_cpu_workers_share_the_nodes_ram(tiny_model_dir):
    j = job(tiny_model_dir, training={"method": "full"}, scaling={"num_workers": 2})
    plan = estimate(j, host_memory_gib=64)
    assert plan.device == "CPU" and plan.workers_per_node == 2
    assert plan.host_per_node["workers"] == 2 * plan.per_worker_total
    assert plan.capacity_per_worker == 32 * GIB and plan.fits is True
    tight = estimate(j, host_memory_gib=plan.host_per_node_total / GIB)  # 100% of it: over the 90% usable
    assert tight.fits is False and tight.advice
    with pytest.raises(PlanError, match="host RAM"):
        estimate(j, gpu_memory_gib=80)


def test_gpu_memory_unknown_without_a_cluster_or_a_gpu(llama_dir):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine's GPU is a known capacity")
    plan = estimate(gpu_job(llama_dir, 8))
    assert plan.fits is None and plan.capacity_per_worker is None and plan.workers_per_node == 8
    assert "--gpu-memory" in plan.render()


# --------------------------------------------------------------------------- the command line


def test_dry_run_prints_the_plan_and_starts_no_ray(tiny_model_dir, tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [chat("hi", "hello")])
    job_file = tmp_path / "job.yaml"
    job_file.write_text(
        "# rayft train job.yaml --dry-run\n"
        f"model: {{name: {tiny_model_dir}}}\n"
        "data: {train: train.jsonl, max_seq_len: 256}\n"
        "training: {method: full, micro_batch_size: 2, global_batch_size: 8}\n"
        "scaling: {num_workers: 4, use_gpu: true}\n"
    )
    ray_tmp = tmp_path / "raytmp"
    ray_tmp.mkdir()
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmp), "TMPDIR": str(ray_tmp)}
    env.pop("RAY_ADDRESS", None)

    def dry_run(gib: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-X", "importtime", "-m", "rayft", "train", str(job_file), "--dry-run"]
        return subprocess.run(
            [*cmd, "--gpu-memory", gib], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120
        )

    small = dry_run("0.001")
    assert small.returncode == 1, small.stderr[-2000:]
    for line in ("per GPU", "weights", "gradients", "optimizer states", "activations", "host RAM per node"):
        assert line in small.stdout
    assert "will NOT fit" in small.stdout and "Traceback" not in small.stderr
    big = dry_run("1000")
    assert big.returncode == 0, big.stderr[-2000:]
    assert "fits: " in big.stdout and "of 1000.0 GiB per GPU" in big.stdout
    for r in (small, big):  # ray was never imported, and no Ray session was started
        assert not re.search(r"\|\s+ray$", r.stderr, re.MULTILINE)
    assert not list(ray_tmp.rglob("session_*"))


def test_dry_run_options_are_checked(tiny_model_dir, tmp_path):
    job_file = tmp_path / "job.yaml"
    job_file.write_text(f"model: {{name: {tiny_model_dir}}}\ndata: {{train: train.jsonl}}\n")
    r = rayft_cli("train", str(job_file), "--dry-run", "--gpu-memory", "80")  # a CPU job has no GPU memory
    assert r.returncode == 2 and "plan error" in r.stderr and "scaling.use_gpu" in r.stderr
    r = rayft_cli("train", str(job_file), "--gpu-memory", "80")
    assert r.returncode == 2 and "--dry-run" in r.stderr
    r = rayft_cli("train", str(job_file), "--dry-run", "--host-memory", "512")
    assert r.returncode == 0 and "fits: " in r.stdout and "512.0 GiB host RAM per node" in r.stdout
