"""How a rayft job reaches a Ray cluster through Ray's Jobs API: the one place that builds a submission (the
entrypoint, the metadata rayft reads back, the runtime environment) and finds the cluster's auth token. `rayft
submit` (rayft.cluster.jobs) and the endpoint's fine-tuning jobs (rayft.serving.finetune) both submit through it,
so a finetune runs the same training-owned entrypoint however it was started:

    python -m rayft.training.run JOB.yaml     (rayft.training.run: trains, and leaves the run's status.json)

The Jobs API is plain HTTP to the head node's dashboard (port 8265). Clusters that require Ray's token
authentication get the token from RAY_AUTH_TOKEN, the file named by RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token; it
travels only in the request header and is never printed, logged or put in a job's metadata or runtime environment.
"""

from __future__ import annotations

import base64
import os
import re
from pathlib import Path

from rayft.training.run_dir import JOB_FILE

TRAIN_MODULE = "rayft.training.run"  # the finetune's entrypoint, run as `python -m`


class LaunchError(Exception):
    """A cluster that cannot be reached or that refuses its auth token; the message says what to do."""

    error_kind = "cluster"  # what `rayft` calls it ("cluster error ..."); rayft.training.run_dir.user_error


def entrypoint(command: str, job_file: str | None = JOB_FILE, job_text: str | None = None, python: str = "python"):
    """The shell command of a rayft job: `python -m rayft.training.run JOB` for a finetune ("train"), `python -m
    rayft COMMAND JOB` for another command (a sweep). With `job_text` the job file travels inside the command
    (base64; no working directory is uploaded) and is written, before it runs, to `job_file` in the job's working
    directory, or with job_file None to a directory of its own (jobs that share a working directory)."""
    run = f"{python} -m {TRAIN_MODULE}" if command == "train" else f"{python} -m rayft {command}"
    if job_text is None:
        return f"{run} {job_file}"
    encoded = base64.b64encode(job_text.encode()).decode()
    if job_file is None:
        return f'd="$(mktemp -d)" && echo {encoded} | base64 -d > "$d/{JOB_FILE}" && exec {run} "$d/{JOB_FILE}"'
    return f"echo {encoded} | base64 -d > {job_file} && exec {run} {job_file}"


def metadata(command: str, run_name: str, storage_path: str, **more: str) -> dict[str, str]:
    """What a rayft job says of itself on the cluster: its command, its run (or sweep) name and where its run dir
    is (run_dir_of reads them back), and `more` (rayft_job_file, rayft_fine_tuning_job)."""
    return {"rayft_command": command, "rayft_run": run_name, "rayft_storage": storage_path, **more}


def run_dir_of(metadata: dict) -> str | None:
    """A rayft job's run (or sweep) dir, from its metadata; None for other jobs."""
    if "rayft_storage" in metadata and "rayft_run" in metadata:
        return f"{metadata['rayft_storage'].rstrip('/')}/{metadata['rayft_run']}"
    return None


def runtime_env(env_vars: dict[str, str] | None = None, **more) -> dict:
    """A job's runtime environment: PYTHONUNBUFFERED (the driver's lines reach the job's log as they are printed)
    and `env_vars`, plus Ray's other keys given in `more` that have a value (image_uri, working_dir, py_modules,
    excludes, pip)."""
    return {k: v for k, v in more.items() if v} | {"env_vars": {"PYTHONUNBUFFERED": "1", **(env_vars or {})}}


def find_token() -> tuple[str | None, str]:
    """(token, where it came from), in Ray's own order of precedence. The token is never shown."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip(), "RAY_AUTH_TOKEN"
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    where = "RAY_AUTH_TOKEN_PATH" if path else "~/.ray/auth_token"
    path = Path(path).expanduser() if path else Path.home() / ".ray" / "auth_token"
    try:
        token = path.read_text().strip()
    except OSError:
        return None, where
    return (token or None), f"{where} ({path})"


def client(address: str):
    """A JobSubmissionClient for the cluster whose dashboard is at `address`, with the auth header when a token is
    found. Raises LaunchError when the cluster cannot be reached or refuses the token."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    token, source = find_token()
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        return JobSubmissionClient(address, headers=headers)
    except AuthenticationError as e:
        if "Authentication required" in str(e) or not token:
            raise LaunchError(
                f"the cluster at {address} requires a Ray auth token and none was found: set RAY_AUTH_TOKEN, or "
                "put the token in ~/.ray/auth_token (`ray get-auth-token` prints it on the head node)"
            ) from None
        raise LaunchError(
            f"the cluster at {address} refused the auth token from {source}: it is not this cluster's token. "
            "Copy the head node's token (`ray get-auth-token` there) into RAY_AUTH_TOKEN or ~/.ray/auth_token"
        ) from None
    except (ConnectionError, OSError) as e:
        raise LaunchError(
            f"cannot reach a Ray cluster at {address} ({_reason(e)}). Check the address: the Jobs API is the head "
            "node's dashboard port (8265 by default, not the 6379 GCS port); `ray dashboard CLUSTER.yaml` "
            "forwards it to http://127.0.0.1:8265. Is the cluster up?"
        ) from None


def _reason(e: BaseException) -> str:
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    m = re.search(r"(Connection refused|Name or service not known|timed out|No route to host)", str(e))
    return m.group(1) if m else text[:200]
