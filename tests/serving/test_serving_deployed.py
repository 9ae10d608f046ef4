"""The endpoint as it is run outside this process: `rayft serve` in a process of its own, stopped with
SIGTERM while streams are in flight; and a config written by `rayft serve --emit-config` and deployed with
`serve deploy`, as a RayService deploys it, the key coming from the environment of the pods, which the
replicas read themselves. Its own module: these stop Serve at their end, so no other module's endpoint is
alive meanwhile."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import requests

from helpers import post_json, rayft_cli, tiny_llama
from helpers import sse_events as events

APP = "rayft"


@pytest.fixture(scope="module")
def tiny_dir(smol_tokenizer, tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("deployed-model"), smol_tokenizer, sharp=True)


def rayft(*args):
    return rayft_cli(*args, env={"RAYFT_API_KEY": None})  # no key from the environment of the suite


def post(base, path, body, key=None):
    return post_json(base, path, body, key=key)


def wait_until(check, timeout_s: float, what: str):
    deadline = time.time() + timeout_s
    while not check():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


@pytest.mark.slow
def test_stopping_rayft_serve_lets_in_flight_streams_finish(ray_local, tiny_dir, serve_port):
    """SIGTERM (what Ctrl-C, `kill` and a service manager send) to `rayft serve`: the streams in flight end with
    their finish_reason and [DONE], then the endpoint stops."""
    import os
    import signal
    import subprocess
    import sys

    import ray

    address = ray._private.worker.global_worker.node.address  # the suite's Ray: no second cluster here
    env = {k: v for k, v in os.environ.items() if k != "RAYFT_API_KEY"}
    cmd = [sys.executable, "-m", "rayft", "serve", str(tiny_dir), "--port", str(serve_port), "--address", address]
    cmd += ["--set", "serve.max_tokens_limit=2000", "--set", "serve.request_timeout_s=120"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{serve_port}"
    try:
        wait_until(lambda: _ready(base), 180, "rayft serve to answer")
        streams = []
        for p in ["Tell me a story", "hi", "The capital of France is"]:
            body = {"prompt": p, "max_tokens": 800, "temperature": 0, "stream": True}
            streams.append(requests.post(f"{base}/v1/completions", json=body, stream=True, timeout=120))
        iters = [r.iter_lines(decode_unicode=True) for r in streams]
        for it in iters:
            assert events([next(it)])  # generating
        proc.send_signal(signal.SIGTERM)
        for it in iters:
            got = events(it)
            assert got[-1] == "[DONE]" and not any("error" in e for e in got[:-1] if isinstance(e, dict)), got[-3:]
            assert got[-2]["choices"][0]["finish_reason"] == "length"
        out, _ = proc.communicate(timeout=120)
        # stopped cleanly; joined to a running cluster (--address) it may still exit 130, as for Ctrl-C
        assert proc.returncode in (0, 130) and "endpoint stopped" in out, out[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
        from ray import serve

        serve.shutdown()  # this process's handle on the Serve the other one stopped goes too


def _ready(base: str) -> bool:
    try:
        return requests.get(f"{base}/readyz", timeout=10).status_code == 200
    except requests.RequestException:
        return False


@pytest.mark.slow
def test_a_deployed_config_with_the_key_in_the_pods_environment_requires_it(ray_local, tiny_dir, tmp_path, serve_port):
    """The shipped RayService's way: the emitted config binds 0.0.0.0 with no key in it, and the key is in the
    environment of the pods (here the application's runtime_env), from a Secret. Deployed with `serve deploy`,
    the app answers only requests with that key; deployed without it, it refuses to start."""
    import subprocess
    import sys

    import ray
    import yaml
    from ray import serve

    out = tmp_path / "serve.yaml"
    r = rayft("serve", str(tiny_dir), "--host", "0.0.0.0", "--port", str(serve_port), "--emit-config", str(out))
    assert r.returncode == 0, r.stderr
    doc = yaml.safe_load(out.read_text())
    assert doc["applications"][0]["args"]["key_hashes"] == []
    doc["http_options"] = {"host": "127.0.0.1", "port": serve_port}  # this suite's Serve proxy
    dashboard = "http://" + ray._private.worker.global_worker.node.address_info["webui_url"]
    serve_cli = str(Path(sys.executable).parent / "serve")

    def deploy_with(env: dict | None) -> str:
        app = doc["applications"][0]
        app.pop("runtime_env", None)
        if env:
            app["runtime_env"] = {"env_vars": env}
        out.write_text(yaml.safe_dump(doc))
        done = subprocess.run([serve_cli, "deploy", str(out), "-a", dashboard], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        deadline = time.time() + 180
        while time.time() < deadline:
            status = serve.status().applications.get(APP)
            if status is not None and str(status.status).rsplit(".", 1)[-1] in ("RUNNING", "DEPLOY_FAILED"):
                return (
                    str(status.status).rsplit(".", 1)[-1]
                    + " "
                    + json.dumps({n: d.message for n, d in status.deployments.items()})
                )
            time.sleep(1)
        raise AssertionError("the deployed app neither ran nor failed")

    base = f"http://127.0.0.1:{serve_port}"
    try:
        assert deploy_with({"RAYFT_API_KEY": "sk-pod-secret"}).startswith("RUNNING")
        hi = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
        assert post(base, "/v1/chat/completions", hi, key=None).status_code == 401
        assert post(base, "/v1/chat/completions", hi, key="sk-wrong").status_code == 401
        assert post(base, "/admin/adapters", {"name": "x", "path": "/"}, key=None).status_code == 401
        assert post(base, "/v1/chat/completions", hi, key="sk-pod-secret").status_code == 200
        state = deploy_with(None)  # the same config, no key where it runs
        assert state.startswith("DEPLOY_FAILED") and "exposes the endpoint to the network" in state, state
    finally:
        serve.delete(APP)
        serve.shutdown()
