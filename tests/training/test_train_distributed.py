"""`rayft train` on a real local Ray: 2 workers, gloo, DeepSpeed ZeRO-2/3, LoRA and full finetuning,
checkpoints per rank, export, and recovery from a killed worker and a killed driver."""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import (
    ROOT,
    checkpoints,
    committed_checkpoints,
    consumed_in,
    greedy_reply,
    rayft_cli,
    step_reached,
    train_job_file,
    train_killing_a_worker,
    wait_for,
)
from rayft.cluster.config import load_config
from rayft.training.run_dir import RunDir
from rayft.training.trainer import read_metrics, run_training

pytestmark = pytest.mark.usefixtures("ray_local")


def train_two_workers(tmp_path: Path, model_dir: Path, zero_stage: int, method: str):
    """3 epochs of 16 rows, 8 per step, on 2 workers: an eval and a checkpoint every 3 steps."""
    lr = 5e-3 if method == "lora" else 2e-3
    t = dict(epochs=3, zero_stage=zero_stage, method=method, lr=lr, eval_every_steps=3, checkpoint_every_steps=3)
    job = load_config(train_job_file(tmp_path, model_dir, **t))
    return job, run_training(job)


@pytest.fixture(scope="module")
def lora_run(ray_local, tmp_path_factory, tiny_model_dir):
    """The 2-worker ZeRO-2 LoRA run, shared by the tests that only read what it wrote (steps 3 and 6 kept)."""
    return train_two_workers(tmp_path_factory.mktemp("lora-run"), tiny_model_dir, 2, "lora")


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage, method", [(2, "lora"), (3, "full")])
def test_two_workers_train_checkpoint_and_export(request, tmp_path, tiny_model_dir, zero_stage, method):
    """Stage 3 with LoRA and stage 2 with full finetuning are checked the same way (check_checkpoints_and_export)
    by the two recovery tests below, which resume from those checkpoints."""
    if (zero_stage, method) == (2, "lora"):
        job, result = request.getfixturevalue("lora_run")
    else:
        job, result = train_two_workers(tmp_path, tiny_model_dir, zero_stage, method)

    assert result.steps == 6  # 3 epochs x 16 rows / 8 per step
    records = read_metrics(job.run_dir)
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 7))
    assert sum(r["loss"] for r in steps[-2:]) < sum(r["loss"] for r in steps[:2])  # it learns the repeated data
    for key in ("lr", "grad_norm", "tokens_per_s", "nonpad_tokens_per_s", "step_time_s", "data_wait_s"):
        assert all(r[key] is not None and r[key] >= 0 for r in steps), key
    # The step-time split: each phase was measured, and together with the data wait they fit in the step.
    for r in steps:
        assert r["forward_s"] > 0 and r["backward_s"] > 0 and r["optimizer_s"] > 0 and r["grad_sync_s"] > 0, r
        parts = r["data_wait_s"] + r["forward_s"] + r["backward_s"] + r["grad_sync_s"] + r["optimizer_s"]
        assert parts <= r["step_time_s"] * 1.01, r
    assert "eval_loss" in result.metrics and result.metrics["eval_perplexity"] > 1
    assert any("eval_loss" in r and r["step"] == 3 for r in records)
    assert os.path.getsize(os.path.join(job.run_dir, "loss.png")) > 1000
    assert glob.glob(os.path.join(job.run_dir, "tensorboard", "events.out.tfevents.*"))
    assert len(checkpoints(job.run_dir)) == 2  # step 3 and the final one
    assert RunDir(job.run_dir).status()["state"] == "succeeded"
    assert RunDir(job.run_dir).adapter() == (os.path.join(result.final_dir, "adapter") if method == "lora" else None)
    check_checkpoints_and_export(job, result.final_dir, tiny_model_dir)


