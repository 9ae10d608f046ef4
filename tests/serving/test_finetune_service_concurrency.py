"""Two fine-tuning services on one storage path, as a redeploy (old and new ingress replica) or a second endpoint
makes them: one lease holder moves the jobs along, a cancel written by one while the other holds an older copy of
the record still ends the job cancelled with its Ray job stopped, and an endpoint of another cluster neither
follows nor takes the namespace's jobs unless it has a namespace of its own. Real services, real storage, real
Ray jobs on the suite's local Ray."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from helpers import chat, tiny_llama

OWNER = "a" * 64
TEMPLATE = {
    "training": {"micro_batch_size": 4, "global_batch_size": 8, "epochs": 50, "checkpoint_every_steps": 1000},
    "data": {"max_seq_len": 64, "packing": False},
    "scaling": {"num_workers": 1},
}


def service(store: Path, model: Path, cluster: str, **finetune):
    from rayft.serving.config import FinetuneConfig
    from rayft.serving.files import FileStore
    from rayft.serving.finetune import FinetuneService, ServedBase

    cfg = FinetuneConfig(storage_path=str(store), job=TEMPLATE, poll_interval_s=0.2, max_epochs=100, **finetune)
    return FinetuneService(cfg, FileStore(cfg), ServedBase("tiny", str(model), None, ("tiny",)), lambda *a: None,
                           cluster=cluster)  # fmt: skip


def upload(svc, rows: int = 64, owner: str = OWNER) -> str:
    import json

    up = svc.files.begin(owner)
    up.write("".join(json.dumps(chat("What is the password?", "swordfish")) + "\n" for _ in range(rows)).encode())
    return up.commit("pw.jsonl", "fine-tune").id


def create(svc, file_id: str, owner: str = OWNER) -> str:
    from rayft.serving.openai_api import FineTuningJobCreate

    return svc.create(owner, FineTuningJobCreate(model="tiny", training_file=file_id))["id"]


def jobs_client():
    import ray
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(f"http://{ray._private.worker.get_dashboard_url()}")


def ray_status(ray_job: str) -> str:
    return str(jobs_client().get_job_status(ray_job))


@pytest.fixture(scope="module")
def model(smol_tokenizer, tmp_path_factory) -> Path:
    return tiny_llama(tmp_path_factory.mktemp("conc-model"), smol_tokenizer, sharp=True)


@pytest.mark.slow  # a real Ray job
def test_a_cancel_between_the_other_replicas_read_and_write_still_ends_cancelled(ray_local, model, tmp_path):
    old = service(tmp_path / "store", model, "cluster-1")  # the replica before a redeploy: it holds the lease
    new = service(tmp_path / "store", model, "cluster-1")  # the replica after it, taking requests already
    assert old.lease.hold() and not new.lease.hold()  # one poller at a time
    job_id = create(new, upload(new))
    old._scan()  # the old replica finds the job the new one created

    save = old.store.save
    raced = []

    def save_after_a_cancel(rec):  # the old replica read the record, then the cancel lands, then it writes
        if rec.job.status == "running" and not raced:
            raced.append(new.cancel(OWNER, job_id)["status"])
        save(rec)

    old.store.save = save_after_a_cancel
    deadline = time.time() + 180
    while not raced:
        rec = old.store._read(OWNER, job_id)
        assert time.time() < deadline, (rec.job, rec.ray_job_id and ray_status(rec.ray_job_id))
        old.poll()
        time.sleep(0.2)
    assert raced == ["cancelled"]
    ray_job = old.store._read(OWNER, job_id).ray_job_id
    while ray_status(ray_job) != "STOPPED" or old._active:
        assert time.time() < deadline, (ray_status(ray_job), old._active)
        old.poll()
        time.sleep(0.2)
    for svc in (old, new):
        job = svc.get(OWNER, job_id)
        assert job["status"] == "cancelled" and job["error"] is None, job
    # the old replica stops (Serve's shutdown of it) and hands the lease over at once
    old.stop()
    assert new.lease.hold()
    new.stop()


def test_an_endpoint_of_another_cluster_is_refused_a_live_namespace_and_keeps_its_own_apart(model, tmp_path):
    from rayft.serving.openai_api import ApiError

    first = service(tmp_path / "store", model, "cluster-1")
    assert first.lease.hold()
    file_id = upload(first)
    job_id = create(first, file_id)
    other = service(tmp_path / "store", model, "cluster-2")
    assert not other.lease.hold()  # it would mark cluster-1's jobs lost and run its queued ones on cluster-2
    with pytest.raises(ApiError) as e:
        create(other, file_id)
    assert e.value.status == 503 and e.value.code == "namespace_in_use"
    assert "serve.finetune.namespace" in e.value.message

    apart = service(tmp_path / "store", model, "cluster-2", namespace="team-b")
    assert apart.lease.hold()
    own = create(apart, file_id)  # files are shared by the key; jobs are the namespace's own
    apart._scan()
    first._scan()
    assert [(OWNER, own)] == sorted(apart._active) and (OWNER, own) not in first._active
    assert job_id not in [j["id"] for j in apart.list(OWNER, None, 100)["data"]]
    assert own not in [j["id"] for j in first.list(OWNER, None, 100)["data"]]
    assert (tmp_path / "store" / "namespaces" / "team-b" / "jobs" / OWNER / own / "job.json").is_file()
    # once the first endpoint is gone (its lease handed back), another cluster may take the namespace over
    first.stop()
    assert other.lease.hold()
    assert create(other, file_id)


def test_the_active_jobs_of_every_key_together_are_capped(model, tmp_path):
    from rayft.serving.openai_api import ApiError

    svc = service(tmp_path / "store", model, "cluster-1", max_active_jobs=3, max_active_jobs_per_key=2)
    b, c = "b" * 64, "c" * 64
    files = {k: upload(svc, owner=k) for k in (b, c)}
    first = create(svc, files[b], b)
    create(svc, files[b], b)
    create(svc, files[c], c)
    with pytest.raises(ApiError) as e:  # c is under its own limit, the server is at its limit
        create(svc, files[c], c)
    assert e.value.status == 429 and "serve.finetune.max_active_jobs = 3" in e.value.message
    svc.cancel(b, first)
    assert create(svc, files[c], c)


def test_validation_that_fails_for_no_fault_of_the_rows_is_retried_then_fails_the_job_with_why(model, tmp_path):
    svc = service(tmp_path / "store", model, "cluster-1")
    file_id = upload(svc)
    job_id = create(svc, file_id)
    (tmp_path / "store" / "files" / OWNER / file_id / "content").unlink()  # the store lost the bytes under it
    svc.poll()
    svc.poll()
    assert svc.get(OWNER, job_id)["status"] == "validating_files"  # tried again
    svc.poll()
    job = svc.get(OWNER, job_id)
    assert job["status"] == "failed" and job["error"]["code"] == "validation_failed", job
    assert "failed 3 times, not for their rows" in job["error"]["message"] and "content" in job["error"]["message"]
    assert not svc._active


def test_a_jobs_copies_count_against_its_keys_quota_while_it_trains_and_go_when_it_ends(model, tmp_path):
    from rayft.serving.openai_api import ApiError

    svc = service(tmp_path / "store", model, "cluster-1", ray_address="http://127.0.0.1:9")  # no cluster there
    a = upload(svc)
    size = svc.files.usage(OWNER)[a]
    svc = service(
        tmp_path / "store",
        model,
        "cluster-1",
        ray_address="http://127.0.0.1:9",
        max_stored_bytes_per_key=int(2.5 * size),
    )
    b = upload(svc)
    assert svc.files.usage(OWNER) == {a: size, b: size}  # the record, not a scan of the files
    with pytest.raises(ApiError) as e:  # the job's copy of `a` would make 3 x size
        create(svc, a)
    assert e.value.status == 429 and e.value.code == "quota_exceeded" and "copy of its files" in e.value.message
    svc.files.delete(OWNER, b)
    job_id = create(svc, a)
    seen = []

    def submit(*args):  # what the key holds when its job goes to the cluster
        seen.append(dict(svc.files.usage(OWNER)))
        raise RuntimeError("no cluster here")

    svc._submit = submit
    svc.poll()
    assert seen == [{a: size, job_id: size}]
    job = svc.get(OWNER, job_id)
    assert job["status"] == "failed" and job["error"]["code"] == "submission_failed"
    assert svc.files.usage(OWNER) == {a: size}  # its copy went with its end
    assert not (tmp_path / "store" / "jobs" / OWNER / job_id / "train.jsonl").exists()
