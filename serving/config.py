"""The job file's `serve:` section: how `rayft serve` runs the endpoint.

Defaults live here and only here; every field carries the one-line description that the
config reference (docs/config.md, `make docs`) and `rayft config show --describe` print.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, model_validator

from rayft.training.config import Section

ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
ROUTE_PREFIX = re.compile(r"^/$|^(/[A-Za-z0-9._-]+)+$")
API_KEY_ENV = "RAYFT_API_KEY"  # the environment variable holding an API key (serve.api_key_env's default)


class AutoscalingConfig(Section):
    min_replicas: int = Field(default=1, ge=0, description="Fewest model replicas (0 scales to zero when idle).")
    max_replicas: int = Field(default=1, ge=1, description="Most model replicas; equal to min_replicas = fixed size.")
    target_ongoing_requests: float = Field(
        default=4.0, gt=0, description="Requests in flight per replica that the autoscaler aims for."
    )
    upscale_delay_s: float = Field(
        default=5.0, ge=0, description="Load must stay high this long before adding a replica."
    )
    downscale_delay_s: float = Field(
        default=30.0, ge=0, description="Load must stay low this long before removing one."
    )
    look_back_period_s: float = Field(
        default=30.0, gt=0, description="Window over which ongoing requests are averaged."
    )

    @model_validator(mode="after")
    def _bounds(self) -> AutoscalingConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"serve.autoscaling.min_replicas ({self.min_replicas}) is larger than max_replicas "
                f"({self.max_replicas})"
            )
        return self


class FinetuneConfig(Section):
    storage_path: str = Field(
        default="~/.cache/rayft/service",
        description="Where the fine-tuning API keeps its state (files, jobs and the jobs' runs): a local "
        "directory (~ is expanded where the ingress runs) or s3:// / gs://; the ingress replicas and the nodes "
        "that run the jobs must all reach the same place.",
    )
    max_file_bytes: int = Field(
        default=512 * 1024**2,
        ge=1,
        description="Largest file POST /v1/files accepts (413 above); uploads stream to storage.",
    )
    max_stored_bytes_per_key: int = Field(
        default=10 * 1024**3, ge=1, description="Bytes of files one API key may keep stored (429 quota_exceeded above)."
    )
    models: list[str] | None = Field(
        default=None,
        description="Model ids a fine-tuning job may name as `model`, each the served model (its id, directory or "
        "built-in alias): a job trains a LoRA adapter that this endpoint then serves. Default: the served model's "
        "id; [] turns fine-tuning jobs off.",
    )
    job: dict[str, Any] = Field(
        default_factory=dict,
        description="The job-file template every fine-tuning job starts from (training, data options, scaling, "
        "run.max_failures, export), under rayft's defaults; the service sets the model, the data, the run's name "
        "and storage, and the request's hyperparameters. training.rl (its sampling: samples_per_prompt, "
        "max_new_tokens, ...) applies to reinforcement jobs only, whose grader comes with each request.",
    )
    max_active_jobs_per_key: int = Field(
        default=2, ge=1, description="Jobs one API key may have validating, queued or running at once (429 above)."
    )
    max_active_jobs: int = Field(
        default=8,
        ge=1,
        description="Jobs of every key together that may be validating, queued or running at once (429 above): the "
        "cluster's share for fine-tuning, whatever the number of keys.",
    )
    driver_cpus: float = Field(
        default=0.1,
        ge=0,
        description="CPUs each job's driver (`rayft train`) asks Ray for, so Ray places drivers where there is room "
        "and queues them when there is none, instead of starting every one on the head node.",
    )
    max_epochs: int = Field(default=20, ge=1, description="The largest n_epochs a job may ask for (400 above).")
    job_restarts: int = Field(
        default=1,
        ge=0,
        description="Times a job whose Ray job died without an error of rayft's own (a killed driver, a lost "
        "node) is submitted again; the run resumes from its last checkpoint.",
    )
    ray_address: str | None = Field(
        default=None,
        description="The Ray Jobs API (dashboard) that runs the jobs, e.g. http://HEAD:8265; default: the cluster "
        "the endpoint runs on.",
    )
    poll_interval_s: float = Field(default=2.0, gt=0, description="How often the service checks on its running jobs.")
    namespace: str = Field(
        default="default",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$",
        description="The endpoint's own jobs in storage_path: endpoints that share a storage path (and its files) "
        "each need their own namespace; one live endpoint (cluster) follows a namespace's jobs at a time.",
    )
    python_graders: bool = Field(
        default=False,
        description="Accept python graders (tenant code, run in a sandboxed process) in reinforcement jobs and "
        "/v1/fine_tuning/alpha/graders; off, they are refused with a 400.",
    )
    max_line_bytes: int = Field(
        default=8 * 1024**2,
        ge=1024,
        description="Longest line (one row) of a training or validation file; a longer one fails the job's "
        "validation as file:line without being read whole.",
    )

    @model_validator(mode="after")
    def _check_job(self) -> FinetuneConfig:
        problems = job_template_problems(self.job)
        if problems:
            raise ValueError("; ".join(problems))
        return self


# What a fine-tuning job's template may not set: the service fills these in for every job.
SERVICE_SET = {
    "model": ("name", "revision", "trust_remote_code"),
    "data": ("train", "eval", "eval_fraction", "repeat", "hub_split"),
    "run": ("name", "storage_path"),
}
TEMPLATE_SECTIONS = ("model", "data", "training", "scaling", "run", "export", "eval")


# Stands in for a request's grader when the template's training.rl is checked on its own.
PLACEHOLDER_GRADER = {"type": "string_check", "name": "template", "input": "{{sample.output_text}}",
                      "reference": "x", "operation": "eq"}  # fmt: skip


def template_job(job: dict[str, Any]):
    """A fine-tuning job file (serve.finetune.job, or a job built from it) as a validated TrainJob, with a
    placeholder for the training data the service fills in per job. A template's training.rl (the sampling of
    reinforcement jobs, checked by job_template_problems) is left out unless the job is one (objective grpo).
    Raises pydantic's ValidationError."""
    from rayft.training.config import TrainJob

    training = job.get("training")
    if isinstance(training, dict) and "rl" in training and training.get("objective") != "grpo":
        job = job | {"training": {k: v for k, v in training.items() if k != "rl"}}
    return TrainJob.model_validate(job | {"data": dict(job.get("data") or {}) | {"train": "train.jsonl"}})