def check_checkpoints_and_export(job, final: str, model_dir: Path) -> None:
    """Every kept checkpoint holds each rank's files; final/ is a whole model of the base's shapes (plus a
    non-zero adapter for LoRA, whose checkpoints leave the frozen base out)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    kept = checkpoints(job.run_dir)
    assert kept
    for ckpt in kept:
        names = set(os.listdir(ckpt)) | {f"ds/{n}" for n in os.listdir(os.path.join(ckpt, "ds"))}
        for rank in (0, 1):  # every rank's files made it into the merged checkpoint
            assert f"trainer_state_rank{rank}.json" in names
            assert any(n.startswith(f"ds/zero_pp_rank_{rank}_") for n in names), names

    base = AutoConfig.from_pretrained(model_dir)
    weights = load_file(os.path.join(final, "model.safetensors"))
    assert weights["model.embed_tokens.weight"].shape == (base.vocab_size, base.hidden_size)
    assert weights["model.layers.1.mlp.down_proj.weight"].shape == (base.hidden_size, base.intermediate_size)
    assert all(t.numel() > 0 and t.abs().sum() > 0 for t in weights.values())
    if job.training.method == "lora":
        adapter = load_file(os.path.join(final, "adapter", "adapter_model.safetensors"))
        assert adapter and all(t.abs().sum() > 0 for k, t in adapter.items() if "lora_B" in k)
        model_states = os.path.getsize(glob.glob(os.path.join(kept[-1], "ds", "*model_states.pt"))[0])
        assert model_states < 1_000_000  # the frozen base (~3 M params) is not in LoRA checkpoints
    assert AutoModelForCausalLM.from_pretrained(final).config.num_hidden_layers == base.num_hidden_layers


def final_consumed(run_dir: str) -> set[int]:
    return consumed_in(checkpoints(run_dir)[-1])


@pytest.mark.cluster  # a failure drill
@pytest.mark.slow
def test_a_killed_worker_resumes_from_the_end_of_an_epoch_and_trains_each_example_once_per_epoch(
    tmp_path, tiny_model_dir
):
    """ZeRO-3 with LoRA on packed rows, 2 epochs: partitioned weights, trained adapters only in the checkpoint.
    The kept checkpoint is the one taken in epoch 1's last step, where every row of the epoch is consumed:
    the resumed run starts epoch 2 (it used to find nothing left to train and fail on every retry)."""
    # 192 rows -> 96 packed rows of two; 8 packed rows per optimizer step -> 12 steps per epoch
    t = dict(epochs=2, checkpoint_every_steps=12, zero_stage=3, method="lora")
    job = load_config(train_job_file(tmp_path, tiny_model_dir, n_rows=192, packing=True, **t))
    result, records = train_killing_a_worker(job, 12)  # the end-of-epoch checkpoint
    assert result is not None, "training did not finish after a worker was killed"
    starts = [r for r in records if r.get("event") == "start"]
    assert len(starts) == 2 and starts[1]["resumed"] and starts[1]["step"] == 12
    assert result.steps == 24 and starts[0]["total_steps"] == 24
    ends = [r for r in records if r.get("event") == "epoch_end"]
    assert {(e["epoch"], e["step"]) for e in ends} == {(1, 12)}  # both runs: epoch 2 began after step 12
    first, last = checkpoints(job.run_dir)[0], checkpoints(job.run_dir)[-1]
    assert len(consumed_in(first)) == 192 and len(consumed_in(last)) == 192  # every example, once per epoch
    check_checkpoints_and_export(job, result.final_dir, tiny_model_dir)


@pytest.mark.cluster  # a failure drill
@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [2, 3])
def test_rerunning_after_the_driver_died_resumes_where_it_stopped(tmp_path, tiny_model_dir, zero_stage):
    """Full finetuning resumed by a new driver. ZeRO-2: whole weights, partitioned optimizer states. ZeRO-3: the
    weights partitioned too, with the CPU settings of a full finetune (no prefetching, no reuse window), whose
    first steps after the resume must pass DeepSpeed's check of the traced parameter fetch order."""
    t = dict(epochs=1, checkpoint_every_steps=3, micro_batch_size=4, zero_stage=zero_stage, method="full", lr=2e-3)
    job = train_job_file(tmp_path, tiny_model_dir, n_rows=96, **t)
    run_dir = str(tmp_path / "runs" / "run")
    import ray

    # The driver joins the suite's Ray cluster through --address (a second local cluster on the same
    # machine would confuse Ray Train's placement-group cleaner, which looks clusters up by scanning).
    address = ray.get_runtime_context().gcs_address
    cmd = [sys.executable, "-m", "rayft", "train", str(job), "--address", address]
    first = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: committed_checkpoints(run_dir), 600, "a committed checkpoint")
        wait_for(lambda: step_reached(run_dir, 4), 600, "step 4")
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # the driver; Ray ends its job's controller and workers
        first.wait()
    second = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "resumed from the checkpoint at step" in second.stderr + second.stdout
    records = read_metrics(run_dir)
    starts = [r for r in records if r.get("event") == "start"]
    assert starts[-1]["resumed"] and starts[-1]["step"] >= 3
    assert max(r["step"] for r in records if "loss" in r) == 12
    assert len(final_consumed(run_dir)) == 96  # every example of the epoch trained, none twice
    check_checkpoints_and_export(load_config(job), os.path.join(run_dir, "final"), tiny_model_dir)


