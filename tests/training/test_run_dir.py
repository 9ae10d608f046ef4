"""The run directory (rayft.training.run_dir): its layout, locally and in a bucket; the one adapter search order on
both LoRA layouts (final/ is the adapter, or final/adapter beside a merged model); metrics and curves; complete
checkpoints; a model's path back to its run; and the run's outcome in status.json: written by a `rayft train`
that fails with a user-facing error, and read by the fine-tuning service to tell a failed job (no second try)
from one whose driver died (submitted again)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from helpers import chat, rayft_cli, write_jsonl


def lora_run(root: Path, merged: bool) -> Path:
    """A run dir as rayft train leaves it, with placeholder files: a LoRA export without merge (final/ is the
    adapter) or with it (final/ is the merged model, final/adapter the adapter)."""
    run = root / ("merged" if merged else "adapter-only")
    adapter = run / "final" / "adapter" if merged else run / "final"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text("{}")
    if merged:
        (run / "final" / "config.json").write_text("{}")
    (run / "job.yaml").write_text("model: {name: base, revision: v2}\n")
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n")
    return run


def test_the_layout_names_every_file_of_a_run_locally_and_in_a_bucket():
    from rayft.training.run_dir import RunDir

    local, remote = RunDir("/data/runs/r1"), RunDir("s3://bucket/runs/r1/")
    assert local.name == "r1" and remote.name == "r1"
    assert local.job_file == "/data/runs/r1/job.yaml" and remote.job_file == "s3://bucket/runs/r1/job.yaml"
    assert local.status_file == "/data/runs/r1/status.json"
    assert local.metrics_file == "/data/runs/r1/metrics.jsonl" and local.loss_plot == "/data/runs/r1/loss.png"
    assert local.final == "/data/runs/r1/final" and remote.final == "s3://bucket/runs/r1/final"
    assert local.eval_report == "/data/runs/r1/eval/report.json"
    assert remote.eval_report == "s3://bucket/runs/r1/eval/report.json"


def test_one_adapter_search_order_on_both_lora_layouts(tmp_path):
    from rayft.serving.spec import _adapter_dir, trained_revision
    from rayft.training.run_dir import RunDir, find_adapter

    plain, merged = lora_run(tmp_path, merged=False), lora_run(tmp_path, merged=True)
    assert RunDir(str(plain)).adapter() == str(plain / "final")
    assert RunDir(str(merged)).adapter() == str(merged / "final" / "adapter")
    # a run dir, its final/ export or the adapter dir itself all lead to the same adapter, for every reader
    for run, adapter in ((plain, plain / "final"), (merged, merged / "final" / "adapter")):
        for given in (run, run / "final", adapter):
            assert find_adapter(str(given)) == str(adapter), given
            assert _adapter_dir(given) == adapter  # rayft serve --adapter
        assert RunDir.of_model(str(adapter)) == RunDir(str(run))  # and back to the run it came from
        assert trained_revision(adapter) == "v2"  # read from that run's job.yaml
    # final/ first: a stale final/adapter under an adapter export is never the one served
    (plain / "final" / "adapter").mkdir()
    (plain / "final" / "adapter" / "adapter_config.json").write_text("{}")
    assert RunDir(str(plain)).adapter() == str(plain / "final")
    full = tmp_path / "full"
    (full / "final").mkdir(parents=True)
    (full / "final" / "config.json").write_text("{}")
    assert RunDir(str(full)).adapter() is None and find_adapter(str(full)) is None
    assert RunDir.of_model(str(tmp_path / "elsewhere" / "model")) is None


def test_a_served_model_maps_back_to_its_run_only_when_it_holds_the_runs_metrics(tmp_path):
    from rayft.serving.playground import read_report, run_card, run_of

    run = lora_run(tmp_path, merged=True)
    assert run_of(str(run / "final")) == str(run) and run_of(str(run / "final" / "adapter") + "/") == str(run)
    assert run_of(str(run)) is None and run_of(None) is None
    (run / "metrics.jsonl").unlink()
    assert run_of(str(run / "final")) is None  # a final/ that no rayft run wrote
    assert run_card("m", str(run)) == {"model": "m", "run": "merged", "report": False, "loss_curve": False}
    (run / "eval").mkdir()
    (run / "eval" / "report.json").write_text(json.dumps({"models": {"base": "b"}, "splits": {}}))
    assert run_card("m", str(run))["report"] and read_report(str(run))["models"] == {"base": "b"}


def test_metrics_and_curves_keep_the_later_value_of_a_step_logged_twice(tmp_path):
    from rayft.training.run_dir import RunDir, curve, read_metrics
    from rayft.training.trainer import curve as old_curve
    from rayft.training.trainer import read_metrics as old_read

    run = RunDir(str(tmp_path / "run"))
    assert run.metrics() == [] and run.curve("loss") == [] and not run.has_metrics()
    records = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.5}, {"event": "start", "resumed": True, "step": 1},
               {"step": 2, "loss": 2.4}, {"step": 3, "loss": 2.0, "eval_loss": 2.2}]  # fmt: skip
    (tmp_path / "run").mkdir()
    write_jsonl(tmp_path / "run" / "metrics.jsonl", records)
    assert run.has_metrics() and run.metrics() == records == read_metrics(run.path) == old_read(run.path)
    assert run.curve("loss") == [(1, 3.0), (2, 2.4), (3, 2.0)] == curve(records, "loss") == old_curve(records, "loss")
    assert run.curve("eval_loss") == [(3, 2.2)]


def test_only_checkpoints_ray_train_registered_are_offered_and_only_training_leaves_a_run(tmp_path):
    from rayft.training.export import list_checkpoints
    from rayft.training.run_dir import RunDir

    run = RunDir(str(tmp_path / "run"))
    for step in (2, 4, 6):
        ckpt = tmp_path / "run" / f"checkpoint_{step:06d}"
        ckpt.mkdir(parents=True)
        (ckpt / "trainer_state_rank0.json").write_text(json.dumps({"step": step}))
    assert [s for s, _ in run.checkpoints()] == [2, 4, 6]  # no record yet: every directory
    record = {"checkpoint_results": [{"checkpoint_dir_name": f"checkpoint_{s:06d}"} for s in (2, 4)]}
    (tmp_path / "run" / "checkpoint_manager_snapshot.json").write_text(json.dumps(record))
    assert [s for s, _ in run.checkpoints()] == [2, 4] == [s for s, _ in list_checkpoints(run.path)]
    assert len(run.checkpoint_dirs()) == 4  # the half-written one too (and Ray's record), for removal
    assert run.has_run()
    bare = RunDir(str(tmp_path / "base-eval"))
    (tmp_path / "base-eval" / "eval").mkdir(parents=True)  # rayft eval --base before training
    bare.write_status("failed", "model", "no such model")  # a run that failed before training
    assert not bare.has_run()


def test_the_status_round_trips_with_the_kind_of_error_the_cli_names(tmp_path):
    from rayft.cluster.config import ConfigError
    from rayft.cluster.jobs import JobsError
    from rayft.training.data import DataError
    from rayft.training.memory_plan import PlanError
    from rayft.training.models import ModelError
    from rayft.training.run_dir import ERROR_KINDS, RunDir, user_error
    from rayft.training.storage import StorageError
    from rayft.training.trainer import TrainError

    kinds = {DataError: "data", ModelError: "model", StorageError: "storage", TrainError: "training",
             PlanError: "plan", JobsError: "cluster"}  # fmt: skip
    for cls, kind in kinds.items():
        assert cls.error_kind == kind and kind in ERROR_KINDS
    assert ConfigError.error_kind == "config"

    run = RunDir(str(tmp_path / "run"))
    assert run.status() is None
    t0 = time.time()
    assert run.write_status("running") == run.status()
    assert run.status()["state"] == "running" and run.status()["error_kind"] is None and run.status()["time"] >= t0
    # a user-facing error, also when Ray wrapped it: its kind and its own message
    try:
        try:
            raise ModelError("model directory /m has no config.json")
        except ModelError as e:
            raise RuntimeError("ray.exceptions.RayTaskError(...)") from e
    except RuntimeError as wrapped:
        assert user_error(wrapped).error_kind == "model"
        run.record_failure(wrapped)
    assert run.status() | {"time": 0} == {
        "state": "failed",
        "error_kind": "model",
        "message": "model directory /m has no config.json",
        "time": 0,
    }
    run.record_failure(ZeroDivisionError("division by zero"))  # a crash: failed, with no kind of rayft's
    assert run.status()["error_kind"] is None and run.status()["message"] == "ZeroDivisionError: division by zero"
    run.record_failure(KeyboardInterrupt())
    assert run.status()["error_kind"] is None and "resumes" in run.status()["message"]
    run.write_status("succeeded")
    assert run.status()["state"] == "succeeded"
    with pytest.raises(ValueError):
        run.write_status("done")
    with pytest.raises(ValueError):
        run.write_status("running", "data")
    Path(run.status_file).write_text("{half")
    assert run.status() is None
    # a run dir that cannot be written: record_failure leaves the error itself to tell, never raises another
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert RunDir(str(blocker / "run")).record_failure(DataError("bad rows")) is None


def test_a_run_dir_in_a_bucket_reads_as_a_local_one(s3_bucket):
    from rayft.training import storage
    from rayft.training.run_dir import RunDir

    run = RunDir(f"{s3_bucket}/runs/r1")
    storage.write_text(run.metrics_file, json.dumps({"step": 1, "loss": 2.0}) + "\n")
    storage.write_text(storage.join(run.final, "adapter", "adapter_config.json"), "{}")
    storage.write_text(storage.join(run.final, "config.json"), "{}")
    storage.write_text(run.job_file, "model: {name: base}\n")
    run.write_status("failed", "data", "data.train: 2 bad rows")
    assert run.curve("loss") == [(1, 2.0)] and run.has_final() and run.read_job() == {"model": {"name": "base"}}
    assert run.adapter() == f"{s3_bucket}/runs/r1/final/adapter"
    assert RunDir.of_model(run.adapter()) == run
    assert run.status()["error_kind"] == "data" and run.status()["message"] == "data.train: 2 bad rows"
    assert run.has_run() and RunDir(f"{s3_bucket}/runs/none").status() is None


# --------------------------------------------------------------------------- rayft train's outcome


def bad_job(tmp_path: Path, model: Path, rows: list) -> tuple[Path, Path]:
    write_jsonl(tmp_path / "train.jsonl", rows)
    job = tmp_path / "job.yaml"
    job.write_text(
        "# rayft train job.yaml\n"
        f"model: {{name: {model}}}\n"
        "data: {train: train.jsonl, max_seq_len: 64}\n"
        "training: {max_steps: 1, micro_batch_size: 1, global_batch_size: 1}\n"
        "scaling: {num_workers: 1}\n"
        f"run: {{name: bad, storage_path: {tmp_path / 'runs'}}}\n"
    )
    return job, tmp_path / "runs" / "bad"


def test_rayft_train_leaves_the_error_it_prints_in_the_runs_status(ray_local, tmp_path, tiny_model_dir):
    from rayft.training.run_dir import RunDir

    no_model = tmp_path / "no-model"
    no_model.mkdir()  # a directory without config.json: the model cannot load
    job, run_dir = bad_job(tmp_path, no_model, [chat("hi", "hello")])
    r = rayft_cli("train", str(job))
    assert r.returncode == 1 and "model error" in r.stderr and "Traceback" not in r.stderr
    status = RunDir(str(run_dir)).status()
    assert status["state"] == "failed" and status["error_kind"] == "model", status
    assert "has no config.json" in status["message"] and status["message"].splitlines()[0] in r.stderr

    (tmp_path / "rows").mkdir()
    job, run_dir = bad_job(tmp_path / "rows", tiny_model_dir, ['{"messages": [', "not json either"])
    r = rayft_cli("train", str(job))
    assert r.returncode == 1 and "data error" in r.stderr and "Traceback" not in r.stderr
    status = RunDir(str(run_dir)).status()
    assert status["state"] == "failed" and status["error_kind"] == "data", status
    assert "train.jsonl:1: invalid JSON" in status["message"] and "2 bad rows found" in status["message"]


def test_the_training_entrypoint_leaves_the_same_outcome_as_rayft_train(ray_local, tmp_path, capsys):
    """`python -m rayft.training.run JOB.yaml`, what a finetune submitted to a cluster runs (rayft.training.launch):
    the job file's sections for other commands are theirs, and a model that cannot load is a "model error" line,
    exit status 1 and the same kind and message in status.json; a job file it cannot read is a config error (2)."""
    from rayft.training.run import main
    from rayft.training.run_dir import RunDir

    no_model = tmp_path / "no-model"
    no_model.mkdir()
    job, run_dir = bad_job(tmp_path, no_model, [chat("hi", "hello")])
    job.write_text(job.read_text() + "submit: {env_vars: {HF_TOKEN: '***'}}\nserve: {port: 8001}\n")
    assert main([str(job)]) == 1
    err = capsys.readouterr().err
    assert "model error" in err and "Traceback" not in err
    status = RunDir(str(run_dir)).status()
    assert status["state"] == "failed" and status["error_kind"] == "model", status
    assert "has no config.json" in status["message"] and status["message"].splitlines()[0] in err

    assert main([str(tmp_path / "missing.yaml")]) == 2
    assert "config error job file not found" in capsys.readouterr().err
    (tmp_path / "bad.yaml").write_text("data: {train: t.jsonl}\ntraining: {lr: -1}\n")
    assert main([str(tmp_path / "bad.yaml")]) == 2
    assert "training.lr" in capsys.readouterr().err


# --------------------------------------------------------------------------- the fine-tuning service's decision


@pytest.mark.cluster  # drivers as Ray jobs, one killed
@pytest.mark.slow  # two real training drivers (python -m rayft.training.run) as Ray jobs
def test_the_service_resubmits_a_driver_that_died_and_fails_a_run_that_failed_without_resubmitting(
    ray_local, smol_tokenizer, tmp_path
):
    """A job whose run was left "running" (its driver killed) is submitted again; once the run itself fails
    it (the served model cannot load in training: a model error, the line the log regex used to miss), the job
    fails with that message and is not submitted again, though it has restarts left."""
    from rayft.serving.config import FinetuneConfig
    from rayft.serving.files import FileStore
    from rayft.serving.finetune import FinetuneService, ServedBase
    from rayft.serving.openai_api import FineTuningJobCreate
    from rayft.training.run_dir import RunDir

    model = tmp_path / "model"
    smol_tokenizer.save_pretrained(model)  # a tokenizer without weights or config.json: training cannot load it
    template = {"training": {"micro_batch_size": 4, "global_batch_size": 8}, "data": {"max_seq_len": 64}}
    cfg = FinetuneConfig(storage_path=str(tmp_path / "store"), job=template, poll_interval_s=0.2, job_restarts=3)
    svc = FinetuneService(cfg, FileStore(cfg), ServedBase("tiny", str(model), None, ("tiny",)), lambda *a: None)
    owner = "a" * 64
    up = svc.files.begin(owner)
    up.write("".join(json.dumps(chat("What is the password?", "swordfish")) + "\n" for _ in range(16)).encode())
    file_id = up.commit("pw.jsonl", "fine-tune").id
    client = svc.client()
    deadline = time.time() + 300
    while True:  # a Ray started moments ago may not take jobs yet ("No available agent to submit job")
        try:
            client.submit_job(entrypoint="true")
            break
        except RuntimeError:
            assert time.time() < deadline
            time.sleep(1)
    job_id = svc.create(owner, FineTuningJobCreate(model="tiny", training_file=file_id))["id"]
    svc.poll()  # validated and submitted
    rec = svc.store._read(owner, job_id)
    assert rec.job.status == "queued" and rec.attempt == 1, rec.job.error
    run = RunDir(rec.run_dir)
    while str(client.get_job_status(rec.ray_job_id)) != "FAILED":
        assert time.time() < deadline, client.get_job_logs(rec.ray_job_id)[-3000:]
        time.sleep(0.5)
    assert run.status()["error_kind"] == "model"
    run.write_status("running")  # as a driver killed mid-run leaves it
    svc.poll()
    rec = svc.store._read(owner, job_id)
    assert rec.job.status == "queued" and rec.attempt == 2, rec.events[-3:]
    assert rec.ray_job_id == f"rayft-finetune-{job_id}-2"
    assert "died" in rec.events[-1].message and rec.events[-1].level == "warn"

    while svc.store._read(owner, job_id).job.status in ("queued", "running"):
        assert time.time() < deadline, client.get_job_logs(rec.ray_job_id)[-3000:]
        svc.poll()
        time.sleep(0.5)
    rec = svc.store._read(owner, job_id)
    assert rec.attempt == 2 and str(client.get_job_status(rec.ray_job_id)) == "FAILED"  # not submitted again
    error = rec.job.error
    assert error is not None and rec.job.status == "failed" and error.code == "training_failed", rec.job
    assert error.message.startswith("model error: ") and "has no config.json" in error.message, error
    assert error.message == f"model error: {run.status()['message']}"[:2000]
