"""bench/offline_bundle.py (`make offline-bundle`): the wheel bundle for the offline GPU machine, built here for
this Python, stays within its size budget, installs with `pip --no-index --no-deps`, and runs Ray from the
installed wheels. Downloads and builds are reused from the bundle cache (RAYFT_BUNDLE_CACHE, default
~/.cache/rayft-bundle), so only a first run on a machine fetches Ray and builds DeepSpeed."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile

import pytest

import rayft
from helpers import ROOT

MAX_MB = 60

# Run in a new interpreter: the bundle's folder comes first on its path, and one process holds one local Ray.
CHECK = """
import sys
site = sys.argv[1]
import ray, ray.data, ray.train, ray.train.torch, ray.tune, ray.serve, deepspeed, pydantic
import rayft, rayft.cluster.cli, rayft.training.trainer, rayft.training.loop, rayft.serving.app, rayft.tuning.sweep
for mod in (ray, deepspeed, pydantic, rayft, rayft.training.loop):  # rayft too: no checkout on the path
    assert mod.__file__.startswith(site), f"{mod.__name__} imported from {mod.__file__}, not from {site}"
assert ray.__version__ == "2.60.0", ray.__version__
ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
assert ray.get(ray.remote(lambda x: x + 1).remote(41)) == 42
ray.shutdown()
print("bundle ok")
"""


@pytest.mark.bundle
def test_bundle_fits_the_budget_installs_offline_and_runs_ray(tmp_path):
    out, site = tmp_path / "bundle", tmp_path / "site"
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    cmd = [sys.executable, "bench/offline_bundle.py", "--out", str(out), "--python", python, "--max-mb", str(MAX_MB)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    wheels = sorted(out.glob("*.whl"))
    assert sum(w.stat().st_size for w in wheels) <= MAX_MB * 1_000_000
    pins = [line for line in (out / "requirements.txt").read_text().splitlines() if "==" in line]
    assert len(pins) == len(wheels)
    assert {"ray==2.60.0", "deepspeed==0.19.8", "pydantic==2.14.3", f"rayft=={rayft.__version__}"} <= set(pins)
    (ray_wheel,) = [w for w in wheels if w.name.startswith("ray-2.60.0-")]
    with zipfile.ZipFile(ray_wheel) as z:
        files = z.namelist()
    assert "ray/_raylet.so" in files and "ray/serve/__init__.py" in files
    assert not [f for f in files if f.startswith(("ray/jars/", "ray/rllib/"))]
    assert "Ray is trimmed" in (out / "MANIFEST.md").read_text()

    install = [sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--target", str(site)]
    proc = subprocess.run([*install, *map(str, wheels)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PYTHONPATH")}
    env["PYTHONPATH"] = str(site)
    proc = subprocess.run(
        [sys.executable, "-c", CHECK, str(site)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0 and "bundle ok" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
