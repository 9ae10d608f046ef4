"""How rayft reaches Ray (a local cluster on this machine, or a running cluster by address), and how many logical
CPUs a local Ray gets: one rule for every command that may start one, and for the training job's entrypoint
(rayft.training.run)."""

from __future__ import annotations

import logging
import math
import os


def local_ray_cpus(need: float) -> int:
    """Logical CPUs for a local Ray that must hold `need` CPUs of workers or replicas at once: this machine's
    cores, or `need` rounded up plus one (Ray Data's stages and Ray's own actors) when that is more. Logical
    CPUs are a scheduling budget, not cores: on a 2-core laptop, 2 workers + data still get their slots."""
    return max(os.cpu_count() or 1, math.ceil(need) + 1)


def connect(
    address: str | None = None,
    need_cpus: float = 0,
    quiet: bool = True,
    dashboard: bool = False,
    num_cpus: int | None = None,
) -> bool:
    """Start or join Ray once per process.

    address (or RAY_ADDRESS) joins a running cluster; otherwise a local Ray starts with
    logical CPUs enough for `need_cpus` of workers or replicas (local_ray_cpus), or
    exactly num_cpus when given. Ray Data's own progress bars are
    turned off: rayft prints one progress line of its own. `dashboard` starts Ray's dashboard with a
    local Ray: its state API is how Ray Train frees the workers of a run whose driver was killed
    (a sweep's stopped trial), so sweeps need it. Returns True when joined to a running cluster
    (one that may grow: an autoscaler can add nodes), False for a local Ray of this process.
    """
    import ray

    joined = bool(address or os.environ.get("RAY_ADDRESS"))
    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS")
        if quiet:  # keep the console to rayft's own lines; Ray's logs stay in /tmp/ray/session_*/logs
            logging.getLogger("ray").setLevel(logging.ERROR)
        kwargs = {"log_to_driver": not quiet, "logging_level": logging.ERROR if quiet else logging.INFO}
        if address:
            ray.init(address=address, **kwargs)
        else:
            ray.init(num_cpus=num_cpus or local_ray_cpus(need_cpus), include_dashboard=dashboard, **kwargs)
    if quiet:
        from rayft.training.data import quiet_ray_data

        quiet_ray_data()
    return joined
