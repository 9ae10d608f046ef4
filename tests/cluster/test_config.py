"""The job file: validation with every problem at once, --set precedence, path resolution,
and every YAML the project ships."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import ROOT, rayft_cli
from rayft.cluster.config import ConfigError, JobConfig, config_reference, load_config


def write(tmp_path: Path, text: str, name: str = "job.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def problems_of(path, overrides=None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    return info.value.problems


def test_every_problem_is_reported_at_once_with_path_value_and_line(tmp_path):
    job = write(
        tmp_path, "data:\n  train: x.jsonl\n  packing: maybe\n  colour: blue\ntraining:\n  lr: -1\n  zero_stage: 5\n"
    )
    problems = problems_of(job)
    assert len(problems) == 4
    assert any(p.startswith("training.lr: must be greater than 0 (got -1)") and f"{job}:6" in p for p in problems)
    assert any(p.startswith("training.zero_stage:") and "(got 5)" in p for p in problems)
    assert any(p.startswith("data.packing:") and "'maybe'" in p for p in problems)
    unknown = next(p for p in problems if p.startswith("data.colour"))
    assert "unknown key" in unknown and "max_seq_len" in unknown  # lists what is allowed


def test_unknown_section_is_rejected(tmp_path):
    problems = problems_of(write(tmp_path, "data: {train: x.jsonl}\ntrainng: {lr: 1}\n"))
    assert problems == [p for p in problems if p.startswith("trainng: unknown key")]
    assert "training" in problems[0]


def test_retired_keys_say_what_replaced_them(tmp_path):
    job = write(tmp_path, "model: {dtype: bfloat16}\ndata: {train: x.jsonl, tokenizer_actors: 4}\n")
    problems = problems_of(job)
    assert len(problems) == 2
    assert any("model.dtype is not a setting" in p and "training.precision" in p for p in problems)
    assert any("data.tokenizer_actors is now data.tokenizer_tasks" in p for p in problems)


def test_missing_required_data_section(tmp_path):
    assert problems_of(write(tmp_path, "model: {name: smollm2-135m-instruct}\n")) == ["data: is required"]


def test_set_overrides_yaml_which_overrides_defaults(tmp_path):
    job = write(tmp_path, "data: {train: x.jsonl, max_seq_len: 256}\ntraining: {lr: 0.001}\n")
    cfg = load_config(job, ["training.lr=5e-5", "data.packing=true", "run.name=exp-2"])
    assert cfg.training.lr == 5e-5  # --set beats YAML
    assert cfg.data.max_seq_len == 256  # YAML beats default
    assert cfg.data.packing is True and cfg.run.name == "exp-2"
    assert cfg.training.micro_batch_size == JobConfig.model_fields["training"].default_factory().micro_batch_size


def test_set_errors_name_the_override(tmp_path):
    job = write(tmp_path, "data: {train: x.jsonl}\n")
    problems = problems_of(job, ["training.lr=-3", "scaling.num_gpus=2", "oops"])
    assert any(p.startswith("training.lr: must be greater than 0 (got -3)") and "[from --set]" in p for p in problems)
    assert any(p.startswith("scaling.num_gpus: unknown key") for p in problems)
    assert any("'oops'" in p and "KEY=VALUE" in p for p in problems)


def test_batch_sizes_must_divide(tmp_path):
    job = write(
        tmp_path,
        "data: {train: x.jsonl}\ntraining: {micro_batch_size: 4, global_batch_size: 12}\nscaling: {num_workers: 2}\n",
    )
    (problem,) = problems_of(job)
    assert "global_batch_size (12)" in problem and "4 x 2 = 8" in problem
    cfg = load_config(job, ["training.global_batch_size=16"])
    assert cfg.grad_accum == 2


def test_offload_needs_the_right_zero_stage(tmp_path):
    job = write(tmp_path, "data: {train: x.jsonl}\ntraining: {zero_stage: 2, offload_params: true}\n")
    (problem,) = problems_of(job)
    assert problem.startswith("training:") and "zero_stage: 3" in problem


def test_data_paths_are_relative_to_the_job_file_and_storage_to_the_cwd(tmp_path, monkeypatch):
    sub = tmp_path / "jobs"
    sub.mkdir()
    job = write(
        sub,
        "data:\n  train: data/train.jsonl\n  eval: [a.jsonl, /abs/b.jsonl, hf://org/set]\nrun: {storage_path: out}\n",
    )
    monkeypatch.chdir(tmp_path)
    cfg = load_config(job)
    assert cfg.data.train == str(sub / "data/train.jsonl")
    assert cfg.data.eval == [str(sub / "a.jsonl"), "/abs/b.jsonl", "hf://org/set"]
    assert cfg.run.storage_path == str(tmp_path / "out")
    assert cfg.run_dir == str(tmp_path / "out" / "rayft-run")


def test_a_model_dir_given_relative_to_the_cwd_reaches_the_workers_absolute(tmp_path, monkeypatch):
    (tmp_path / "runs" / "sft" / "final").mkdir(parents=True)
    job = write(tmp_path, "model: {name: runs/sft/final}\ndata: {train: t.jsonl}\n")
    monkeypatch.chdir(tmp_path)
    assert load_config(job).model.name == str(tmp_path / "runs" / "sft" / "final")
    for name in ("smollm2-135m-instruct", "org/model", "s3://bucket/model"):  # aliases, hub ids, URIs as written
        assert load_config(job, [f"model.name={name}"]).model.name == name


def test_bad_yaml_and_missing_file(tmp_path):
    (problem,) = problems_of(write(tmp_path, "data:\n  train: [a\n  b: c\n"))
    assert "not valid YAML" in problem and "job.yaml:" in problem
    (problem,) = problems_of(tmp_path / "nope.yaml")
    assert "job file not found" in problem


def test_every_field_has_a_description():
    rows = config_reference()
    assert len(rows) > 30
    assert all(desc for _, _, desc in rows), [key for key, _, desc in rows if not desc]


SHIPPED_YAML = sorted(p for pattern in ("configs/**/*.yaml", "examples/**/*.yaml") for p in ROOT.glob(pattern))


def test_the_project_ships_job_files():
    assert any(p.name == "quickstart.yaml" for p in SHIPPED_YAML)


@pytest.mark.parametrize("path", SHIPPED_YAML, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_yaml_loads_and_says_how_to_run_it(path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("#") and "rayft " in path.read_text().split("\n\n")[0], (
        "start with a '# run: rayft ...' comment"
    )
    cfg = load_config(path)
    for spec in [cfg.data.train] + ([cfg.data.eval] if cfg.data.eval else []):
        for s in [spec] if isinstance(spec, str) else spec:
            assert "://" in s or Path(s).exists(), f"{path.name} points at missing data {s}"


def test_cli_prints_config_errors_without_a_traceback(tmp_path):
    job = write(tmp_path, "data: {train: x.jsonl}\ntraining: {lr: -1}\n")
    r = rayft_cli("config", "show", str(job))
    assert r.returncode == 2
    assert "training.lr: must be greater than 0 (got -1)" in r.stderr
    assert "Traceback" not in r.stderr + r.stdout


def test_cli_config_show_prints_the_resolved_config(tmp_path):
    job = write(tmp_path, "data: {train: x.jsonl}\n")
    r = rayft_cli("config", "show", str(job), "--set", "training.lr=0.01")
    assert r.returncode == 0, r.stderr
    shown = yaml.safe_load(r.stdout)
    assert shown["training"]["lr"] == 0.01
    assert shown["model"]["name"] == "smollm2-135m-instruct"
    assert set(shown) == {"model", "data", "training", "scaling", "run", "export", "eval", "serve", "sweep", "submit"}
    assert JobConfig.model_validate(shown)  # what it prints is itself a valid job file


def test_cli_import_does_not_load_torch_or_ray():
    code = (
        "import sys, rayft.cluster.cli, rayft.cluster.config; "
        "print(sorted(m for m in ('torch', 'ray', 'transformers') if m in sys.modules))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_the_config_reference_documents_every_key_and_is_up_to_date():
    from rayft.cluster.docs import CONFIG_MD, config_markdown, main

    page = CONFIG_MD.read_text(encoding="utf-8")
    missing = [key for key, _, _ in config_reference() if f"| `{key}` |" not in page]
    assert missing == [], f"docs/config.md lacks these keys: {missing}; run `make docs`"
    assert page == config_markdown(), "docs/config.md is stale: run `make docs` (python -m rayft.cluster.docs)"
    assert main(["--check"]) == 0


def test_the_config_reference_lists_optional_sections_and_allowed_values(tmp_path):
    from rayft.cluster.docs import main

    rows = {key: (default, desc) for key, default, desc in config_reference()}
    assert rows["run.tracking.mlflow"][0] == "None" and rows["run.tracking.mlflow.uri"][0] == "'./mlruns'"
    assert rows["run.tracking.wandb.mode"][0] == "'online'"
    assert rows["training.zero_stage"][1].endswith("One of: 0, 1, 2, 3.")
    assert "One of" not in rows["training.method"][1]  # its description already names lora and full
    stale = tmp_path / "config.md"
    stale.write_text("# Config reference\n")
    assert main(["--out", str(stale), "--check"]) == 1
    assert main(["--out", str(stale)]) == 0 and main(["--out", str(stale), "--check"]) == 0


def test_redacted_hides_credentials_and_keeps_everything_else():
    from rayft.training.redact import REDACTED, redacted

    data = {
        "submit": {"env_vars": {"HF_TOKEN": "hf_x", "LOG_LEVEL": "debug"}, "pip": ["git+https://u:pw@host/r", "torch"]},
        "serve": {"api_key_env": "RAYFT_API_KEY", "api_keys_file": "/keys.txt", "max_tokens_limit": 1024},
        "training": {"ds_config": {"wandb": {"apiKey": "k1", "team": "t"}, "credentials": {"user": "u"}}},
        "run": {"storage_path": "s3://AKIA:abc@bucket/runs", "tracking": {"mlflow": {"uri": "https://mlflow:5000"}}},
        "data": {"train": ["a.jsonl"], "max_seq_len": 128, "client_secret": None},
    }
    found: list[str] = []
    out = redacted(data, found=found)
    assert out["submit"]["env_vars"] == {"HF_TOKEN": REDACTED, "LOG_LEVEL": REDACTED}  # every value: all may be keys
    assert out["submit"]["pip"] == ["git+https://***@host/r", "torch"]
    assert out["serve"] == data["serve"]  # names of where keys are, not keys; token counts
    assert out["training"]["ds_config"] == {
        "wandb": {"apiKey": REDACTED, "team": "t"},
        "credentials": {"user": REDACTED},
    }
    assert out["run"] == {
        "storage_path": "s3://***@bucket/runs",
        "tracking": {"mlflow": {"uri": "https://mlflow:5000"}},
    }
    assert out["data"] == data["data"]
    assert data["submit"]["env_vars"]["HF_TOKEN"] == "hf_x"  # a copy: the job itself keeps its values
    assert sorted(found) == [
        "run.storage_path",
        "submit.env_vars.HF_TOKEN",
        "submit.env_vars.LOG_LEVEL",
        "submit.pip",
        "training.ds_config.credentials.user",
        "training.ds_config.wandb.apiKey",
    ]
    assert redacted(out) == out  # idempotent
