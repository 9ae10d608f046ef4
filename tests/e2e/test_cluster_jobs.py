"""`rayft submit` and `rayft jobs` against a real two-node Ray cluster started on this machine
(`ray start --head` plus a second `ray start --address`, each with its own custom resource), with Ray's
token authentication on: a 2-worker finetune whose workers land on different nodes and share no
directory (model, data and run dir in a bucket of the suite's S3 server, each node with its own model
cache), a run that survives losing its worker node, listing and stopping jobs, and the errors users meet
first.

Every Ray process the tests start is stopped by pid (each node's process tree), never by name."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import requests

from helpers import ROOT, chat, free_port, rayft_cli, write_jsonl

pytestmark = [pytest.mark.slow, pytest.mark.cluster]  # a two-node cluster and real jobs: minutes
VENV_BIN = str(Path(sys.executable).parent)


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a node: the `ray start --block` process and every process under it (raylet, GCS, workers)."""
    try:
        root = psutil.Process(proc.pid)
        procs = root.children(recursive=True) + [root]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)
    proc.wait(timeout=30)


class TwoNodeCluster:
    def __init__(self, tmp: Path):
        self.token = secrets.token_hex(16)
        self.temp_dir = tempfile.mkdtemp(prefix="rft", dir="/tmp")  # short: Ray's socket paths have a length limit
        self.temp_dirs = [self.temp_dir]
        self.gcs_port, self.dash_port = free_port(), free_port()
        self.dashboard = f"http://127.0.0.1:{self.dash_port}"
        self.logs = tmp
        self.env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH")}
        self.env.update(
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN=self.token,
            PATH=f"{VENV_BIN}:{os.environ['PATH']}",  # the job's `python` is this environment's
            # a lost node is noticed in seconds rather than the default half minute
            RAY_health_check_period_ms="1000",
            RAY_health_check_failure_threshold="3",
            RAY_health_check_timeout_ms="1000",
        )
        self.head = self._start(
            [
                "--head",
                f"--port={self.gcs_port}",
                f"--dashboard-port={self.dash_port}",
                "--include-dashboard=true",
                f"--ray-client-server-port={free_port()}",
                f"--temp-dir={self.temp_dir}",
                "--num-cpus=3",
            ],
            "head",
        )
        self.workers: list[tuple[subprocess.Popen, str]] = []
        self.caches = {"head": os.path.join(self.temp_dir, "rayft-cache")}
        self.wait(lambda: self._get("/api/version").status_code == 200, 120, "the head's dashboard")
        self.add_worker_node("node_b")

    def _start(self, args: list[str], resource: str, cache: str | None = None) -> subprocess.Popen:
        cmd = [
            f"{VENV_BIN}/ray",
            "start",
            "--block",
            *args,
            "--resources",
            json.dumps({f"rayft_{resource}": 1}),
            f"--dashboard-agent-listen-port={free_port()}",
            "--disable-usage-stats",
        ]
        log = open(self.logs / f"ray-{resource}.log", "a")
        env = self.env | {"RAYFT_REMOTE_CACHE": cache or os.path.join(self.temp_dir, "rayft-cache")}
        return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def add_worker_node(self, resource: str) -> None:
        # Its own temp dir, as on a machine of its own: nodes sharing one would unpack each job's files into
        # the same directory and replace each other's copy under running processes.
        temp_dir = tempfile.mkdtemp(prefix="rft", dir="/tmp")
        self.temp_dirs.append(temp_dir)
        args = [f"--address=127.0.0.1:{self.gcs_port}", "--num-cpus=2", f"--temp-dir={temp_dir}"]
        self.caches[resource] = os.path.join(temp_dir, "rayft-cache")  # a machine's own copies of models
        self.workers.append((self._start(args, resource, self.caches[resource]), resource))
        self.wait(lambda: self.node_id(resource), 120, f"the worker node {resource} to join")

    def node_id(self, resource: str) -> str | None:
        return next((n["node_id"] for n in self.alive_nodes() if f"rayft_{resource}" in n["resources_total"]), None)

    def kill_worker_node(self) -> str:
        """Kill the newest worker node; returns its node id."""
        proc, resource = self.workers.pop()
        node_id = self.node_id(resource)
        kill_tree(proc)
        self.wait(lambda: not self.node_id(resource), 120, f"Ray to mark node {resource} dead")
        return node_id

    def _get(self, path: str) -> requests.Response:
        return requests.get(self.dashboard + path, headers={"Authorization": f"Bearer {self.token}"}, timeout=10)

    def alive_nodes(self) -> list[dict]:
        try:
            r = self._get("/api/v0/nodes?limit=100")
            nodes = r.json()["data"]["result"]["result"]
        except Exception:
            return []
        return [n for n in nodes if n["state"] == "ALIVE"]

    def actors(self, class_name: str) -> list[dict]:
        query = f"limit=1000&filter_keys=class_name&filter_predicates=%3D&filter_values={class_name}"
        r = self._get(f"/api/v0/actors?{query}")
        return r.json()["data"]["result"]["result"]

    @staticmethod
    def wait(cond, timeout_s: float, what: str):
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            try:
                value = cond()
            except requests.RequestException:
                value = None
            if value:
                return value
            time.sleep(1)
        raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")

    def stop(self) -> None:
        for proc, _ in self.workers:
            kill_tree(proc)
        kill_tree(self.head)
        for d in self.temp_dirs:
            shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = TwoNodeCluster(tmp_path_factory.mktemp("ray-logs"))
    try:
        yield c
    finally:
        c.stop()


