"""What `rayft serve TARGET` resolves to before Ray starts: one typed `ServeSpec` for the Serve app.

TARGET is a job file (its run's final/ export, with the job's `serve:` section), a run dir, a model
dir or a built-in alias. Every problem is reported before anything starts. API keys enter the spec
only as SHA-256 hashes, so they never appear in Serve's deployment config, the dashboard or an
emitted config file.

The spec is JSON-able both ways: `rayft serve --emit-config` writes `spec.model_dump(mode="json")` as
the Serve application's `args`, and `rayft.serving.app:app_builder` validates them back with
`ServeSpec.from_args`.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import os
import re
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from rayft.serving.config import ADAPTER_NAME, API_KEY_ENV, ServeConfig
from rayft.training import storage
from rayft.training.run_dir import RunDir, find_adapter

KEY_HASH = re.compile(r"^[0-9a-f]{64}$")
# What the vLLM app (Ray Serve LLM's own ingress and engine) takes from `serve:`. Every other setting belongs
# to rayft's ingress (auth, limits, timeouts, logging) or its batching scheduler, which the vLLM app does not
# run: a non-default value for one of them is refused rather than silently dropped.
VLLM_USES = frozenset(
    {
        "engine",
        "model_name",
        "host",
        "port",
        "route_prefix",
        "autoscaling",
        "max_ongoing_requests",
        "gpus_per_replica",
        "dtype",
        "allow_unauthenticated",
        "drain_timeout_s",
    }
)


class ServeError(Exception):
    """A serve target or setting that cannot be used; the message says what to do."""


class OutsideRoots(ValueError):
    """An adapter path that resolves outside the directories adapters may come from (a 403, not a bad request)."""


class NoAdapter(ValueError):
    """An adapter path that holds no LoRA adapter (a 404: nothing is there to register)."""


def env_api_key(variable: str = API_KEY_ENV, environ=None) -> str:
    """The API key in the environment variable `variable` (serve.api_key_env), "" when there is none: the one
    place a key is read from the environment, by `rayft serve` and by each ingress replica."""
    return ((os.environ if environ is None else environ).get(variable) or "").strip()


def hash_key(key: str) -> str:
    """How an API key is kept: its SHA-256 hex digest."""
    return hashlib.sha256(key.encode()).hexdigest()


def is_loopback(host: str) -> bool:
    """Whether a bind address is reachable from this machine only."""
    if host.lower() in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def read_keys_file(path: str | Path) -> list[str]:
    """The key hashes a keys file holds: one key per line, or `sha256:HEX` for a key given by its digest;
    blank lines and lines starting with # are skipped. A malformed digest is an error naming its line."""
    hashes = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("sha256:"):
            digest = line[len("sha256:") :].strip().lower()
            if not KEY_HASH.match(digest):
                raise ServeError(f"{path}:{n}: a sha256: line needs 64 hex digits (sha256sum of the key)")
            hashes.append(digest)
        else:
            hashes.append(hash_key(line))
    return hashes


class _KeysFile:
    """A keys file on this node, re-read when it changes (checked at most every `recheck_s`); a file that turns
    unreadable or malformed keeps the last good keys, with a warning."""

    def __init__(self, path: str, setting: str, recheck_s: float):
        self.path, self.recheck_s = Path(path).expanduser(), recheck_s
        if not self.path.is_file():
            raise ServeError(
                f"{setting} {self.path} does not exist on this node; mount the keys there (one per line) or unset "
                f"{setting}"
            )
        self.hashes: set[str] = set()
        self._stamp = None
        self._checked = time.monotonic()
        self._reload()

    def _reload(self) -> None:
        st = self.path.stat()
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        if stamp != self._stamp:
            self.hashes, self._stamp = set(read_keys_file(self.path)), stamp

    def current(self) -> set[str]:
        if time.monotonic() - self._checked >= self.recheck_s:
            self._checked = time.monotonic()
            try:
                self._reload()
            except (OSError, ServeError) as e:  # keep the last good keys; the operator sees why
                logging.getLogger("ray.serve.rayft").warning("keeping the previous API keys of %s: %s", self.path, e)
        return self.hashes