def _rl_template_problems(rl: Any) -> list[str]:
    """Why serve.finetune.job.training.rl cannot be the sampling of every reinforcement job; [] when it can."""
    from pydantic import ValidationError

    from rayft.training.config import RlConfig

    where = "serve.finetune.job.training.rl"
    if not isinstance(rl, dict):
        return [f"{where} must be a mapping"]
    problems = [
        f"{where}.{key}: each reinforcement job's reward is the grader its request sends "
        "(method.reinforcement.grader); remove it"
        for key in ("grader", "reward")
        if key in rl
    ]
    if problems:
        return problems
    try:
        RlConfig.model_validate(rl | {"grader": PLACEHOLDER_GRADER})
    except ValidationError as e:
        for err in e.errors():
            at = ".".join(str(p) for p in err["loc"])
            problems.append(f"{where}.{at}: {err['msg'].removeprefix('Value error, ')}".rstrip(": "))
    return problems


def job_template_problems(job: dict[str, Any]) -> list[str]:
    """Why serve.finetune.job cannot be every fine-tuning job's template; [] when it can."""
    from pydantic import ValidationError

    problems = []
    for section, value in job.items():
        if section not in TEMPLATE_SECTIONS:
            problems.append(
                f"serve.finetune.job.{section}: not a section a fine-tuning job takes (it takes "
                f"{', '.join(TEMPLATE_SECTIONS)})"
            )
        elif not isinstance(value, dict):
            problems.append(f"serve.finetune.job.{section} must be a mapping")
        else:
            for key in SERVICE_SET.get(section, ()):
                if key in value:
                    problems.append(
                        f"serve.finetune.job.{section}.{key}: the service sets this itself for every job (from the "
                        "request and serve.finetune.storage_path); remove it"
                    )
    training = job.get("training")
    training = training if isinstance(training, dict) else {}
    method = training.get("method")
    if method not in (None, "lora"):
        problems.append(
            f"serve.finetune.job.training.method is {method!r}: fine-tuning jobs train LoRA adapters, which the "
            "endpoint serves beside its model; set it to lora or remove it"
        )
    if training.get("objective") not in (None, "sft"):
        problems.append(
            f"serve.finetune.job.training.objective is {training['objective']!r}: each job's objective follows its "
            "request's method (supervised: sft, dpo: dpo, reinforcement: grpo); remove it"
        )
    if "rl" in training:
        problems += _rl_template_problems(training["rl"])
    if problems:
        return problems
    try:
        template_job(job)
    except ValidationError as e:
        for err in e.errors():
            where = ".".join(str(p) for p in err["loc"])
            problems.append(f"serve.finetune.job.{where}: {err['msg'].removeprefix('Value error, ')}".rstrip(": "))
    return problems