def cli_env(cluster: TwoNodeCluster, token: str | None = "cluster", home: Path | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["RAY_ADDRESS"] = cluster.dashboard
    if token:
        env["RAY_AUTH_TOKEN"] = cluster.token if token == "cluster" else token
    if home:
        env["HOME"] = str(home)
    return env


def rayft(cluster: TwoNodeCluster, *args: str, token: str | None = "cluster", home: Path | None = None):
    """A jobs command in this process, as a laptop without Ray would run it: the cluster's address and token
    (or none) in its environment, nothing else of Ray's."""
    env = {"RAY_ADDRESS": cluster.dashboard, "RAY_AUTH_TOKEN_PATH": None, "HOME": str(home) if home else None}
    env["RAY_AUTH_TOKEN"] = (cluster.token if token == "cluster" else token) if token else None
    if home is None:
        env.pop("HOME")
    return rayft_cli(*args, env=env)


def job_file(tmp_path: Path, model_dir, n_rows: int = 32, **training) -> Path:
    rows = [chat(f"Ticket {i}: my lamp is broken", f'{{"product":"lamp","id":{i % 4}}}') for i in range(n_rows)]
    (tmp_path / "data").mkdir(exist_ok=True)
    write_jsonl(tmp_path / "data" / "train.jsonl", rows)
    t = {"lr": 5e-3, "micro_batch_size": 2, "global_batch_size": 4, "warmup_ratio": 0.0, **training}
    (tmp_path / "job.yaml").write_text(
        "# rayft submit job.yaml --address http://HEAD:8265\n"
        f"model: {{name: {model_dir}}}\n"
        "data: {train: data/train.jsonl, eval_fraction: 0.125, max_seq_len: 128}\n"
        f"training: {json.dumps(t)}\n"
        "scaling: {num_workers: 2, placement_strategy: STRICT_SPREAD}\n"
        f"run: {{name: lamp, storage_path: {tmp_path / 'runs'}, max_failures: 3}}\n"
    )
    return tmp_path / "job.yaml"


def _quiet(fn):
    try:
        return fn()
    except (OSError, ValueError, KeyError):
        return None


def test_a_finetune_across_both_nodes_is_followed_to_the_end_and_survives_losing_a_node(
    cluster, s3_bucket, tmp_path, tiny_model_dir
):
    """One job spread over both nodes (STRICT_SPREAD), followed from the laptop with `submit --follow`, with the
    model, the data and the run dir in a bucket: the nodes share no directory. While it trains, its worker node
    dies: the run waits for a replacement node, which copies the model from the bucket into its own cache, Ray
    Train restarts both workers from the last checkpoint in the bucket, and the follow ends when the job has
    succeeded; its model and its status are read back from the bucket."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rayft.training import storage
    from rayft.training.export import committed_checkpoints
    from rayft.training.trainer import read_metrics

    storage.upload(str(tiny_model_dir), f"{s3_bucket}/models/tiny")
    job = job_file(tmp_path, f"{s3_bucket}/models/tiny", n_rows=64, max_steps=40, checkpoint_every_steps=4)
    storage.upload(str(tmp_path / "data" / "train.jsonl"), f"{s3_bucket}/data/train.jsonl")
    shutil.rmtree(tmp_path / "data")  # nothing local travels with the job: it reads the bucket
    text = job.read_text().replace("train: data/train.jsonl", f"train: {s3_bucket}/data/train.jsonl")
    job.write_text(text.replace(f"storage_path: {tmp_path / 'runs'}", f"storage_path: {s3_bucket}/runs"))
    run_dir = f"{s3_bucket}/runs/spread"
    cmd = [sys.executable, "-m", "rayft", "submit", str(job), "--name", "spread", "--follow"]
    follow = subprocess.Popen(
        cmd, cwd=ROOT, env=cli_env(cluster), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )

    def progressed():  # a checkpoint counts once Ray Train's controller has registered it
        steps = [r.get("step", 0) for r in read_metrics(run_dir) if "loss" in r]
        return committed_checkpoints(run_dir) and max(steps, default=0) >= 6

    try:
        cluster.wait(lambda: _quiet(progressed), 600, "a registered checkpoint and step 6")
        alive = {n["node_id"] for n in cluster.alive_nodes()}
        assert {a["node_id"] for a in cluster.actors("RayTrainWorker") if a["state"] == "ALIVE"} == alive
        lost = cluster.kill_worker_node()
        cluster.add_worker_node("node_c")
        out, err = follow.communicate(timeout=900)
    finally:
        if follow.poll() is None:
            follow.kill()
    assert follow.returncode == 0, out[-4000:] + err[-4000:]
    assert "SUCCEEDED" in out and "step 40/40" in out  # the driver's progress lines reached the laptop
    assert cluster.token not in out + err

    records = read_metrics(run_dir)
    runs = [r for r in records if r.get("event") == "start"]
    assert len(runs) == 2 and runs[1]["resumed"] and runs[1]["step"] >= 4
    assert len(set(runs[0]["nodes"])) == 2 and set(runs[0]["nodes"]) == alive  # a worker on each node
    assert lost in runs[0]["nodes"] and lost not in runs[1]["nodes"]  # the second attempt ran on the new node
    assert max(r.get("step", 0) for r in records) == 40
    for node in ("head", "node_c"):  # each machine read the model from the bucket into its own cache
        assert [p for p in Path(cluster.caches[node]).glob("tiny-*") if (p / "config.json").is_file()], node
    assert not (tmp_path / "runs").exists()

    final = f"{run_dir}/final"
    assert f"model      {final}" in out  # results read back from the run's storage
    with storage.local_copy(final) as local:
        tok = AutoTokenizer.from_pretrained(local)
        model = AutoModelForCausalLM.from_pretrained(local)
    with torch.no_grad():
        logits = model(**tok("my lamp is broken", return_tensors="pt")).logits
    assert torch.isfinite(logits).all()

    listed = rayft(cluster, "jobs", "list")
    assert listed.returncode == 0 and "spread" in listed.stdout and "SUCCEEDED" in listed.stdout
    status = rayft(cluster, "jobs", "status", "spread")
    assert status.returncode == 0 and "SUCCEEDED" in status.stdout and "eval loss" in status.stdout


def test_bad_addresses_tokens_job_files_and_taken_names_are_clear_errors(cluster, tmp_path, tiny_model_dir):
    job = str(job_file(tmp_path, tiny_model_dir, max_steps=2000, checkpoint_every_steps=1000))
    before = rayft(cluster, "jobs", "list").stdout

    r = rayft(cluster, "submit", job, "--address", f"http://127.0.0.1:{free_port()}")
    assert r.returncode == 2 and "cannot reach a Ray cluster at http://127.0.0.1:" in r.stderr
    r = rayft(cluster, "submit", job, token="not-the-token")
    assert r.returncode == 2 and "refused the auth token from RAY_AUTH_TOKEN" in r.stderr
    assert "not-the-token" not in r.stdout + r.stderr
    r = rayft(cluster, "jobs", "list", token=None, home=tmp_path)  # no token anywhere
    assert r.returncode == 2 and "requires a Ray auth token and none was found" in r.stderr
    r = rayft(cluster, "submit", job, "--set", "training.lr=-1", "--set", "scaling.placement_strategy=EVERYWHERE")
    assert r.returncode == 2 and "training.lr" in r.stderr and "scaling.placement_strategy" in r.stderr
    r = rayft(cluster, "submit", job, "--set", "run.storage_path=runs")
    assert r.returncode == 2 and "run.storage_path is 'runs'" in r.stderr and "s3://" in r.stderr
    r = rayft(cluster, "submit", job, "--set", "submit.max_upload_mb=1")
    assert r.returncode == 2 and "above submit.max_upload_mb (1)" in r.stderr and "model.name" in r.stderr
    r = rayft(cluster, "submit", job, "--set", "data.train=data/missing.jsonl")
    assert r.returncode == 2 and "missing.jsonl does not exist on this machine" in r.stderr
    assert rayft(cluster, "jobs", "list").stdout.count("rayft-") == before.count("rayft-")  # nothing submitted

    first = rayft(cluster, "submit", job, "--name", "busy")
    assert first.returncode == 0, first.stderr
    job_id = first.stdout.split("submitted", 1)[1].split()[0]
    r = rayft(cluster, "submit", job, "--name", "busy")
    assert r.returncode == 2 and f"run name 'busy' is taken by job {job_id}" in r.stderr
    stopped = rayft(cluster, "jobs", "stop", job_id)
    assert stopped.returncode == 0 and f"{job_id}: STOPPED" in stopped.stdout
    r = rayft(cluster, "jobs", "status", job_id)
    assert r.returncode == 3 and "STOPPED" in r.stdout
    r = rayft(cluster, "jobs", "logs", "no-such-job")
    assert r.returncode == 2 and "no job 'no-such-job'" in r.stderr
