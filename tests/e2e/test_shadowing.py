"""A user's project with its own `training/`, `serving.py` and `tuning.py` (the most common names in ML
code): `rayft train` (2 workers) and `rayft serve` run from inside it work and import none of the user's
modules, although Ray puts the driver's working directory on every worker's sys.path."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from helpers import chat, free_port, write_jsonl

# Each of the user's modules leaves a mark (which module, which process) and refuses to be used.
USER_MODULE = """
import os, pathlib
pathlib.Path({marks!r}, "{name}-" + str(os.getpid())).touch()
raise ImportError("this is the user's own {name}, not rayft's")
"""


@pytest.fixture
def project(tmp_path: Path, tiny_model_dir) -> Path:
    marks = tmp_path / "imported"
    marks.mkdir()
    (tmp_path / "training").mkdir()
    (tmp_path / "training" / "__init__.py").write_text(USER_MODULE.format(marks=str(marks), name="training"))
    for name in ("serving", "tuning", "cluster"):
        (tmp_path / f"{name}.py").write_text(USER_MODULE.format(marks=str(marks), name=name))
    rows = [chat(f"Ticket {i}: my lamp is broken", f'{{"product":"lamp","id":{i % 4}}}') for i in range(16)]
    write_jsonl(tmp_path / "train.jsonl", rows)
    (tmp_path / "job.yaml").write_text(
        "# rayft train job.yaml\n"
        f"model: {{name: {tiny_model_dir}}}\n"
        "data: {train: train.jsonl, max_seq_len: 128}\n"
        "training: {lr: 5.0e-3, micro_batch_size: 2, global_batch_size: 4, max_steps: 2, warmup_ratio: 0.0}\n"
        "scaling: {num_workers: 2}\n"
        "run: {name: mine, storage_path: runs}\n"
    )
    return tmp_path


def user_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PYTHONPATH")}
    env["PYTHONPATH"] = "."  # as if the user's project were on the path on purpose, too
    return env


@pytest.mark.cluster  # a user's project end to end: train and serve
@pytest.mark.slow
def test_train_and_serve_from_a_project_with_modules_named_like_rayfts(project, ray_local):
    import ray

    address = ray.get_runtime_context().gcs_address  # train joins the suite's Ray: its workers get the cwd
    r = subprocess.run(
        [sys.executable, "-m", "rayft", "train", "job.yaml", "--address", address],
        cwd=project,
        env=user_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    run_dir = project / "runs" / "mine"
    assert (run_dir / "final" / "adapter" / "adapter_config.json").is_file()
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert max(s.get("step", 0) for s in steps if "loss" in s) == 2

    # serve starts its own local Ray from the project dir, as a user's `rayft serve` does
    port = free_port()
    cmd = [sys.executable, "-m", "rayft", "serve", "runs/mine", "--port", str(port)]
    proc = subprocess.Popen(
        cmd,
        cwd=project,
        env=user_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        reply = None
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None and reply is None:
            try:
                body = json.dumps({"model": "mine", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
                req = urllib.request.Request(
                    f"{base}/v1/chat/completions", data=body.encode(), headers={"Content-Type": "application/json"}
                )
                with urllib.request.urlopen(req, timeout=60) as resp:
                    reply = json.loads(resp.read())
            except OSError:
                time.sleep(1)
        assert reply is not None, f"rayft serve never answered: {proc.poll()=}"
        assert reply["object"] == "chat.completion" and reply["usage"]["completion_tokens"] >= 1
    finally:
        proc.send_signal(signal.SIGTERM)  # as `kill` or a service manager stops it: the endpoint stops cleanly
        try:
            output, _ = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
    assert "endpoint stopped" in output, output[-3000:]
    assert sorted(p.name for p in (project / "imported").iterdir()) == []  # (module-pid) of each one imported