class KeyRing:
    """The API keys an ingress replica accepts: the spec's hashes, plus what the replica reads itself at start
    (serve.api_key_env in its own environment, serve.api_keys_file and serve.admin_keys_file on its own node), so
    keys can come from a Kubernetes Secret that the machine writing the config never saw. The keys files are
    re-read when they change, so rotating a Secret needs no redeploy. Admin keys are accepted like the others and
    also see every key's files (rayft.serving.files).

    Auth is required when any key was found at start or a keys file is configured; once required it stays
    required: a keys file emptied later rejects every request rather than opening the endpoint."""

    def __init__(self, spec: ServeSpec, environ=None, recheck_s: float = 5.0):
        cfg = spec.serve
        self.fixed = set(spec.key_hashes)
        env_key = env_api_key(cfg.api_key_env, environ)
        if env_key:
            self.fixed.add(hash_key(env_key))
        self.file = _KeysFile(cfg.api_keys_file, "serve.api_keys_file", recheck_s) if cfg.api_keys_file else None
        self.admin = _KeysFile(cfg.admin_keys_file, "serve.admin_keys_file", recheck_s) if cfg.admin_keys_file else None
        self.required = bool(self.fixed or self.file or self.admin)

    def role(self, token: str) -> str | None:
        """'admin' for an admin key, 'user' for another accepted key, None for a missing or unknown one."""
        import hmac

        if not token:
            return None
        digest = hash_key(token)
        if self.admin and any(hmac.compare_digest(digest, h) for h in self.admin.current()):
            return "admin"
        users = self.fixed | (self.file.current() if self.file else set())
        return "user" if any(hmac.compare_digest(digest, h) for h in users) else None

    def accepts(self, token: str) -> bool:
        return self.role(token) is not None


def check_bind(cfg: ServeConfig, has_keys: bool) -> None:
    """A non-loopback bind needs an API key unless serve.allow_unauthenticated says otherwise."""
    if has_keys or cfg.allow_unauthenticated or is_loopback(cfg.host):
        return
    raise ServeError(
        f"serve.host {cfg.host} exposes the endpoint to the network, but no API key is set: give one (--api-key, "
        f"${cfg.api_key_env} or serve.api_keys_file), or set serve.allow_unauthenticated: true if a gateway in "
        "front of it checks who calls"
    )


class ServeSpec(BaseModel):
    """Everything the Serve app needs, resolved and checked: the model, its name, the adapters, the keys."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model_path: str = Field(..., description="What from_pretrained loads: a local model directory or a hub id.")
    model_name: str = Field(..., min_length=1, description="The model id clients send as `model`.")
    revision: str | None = Field(
        default=None,
        description="Hub revision (branch, tag or commit) the model and its tokenizer load at, when model_path is "
        "a hub id; None: the hub's default. Local directories have none.",
    )
    serve: ServeConfig = Field(default_factory=ServeConfig, description="The job's `serve:` section.")
    adapters: dict[str, str] = Field(
        default_factory=dict, description="LoRA adapters served from the start: {name: checked adapter directory}."
    )
    adapter_roots: list[str] = Field(
        default_factory=list, description="Absolute directories adapters may be registered from at run time."
    )
    key_hashes: list[str] = Field(
        default_factory=list, description="SHA-256 hex digests of the accepted API keys; empty: no key needed."
    )

    @field_validator("adapters")
    @classmethod
    def _adapter_names(cls, v: dict[str, str]) -> dict[str, str]:
        bad = [name for name in v if not ADAPTER_NAME.match(name)]
        if bad:
            raise ValueError(f"adapter names {bad} must be 1-64 letters, digits, '.', '_' or '-'")
        return v

    @field_validator("key_hashes")
    @classmethod
    def _hashes(cls, v: list[str]) -> list[str]:
        if any(not KEY_HASH.match(h) for h in v):
            raise ValueError("key_hashes holds SHA-256 hex digests (64 characters 0-9a-f), never plain keys")
        return v

    @model_validator(mode="after")
    def _engine_settings(self) -> ServeSpec:
        problems = vllm_problems(self.serve, ["key_hashes"] if self.key_hashes else [])
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @classmethod
    def from_args(cls, args: Any) -> ServeSpec:
        """The spec from a Serve application's `args` (as --emit-config writes them); a clear error otherwise."""
        if isinstance(args, cls):
            return args
        if not isinstance(args, dict):
            raise ServeError(
                f"the application's args must be a rayft serve spec (a mapping), not {type(args).__name__}; "
                "write them with `rayft serve TARGET --emit-config FILE`"
            )
        try:
            return cls.model_validate(args)
        except ValidationError as e:
            problems = []
            for err in e.errors():
                where = ".".join(str(p) for p in err["loc"]) or "args"
                problems.append(f"{where}: {err['msg'].removeprefix('Value error, ')}")
            raise ServeError(
                "the application's args are not a valid rayft serve spec: " + "; ".join(problems) + ". Write them "
                "with `rayft serve TARGET --emit-config FILE`"
            ) from None

    def with_serve(self, **changes: Any) -> ServeSpec:
        """This spec with some `serve:` settings changed (validated), e.g. `spec.with_serve(port=8001)`."""
        serve = self.serve.model_dump() | changes
        return type(self).model_validate(self.model_dump() | {"serve": serve})


