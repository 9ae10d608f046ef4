"""Deploying the Serve application of a spec on the Ray this process is connected to, and taking it down.
The CLI (`rayft serve`, `rayft demo`) adds its console around these; tests and benchmarks call them directly."""

from __future__ import annotations

import time

APP_NAME = "rayft"


def endpoint_url(spec: dict) -> str:
    """The base URL a client on this machine reaches the endpoint at."""
    s = spec["serve"]
    return f"http://{'127.0.0.1' if s['host'] in ('0.0.0.0', '::') else s['host']}:{s['port']}"


def cpus_needed(spec: dict) -> float:
    """CPUs of every replica the app may scale to."""
    s = spec["serve"]
    return s["autoscaling"]["max_replicas"] * s["cpus_per_replica"]


def deploy(spec: dict, timeout_s: float = 600) -> str:
    """Start Serve's HTTP proxy at the spec's host:port, run the app, and wait until /readyz answers (the
    model is loaded); returns the base URL. Ray must be connected."""
    from ray import serve

    from rayft.serving.app import build_app

    s = spec["serve"]
    serve.start(http_options={"host": s["host"], "port": s["port"]})
    serve.run(build_app(spec), name=APP_NAME, route_prefix="/", blocking=False)
    base = endpoint_url(spec)
    wait_ready(base, timeout_s)
    return base


def undeploy() -> None:
    """Delete the app and stop Serve on the connected Ray."""
    from ray import serve

    serve.delete(APP_NAME)
    serve.shutdown()


def wait_ready(base: str, timeout_s: float) -> None:
    import urllib.error
    import urllib.request

    deadline = time.time() + timeout_s
    last = ""
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"{base}/readyz", timeout=60) as r:
                if r.status == 200:
                    return
        except urllib.error.HTTPError as e:
            last = f"HTTP {e.code}"
        except (urllib.error.URLError, OSError) as e:
            last = str(e)
        time.sleep(1)
    raise RuntimeError(f"the endpoint at {base} did not become ready within {timeout_s:.0f} s (last: {last})")
