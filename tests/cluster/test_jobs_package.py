"""What `rayft submit` packages, checked without a cluster: which files travel, how the job file is
rewritten to find them, what is refused and why, and that no token ends up in what is sent."""

from __future__ import annotations

import base64
import re
import secrets
from pathlib import Path

import pytest
import yaml

from helpers import chat, rayft_cli, write_jsonl
from rayft.cluster.jobs import SUBPACKAGES, JobsError, dashboard_address, package
from rayft.training.launch import find_token


@pytest.fixture
def job_dir(tmp_path: Path) -> Path:
    (tmp_path / "data" / "parts").mkdir(parents=True)
    write_jsonl(tmp_path / "data" / "facts.jsonl", [chat("q", "a")] * 4)
    for i in range(3):
        write_jsonl(tmp_path / "data" / "parts" / f"p{i}.jsonl", [chat(f"q{i}", "a")] * 2)
    (tmp_path / "job.yaml").write_text(
        "data:\n"
        "  train: [data/facts.jsonl, 'data/parts/*.jsonl', s3://bucket/more.jsonl]\n"
        "  repeat: {facts.jsonl: 2}\n"
        "run: {name: lamp, storage_path: /mnt/shared/runs}\n"
    )
    return tmp_path


def staged(pkg) -> dict:
    return yaml.safe_load((Path(pkg.staging) / "job.yaml").read_text())


