"""Run directories and data in cloud storage, against a real S3 API server on 127.0.0.1 (moto's), through the
same pyarrow filesystems users run: nothing is patched, and nothing may land in a local directory named `s3:`."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from helpers import QUICKSTART, chat, consumed_in, rayft_cli, write_jsonl
from rayft.training import storage


def test_files_and_trees_round_trip_through_the_bucket(s3_bucket, tmp_path):
    root = storage.join(s3_bucket, "runs", "r1")
    storage.write_text(storage.join(root, "job.yaml"), "a: 1\n")
    assert storage.read_text(storage.join(root, "job.yaml")) == "a: 1\n"
    assert storage.exists(root) and storage.is_dir(root) and not storage.exists(storage.join(root, "nope"))

    tree = tmp_path / "ckpt"
    (tree / "ds").mkdir(parents=True)
    (tree / "ds" / "mp_rank_00_model_states.pt").write_bytes(b"w" * 1000)
    (tree / "ds" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"o" * 5000)
    (tree / "trainer_state_rank0.json").write_text('{"step": 3}')
    storage.upload(str(tree), storage.join(root, "checkpoint_1"))
    assert storage.listdir(root) == ["checkpoint_1", "job.yaml"]
    assert storage.glob(root, "checkpoint_*") == [storage.join(root, "checkpoint_1")]
    state = storage.join(root, "checkpoint_1", "trainer_state_rank0.json")
    assert storage.match(f"{s3_bucket}/runs/**/*.json") == [state]

    # A download can leave out what it does not need (the optimizer states of a checkpoint, for an export).
    with storage.local_copy(storage.join(root, "checkpoint_1"), skip=("*optim_states*",)) as local:
        got = sorted(str(p.relative_to(local)) for p in Path(local).rglob("*") if p.is_file())
        assert got == ["ds/mp_rank_00_model_states.pt", "trainer_state_rank0.json"]
    assert not os.path.exists(local)  # the temporary copy is gone

    with storage.open_binary(state) as f:
        f.seek(1)
        assert f.readline() == b'"step": 3}'

    storage.move_aside(root, root + ".prev")  # --restart on an object store: copy, then delete
    assert not storage.exists(root) and storage.listdir(root + ".prev") == ["checkpoint_1", "job.yaml"]


def test_the_nodes_copies_of_cloud_models_stay_within_their_limit_least_recently_used_first(
    s3_bucket, tmp_path, monkeypatch
):
    monkeypatch.setenv("RAYFT_REMOTE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("RAYFT_REMOTE_CACHE_GIB", str(2.5 * 4096 / 1024**3))  # room for two 4 KiB copies
    for name in ("a", "b", "c"):
        local = tmp_path / name
        local.mkdir()
        (local / "adapter_model.safetensors").write_bytes(name.encode() * 4096)
        storage.upload(str(local), f"{s3_bucket}/adapters/{name}")
    a = storage.cached(f"{s3_bucket}/adapters/a")
    b = storage.cached(f"{s3_bucket}/adapters/b")
    os.utime(b, (1, 1))  # b was used long ago, a just now...
    assert storage.cached(f"{s3_bucket}/adapters/a") == a
    c = storage.cached(f"{s3_bucket}/adapters/c")  # ...so c's download pushes b out
    assert Path(a).is_dir() and Path(c).is_dir() and not Path(b).exists()
    assert storage.cached(f"{s3_bucket}/adapters/b") == b  # downloaded again at its next use
    assert Path(b, "adapter_model.safetensors").read_bytes()[:1] == b"b"


def test_a_missing_bucket_is_a_clear_error(s3_server):
    with pytest.raises(storage.StorageError, match=r"cannot write s3://no-such-bucket-here/x: .*bucket.*credentials"):
        storage.write_text("s3://no-such-bucket-here/x", "x")
    with pytest.raises(FileNotFoundError):
        storage.read_text("s3://no-such-bucket-here/x")


def test_data_in_the_bucket_gives_the_same_rows_and_tokens(s3_bucket, ray_local):
    from rayft.training.config import DataConfig, ModelConfig
    from rayft.training.data import DataError, check_rows, tokenized

    for name in ("train.jsonl", "eval.jsonl"):
        storage.upload(str(QUICKSTART / name), storage.join(s3_bucket, "data", name))
    model = ModelConfig()
    local = DataConfig(train=str(QUICKSTART / "train.jsonl"), eval=str(QUICKSTART / "eval.jsonl"), shuffle=False)
    remote = DataConfig(train=f"{s3_bucket}/data/train.jsonl", eval=f"{s3_bucket}/data/*.jsonl", shuffle=False)
    assert {k: v.rows for k, v in check_rows(remote).items()} == {"train": 1200, "eval": 1200 + 170}

    def tokens(data):
        return [list(r["input_ids"]) for r in tokenized(model, data, "train").take_all()]

    assert tokens(remote) == tokens(local)
    with pytest.raises(DataError, match=r"data.train: not found: s3://.*/data/missing.jsonl"):
        check_rows(DataConfig(train=f"{s3_bucket}/data/missing.jsonl"))
    with pytest.raises(DataError, match=r"data.train: the pattern s3://.*/nothing/\*.jsonl matches no files"):
        check_rows(DataConfig(train=f"{s3_bucket}/nothing/*.jsonl"))


@pytest.mark.slow
def test_a_run_in_the_bucket_keeps_every_artifact_there(
    s3_bucket, ray_local, serve_port, tiny_model_dir, tmp_path, monkeypatch
):
    """2 workers, LoRA, data read from the bucket, run dir in the bucket: job.yaml, the metrics the driver
    followed, TensorBoard, loss.png, the checkpoints and final/ are all in the bucket; rayft export, rayft eval
    and rayft serve work on it there; --restart moves the run aside there."""
    from rayft.cluster.config import load_config
    from rayft.training.export import list_checkpoints
    from rayft.training.trainer import prepare_run_dir, read_metrics, run_training

    monkeypatch.chdir(tmp_path)  # where a local file API handed "s3://..." would create a directory "s3:"
    rows = [chat(f"Ticket {i:03d}: my lamp is broken", f'{{"product":"lamp","id":{i % 4}}}') for i in range(32)]
    write_jsonl(tmp_path / "train.jsonl", rows)
    storage.upload(str(tmp_path / "train.jsonl"), f"{s3_bucket}/data/train.jsonl")
    (tmp_path / "train.jsonl").unlink()
    training = {"method": "lora", "lr": 5e-3, "micro_batch_size": 2, "global_batch_size": 4, "max_steps": 4}
    job_text = (
        f"model: {{name: {tiny_model_dir}}}\n"
        f"data: {{train: {s3_bucket}/data/train.jsonl, eval_fraction: 0.2, max_seq_len: 128}}\n"
        f"training: {json.dumps(training | {'checkpoint_every_steps': 2, 'eval_every_steps': 2})}\n"
        "scaling: {num_workers: 2}\n"
        f"run: {{name: cloud, storage_path: {s3_bucket}/runs}}\n"
    )
    (tmp_path / "job.yaml").write_text(job_text)
    job = load_config(tmp_path / "job.yaml")
    assert job.run_dir == f"{s3_bucket}/runs/cloud"
    seen: list[dict] = []
    result = run_training(job, on_event=seen.append)

    assert result.steps == 4 and result.final_dir == f"{s3_bucket}/runs/cloud/final"
    names = storage.listdir(job.run_dir)
    assert {"job.yaml", "metrics.jsonl", "tensorboard", "loss.png", "final"} <= set(names), names
    assert load_config_text(storage.read_text(storage.join(job.run_dir, "job.yaml")))["run"]["name"] == "cloud"
    records = read_metrics(job.run_dir)
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    assert records[-1]["event"] == "end" and any("eval_loss" in r for r in records)
    assert [r["step"] for r in seen if "loss" in r] == [1, 2, 3, 4]  # the driver followed the bucket's copy
    assert storage.glob(storage.join(job.run_dir, "tensorboard"), "events.out.tfevents.*")
    assert len(storage.read_bytes(storage.join(job.run_dir, "loss.png"))) > 1000
    assert [step for step, _ in list_checkpoints(job.run_dir)] == [2, 4]
    final = storage.listdir(result.final_dir)
    assert {"adapter", "config.json", "rayft_export.json"} <= set(final), final
    info = json.loads(storage.read_text(storage.join(result.final_dir, "rayft_export.json")))
    assert info["step"] == 4 and info["checkpoint"].startswith(f"{s3_bucket}/runs/cloud/checkpoint_")
    assert not any(p.name.startswith("s3") for p in tmp_path.iterdir())  # nothing written through local APIs
    from rayft.cluster.jobs import run_summary  # what `rayft jobs status` shows of a submitted run

    summary = run_summary(job.run_dir)
    assert summary["step"] == 4 and summary["final"] == result.final_dir and summary["eval_loss"] > 0

    # rayft export of a kept checkpoint, from the bucket to the bucket
    step2 = f"{s3_bucket}/exports/step2"
    r = rayft_cli("export", job.run_dir, "--checkpoint", "2", "--out", step2)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(storage.read_text(storage.join(step2, "rayft_export.json")))["step"] == 2

    # rayft eval of the run: the eval rows come from the bucket, each eval actor copies the model to its node,
    # and the report and predictions are written to the run dir in the bucket
    from rayft.training.evaluate import run_eval

    report = run_eval(load_config(tmp_path / "job.yaml", ["eval.max_new_tokens=4", "eval.replicas=1"]))
    assert set(report["models"]) == {"base", "finetuned"} and report["files"]["json"].startswith(s3_bucket)
    assert {"report.json", "report.md", "predictions-finetuned.jsonl"} <= set(
        storage.listdir(storage.join(job.run_dir, "eval"))
    )

    # rayft serve of the run: the spec names the bucket, the replica loads its node's copy
    serve_the_run(job, serve_port)

    assert prepare_run_dir(job, restart=True) is False  # --restart: the earlier run is moved aside, in the bucket
    aside = [n for n in storage.listdir(storage.join(s3_bucket, "runs")) if n.startswith("cloud.prev-")]
    assert len(aside) == 1 and "final" in storage.listdir(storage.join(s3_bucket, "runs", aside[0]))
    assert storage.listdir(job.run_dir) == []


def serve_the_run(job, port: int) -> None:
    from openai import OpenAI
    from ray import serve

    from rayft.serving.deploy import APP_NAME, deploy
    from rayft.serving.spec import build_spec

    cache = Path(storage.cache_dir())  # the suite's own (conftest), so that runs never share copies
    try:
        spec = build_spec(job.run_dir, job.serve, run_dir=job.run_dir, storage_path=job.run.storage_path)
        assert spec.model_path == f"{job.run_dir}/final" and spec.model_name == "cloud"
        base = deploy(spec.with_serve(port=port))
        reply = OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=120).chat.completions.create(
            model="cloud", messages=[{"role": "user", "content": "Ticket 001: my lamp is broken"}], max_tokens=4
        )
        assert reply.choices[0].message.content is not None
        key = storage.tree_fingerprint(spec.model_path)
        copies = [p for p in cache.iterdir() if p.is_dir() and p.name.startswith("final-") and p.name.endswith(key)]
        assert len(copies) == 1 and (copies[0] / "config.json").is_file()  # eval actors and the replica: one copy
    finally:
        serve.delete(APP_NAME)


def load_config_text(text: str) -> dict:
    import yaml

    return yaml.safe_load(text)


def test_a_rank_resuming_from_the_bucket_fetches_only_its_own_partition(s3_bucket, tmp_path):
    from types import SimpleNamespace

    from rayft.training.checkpoints import checkpoint_files

    ckpt = tmp_path / "checkpoint_000"
    (ckpt / "ds").mkdir(parents=True)
    files = ["ds/mp_rank_00_model_states.pt", "trainer_state_rank0.json", "trainer_state_rank1.json"]
    files += [f"ds/zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)]
    for f in files:
        (ckpt / f).write_text(f)
    run_dir = f"{s3_bucket}/runs/r"
    storage.upload(str(ckpt), f"{run_dir}/checkpoint_000")
    checkpoint = SimpleNamespace(path=f"{s3_bucket.removeprefix('s3://')}/runs/r/checkpoint_000")  # Ray's form

    def fetched(rank: int, world: int) -> list[str]:
        with checkpoint_files(checkpoint, run_dir, rank, world) as local:
            return sorted(str(p.relative_to(local)) for p in Path(local).rglob("*") if p.is_file())

    common = ["ds/mp_rank_00_model_states.pt", "trainer_state_rank0.json", "trainer_state_rank1.json"]
    assert fetched(1, 2) == sorted([*common, "ds/zero_pp_rank_1_mp_rank_00_optim_states.pt"])
    assert fetched(0, 2) == sorted([*common, "ds/zero_pp_rank_0_mp_rank_00_optim_states.pt"])
    assert fetched(0, 3) == sorted(files)  # the number of ranks changed: every partition is needed


def epoch_job(tmp_path: Path, model_dir, runs: str, name: str, run_extra: str = "") -> Path:
    """A 2-worker LoRA job of one epoch over 384 ticket rows (48 steps, a checkpoint every 3): the bucket's copy
    of the metrics lags by up to a second, so a kill needs a wide window."""
    rows = [chat(f"Ticket {i:03d}: my lamp is broken", f'{{"product":"lamp","id":{i % 4}}}') for i in range(384)]
    write_jsonl(tmp_path / "train.jsonl", rows)
    training = {"method": "lora", "lr": 5e-3, "micro_batch_size": 4, "global_batch_size": 8, "epochs": 1}
    (tmp_path / "job.yaml").write_text(
        f"model: {{name: {model_dir}}}\n"
        "data: {train: train.jsonl, max_seq_len: 128}\n"
        f"training: {json.dumps(training | {'checkpoint_every_steps': 3, 'zero_stage': 2})}\n"
        "scaling: {num_workers: 2}\n"
        f"run: {{name: {name}, storage_path: {runs}{', ' + run_extra if run_extra else ''}}}\n"
    )
    return tmp_path / "job.yaml"


@pytest.mark.cluster  # a failure drill
@pytest.mark.slow
def test_a_killed_worker_resumes_from_the_bucket(s3_bucket, ray_local, tiny_model_dir, tmp_path):
    """ZeRO-2 LoRA with the run dir in the bucket: a worker killed after a checkpoint; the restarted group
    resumes from the bucket's checkpoint and the epoch's examples are each trained once."""
    import signal
    import threading
    import time

    from rayft.cluster.config import load_config
    from rayft.training.trainer import read_metrics, run_training

    job = load_config(epoch_job(tmp_path, tiny_model_dir, f"{s3_bucket}/runs", "killed", "max_failures: 2"))
    box: dict = {}
    thread = threading.Thread(target=lambda: box.update(result=run_training(job)), daemon=True)
    thread.start()

    from rayft.training.export import committed_checkpoints, list_checkpoints

    def committed() -> list:
        return committed_checkpoints(job.run_dir) or []

    deadline = time.time() + 600
    while not (committed() and any(r.get("step", 0) >= 4 for r in read_metrics(job.run_dir) if "loss" in r)):
        assert time.time() < deadline, "no committed checkpoint and step 4 in the bucket"
        time.sleep(0.2)
    start = next(r for r in read_metrics(job.run_dir) if r.get("event") == "start")
    os.kill(start["pids"][1], signal.SIGKILL)
    thread.join(timeout=600)
    assert "result" in box, "training did not finish after a worker was killed"
    starts = [r for r in read_metrics(job.run_dir) if r.get("event") == "start"]
    assert len(starts) == 2 and starts[1]["resumed"] and starts[1]["step"] >= 3
    assert box["result"].steps == 48
    step, last = list_checkpoints(job.run_dir)[-1]
    assert step == 48
    assert len(consumed_in(last)) == 384  # every example of the epoch trained, none twice
    assert "config.json" in storage.listdir(box["result"].final_dir)


@pytest.mark.cluster  # a failure drill
@pytest.mark.slow
def test_a_killed_driver_is_rerun_and_resumes_from_the_bucket(s3_bucket, tiny_model_dir, tmp_path):
    """`rayft train` (its own local Ray) killed with SIGKILL mid-run, as a lost head or a stopped job's driver
    is; the same command again resumes from the last checkpoint in the bucket and finishes the planned steps,
    and every example of the epoch is trained once."""
    import signal
    import subprocess
    import sys
    import time

    from rayft.cluster.config import load_config
    from rayft.training.export import committed_checkpoints, list_checkpoints
    from rayft.training.trainer import read_metrics

    job = load_config(epoch_job(tmp_path, tiny_model_dir, f"{s3_bucket}/runs", "driver"))
    cmd = [sys.executable, "-m", "rayft", "train", "job.yaml"]
    first = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 600
        while not (
            committed_checkpoints(job.run_dir) and any(r.get("step", 0) >= 4 for r in read_metrics(job.run_dir))
        ):
            assert first.poll() is None, first.stdout.read()[-3000:]
            assert time.time() < deadline, "no committed checkpoint and step 4 in the bucket"
            time.sleep(0.2)
        os.kill(first.pid, signal.SIGKILL)  # the driver only: its local Ray shares its fate
        first.wait(timeout=60)
    finally:
        if first.poll() is None:
            first.kill()
    kept = max(c["metrics"]["step"] for c in committed_checkpoints(job.run_dir))
    assert kept < 48

    again = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "resumed from the checkpoint at step" in again.stdout + again.stderr
    starts = [r for r in read_metrics(job.run_dir) if r.get("event") == "start"]
    # from the last checkpoint committed (one being committed as the driver died may count too)
    assert len(starts) == 2 and starts[1]["resumed"] and starts[1]["step"] >= kept and starts[1]["step"] % 3 == 0
    # the history is whole: the bucket had every step's record up to the checkpoint the run resumed from
    assert {r["step"] for r in read_metrics(job.run_dir) if "loss" in r} == set(range(1, 49))
    step, last = list_checkpoints(job.run_dir)[-1]
    assert step == 48
    assert len(consumed_in(last)) == 384
    assert "config.json" in storage.listdir(f"{job.run_dir}/final")


@pytest.mark.cluster  # a sweep resumed from the bucket
@pytest.mark.slow
def test_a_sweep_in_the_bucket_keeps_its_leaderboard_there_and_resumes_from_it(
    s3_bucket, ray_local, tiny_model_dir, tmp_path, monkeypatch
):
    """2 trials, 2 at once, everything in the bucket: the trials' run dirs and models, the leaderboard, the
    plot, best.yaml and best.json; the same command again resumes from Tune's state in the bucket without
    training anything again; --restart moves the sweep aside there."""
    import yaml

    from rayft.cluster.config import load_config
    from rayft.serving.config import ServeConfig
    from rayft.serving.spec import build_spec
    from rayft.tuning.sweep import best_model, run_sweep

    monkeypatch.chdir(tmp_path)
    rows = [chat(f"Ticket {i}: my lamp is broken", f'{{"product":"lamp","id":{i % 4}}}') for i in range(16)]
    write_jsonl(tmp_path / "train.jsonl", rows)
    storage.upload(str(tmp_path / "train.jsonl"), f"{s3_bucket}/data/train.jsonl")
    doc = {
        "model": {"name": str(tiny_model_dir)},
        "data": {"train": f"{s3_bucket}/data/train.jsonl", "eval_fraction": 0.25, "max_seq_len": 128},
        "training": {"micro_batch_size": 2, "global_batch_size": 4, "max_steps": 3, "eval_every_steps": 3},
        "scaling": {"num_workers": 1},
        "run": {"name": "tiny", "storage_path": f"{s3_bucket}/runs"},
        "sweep": {
            "name": "lr",
            "space": {"training.lr": {"grid": [5e-3, 1e-8]}},
            "num_samples": 1,  # one pass over the grid
            "max_concurrent_trials": 2,
            "scheduler": {"type": "fifo"},
        },
    }
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    job = load_config(tmp_path / "job.yaml")
    result = run_sweep(job)

    root = f"{s3_bucket}/runs/lr"
    assert result.sweep_dir == root and [r.status for r in result.rows] == ["completed", "completed"]
    assert result.best.params["training.lr"] == 5e-3 and result.best.run_dir.startswith(f"{root}/runs/")
    names = set(storage.listdir(root))
    assert {"results.csv", "results.md", "results.png", "best.yaml", "best.json", "rayft-version", "runs"} <= names
    assert result.best.trial in storage.read_text(f"{root}/results.csv").splitlines()[1]
    best = json.loads(storage.read_text(f"{root}/best.json"))
    assert best["model"] == f"{result.best.run_dir}/final" and best["value"] == result.best.metric
    rerun = yaml.safe_load(storage.read_text(f"{root}/best.yaml"))
    assert rerun["training"]["lr"] == 5e-3 and rerun["run"] == {**rerun["run"], "name": "lr-best"}
    spec = build_spec(best_model(root, result.best), ServeConfig())  # what the sweep tells users to serve
    assert spec.model_path == best["model"]
    for r in result.rows:
        assert "final" in storage.listdir(r.run_dir)
    assert not any(p.name.startswith("s3") for p in tmp_path.iterdir())

    stamps = {r.trial: storage.tree_fingerprint(f"{r.run_dir}/final") for r in result.rows}
    again = run_sweep(job)  # the same command: Tune's state in the bucket says every trial has ended
    assert again.resumed and sorted(r.status for r in again.rows) == ["completed", "completed"]
    assert {r.trial: storage.tree_fingerprint(f"{r.run_dir}/final") for r in again.rows} == stamps

    from rayft.tuning.sweep import sweep_dir

    doc["sweep"]["space"]["training.lr"]["grid"] = [5e-3]  # one trial: --restart starts afresh
    (tmp_path / "one.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    aside = run_sweep(load_config(tmp_path / "one.yaml"), restart=True)
    assert [n for n in storage.listdir(f"{s3_bucket}/runs") if n.startswith("lr.prev-")]
    assert sweep_dir(job) == root and len(aside.rows) == 1 and not aside.resumed
