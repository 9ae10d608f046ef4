"""What `rayft submit` packages, checked without a cluster: which files travel, how the job file is
rewritten to find them, what is refused and why, and that no token ends up in what is sent."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from conftest import chat, write_jsonl
from rayft.cluster.jobs import SUBPACKAGES, JobsError, dashboard_address, find_token, package


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
        assert pkg.run_dir == "/mnt/shared/runs/lamp-2" and pkg.entrypoint == "python -m rayft train job.yaml"
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
    assert pkg.entrypoint.endswith("rayft train rayft-job.yaml") and pkg.staging is None


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
