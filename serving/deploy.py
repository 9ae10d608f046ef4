"""Deploying the Serve application of a spec on the Ray this process is connected to, and taking it down.
The CLI (`rayft serve`, `rayft demo`) adds its console around these; tests and benchmarks call them directly."""

from __future__ import annotations

import time

from rayft.serving.spec import ServeSpec

APP_NAME = "rayft"


def endpoint_url(spec: ServeSpec) -> str:
    """The base URL a client on this machine reaches the endpoint at."""
    s = spec.serve
    prefix = "" if s.route_prefix == "/" else s.route_prefix
    return f"http://{'127.0.0.1' if s.host in ('0.0.0.0', '::') else s.host}:{s.port}{prefix}"


def cpus_needed(spec: ServeSpec) -> float:
    """CPUs of every replica the app may scale to, and of one fine-tuning job when the endpoint takes them."""
    s = spec.serve
    return s.autoscaling.max_replicas * s.cpus_per_replica + (job_cpus(spec) if takes_jobs(spec) else 0)


def takes_jobs(spec: ServeSpec) -> bool:
    """Whether the endpoint runs fine-tuning jobs (POST /v1/fine_tuning/jobs): they need Ray's Jobs API, so a
    local Ray for it starts with its dashboard."""
    return spec.serve.engine == "transformers" and spec.serve.finetune.models != []


def job_cpus(spec: ServeSpec) -> float:
    """The CPUs one fine-tuning job takes: its template's workers and data stages."""
    from rayft.serving.config import template_job
    from rayft.training.trainer import required_cpus

    return required_cpus(template_job(spec.serve.finetune.job)) + spec.serve.finetune.driver_cpus


def deploy(spec: ServeSpec, timeout_s: float = 600) -> str:
    """Start Serve's HTTP proxy at the spec's host:port, run the app, and wait until it answers (the model is
    loaded); returns the base URL. Ray must be connected."""
    from ray import serve

    from rayft.serving.app import build_app

    s = spec.serve
    serve.start(http_options={"host": s.host, "port": s.port})
    serve.run(build_app(spec), name=APP_NAME, route_prefix=s.route_prefix, blocking=False)
    base = endpoint_url(spec)
    # rayft's ingress answers /readyz once a replica generated; Ray Serve LLM's app has no such probe, and
    # serve.run has already waited for its replicas, so its model list answering is enough.
    wait_ready(base, timeout_s, "/readyz" if s.engine == "transformers" else "/v1/models")
    return base


def undeploy() -> None:
    """Delete the app (its replicas drain their in-flight requests first, up to serve.drain_timeout_s), and stop
    Serve on the connected Ray unless other applications still run there (a shared cluster's)."""
    from ray import serve

    serve.delete(APP_NAME)
    if not serve.status().applications:
        serve.shutdown()


def wait_ready(base: str, timeout_s: float, probe: str = "/readyz") -> None:
    import urllib.error
    import urllib.request

    deadline = time.time() + timeout_s
    last = ""
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"{base}{probe}", timeout=60) as r:
                if r.status == 200:
                    return
        except urllib.error.HTTPError as e:
            last = f"HTTP {e.code}"
        except (urllib.error.URLError, OSError) as e:
            last = str(e)
        time.sleep(0.25)
    raise RuntimeError(f"the endpoint at {base} did not become ready within {timeout_s:.0f} s (last: {last})")