def vllm_problems(cfg: ServeConfig, key_sources: list[str]) -> list[str]:
    """Why a `serve:` section cannot run on serve.engine vllm: settings the vLLM app would silently ignore.
    `key_sources` names where API keys came from (they would not be checked there)."""
    if cfg.engine != "vllm":
        return []
    problems = []
    if key_sources:
        problems.append(
            f"serve.engine vllm does not check API keys, so the endpoint would be open to anyone although keys are "
            f"set ({', '.join(key_sources)}); use serve.engine: transformers, which enforces them, or put the vLLM "
            "app behind a gateway that checks keys and give rayft none (no --api-key, key variable, "
            "serve.api_keys_file or serve.admin_keys_file)"
        )
    if not key_sources and not cfg.allow_unauthenticated and not is_loopback(cfg.host):
        problems.append(
            f"serve.engine vllm cannot check API keys, and serve.host {cfg.host} exposes it to the network: put it "
            "behind a gateway that checks keys and set serve.allow_unauthenticated: true, or bind 127.0.0.1"
        )
    defaults = ServeConfig()
    ignored = [f for f in ServeConfig.model_fields if f not in VLLM_USES and getattr(cfg, f) != getattr(defaults, f)]
    lora = [f for f in ignored if f in ("adapters", "max_adapters_per_replica", "adapter_roots")]
    if lora:
        problems.append(
            f"serve.engine vllm cannot use {', '.join('serve.' + f for f in lora)}: Ray Serve LLM loads LoRA "
            "adapters only from cloud storage (s3://, gs://) and has no /admin/adapters; serve a merged model "
            "(export.merge: true) or use serve.engine: transformers"
        )
    key_settings = ("api_key_env", "api_keys_file", "admin_keys_file")
    rest = [f for f in ignored if f not in lora and not (key_sources and f in key_settings)]
    if rest:
        names = ", ".join(f"serve.{f}={getattr(cfg, f)!r}" for f in rest)
        problems.append(
            f"serve.engine vllm ignores {names}: these set rayft's own ingress and batching, which the vLLM app "
            "does not run (vLLM batches, queues and limits requests itself); remove them or use serve.engine: "
            "transformers"
        )
    return problems


