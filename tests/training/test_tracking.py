"""Experiment tracking in a real local MLflow store, read back through MlflowClient: the job as params, every
step's metrics, one tracked run across a killed worker and a killed driver, `rayft eval` logging into it, a
sweep as a parent run with a child run per trial, and a store that fails mid-run never stopping anything.
Every job here carries a credential in submit.env_vars, which must show in no param, tag, artifact, run-dir file
or line the CLI prints."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import HF_TOKEN, ROOT, checkpoint_steps, step_reached, train_job_file, wait_for
from rayft.cluster.config import ConfigError, load_config

# A credential the jobs give their cluster environment (submit.env_vars): the runs must not keep or log it.


def assert_secret_nowhere(root: Path, *outputs: str, skip: tuple[Path, ...] = ()) -> None:
    """HF_TOKEN in no file under `root` (MLflow's database and artifacts, run dirs; read as bytes) but `skip`
    (the job file itself), and in none of `outputs` (what the CLI printed)."""
    secret = HF_TOKEN.encode()
    leaked = [
        str(f)
        for f in root.rglob("*")
        if f.is_file() and not f.is_symlink() and f not in skip and secret in f.read_bytes()
    ]
    assert leaked == [], f"the credential in submit.env_vars leaked into {leaked}"
    assert not [o for o in outputs if HF_TOKEN in o], "the credential in submit.env_vars was printed"


def assert_no_secret_tracked(store: Path, run_id: str, artifacts: bool = True) -> None:
    """Neither the run's params and tags nor any of its artifacts' files hold HF_TOKEN (read through MLflow).
    `artifacts`: the run must have logged some (a trial stopped early never reached its end, where they are)."""
    c = client(store)
    run = c.get_run(run_id)
    assert not [k for k in run.data.params if k.startswith(("submit.", "serve."))], run.data.params
    shown = {**run.data.params, **run.data.tags}
    assert [k for k, v in shown.items() if HF_TOKEN in k + v] == []

    def files(folder: str | None = None) -> list[str]:
        return [p for a in c.list_artifacts(run_id, folder) for p in (files(a.path) if a.is_dir else [a.path])]

    logged = files()
    assert logged or not artifacts, "the run logged no artifacts"
    for path in logged:
        local = Path(c.download_artifacts(run_id, path, str(store.parent / "downloaded")))
        assert HF_TOKEN.encode() not in local.read_bytes(), f"artifact {path} holds the credential"


def client(store: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{store}/mlflow.db")


def runs_of(store: Path, experiment: str = "rayft") -> list:
    c = client(store)
    exp = c.get_experiment_by_name(experiment)
    return c.search_runs([exp.experiment_id]) if exp else []


def tracked_job(tmp_path: Path, model_dir, store: Path, n_rows: int = 16, **training) -> Path:
    path = train_job_file(tmp_path, model_dir, n_rows=n_rows, **training)
    text = path.read_text().replace(
        "max_failures: 2}",
        f"max_failures: 2, tracking: {{mlflow: {{uri: {store}, experiment: tests}}, log_model: true}}}}",
    )
    path.write_text(
        text + "eval: {max_new_tokens: 8, max_rows: 4}\n" + f"submit: {{env_vars: {{HF_TOKEN: {HF_TOKEN}}}}}\n"
    )
    return path


def test_tracking_settings_are_checked_before_launch(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text("data: {train: t.jsonl}\n")
    with pytest.raises(ConfigError) as e:
        load_config(
            job,
            [
                "run.tracking.mlflow.uri=htp://tracker:5000",
                "run.tracking.wandb.mode=loud",
            ],
        )
    text = str(e.value)
    assert "run.tracking.mlflow" in text and "'htp'" in text and "http(s)://HOST:PORT" in text
    assert "run.tracking.wandb.mode" in text
    with pytest.raises(ConfigError, match="names no host"):
        load_config(job, ["run.tracking.mlflow.uri=http://"])
    on = load_config(job, ["run.tracking.mlflow=true"]).run.tracking
    assert on.enabled and on.mlflow.uri == "./mlruns" and on.mlflow.experiment == "rayft" and on.wandb is None
    assert not load_config(job).run.tracking.enabled
    ok = ["./mlruns", "/abs/mlruns", "file:///tmp/mlruns", "sqlite:///mlflow.db", "https://mlflow.example.com"]
    for uri in ok:
        assert load_config(job, [f"run.tracking.mlflow.uri={uri}"]).run.tracking.mlflow.uri == uri


def test_a_store_that_fails_warns_once_and_stops_nothing(tmp_path, caplog):
    """A store that cannot be created is skipped at the start; one that breaks mid-run is dropped at its first
    failure, with one warning each, and every later call is a no-op."""
    import shutil

    from rayft.training.config import TrackingConfig
    from rayft.training.tracking import Tracker

    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    caplog.set_level(logging.WARNING, logger="rayft.tracking")
    broken = TrackingConfig.model_validate({"mlflow": {"uri": str(blocker / "mlruns")}})
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    assert Tracker.open(broken, str(run_dir), "run", {"training": {"lr": 1}}) is None
    assert [r.message for r in caplog.records if "could not start the run" in r.message]

    caplog.clear()
    store = tmp_path / "mlruns"
    tracker = Tracker.open(TrackingConfig.model_validate({"mlflow": {"uri": str(store)}}), str(run_dir), "run")
    tracker.log_record({"step": 1, "loss": 2.0})
    shutil.rmtree(store)
    store.write_text("the store is gone")  # every later write fails
    for step in range(2, 6):
        tracker.log_record({"step": step, "loss": 1.0})
    tracker.finish()
    warnings = [r.message for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "mlflow tracking could not log metrics" in warnings[0], warnings
    assert "training goes on without it" in warnings[0]
    assert tracker.backends == []


@pytest.mark.cluster  # a failure drill
@pytest.mark.slow
@pytest.mark.usefixtures("ray_local")
def test_one_tracked_run_across_a_killed_worker_a_killed_driver_and_rayft_eval(tmp_path, tiny_model_dir):
    import ray
    import yaml

    from rayft.training.trainer import read_metrics

    store = tmp_path / "mlruns"
    # 48 rows, 8 per step, 2 epochs: 12 steps; a checkpoint every 3
    path = tracked_job(tmp_path, tiny_model_dir, store, n_rows=48, epochs=2, checkpoint_every_steps=3)
    job = load_config(path)
    address = ray.get_runtime_context().gcs_address
    cmd = [sys.executable, "-m", "rayft", "train", str(path), "--address", address]
    first = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: 3 in checkpoint_steps(job.run_dir), 600, "the step-3 checkpoint")
        records = wait_for(lambda: step_reached(job.run_dir, 4), 600, "step 4")
        os.kill([r for r in records if r.get("event") == "start"][0]["pids"][1], signal.SIGKILL)  # a worker
        wait_for(lambda: len([r for r in read_metrics(job.run_dir) if r.get("event") == "start"]) == 2, 600, "restart")
        wait_for(lambda: 6 in checkpoint_steps(job.run_dir), 600, "the step-6 checkpoint")
        wait_for(lambda: step_reached(job.run_dir, 7), 600, "step 7")
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # the driver
        first.wait()
    first_output = first.stdout.read().decode(errors="replace")
    run_id = json.loads((Path(job.run_dir) / "tracking.json").read_text())["mlflow"]["run_id"]
    assert client(store).get_run(run_id).info.status == "RUNNING"  # the killed driver never ended it

    second = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    evaluated = subprocess.run(
        [sys.executable, "-m", "rayft", "eval", str(path), "--address", address],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert evaluated.returncode == 0, evaluated.stdout[-3000:] + evaluated.stderr[-3000:]

    runs = runs_of(store, "tests")
    assert [r.info.run_id for r in runs] == [run_id]  # one tracked run for the whole story
    c = client(store)
    run = c.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    params = run.data.params
    assert params["training.lr"] == "0.005" and params["scaling.num_workers"] == "2"
    assert params["run.tracking.mlflow.experiment"] == "tests"
    assert {m.step for m in c.get_metric_history(run_id, "loss")} == set(range(1, 13))
    assert {m.step for m in c.get_metric_history(run_id, "eval_loss")} >= {12}
    assert run.data.tags["rayft.final_dir"] == os.path.join(job.run_dir, "final")
    assert "eval/eval/finetuned/token_f1" in run.data.metrics and "eval/eval/base/token_f1" in run.data.metrics
    artifacts = {a.path for a in c.list_artifacts(run_id)} | {a.path for a in c.list_artifacts(run_id, "eval")}
    assert {"loss.png", "job.yaml", "eval/report.md", "eval/report.json"} <= artifacts
    model = {a.path for a in c.list_artifacts(run_id, "model")}  # run.tracking.log_model: the final model itself
    assert {"model/config.json", "model/model.safetensors", "model/adapter"} <= model, model

    # The job's own sections are kept and logged; submit.env_vars (the job's credentials) nowhere.
    saved = yaml.safe_load((Path(job.run_dir) / "job.yaml").read_text())
    assert set(saved) == {"model", "data", "training", "scaling", "run", "export", "eval"}
    assert_no_secret_tracked(store, run_id)
    outputs = (first_output, second.stdout, second.stderr, evaluated.stdout, evaluated.stderr)
    assert "done" in second.stdout and "report" in evaluated.stdout  # the outputs searched are the real ones
    assert_secret_nowhere(tmp_path, *outputs, skip=(path,))


@pytest.mark.slow
@pytest.mark.usefixtures("ray_local")
def test_a_sweep_is_a_parent_run_with_a_child_run_per_trial(asha_sweep):
    """The suite's ASHA sweep (conftest.py), tracked: one parent run, a child run per trial with its status."""
    from rayft.training.trainer import read_metrics

    tmp, path, result, store = asha_sweep
    assert {r.status for r in result.rows} == {"completed", "stopped early"}

    runs = runs_of(store)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 4
    parent = parents[0]
    assert parent.info.run_name == "lr" and parent.info.status == "FINISHED"
    assert parent.data.tags["rayft.trials"] == "4" and "best_eval_loss" in parent.data.metrics
    assert parent.data.params["sweep.space.training.lr.grid"] == "[0.005, 0.002, 1e-08, 1e-09]"
    assert {a.path for a in client(store).list_artifacts(parent.info.run_id)} >= {"results.md", "results.csv"}
    by_trial = {r.info.run_name: r for r in children}
    assert set(by_trial) == {r.trial for r in result.rows}
    for row in result.rows:
        child = by_trial[row.trial]
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.data.tags["rayft.trial_status"] == row.status
        assert child.info.status == {"completed": "FINISHED", "stopped early": "KILLED"}[row.status]
        assert float(child.data.params["trial.training.lr"]) == row.params["training.lr"]
        assert float(child.data.params["training.lr"]) == row.params["training.lr"]
        trained = {r["step"] for r in read_metrics(row.run_dir) if "loss" in r}  # 8 steps, fewer when stopped
        logged = {m.step for m in client(store).get_metric_history(child.info.run_id, "loss")}
        assert logged and logged <= trained and (row.status != "completed" or logged == set(range(1, 9)))
    for run in runs:
        assert_no_secret_tracked(store, run.info.run_id, artifacts=run.info.status == "FINISHED")
    assert_secret_nowhere(tmp, skip=(path,))


def test_wandb_offline_keeps_one_run_id_across_a_resume_and_saves_the_artifacts(tmp_path):
    """W&B in offline mode (no network): the run lives under the run dir, a second driver reopens the same run
    id from tracking.json, and artifacts are saved with the run."""
    from rayft.training.config import TrackingConfig
    from rayft.training.tracking import Tracker

    tracking = TrackingConfig.model_validate({"wandb": {"project": "tests", "mode": "offline"}})
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "loss.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    first = Tracker.open(tracking, str(run_dir), "run", {"training": {"lr": 0.001}})
    assert [b.kind for b in first.backends] == ["wandb"]
    for step in (1, 2, 3):
        first.log_record({"step": step, "loss": 1.0 / step, "time": 1.0})
    first.log_artifact(str(run_dir / "loss.png"))
    first.finish()
    run_id = json.loads((run_dir / "tracking.json").read_text())["wandb"]["run_id"]

    second = Tracker.open(tracking, str(run_dir), "run")
    second.log_record({"step": 4, "loss": 0.2})
    second.finish()
    assert json.loads((run_dir / "tracking.json").read_text())["wandb"]["run_id"] == run_id
    runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    # one folder per driver, named by the second it started (two drivers within a second share one)
    assert 1 <= len(runs) <= 2 and all(r.name.endswith(f"-{run_id}") for r in runs)
    assert all((r / f"run-{run_id}.wandb").stat().st_size > 0 for r in runs)
    assert (runs[0] / "files" / "loss.png").read_bytes().startswith(b"\x89PNG")


def test_a_run_dir_in_a_bucket_keeps_its_tracked_run_and_its_files_reach_the_store(s3_bucket, tmp_path):
    """A run dir in S3 (moto's server on 127.0.0.1): tracking.json lives in the bucket, a second driver finds the
    same run there, and an artifact in the bucket is copied into the store."""
    from rayft.training import storage
    from rayft.training.config import TrackingConfig
    from rayft.training.tracking import Tracker

    store = tmp_path / "mlruns"
    tracking = TrackingConfig.model_validate({"mlflow": {"uri": str(store)}})
    run_dir = f"{s3_bucket}/runs/cloud"
    storage.write_bytes(storage.join(run_dir, "loss.png"), b"\x89PNG\r\n\x1a\na curve")
    first = Tracker.open(tracking, run_dir, "cloud", {"training": {"lr": 0.002}})
    first.log_record({"step": 1, "loss": 1.5})
    first.log_artifact(storage.join(run_dir, "loss.png"))
    first.finish()
    state = json.loads(storage.read_text(storage.join(run_dir, "tracking.json")))
    second = Tracker.open(tracking, run_dir, "cloud")
    second.log_record({"step": 2, "loss": 1.0})
    second.finish()

    c = client(store)
    [run] = runs_of(store)
    assert run.info.run_id == state["mlflow"]["run_id"] and run.data.tags["rayft.run_dir"] == run_dir
    assert [m.step for m in c.get_metric_history(run.info.run_id, "loss")] == [1, 2]
    assert run.data.params["training.lr"] == "0.002"
    local = c.download_artifacts(run.info.run_id, "loss.png", str(tmp_path))
    assert Path(local).read_bytes() == b"\x89PNG\r\n\x1a\na curve"


@pytest.mark.slow
@pytest.mark.usefixtures("ray_local")
def test_a_run_that_fails_ends_its_tracked_run_failed_with_the_reason(tmp_path, tiny_model_dir):
    from rayft.training.data import DataError
    from rayft.training.trainer import run_training

    store = tmp_path / "mlruns"
    job = load_config(tracked_job(tmp_path, tiny_model_dir, store, n_rows=4))  # 4 rows, 8 per step
    with pytest.raises(DataError, match="fewer than one global batch"):
        run_training(job)
    [run] = runs_of(store, "tests")
    assert run.info.status == "FAILED"
    assert "fewer than one global batch" in run.data.tags["rayft.error"]
    assert run.data.params["training.lr"] == "0.005" and not [k for k in run.data.params if k.startswith("submit.")]
    assert HF_TOKEN not in json.dumps({**run.data.params, **run.data.tags})
    assert_secret_nowhere(tmp_path, skip=(tmp_path / "job.yaml",))
