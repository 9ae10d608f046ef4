"""Cluster jobs through Ray's Jobs API: package a job file with its small local files and rayft's
own code, submit it to a running cluster, follow its logs, list and stop jobs.

The Jobs API is plain HTTP to the head node's dashboard (port 8265), so this module needs no Ray
connection. What a job is submitted as (its entrypoint, metadata and runtime environment) and how the cluster's
auth token is found are rayft.training.launch's, which the endpoint's fine-tuning jobs use too: the token travels
only in the request header and is never printed, logged or put in a job's metadata or runtime environment.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from rayft.training import launch
from rayft.training.launch import run_dir_of
from rayft.training.run_dir import JOB_FILE, RunDir

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
IMAGE_JOB_FILE = f"rayft-{JOB_FILE}"  # where a job run in an image writes the job file its entrypoint carries
LIVE = ("PENDING", "RUNNING")
# The name a job file travels under, as a run dir keeps it (rayft.training.run_dir), and a job's run dir from its
# metadata (rayft.training.launch), for the `rayft jobs` commands.
__all__ = ["JOB_FILE", "run_dir_of"]
# rayft's subpackages: with rayft's own __init__/__main__ they are the `rayft` package every job ships, so the
# cluster runs the same code as the laptop whatever rayft (or none) its image holds.
SUBPACKAGES = ("cluster", "training", "tuning", "serving")


class JobsError(Exception):
    """A job that cannot be submitted or found, or a cluster that cannot be reached; the message says why."""

    error_kind = "cluster"  # what `rayft` calls it ("cluster error ..."); rayft.training.run_dir.user_error


# ---------------------------------------------------------------- the cluster


def dashboard_address(address: str | None) -> str:
    """The Jobs API address: --address, else RAY_ADDRESS, else the local dashboard."""
    addr = (address or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS).strip().rstrip("/")
    if addr.startswith("ray://"):
        raise JobsError(
            f"{addr} is a Ray Client address; jobs go through the head node's dashboard instead: "
            "--address http://HEAD:8265"
        )
    if addr == "auto":
        return DEFAULT_ADDRESS
    return addr if "://" in addr else f"http://{addr}"


def client(address: str | None):
    """A JobSubmissionClient for the cluster (--address, else RAY_ADDRESS, else the local dashboard), with the
    auth header when a token is found (rayft.training.launch)."""
    import logging

    for name in ("ray", "ray.dashboard.modules.job.sdk", "ray.dashboard.modules.dashboard_sdk"):
        logging.getLogger(name).setLevel(logging.ERROR)  # Ray's upload chatter; rayft prints what was shipped
    addr = dashboard_address(address)
    os.environ["RAY_ADDRESS"] = addr  # Ray's client prefers RAY_ADDRESS over its address argument
    return launch.client(addr)


# ---------------------------------------------------------------- packaging


@dataclass
class Package:
    """What `rayft submit` sends: a staged working dir, the entrypoint, the runtime env and metadata."""

    command: str
    run_name: str
    run_dir: str
    entrypoint: str
    runtime_env: dict
    metadata: dict
    staging: str | None = None
    shipped: list[tuple[str, str, int]] = field(default_factory=list)  # (config key, local path, bytes)
    code: str | None = None  # the folder holding the staged `rayft` package (runtime_env py_modules)
    job_text: str = ""  # the job file as the cluster gets it (credentials shown as ***)

    def cleanup(self) -> None:
        for path in (self.staging, self.code):
            if path:
                shutil.rmtree(path, ignore_errors=True)


def package(config: Path, overrides: list[str], command: str, name: str | None) -> Package:
    """Validate the job file locally and stage it for the cluster. Raises ConfigError (the job file) or
    JobsError (storage or files the cluster could not read)."""
    from rayft.cluster.config import ConfigError, load_config

    if name:
        overrides = [*overrides, f"sweep.name={name}" if command == "sweep" else f"run.name={name}"]
    cfg = load_config(config, overrides)
    if command == "sweep":
        from rayft.tuning.sweep import check_sweep

        problems = check_sweep(cfg)
        if problems:
            raise ConfigError(str(config), problems)
    storage = _raw_storage_path(config, overrides)
    job = cfg.model_dump(mode="json", exclude_unset=True)
    job.setdefault("run", {})["storage_path"] = storage
    problems = _cluster_problems(cfg, job, storage)
    if problems:
        raise JobsError(
            problems[0]
            if len(problems) == 1
            else "the job cannot run on a cluster as it is:\n  - " + "\n  - ".join(problems)
        )
    sub = cfg.submit
    run_name = (cfg.sweep.name or f"{cfg.run.name}-sweep") if command == "sweep" else cfg.run.name

    files = _local_files(cfg, sub.shared_paths)
    total = sum(size for _, _, size in files)
    if total > sub.max_upload_mb * 1e6:
        biggest = sorted(files, key=lambda f: -f[2])[:5]
        listing = "\n  ".join(f"{key}: {path} ({fmt_size(size)})" for key, path, size in biggest)
        raise JobsError(
            f"the job's local files come to {fmt_size(total)}, above submit.max_upload_mb "
            f"({sub.max_upload_mb:g}):\n  {listing}\nPut them on storage the cluster reads (s3://..., gs://..., or "
            "an NFS mount listed in submit.shared_paths) and point the job file there."
        )
    if files and sub.image_uri:
        raise JobsError(
            "submit.image_uri runs the job in a container, which cannot carry local files "
            f"({', '.join(sorted({k for k, _, _ in files}))}); put them on shared storage or in the image"
        )

    metadata = launch.metadata(command, run_name, storage, rayft_job_file=Path(config).name)
    run_dir = run_dir_of(metadata)
    assert run_dir is not None  # metadata names both storage and run
    if sub.image_uri:  # only env_vars may accompany an image: the job file travels inside the entrypoint
        text = _job_yaml(job, config)
        entrypoint = launch.entrypoint(command, IMAGE_JOB_FILE, job_text=text)
        runtime_env = launch.runtime_env(sub.env_vars, image_uri=sub.image_uri)
        return Package(command, run_name, run_dir, entrypoint, runtime_env, metadata, job_text=text)

    staging = tempfile.mkdtemp(prefix="rayft-submit-")
    code = tempfile.mkdtemp(prefix="rayft-code-")
    try:
        _stage(job, files, Path(staging))
        text = _job_yaml(job, config)
        (Path(staging) / JOB_FILE).write_text(text)
        shipped_code = stage_rayft(Path(code))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(code, ignore_errors=True)
        raise
    runtime_env = launch.runtime_env(
        sub.env_vars,
        working_dir=staging,
        py_modules=[str(shipped_code)],
        excludes=["__pycache__", "*.pyc"],
        pip=list(sub.pip),
    )
    entrypoint = launch.entrypoint(command, JOB_FILE)
    return Package(command, run_name, run_dir, entrypoint, runtime_env, metadata, staging, files, code, text)


def fmt_size(n: int) -> str:
    return f"{n / 1e6:,.1f} MB" if n >= 1e5 else f"{n / 1e3:,.1f} kB"


def _raw_storage_path(config: Path, overrides: list[str]) -> str:
    """run.storage_path as the user wrote it (load_config resolves a local one against this machine)."""
    from rayft.cluster.config import RunConfig, apply_overrides

    raw = yaml.safe_load(Path(config).read_text()) or {}
    apply_overrides(raw, [o for o in overrides if o.strip().startswith("run.")])
    value = (raw.get("run") or {}).get("storage_path") if isinstance(raw.get("run"), dict) else None
    return str(value if value is not None else RunConfig.model_fields["storage_path"].default)


def _local_files(cfg, shared: list[str]) -> list[tuple[str, str, int]]:
    """(config key, local path, bytes) of every file or directory the job reads from this machine."""
    found: list[tuple[str, str, int]] = []
    missing: list[str] = []
    entries: list[tuple[str, str]] = []
    for key in ("train", "eval"):
        value = getattr(cfg.data, key)
        for v in [value] if isinstance(value, str) else value or []:
            entries.append((f"data.{key}", v))
    if os.path.isdir(cfg.model.name):
        entries.append(("model.name", cfg.model.name))
    for rf in cfg.training.rl.reward if cfg.training.rl else []:
        where = rf.function.rpartition(":")[0]
        if where.endswith(".py"):
            entries.append(("training.rl.reward", where))
    for key, value in entries:
        if "://" in value or any(_under(value, s) for s in shared):
            continue
        if glob.has_magic(value):
            matches = [m for m in glob.glob(value, recursive=True) if os.path.isfile(m)]
            if not matches:
                missing.append(f"{key}: no file on this machine matches {value}")
            found.append((key, value, sum(os.path.getsize(m) for m in matches)))
        elif os.path.exists(value):
            found.append((key, value, _size(value)))
        else:
            missing.append(f"{key}: {value} does not exist on this machine")
    if missing:
        raise JobsError(
            "the job reads files this machine does not have:\n  " + "\n  ".join(missing) + "\nIf they are on "
            "storage mounted on every node of the cluster, list the mount in submit.shared_paths."
        )
    return found


def _under(path: str, prefix: str) -> bool:
    prefix = os.path.abspath(os.path.expanduser(prefix)).rstrip("/")
    return os.path.abspath(path) == prefix or os.path.abspath(path).startswith(prefix + "/")


def _size(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, names in os.walk(path) for f in names)


def _stage(job: dict, files: list[tuple[str, str, int]], staging: Path) -> None:
    """Copy each local file into staging/data/<n>/ and point the job at the copy (relative to job.yaml)."""
    moved: dict[str, str] = {}
    for n, (_, path, _) in enumerate(files):
        dest = staging / "data" / str(n)
        dest.mkdir(parents=True)
        if glob.has_magic(path):
            root = _glob_root(path)
            for m in glob.glob(path, recursive=True):
                if os.path.isfile(m):
                    target = dest / os.path.relpath(m, root)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(m, target)
            moved[path] = f"data/{n}/{os.path.relpath(path, root)}"
        elif os.path.isdir(path):
            shutil.copytree(path, dest / Path(path).name)
            moved[path] = f"data/{n}/{Path(path).name}"
        else:
            shutil.copy2(path, dest / Path(path).name)
            moved[path] = f"data/{n}/{Path(path).name}"
    data = job.get("data", {})
    for key in ("train", "eval"):
        value = data.get(key)
        if isinstance(value, str):
            data[key] = moved.get(value, value)
        elif isinstance(value, list):
            data[key] = [moved.get(v, v) for v in value]
    model = job.get("model", {})
    if model.get("name") in moved:
        model["name"] = "./" + moved[model["name"]]
    rl = job.get("training", {}).get("rl") or {}
    for i, entry in enumerate(rl.get("reward") or []):
        spec = entry.get("function") if isinstance(entry, dict) else entry
        where, _, name = str(spec).rpartition(":")
        if where in moved:
            staged = f"{moved[where]}:{name}"
            rl["reward"][i] = entry | {"function": staged} if isinstance(entry, dict) else staged


def _glob_root(pattern: str) -> str:
    parts = Path(pattern).parts
    for i, part in enumerate(parts):
        if glob.has_magic(part):
            return str(Path(*parts[:i])) if i else "."
    return str(Path(pattern).parent)


def _job_yaml(job: dict, config: Path) -> str:
    """The job file the cluster gets: the Ray job's working dir (or entrypoint) is stored on the cluster and shown
    with the job, so every credential in it shows as *** (the job's environment alone holds submit.env_vars)."""
    from rayft.training.redact import redacted

    head = (
        f"# {Path(config).name} as submitted by `rayft submit` (overrides applied, local files alongside, "
        "credentials hidden: submit.env_vars reaches the job as its environment).\n"
    )
    return head + yaml.safe_dump(redacted(job), sort_keys=False)


def _cluster_problems(cfg, job: dict, storage: str) -> list[str]:
    """What a valid job file cannot do on a cluster: keep results or tracked runs on one node's disk or in Ray's
    per-job copy of the working dir, or read a credential from the job file (which reaches the cluster with
    every credential hidden)."""
    from rayft.cluster.config import TrainJob
    from rayft.training.redact import redacted

    problems = []
    if "://" not in storage and not os.path.isabs(os.path.expanduser(storage)):
        problems.append(
            f"run.storage_path is {storage!r}, a path relative to this machine: the cluster's nodes would each "
            "write their part of the run to their own disk. Point it at storage every node shares, e.g. "
            "--set run.storage_path=s3://BUCKET/runs, gs://BUCKET/runs, or an NFS mount such as /mnt/shared/runs"
        )
    mlflow = cfg.run.tracking.mlflow
    if mlflow is not None and _relative_store(mlflow.uri):
        problems.append(
            f"run.tracking.mlflow.uri is {mlflow.uri!r}, a tracking store relative to where the job's driver "
            "starts: on the cluster that is Ray's copy of the job's working dir, which Ray removes once no job uses "
            "it, and the tracked runs would go with it. Point it at a tracking server, e.g. --set "
            "run.tracking.mlflow.uri=http://HOST:5000 (or https://..., databricks, a database URI), or at an "
            "absolute path the cluster keeps, such as an NFS mount: /mnt/shared/mlruns"
        )
    found: list[str] = []
    redacted(job, found=found)
    read_there = set(TrainJob.model_fields) | {"sweep"}  # serve and submit are not read by the job itself
    used = [path for path in found if path.split(".")[0] in read_there]
    if used:
        problems.append(
            f"{', '.join(used)} {'holds' if len(used) == 1 else 'hold'} a credential (the user or password of a URI, "
            "or a key named like a token, secret or password), and the job file reaches the cluster with every "
            "credential hidden as ***, where the job could not use it. Give credentials through submit.env_vars, "
            "which only the job's environment holds: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY for s3://, "
            "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) for an MLflow server, "
            "HF_TOKEN for the hub"
        )
    return problems


def _relative_store(uri: str) -> bool:
    """Whether an MLflow tracking URI is a local store at a relative path (./mlruns, file:mlruns,
    sqlite:///mlflow.db): one that lands wherever the process using it starts."""
    uri = uri.strip()
    if uri.startswith("databricks"):  # `databricks` or databricks://PROFILE
        return False
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///") :]
    elif uri.startswith("file:"):
        path = uri[len("file:") :]
        path = path[len("//") :] if path.startswith("//") else path
    elif re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", uri):
        return False  # a tracking server, a database or databricks: the same from every machine
    else:
        path = uri
    return not os.path.isabs(os.path.expanduser(path))


def stage_rayft(dest: Path) -> Path:
    """Copy the installed rayft package (its own files and the four subpackages, nothing else of the folder
    an editable install points at) to dest/rayft, as Ray's py_modules ships it; returns that directory.

    A directory rather than a wheel: Ray installs a py_modules wheel with `pip install --target`, which would
    fetch all of rayft's dependencies (torch included) into every job's environment."""
    import importlib

    import rayft

    root = Path(rayft.__file__).parent
    target = dest / "rayft"
    target.mkdir(parents=True)
    for name in ("__init__.py", "__main__.py"):
        shutil.copy2(root / name, target / name)
    skip = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in SUBPACKAGES:
        shutil.copytree(list(importlib.import_module(f"rayft.{name}").__path__)[0], target / name, ignore=skip)
    return target


# ---------------------------------------------------------------- jobs


def submit(address: str | None, pkg: Package) -> tuple[str, str]:
    """Submit a packaged job; returns (job id, dashboard address). Refuses a run name a live job holds."""
    c = client(address)
    for j in c.list_jobs():
        md = j.metadata or {}
        if (
            md.get("rayft_run") == pkg.run_name
            and md.get("rayft_storage") == pkg.metadata["rayft_storage"]
            and str(j.status) in LIVE
        ):
            raise JobsError(
                f"run name {pkg.run_name!r} is taken by job {j.submission_id}, which is still {j.status}: a second "
                f"job would write into the same run dir. Use another --name, wait for it, or stop it with "
                f"`rayft jobs stop {j.submission_id}`"
            )
    job_id = f"rayft-{pkg.command}-{pkg.run_name}-{time.strftime('%Y%m%d-%H%M%S')}"
    try:
        c.submit_job(
            entrypoint=pkg.entrypoint, runtime_env=pkg.runtime_env, metadata=pkg.metadata, submission_id=job_id
        )
    except (RuntimeError, ValueError) as e:
        raise JobsError(f"the cluster did not accept the job: {str(e).strip()[:2000]}") from None
    return job_id, c.get_address()


def resolve_job(c, job: str):
    """A job by id, or the newest job of a rayft run name."""
    jobs = c.list_jobs()
    for j in jobs:
        if job in (j.submission_id, j.job_id):
            return j
    named = [j for j in jobs if (j.metadata or {}).get("rayft_run") == job]
    if named:
        return max(named, key=lambda j: j.start_time or 0)
    raise JobsError(f"no job {job!r} on the cluster at {c.get_address()}; `rayft jobs list` shows the job ids")


def job_id_of(info) -> str:
    """A listed job's id: its submission id (every job `rayft submit` makes has one), else Ray's job id."""
    return info.submission_id or info.job_id


def follow(c, job_id: str, write) -> str:
    """Stream a job's logs (from the start) until it ends; returns its final status."""
    import asyncio

    async def tail() -> None:
        async for chunk in c.tail_job_logs(job_id):
            write(chunk)

    asyncio.run(tail())
    return wait_ended(c, job_id, 60)  # the log stream closes as the job ends; its status may lag a moment


def stop(c, job_id: str, wait_s: float = 60) -> str:
    """Ask a job to stop and wait for it to end; returns its status."""
    c.stop_job(job_id)
    return wait_ended(c, job_id, wait_s)


def wait_ended(c, job_id: str, wait_s: float) -> str:
    """The job's status once it has ended, or its live status after `wait_s` seconds."""
    deadline = time.time() + wait_s
    status = str(c.get_job_status(job_id))
    while status in LIVE and time.time() < deadline:
        time.sleep(1)
        status = str(c.get_job_status(job_id))
    return status


def run_summary(run_dir: str) -> dict | None:
    """The last metrics, the outcome (status.json) and the final model of a run dir, read from its storage (a
    local or NFS path, or a cloud URI through pyarrow's filesystems). None when the run dir cannot be read from
    here."""
    run = RunDir(run_dir)
    try:
        records = run.metrics()
        final = run.has_final()
        status = run.status()
    except Exception:  # unreachable storage, missing credentials: the summary is left out, not an error
        return None
    if not records and not final and not status:
        return None
    steps = [r for r in records if "loss" in r and "step" in r]
    evals = [r for r in records if "eval_loss" in r]
    return {
        "step": steps[-1]["step"] if steps else 0,
        "loss": steps[-1]["loss"] if steps else None,
        "eval_loss": evals[-1]["eval_loss"] if evals else None,
        "final": run.final if final else None,
        "status": status,
    }