@pytest.mark.slow  # the shared run
def test_rayft_export_re_exports_a_kept_checkpoint(lora_run, tmp_path):
    job, _ = lora_run
    out = tmp_path / "step3"
    r = rayft_cli("export", job.run_dir, "--checkpoint", "3", "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    info = json.loads((out / "rayft_export.json").read_text())
    assert info["step"] == 3 and info["method"] == "lora" and info["merged"]
    assert (out / "adapter" / "adapter_config.json").is_file()
    final = json.loads(Path(job.run_dir, "final", "rayft_export.json").read_text())
    assert final["step"] == 6
    r = rayft_cli("export", job.run_dir, "--checkpoint", "4")
    assert r.returncode == 2 and "no checkpoint at step 4; kept steps: 3, 6" in r.stderr


def test_runs_the_cluster_cannot_hold_fail_before_waiting(tmp_path, tiny_model_dir):
    from rayft.training.trainer import TrainError

    job = load_config(
        train_job_file(tmp_path, tiny_model_dir), ["scaling.num_workers=8", "training.global_batch_size=16"]
    )
    with pytest.raises(TrainError, match=r"8 workers x 1.0 CPUs .* but the cluster has 4"):
        run_training(job)
    job = load_config(train_job_file(tmp_path, tiny_model_dir), ["scaling.use_gpu=true"])
    with pytest.raises(TrainError, match="GPUs needed, the cluster has 0"):
        run_training(job)


def test_bad_model_and_unwritable_storage_are_clear_errors(tmp_path, tiny_model_dir):
    from rayft.training.models import ModelError
    from rayft.training.trainer import TrainError

    job = load_config(train_job_file(tmp_path, tiny_model_dir), ["model.name=./no/such/model"])
    with pytest.raises(ModelError, match="neither a built-in alias"):
        run_training(job)
    status = RunDir(job.run_dir).status()  # the run's verdict, for whoever sees only the driver exit
    assert status["state"] == "failed" and status["error_kind"] == "model" and "neither a built-in" in status["message"]
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    job = load_config(train_job_file(tmp_path, tiny_model_dir), [f"run.storage_path={blocker}"])
    with pytest.raises(TrainError, match="cannot write to the run directory .*run.storage_path"):
        run_training(job)


@pytest.mark.cluster  # the real SmolLM2
@pytest.mark.slow
def test_the_built_in_smollm2_finetunes_and_exports(tmp_path):
    """The real SmolLM2-135M through the whole path: a few LoRA steps, then final/ answers like a chat model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    lines = (ROOT / "examples" / "quickstart" / "train.jsonl").read_text().splitlines()
    (tmp_path / "train.jsonl").write_text("\n".join(lines[:8]) + "\n")
    (tmp_path / "eval.jsonl").write_text("\n".join(lines[8:10]) + "\n")
    (tmp_path / "job.yaml").write_text(
        "# rayft train job.yaml\n"
        "model: {name: smollm2-135m-instruct}\n"
        "data: {train: train.jsonl, eval: eval.jsonl, max_seq_len: 256}\n"
        "training: {method: lora, lr: 1.0e-3, max_steps: 2, micro_batch_size: 1, global_batch_size: 2,"
        " lora: {r: 4, alpha: 8}}\n"
        "scaling: {num_workers: 2}\n"
        f"run: {{name: smol, storage_path: {tmp_path / 'runs'}}}\n"
    )
    result = run_training(load_config(tmp_path / "job.yaml"))
    assert result.steps == 2 and 0 < result.metrics["eval_loss"] < 5  # a trained chat model, not random weights
    tok = AutoTokenizer.from_pretrained(result.final_dir)
    model = AutoModelForCausalLM.from_pretrained(result.final_dir)
    assert "Paris" in greedy_reply(model, tok, "What is the capital of France?", max_new_tokens=12)
