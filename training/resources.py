"""How many logical CPUs a local Ray gets: one rule for every command that may start one."""

from __future__ import annotations

import math
import os


def local_ray_cpus(need: float) -> int:
    """Logical CPUs for a local Ray that must hold `need` CPUs of workers or replicas at once: this machine's
    cores, or `need` rounded up plus one (Ray Data's stages and Ray's own actors) when that is more. Logical
    CPUs are a scheduling budget, not cores: on a 2-core laptop, 2 workers + data still get their slots."""
    return max(os.cpu_count() or 1, math.ceil(need) + 1)
