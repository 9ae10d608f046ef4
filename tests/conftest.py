"""Shared fixtures: one local Ray for the whole suite, moto's S3 server, the built-in SmolLM2 tokenizer and the tiny
model. Plain helpers are in helpers.py."""

from __future__ import annotations

import os
import tempfile

import pytest

from helpers import free_port, tiny_llama

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Ray Train's controller polls its workers every 2 s: every run's start, each report and its end wait on that
# poll. The suite runs many short runs, so it polls faster (set before Ray starts: its workers inherit it).
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
# Each run would also start an actor that watches for node preemption (spot instances): a Python process more
# per run on two cores, for an event a local suite never sees.
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")


# Cloud storage in tests is a real S3 API server on 127.0.0.1 (moto's, started by the `s3` fixture). Its address
# and test credentials are in the environment before any Ray process starts, since Ray's workers (training
# ranks, data tasks, replicas) inherit the environment of the cluster they belong to.
S3_PORT = int(os.environ.setdefault("RAYFT_TEST_S3_PORT", str(free_port())))
os.environ.setdefault("AWS_ENDPOINT_URL", f"http://127.0.0.1:{S3_PORT}")
os.environ.setdefault("AWS_ACCESS_KEY_ID", "rayft-test")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "rayft-test")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
# Models and adapters copied from the bucket go to a cache of this session's own, not the user's ~/.cache.
os.environ.setdefault("RAYFT_REMOTE_CACHE", tempfile.mkdtemp(prefix="rayft-test-remote-cache-"))


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the suite. 4 logical CPUs on a 2-core machine: 2 training workers hold
    one each and the data stages (fractional CPUs) still find room, as on a real cluster."""
    import ray

    from rayft.cluster.runtime import connect

    connect(num_cpus=4, dashboard=True)  # the dashboard's state API frees a stopped sweep trial's workers
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on 127.0.0.1:S3_PORT for the rest of the session (a separate process, ended by pid)."""
    import subprocess
    import sys
    import time
    import urllib.request

    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(S3_PORT)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 60
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{S3_PORT}/", timeout=2)
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError("moto's S3 server did not start") from None
            time.sleep(0.2)
    yield f"http://127.0.0.1:{S3_PORT}"
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture
def s3_bucket(s3_server, request):
    """A fresh bucket for one test, s3://rayft-<test name>/ (created as an operator would, with boto3)."""
    import re

    import boto3

    name = "rayft-" + re.sub(r"[^a-z0-9-]+", "-", request.node.name.lower())[:50].strip("-")
    boto3.client("s3").create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture(scope="session")
def serve_port():
    """The HTTP port of the suite's Ray Serve (Serve keeps the port it first started with)."""
    return free_port()


@pytest.fixture(scope="session")
def smol_tokenizer():
    from rayft.training.models import load_tokenizer

    return load_tokenizer("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smol_tokenizer):
    """A 2-layer Llama with SmolLM2's tokenizer and chat template, saved as a normal model dir."""
    return tiny_llama(tmp_path_factory.mktemp("tiny-llama"), smol_tokenizer)


@pytest.fixture(scope="session")
def asha_sweep(ray_local, tiny_model_dir, tmp_path_factory):
    """The suite's ASHA sweep, read by the tests of its leaderboard (tuning) and of its tracked runs (training):
    four learning rates, two that learn and two that cannot move the weights in 8 steps, two trials at once (so
    the hopeless pair reaches ASHA's first rung, step 2, after a good one recorded its value). It is tracked in
    an MLflow store given by a relative path (where the sweep starts, not where its trials run), with a secret in
    submit.env_vars. (dir, job file, result, MLflow store)"""
    import yaml

    from helpers import HF_TOKEN, sweep_job_file
    from rayft.cluster.config import load_config
    from rayft.tuning.sweep import run_sweep

    tmp = tmp_path_factory.mktemp("asha")
    sweep = {
        "name": "lr",
        "space": {"training.lr": {"grid": [5e-3, 2e-3, 1e-8, 1e-9]}},
        "num_samples": 1,  # one pass over the grid
        "max_concurrent_trials": 2,
        "scheduler": {"grace_period": 2, "reduction_factor": 2},
    }
    path = sweep_job_file(tmp, tiny_model_dir, sweep)
    doc = yaml.safe_load(path.read_text())
    doc["run"]["tracking"] = {"mlflow": {"uri": "mlruns"}}
    doc["submit"] = {"env_vars": {"HF_TOKEN": HF_TOKEN}}
    path.write_text("# rayft sweep job.yaml\n" + yaml.safe_dump(doc, sort_keys=False))
    cwd = os.getcwd()
    os.chdir(tmp)
    try:
        result = run_sweep(load_config(path))
    finally:
        os.chdir(cwd)
    return tmp, path, result, tmp / "mlruns"
