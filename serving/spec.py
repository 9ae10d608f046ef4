"""What `rayft serve TARGET` resolves to before Ray starts: one JSON-able spec for the Serve app.

TARGET is a job file (its run's final/ export, with the job's `serve:` section), a run dir, a model
dir or a built-in alias. Every problem is reported before anything starts. API keys enter the spec
only as SHA-256 hashes, so they never appear in Serve's deployment config, the dashboard or an
emitted config file.
"""

from __future__ import annotations

import os
from pathlib import Path

from rayft.serving.config import ADAPTER_NAME, ServeConfig


class ServeError(Exception):
    """A serve target or setting that cannot be used; the message says what to do."""


def build_spec(
    target: str,
    serve_cfg: ServeConfig,
    run_dir: str | None = None,
    storage_path: str | None = None,
    api_keys: list[str] | None = None,
) -> dict:
    """Resolve the model to serve and the adapters, check them, and return the app's spec."""
    from rayft.training.inference import resolve_inference_model
    from rayft.training.models import ModelError

    if serve_cfg.engine == "vllm":
        import importlib.util

        if serve_cfg.gpus_per_replica <= 0:
            raise ServeError("serve.engine vllm runs on GPUs only: set serve.gpus_per_replica (e.g. 1)")
        if importlib.util.find_spec("vllm") is None:
            raise ServeError(
                "serve.engine is vllm but vllm is not installed here; install it on the GPU nodes "
                "(pip install 'ray[llm]') or use serve.engine: transformers"
            )
    path = Path(run_dir or target).expanduser()
    try:
        model = resolve_inference_model(str(path) if run_dir or path.exists() else target)
    except ModelError as e:
        if run_dir and not Path(run_dir, "final").is_dir():
            raise ServeError(f"run {run_dir} has no final/ export yet: train it first (rayft train {target})") from None
        raise ServeError(str(e)) from None
    if model.adapter:
        raise ServeError(
            f"{target} is a LoRA adapter; serve its base model and add it as an adapter "
            f"(serve.adapters: {{NAME: {target}}}), or serve the run directory, whose final/ holds the merged model"
        )
    name = serve_cfg.model_name or _default_name(target, run_dir)
    roots = [str(Path(r).expanduser().resolve()) for r in (serve_cfg.adapter_roots or [storage_path or "runs"])]
    adapters = {}
    for adapter_name, adapter_path in serve_cfg.adapters.items():
        try:
            adapters[adapter_name] = validate_adapter(adapter_name, adapter_path, None, model.path)
        except ValueError as e:
            raise ServeError(f"serve.adapters.{adapter_name}: {e}") from None
    import hashlib

    keys = [k.strip() for k in (api_keys or []) if k and k.strip()]
    env_key = os.environ.get(serve_cfg.api_key_env)
    if env_key:
        keys.append(env_key.strip())
    if serve_cfg.api_keys_file:
        f = Path(serve_cfg.api_keys_file).expanduser()
        if not f.is_file():
            raise ServeError(f"serve.api_keys_file {f} does not exist; write one API key per line")
        keys += [line.strip() for line in f.read_text().splitlines() if line.strip() and not line.startswith("#")]
    return {
        "model_path": model.path,
        "model_name": name,
        "serve": serve_cfg.model_dump(mode="json"),
        "adapters": adapters,
        "adapter_roots": roots,
        "key_hashes": sorted({hashlib.sha256(k.encode()).hexdigest() for k in keys}),
    }


def _default_name(target: str, run_dir: str | None) -> str:
    if run_dir:
        return Path(run_dir).name
    p = Path(target)
    if p.is_dir():
        return p.resolve().name if p.resolve().name != "final" else p.resolve().parent.name
    return target.rsplit("/", 1)[-1]


def validate_adapter(name: str, path: str, roots: list[str] | None, base_path: str) -> str:
    """An adapter's directory, checked: a valid name, a real adapter trained on `base_path`, inside
    `roots` when given. Accepts a run directory (its final/adapter/), a final/ export, or an adapter dir.
    """
    from rayft.training.inference import adapter_base_model
    from rayft.training.models import resolve_model

    if not ADAPTER_NAME.match(name or ""):
        raise ValueError(f"adapter name {name!r} must be 1-64 letters, digits, '.', '_' or '-'")
    p = Path(path).expanduser().resolve()  # resolves '..' and symlinks before the roots check
    if roots is not None and not any(p == Path(r) or Path(r) in p.parents for r in roots):
        raise ValueError(f"{path} is outside the directories adapters may come from ({', '.join(roots)})")
    for candidate in (p, p / "adapter", p / "final" / "adapter"):
        if (candidate / "adapter_config.json").is_file():
            base = adapter_base_model(candidate)
            if base and Path(resolve_model(base)).resolve() != Path(base_path).resolve():
                raise ValueError(
                    f"{path} was trained on {base}, not on the served model ({base_path}); serve that base model "
                    "to switch between its adapters (rayft serve BASE --adapter NAME=RUN_DIR)"
                )
            return str(candidate)
    raise ValueError(f"{path} holds no LoRA adapter (adapter_config.json); give a LoRA run dir or its final/adapter")