def test_local_files_travel_with_the_job_and_remote_ones_stay(job_dir, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_TOKEN", "secret-token-value")
    pkg = package(job_dir / "job.yaml", ["training.lr=1e-4"], "train", "lamp-2")
    try:
        job = staged(pkg)
        assert job["data"]["train"] == ["data/0/facts.jsonl", "data/1/*.jsonl", "s3://bucket/more.jsonl"]
        assert job["data"]["repeat"] == {"facts.jsonl": 2}  # file names survive, so repeat still applies
        assert job["training"]["lr"] == 1e-4 and job["run"] == {"name": "lamp-2", "storage_path": "/mnt/shared/runs"}
        root = Path(pkg.staging)
        assert sorted(p.name for p in (root / "data" / "1").iterdir()) == ["p0.jsonl", "p1.jsonl", "p2.jsonl"]
        assert (root / "data" / "0" / "facts.jsonl").read_text() == (job_dir / "data" / "facts.jsonl").read_text()
        assert pkg.run_dir == "/mnt/shared/runs/lamp-2" and pkg.entrypoint == "python -m rayft.training.run job.yaml"
        (code,) = pkg.runtime_env["py_modules"]  # rayft itself, importable as rayft.* on the cluster
        assert Path(code).name == "rayft" and (Path(code) / "__init__.py").is_file()
        assert sorted(p.name for p in Path(code).iterdir() if p.is_dir()) == sorted(SUBPACKAGES)
        assert (Path(code) / "training" / "loop.py").is_file() and (Path(code) / "serving" / "app.py").is_file()
        assert not list(Path(code).rglob("__pycache__")) and not list(Path(code).rglob("test_*.py"))
        sent = repr(pkg.runtime_env) + repr(pkg.metadata) + (root / "job.yaml").read_text()
        assert "secret-token-value" not in sent
    finally:
        pkg.cleanup()
    assert not Path(pkg.staging).exists() and not Path(pkg.code).exists()


def test_files_on_shared_mounts_are_read_in_place(job_dir):
    pkg = package(job_dir / "job.yaml", [f"submit.shared_paths=[{job_dir / 'data' / 'parts'}]"], "train", None)
    try:
        train = staged(pkg)["data"]["train"]
        assert train[0] == "data/0/facts.jsonl" and train[1] == str(job_dir / "data" / "parts" / "*.jsonl")
        assert [key for key, _, _ in pkg.shipped] == ["data.train"]
    finally:
        pkg.cleanup()


def test_what_the_cluster_could_not_read_is_refused_with_what_to_do(job_dir):
    with pytest.raises(JobsError, match=r"(?s)above submit.max_upload_mb \(1e-06\).*data.train: .*facts.jsonl.*s3://"):
        package(job_dir / "job.yaml", ["submit.max_upload_mb=0.000001"], "train", None)
    with pytest.raises(JobsError, match=r"run.storage_path is 'runs', a path relative to this machine"):
        package(job_dir / "job.yaml", ["run.storage_path=runs"], "train", None)
    with pytest.raises(JobsError, match="(?s)no file on this machine matches .*nothing-\\*.jsonl.*submit.shared_paths"):
        package(job_dir / "job.yaml", ["data.train=data/nothing-*.jsonl"], "train", None)
    with pytest.raises(JobsError, match="(?s)submit.image_uri runs the job in a container.*data.train"):
        package(job_dir / "job.yaml", ["submit.image_uri=registry/rayft:1"], "train", None)


def test_an_image_job_carries_its_job_file_in_the_entrypoint(job_dir):
    pkg = package(
        job_dir / "job.yaml", ["data.train=s3://bucket/train.jsonl", "submit.image_uri=reg/rayft:1"], "train", None
    )
    assert pkg.runtime_env == {"image_uri": "reg/rayft:1", "env_vars": {"PYTHONUNBUFFERED": "1"}}
    assert pkg.entrypoint.endswith("python -m rayft.training.run rayft-job.yaml") and pkg.staging is None


def test_a_sweep_is_checked_before_it_is_sent(job_dir):
    from rayft.cluster.config import ConfigError

    with pytest.raises(ConfigError, match="sweep.space is empty"):
        package(job_dir / "job.yaml", [], "sweep", None)
    pkg = package(
        job_dir / "job.yaml", ["sweep.space={training.lr: {choice: [1e-4, 1e-3]}}", "sweep.metric=loss"], "sweep", "lr"
    )
    try:
        assert pkg.run_name == "lr" and pkg.entrypoint == "python -m rayft sweep job.yaml"
        assert staged(pkg)["sweep"]["name"] == "lr"
    finally:
        pkg.cleanup()


def test_addresses_and_token_sources(monkeypatch, tmp_path):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert dashboard_address(None) == "http://127.0.0.1:8265"
    assert dashboard_address("head:8265") == "http://head:8265"
    monkeypatch.setenv("RAY_ADDRESS", "https://ray.example.com/")
    assert dashboard_address(None) == "https://ray.example.com"
    with pytest.raises(JobsError, match="Ray Client address"):
        dashboard_address("ray://head:10001")
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "token"))
    assert find_token() == (None, "RAY_AUTH_TOKEN_PATH")
    (tmp_path / "token").write_text("abc\n")
    assert find_token() == ("abc", f"RAY_AUTH_TOKEN_PATH ({tmp_path / 'token'})")


SECRET = "hf_" + secrets.token_hex(16)  # a credential the job gives its cluster environment