class ServeConfig(Section):
    engine: Literal["transformers", "vllm"] = Field(
        default="transformers", description="transformers (CPU or GPU) or vllm (GPU only, through ray.serve.llm)."
    )
    model_name: str | None = Field(
        default=None,
        description="Model id clients send as `model` (default: the run name or the model directory's name).",
    )
    host: str = Field(
        default="127.0.0.1", description="Address the HTTP server binds to; 0.0.0.0 exposes it to the network."
    )
    port: int = Field(default=8000, ge=1, le=65535, description="HTTP port.")
    route_prefix: str = Field(
        default="/",
        description="Path the app answers under, e.g. /llm (a second app on the same Serve instance, a gateway's "
        "path): clients then call http://HOST:PORT/llm/v1/...; keys are checked the same under any prefix.",
    )
    autoscaling: AutoscalingConfig = Field(default_factory=AutoscalingConfig, description="Model replicas.")
    max_ongoing_requests: int = Field(
        default=16,
        ge=1,
        description="Requests a replica holds at once, running or waiting for a batch slot (at least max_batch_size).",
    )
    max_queued_requests: int = Field(
        default=64, ge=1, description="Requests waiting for a replica before new ones get 429 with Retry-After."
    )
    max_batch_size: int = Field(
        default=8, ge=1, description="Requests generated together in one batch (1 = no batching)."
    )
    batch_wait_timeout_s: float = Field(
        default=0.02, ge=0, description="How long a batch waits to fill before it starts."
    )
    cpus_per_replica: float = Field(
        default=1.0, gt=0, description="Logical CPUs (and torch threads) per model replica."
    )
    gpus_per_replica: float = Field(default=0.0, ge=0, description="GPUs per model replica (0 = CPU).")
    dtype: Literal["auto", "fast", "float32", "bfloat16"] = Field(
        default="auto",
        description="Weights dtype; auto = bfloat16 on GPU, float32 on CPU; fast = bfloat16 on a GPU or a CPU with "
        "native bf16 (AVX512-BF16, AMX), else float32.",
    )
    default_max_tokens: int = Field(
        default=256, ge=1, description="Tokens generated when a request sets no max_tokens."
    )
    max_tokens_limit: int = Field(default=1024, ge=1, description="Largest max_tokens a request may ask for.")
    request_timeout_s: float = Field(default=120.0, gt=0, description="A request taking longer gets 504.")
    max_body_bytes: int = Field(default=1_000_000, ge=1024, description="Largest accepted request body (413 above).")
    api_key_env: str = Field(
        default=API_KEY_ENV,
        description="Environment variable holding an API key; read by `rayft serve` and by every ingress replica.",
    )
    api_keys_file: str | None = Field(
        default=None,
        description="File of accepted API keys, one per line (or sha256:HEX digests), read by every ingress replica "
        "and re-read when it changes (e.g. a mounted Kubernetes Secret).",
    )
    admin_keys_file: str | None = Field(
        default=None,
        description="File of admin API keys (same format as api_keys_file): accepted like the others, and they see "
        "and manage every key's files, not only their own.",
    )
    allow_unauthenticated: bool = Field(
        default=False, description="Serve on a non-loopback address with no API key (refused unless true)."
    )
    drain_timeout_s: float = Field(
        default=60.0,
        ge=0,
        description="On scale-down, redeploy or Ctrl-C, how long a replica keeps generating its in-flight requests "
        "(new ones go elsewhere) before it stops.",
    )
    retry_after_s: int = Field(default=1, ge=0, description="Retry-After (s) sent with a 429 when every queue is full.")
    kv_cache_gib: float = Field(
        default=4.0,
        gt=0,
        description="KV-cache bytes a replica's running batch may hold (GiB); a request is admitted when its prompt "
        "plus max_tokens fits beside the running ones.",
    )
    adapters: dict[str, str] = Field(
        default_factory=dict, description="LoRA adapters served next to the model: {name: run dir or adapter dir}."
    )
    adapter_roots: list[str] = Field(
        default_factory=list,
        description="Directories new adapters may be registered from at run time (default: run.storage_path).",
    )
    max_adapters_per_replica: int = Field(default=4, ge=1, description="Adapters kept loaded per replica (LRU).")
    log_prompts: bool = Field(default=False, description="Put prompt text in the access log (off: sizes only).")
    finetune: FinetuneConfig = Field(
        default_factory=FinetuneConfig,
        description="The OpenAI fine-tuning API (files and jobs): storage, the job template, limits.",
    )
    special_tokens_in_content: Literal["escape", "refuse", "allow"] = Field(
        default="escape",
        description="Special-token text inside a chat message (a user typing the template's turn markers): escape = "
        "the model reads it as plain text, so only the template writes turn markers (as data.special_tokens_in_content "
        "trains); refuse = a 400 naming the message; allow = it becomes the special token. /v1/completions prompts "
        "are raw text the caller writes whole, markers included, and are never changed.",
    )

    @model_validator(mode="after")
    def _check(self) -> ServeConfig:
        problems = []
        if self.max_ongoing_requests < self.max_batch_size:
            problems.append(
                f"serve.max_ongoing_requests ({self.max_ongoing_requests}) must be at least serve.max_batch_size "
                f"({self.max_batch_size}), or batches can never fill"
            )
        if self.default_max_tokens > self.max_tokens_limit:
            problems.append(
                f"serve.default_max_tokens ({self.default_max_tokens}) is above serve.max_tokens_limit "
                f"({self.max_tokens_limit})"
            )
        if not ROUTE_PREFIX.match(self.route_prefix):
            problems.append(
                f"serve.route_prefix {self.route_prefix!r} must be / or a path like /llm (letters, digits, '.', '_', "
                "'-' between slashes, no trailing slash)"
            )
        for name in self.adapters:
            if not ADAPTER_NAME.match(name):
                problems.append(
                    f"serve.adapters: name {name!r} must be 1-64 letters, digits, '.', '_' or '-', starting with a "
                    "letter or digit"
                )
        if problems:
            raise ValueError("; ".join(problems))
        return self