def build_spec(
    target: str,
    serve_cfg: ServeConfig,
    run_dir: str | None = None,
    storage_path: str | None = None,
    api_keys: list[str] | None = None,
    revision: str | None = None,
    elsewhere: bool = False,
) -> ServeSpec:
    """Resolve the model to serve and the adapters, check them, and return the app's spec.

    `revision`: the hub revision to load a hub-id model at; without one, the revision the served adapters'
    runs were trained on (their job.yaml), else the hub's default. `elsewhere`: the spec is for a config file
    deployed on other machines (--emit-config): a keys file missing here and a network bind with no key here
    are left to the replicas, which read the key variable and the keys file themselves and refuse to start
    without a key."""
    from rayft.training.inference import resolve_inference_model
    from rayft.training.models import ModelError

    hashes, key_sources = _api_keys(serve_cfg, api_keys, elsewhere)
    if not elsewhere:
        check_bind(serve_cfg, bool(hashes) or "serve.admin_keys_file" in key_sources)
    if serve_cfg.engine == "vllm":
        import importlib.util

        if serve_cfg.gpus_per_replica <= 0:
            raise ServeError("serve.engine vllm runs on GPUs only: set serve.gpus_per_replica (e.g. 1)")
        problems = vllm_problems(serve_cfg, key_sources)
        if problems:
            raise ServeError("; ".join(problems))
        if importlib.util.find_spec("vllm") is None:
            raise ServeError(
                "serve.engine is vllm but vllm is not installed here; install it on the GPU nodes "
                "(pip install 'ray[llm]') or use serve.engine: transformers"
            )
    where = run_dir or target
    try:
        if storage.is_remote(where):  # a model or run dir in cloud storage: each replica copies it to its node
            model = resolve_inference_model(where)
        else:
            path = Path(where).expanduser()
            model = resolve_inference_model(str(path) if run_dir or path.exists() else target)
    except (ModelError, storage.StorageError) as e:
        if run_dir and not RunDir(run_dir).has_final():
            raise ServeError(f"run {run_dir} has no final/ export yet: train it first (rayft train {target})") from None
        raise ServeError(str(e)) from None
    if model.adapter:
        raise ServeError(
            f"{target} is a LoRA adapter; serve its base model and add it as an adapter "
            f"(rayft serve BASE --adapter NAME={target}), or export the run with export.merge: true, so that final/ "
            "holds the merged model"
        )
    hub_model = not (storage.is_remote(model.path) or Path(model.path).is_dir())
    if revision and not hub_model:
        raise ServeError(
            f"revision {revision!r} applies to hub models only; {model.path} is a local directory (one version)"
        )
    if hub_model and revision is None:
        recorded = (trained_revision(d) for d in map(_adapter_dir, serve_cfg.adapters.values()) if d)
        revision = next((r for r in recorded if r), None)
    adapters = {}
    for adapter_name, adapter_path in serve_cfg.adapters.items():
        try:
            adapters[adapter_name] = validate_adapter(adapter_name, adapter_path, None, model.path, revision)
        except ValueError as e:
            raise ServeError(f"serve.adapters.{adapter_name}: {e}") from None
    roots = [str(Path(r).expanduser().resolve()) for r in (serve_cfg.adapter_roots or [storage_path or "runs"])]
    name = serve_cfg.model_name or _default_name(target, run_dir)
    others = [m for m in serve_cfg.finetune.models or [] if not _names_model(m, name, target, model.path)]
    if others:
        raise ServeError(
            f"serve.finetune.models: {', '.join(others)} {'is' if len(others) == 1 else 'are'} not the served model "
            f"({name}, {model.path}): fine-tuning jobs train LoRA adapters that this endpoint serves beside its "
            "model, so they can only start from it; list its id, or serve the other model on its own endpoint"
        )
    return ServeSpec(
        model_path=model.path,
        model_name=name,
        revision=revision,
        serve=serve_cfg,
        adapters=adapters,
        adapter_roots=roots,
        key_hashes=sorted(set(hashes)),
    )


def _names_model(model_id: str, name: str, target: str, path: str) -> bool:
    """Whether `model_id` names the served model: its id, the target it was served from, or its directory."""
    from rayft.training.models import ModelError, resolve_model

    if model_id in (name, target, path):
        return True
    try:
        resolved = resolve_model(model_id)
    except (ModelError, OSError, ValueError):
        return False
    if storage.is_remote(resolved) or storage.is_remote(path):
        return resolved == path
    return Path(resolved).expanduser().resolve() == Path(path).expanduser().resolve()


def _api_keys(cfg: ServeConfig, given: list[str] | None, elsewhere: bool = False) -> tuple[list[str], list[str]]:
    """The hashes of the accepted API keys (--api-key, the key variable, serve.api_keys_file) and where they
    came from. A keys file that exists only where the replicas run (elsewhere) is read there."""
    keys = [k.strip() for k in (given or []) if k and k.strip()]
    sources = ["--api-key"] if keys else []
    env_key = env_api_key(cfg.api_key_env)
    if env_key:
        keys.append(env_key)
        sources.append(f"${cfg.api_key_env}")
    hashes = [hash_key(k) for k in keys]
    if cfg.api_keys_file:
        f = Path(cfg.api_keys_file).expanduser()
        if f.is_file():
            from_file = read_keys_file(f)
            hashes += from_file
            sources += ["serve.api_keys_file"] if from_file else []
        elif not elsewhere:
            raise ServeError(f"serve.api_keys_file {f} does not exist; write one API key per line")
        else:
            sources.append("serve.api_keys_file")
    if cfg.admin_keys_file:  # checked here and read by the replicas: admin hashes never enter the spec
        f = Path(cfg.admin_keys_file).expanduser()
        if f.is_file():
            sources += ["serve.admin_keys_file"] if read_keys_file(f) else []
        elif not elsewhere:
            raise ServeError(f"serve.admin_keys_file {f} does not exist; write one admin API key per line")
        else:
            sources.append("serve.admin_keys_file")
    return hashes, sources