def test_credentials_reach_the_jobs_environment_and_nothing_else(job_dir):
    """submit.env_vars is how a job gets HF_TOKEN or WANDB_API_KEY: their values go into the job's runtime_env,
    and show as *** in the job file the cluster stores, the entrypoint, `rayft submit --dry-run`,
    `rayft config show` and a config error."""
    job = job_dir / "job.yaml"
    with job.open("a") as f:
        f.write(
            f"submit: {{env_vars: {{HF_TOKEN: {SECRET}, WANDB_API_KEY: wb-{SECRET}}}, "
            f"pip: ['git+https://{SECRET}@github.com/org/tool']}}\n"
        )
    pkg = package(job, [], "train", None)
    try:
        env = pkg.runtime_env["env_vars"]
        assert env == {"PYTHONUNBUFFERED": "1", "HF_TOKEN": SECRET, "WANDB_API_KEY": f"wb-{SECRET}"}
        assert pkg.runtime_env["pip"] == [f"git+https://{SECRET}@github.com/org/tool"]  # what pip needs to fetch it
        shipped = (Path(pkg.staging) / "job.yaml").read_text()
        assert SECRET not in shipped + pkg.entrypoint + repr(pkg.metadata)
        sub = yaml.safe_load(shipped)["submit"]
        assert sub == {
            "env_vars": {"HF_TOKEN": "***", "WANDB_API_KEY": "***"},
            "pip": ["git+https://***@github.com/org/tool"],
        }
    finally:
        pkg.cleanup()

    image = package(job, ["data.train=s3://bucket/train.jsonl", "submit.image_uri=reg/rayft:1"], "train", None)
    assert image.runtime_env["env_vars"]["HF_TOKEN"] == SECRET
    carried = base64.b64decode(image.entrypoint.split()[1]).decode()  # the job file inside the entrypoint
    assert "HF_TOKEN: '***'" in carried and SECRET not in carried

    dry = rayft_cli("submit", str(job), "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "nothing submitted" in dry.stdout and "HF_TOKEN=***" in dry.stdout and "data.train" in dry.stdout
    assert SECRET not in dry.stdout + dry.stderr

    shown = rayft_cli("config", "show", str(job))
    assert shown.returncode == 0, shown.stderr
    assert yaml.safe_load(shown.stdout)["submit"]["env_vars"] == {"HF_TOKEN": "***", "WANDB_API_KEY": "***"}
    assert SECRET not in shown.stdout + shown.stderr

    bad = rayft_cli("config", "show", str(job), "--set", f"submit.env_vars.HF_TOKEN=[{SECRET}]")  # not a string
    assert bad.returncode == 2 and "submit.env_vars.HF_TOKEN: must be a valid string (got ['***'])" in bad.stderr
    assert SECRET not in bad.stdout + bad.stderr


def test_a_credential_inside_a_uri_the_cluster_reads_is_refused(job_dir):
    """The job file is stored on the cluster with its credentials hidden, so a password written into a URI the
    job reads would reach the job as ***: refused, naming the key and where credentials go instead."""
    with pytest.raises(JobsError) as e:
        package(job_dir / "job.yaml", [f"run.storage_path=s3://AKIA:{SECRET}@bucket/runs"], "train", None)
    assert re.search(r"run.storage_path holds a credential .*submit.env_vars", str(e.value))
    assert SECRET not in str(e.value)


def test_a_local_mlflow_store_is_refused_for_a_cluster(job_dir):
    """A store relative to the driver's directory would land in Ray's per-job copy of the working dir on the
    cluster; a tracking server, databricks, a database or an absolute (shared) path is taken."""
    job = job_dir / "job.yaml"
    for uri in ("./mlruns", "mlruns", "file:mlruns", "sqlite:///mlflow.db"):
        with pytest.raises(JobsError, match=rf"run.tracking.mlflow.uri is '{re.escape(uri)}', .*working dir.*http"):
            package(job, [f"run.tracking.mlflow.uri={uri}"], "train", None)
    with pytest.raises(JobsError) as e:  # `mlflow: true` is ./mlruns; found with every other problem at once
        package(job, ["run.tracking.mlflow=true", "run.storage_path=runs"], "train", None)
    assert "run.tracking.mlflow.uri is './mlruns'" in str(e.value) and "run.storage_path is 'runs'" in str(e.value)

    refused = rayft_cli("submit", str(job), "--set", "run.tracking.mlflow=true", "--dry-run")
    assert refused.returncode == 2 and "cluster error" in refused.stderr
    assert "run.tracking.mlflow.uri" in refused.stderr and "Traceback" not in refused.stderr

    for uri in ("https://mlflow.example.com", "databricks", "postgresql://db.internal/mlflow", "/mnt/shared/mlruns"):
        pkg = package(job, [f"run.tracking.mlflow.uri={uri}"], "train", None)
        try:
            assert staged(pkg)["run"]["tracking"]["mlflow"]["uri"] == uri
        finally:
            pkg.cleanup()