def _default_name(target: str, run_dir: str | None) -> str:
    """The served model's name: its run's (a run dir, or its final/ export), else the directory's or the id's."""
    if run_dir:
        return storage.basename(run_dir)
    if storage.is_remote(target):
        path = target
    elif Path(target).is_dir():
        path = str(Path(target).resolve())  # a link (a sweep's best/) names the run it points into
    else:
        return target.rsplit("/", 1)[-1]
    run = RunDir.of_model(path)
    return run.name if run else storage.basename(path)


def _adapter_dir(path: str | Path) -> Path | None:
    """The LoRA adapter directory in a run dir, a final/ export or an adapter dir (run_dir.find_adapter's
    order); None if there is none."""
    found = find_adapter(str(Path(path).expanduser().resolve()))
    return Path(found) if found else None


def trained_revision(adapter_dir: Path) -> str | None:
    """The hub revision of the base an adapter was trained on: what the export recorded (rayft_export.json,
    else PEFT's adapter_config.json), else `model.revision` in the job.yaml of the run the adapter was
    exported from (runs exported before the revision was recorded); None: the hub's default."""
    from rayft.training.inference import adapter_base

    recorded = adapter_base(adapter_dir)[1]
    if recorded:
        return recorded
    run = RunDir.of_model(str(adapter_dir))  # final/ (LoRA without merge) or final/adapter
    job = run.read_job() if run else None
    model = (job or {}).get("model") or {}
    return model.get("revision") if isinstance(model, dict) else None


def validate_adapter(name: str, path: str, roots: list[str] | None, base_path: str, revision: str | None = None) -> str:
    """An adapter's directory, checked: a valid name, a real adapter trained on `base_path` (at `revision`, for
    a hub model), inside `roots` when given. Accepts a run directory, a final/ export, or an adapter dir."""
    from rayft.training.inference import adapter_base
    from rayft.training.models import ModelError, resolve_model

    if not ADAPTER_NAME.match(name or ""):
        raise ValueError(f"adapter name {name!r} must be 1-64 letters, digits, '.', '_' or '-'")
    try:
        p = Path(path).expanduser().resolve()  # resolves '..' and symlinks before the roots check
    except (RuntimeError, OSError, ValueError) as e:  # '~nobody/x', an unreadable link, a NUL byte
        raise ValueError(f"{path!r} is not a usable path ({e})") from None
    if roots is not None and not any(p == Path(r) or Path(r) in p.parents for r in roots):
        raise OutsideRoots(f"{path} is outside the directories adapters may come from ({', '.join(roots)})")
    adapter = _adapter_dir(p)
    if adapter is None:
        raise NoAdapter(f"{path} holds no LoRA adapter (adapter_config.json); give a LoRA run dir or its final/adapter")
    try:
        base = adapter_base(adapter)[0]
        base_dir = Path(resolve_model(base)).resolve() if base else None
    except (ModelError, OSError, ValueError) as e:  # an unreadable adapter_config.json, a base that cannot load
        raise ValueError(f"{path} cannot be loaded: its adapter's base model is unusable ({e})") from None
    if base_dir is not None and base_dir != Path(base_path).resolve():
        raise ValueError(
            f"{path} was trained on {base}, not on the served model ({base_path}); serve that base model "
            "to switch between its adapters (rayft serve BASE --adapter NAME=RUN_DIR)"
        )
    trained = trained_revision(adapter)
    if not Path(base_path).is_dir() and trained != revision:
        raise ValueError(
            f"{path} was trained on {base_path} at revision {trained or '(the default)'}, but the served model "
            f"loads at revision {revision or '(the default)'}; serve adapters trained on one revision together"
        )
    return str(adapter)
