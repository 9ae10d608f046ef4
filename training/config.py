"""Config owned by training: the sections `model`, `data`, `training`, `scaling`, `run`, `export`, `eval`
and the training job that composes them.

Defaults live here and only here. Every field carries a one-line description, which
`rayft config show --describe` and docs/config.md (`make docs`) are built from.
"""

from __future__ import annotations

import os
import re
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


def set_dotted(raw: dict, path: str, value: Any) -> bool:
    """Set `a.b.c` in raw config data, creating sections on the way (a section left empty in YAML counts as
    empty). False, and nothing set, when a step on the way holds a value rather than a section."""
    keys = path.split(".")
    d = raw
    for k in keys[:-1]:
        if d.get(k) is None:
            d[k] = {}
        if not isinstance(d[k], dict):
            return False
        d = d[k]
    d[keys[-1]] = value
    return True


class Section(BaseModel):
    """Base for every config section: unknown keys are errors, values are checked on assignment. A key an
    earlier rayft had is refused with what replaced it (RETIRED: key -> message)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    RETIRED: ClassVar[dict[str, str]] = {}

    @model_validator(mode="before")
    @classmethod
    def _retired(cls, data: Any) -> Any:
        for key in cls.RETIRED.keys() & (data.keys() if isinstance(data, dict) else set()):
            raise ValueError(cls.RETIRED[key])
        return data


class ModelConfig(Section):
    name: str = Field(
        default="smollm2-135m-instruct",
        description="Built-in alias (smollm2-135m-instruct), a Hugging Face model directory (local, or s3:// / "
        "gs://, copied once per machine), or a hub id.",
    )
    revision: str | None = Field(
        default=None, description="Hub revision (branch, tag or commit) when `name` is a hub id."
    )
    trust_remote_code: bool = Field(
        default=False, description="Allow model code from the hub (only for models you trust)."
    )

    RETIRED: ClassVar[dict[str, str]] = {
        "dtype": "model.dtype is not a setting (rayft 0.1 documented it but never read it): the weights train in "
        "training.precision, are exported in export.dtype, and run in eval.dtype / serve.dtype"
    }


class DataConfig(Section):
    RETIRED: ClassVar[dict[str, str]] = {
        "tokenizer_actors": "data.tokenizer_actors is now data.tokenizer_tasks: tokenizing runs as Ray tasks whose "
        "worker processes keep the tokenizer loaded (rayft 0.2); rename the key"
    }

    train: str | list[str] = Field(
        ...,
        description="Training data: file(s), glob(s) or a directory (JSONL/JSON/Parquet/CSV), a dataset saved "
        "with `datasets.save_to_disk`, or `hf://NAME` for a hub dataset. Relative paths are relative to "
        "the job file.",
    )
    eval: str | list[str] | None = Field(default=None, description="Evaluation data, same forms as `train`.")
    repeat: dict[str, Annotated[int, Field(ge=1)]] = Field(
        default_factory=dict,
        description="Upsample training files: {file name: copies per epoch}, e.g. {facts.jsonl: 3}.",
    )
    eval_fraction: float = Field(
        default=0.0,
        ge=0.0,
        lt=1.0,
        description="Hold out this fraction of `train` for evaluation when `eval` is unset.",
    )
    hub_split: str = Field(default="train", description="Split to read when `train` or `eval` is a hub dataset.")
    format: Literal["auto", "messages", "sharegpt", "alpaca", "prompt_completion", "text", "preference", "prompt"] = (
        Field(
            default="auto",
            description="Row format; auto detects it from each row's keys (with training.objective grpo every row is a "
            "prompt: messages ending in a user turn, or prompt, plus the fields its grader reads). messages and "
            "sharegpt rows may carry tools and tool calls (docs/formats.md).",
        )
    )
    template: str | None = Field(
        default=None,
        description="Prompt template: unset = the model's own chat template; `alpaca`; or a custom Jinja "
        "chat template string.",
    )
    train_on_inputs: bool = Field(
        default=False, description="Also train on prompt/user tokens (default: assistant only)."
    )
    special_tokens_in_content: Literal["escape", "refuse", "allow"] = Field(
        default="escape",
        description="Special-token text inside a message (a user typing the template's turn markers): escape = train "
        "on it as plain text, so only the template writes turn markers (as serve.special_tokens_in_content does); "
        "refuse = the row is an error; allow = it becomes the special token. Raw-text rows (text, "
        "prompt_completion) are never changed.",
    )
    max_seq_len: int = Field(default=1024, gt=8, description="Maximum tokens per training row.")
    overlong: Literal["truncate", "drop", "error"] = Field(
        default="truncate", description="What to do with examples longer than max_seq_len."
    )
    packing: bool = Field(
        default=False,
        description="Pack several examples into each max_seq_len row (attention never crosses examples). Rows are "
        "packed within windows of 1,024 examples and leave each window in a seeded order that spreads long- and "
        "short-example rows evenly, so any run of consecutive rows (a global batch) holds each kind of example "
        "near its share of the data; the same data and seed give the same rows in the same order.",
    )
    shuffle: bool = Field(default=True, description="Shuffle training rows (deterministically, from `seed`).")
    seed: int = Field(default=42, description="Seed for shuffling and the eval_fraction split.")
    on_bad_rows: Literal["error", "skip"] = Field(
        default="error", description="error = stop before training and list bad rows; skip = drop them and count them."
    )
    tokenizer_tasks: int = Field(
        default=2,
        ge=1,
        description="Most tokenizing tasks at once; each Ray worker process loads the tokenizer once and keeps it "
        "for its later tasks and runs.",
    )
    cache_max_mb: float = Field(
        default=1024.0,
        ge=0,
        description="A split whose token rows fit in this many MB (estimated as rows x max_seq_len x 24 bytes) is "
        "tokenized once and kept in Ray's object store for every epoch and eval pass; a bigger one streams, "
        "tokenized again each pass. 0 = always stream.",
    )
    cpus_per_data_task: float = Field(
        default=0.25, gt=0, le=8, description="Logical CPUs each Ray Data read/tokenize task reserves."
    )


class LoraConfig(Section):
    r: int = Field(default=16, ge=1, description="LoRA rank.")
    alpha: int = Field(default=32, ge=1, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(default=0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA path.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        default="all-linear", description="Module names to adapt, or all-linear."
    )
    last_layers: int | None = Field(
        default=None,
        ge=1,
        description="Adapt only the last N transformer layers (backward then stops below them: faster steps).",
    )


class DpoConfig(Section):
    beta: float = Field(
        default=0.1,
        gt=0,
        description="How far the policy may move from the reference: the scale of the implicit reward.",
    )
    loss: Literal["sigmoid", "ipo"] = Field(
        default="sigmoid",
        description="sigmoid = DPO's -log sigmoid(beta x margin); ipo = (margin - 1/(2 beta))^2 on per-token mean "
        "log-probabilities.",
    )
    sft_weight: float = Field(
        default=0.0, ge=0, description="Weight of an added NLL loss on the chosen answer (0 = pure preference loss)."
    )
    reference: str = Field(
        default="base",
        description="The reference model: base (the starting model; for LoRA the same model with its adapter "
        "switched off, no second copy), or a model dir or run dir to compare against.",
    )


class RewardFunction(Section):
    function: str = Field(
        ...,
        description="A reward function with TRL's signature fn(completions, **row_fields) -> list[float] (one score "
        "per completion; the row's fields by name, prompts as `prompts`): FILE.py:function (a Python file, relative "
        "to the job file) or module:function (a module installed where the workers run).",
    )
    weight: float = Field(default=1.0, description="Weight of this function's score in the summed reward.")

    @model_validator(mode="before")
    @classmethod
    def _short(cls, data: Any) -> Any:
        """A plain "module:function" string is that function with weight 1."""
        return {"function": data} if isinstance(data, str) else data

    @model_validator(mode="after")
    def _check_name(self) -> RewardFunction:
        if not re.fullmatch(r"([A-Za-z_][\w.]*|.+\.py):[A-Za-z_]\w*", self.function):
            raise ValueError(
                f"function {self.function!r} is not FILE.py:function or module:function (e.g. rewards.py:exact_answer)"
            )
        return self


class ScoreModelConfig(Section):
    base_url: str = Field(
        description="An OpenAI-compatible chat-completions server that serves score_model graders' models (e.g. "
        "http://127.0.0.1:8000/v1 for `rayft serve`, a vLLM server, https://api.openai.com/v1); each grader's "
        "`model` is the model name sent to it."
    )
    api_key_env: str | None = Field(
        default=None,
        description="Name of the environment variable that holds the server's API key, read where the grading tasks "
        "run (the key itself never goes in a job file); unset = no key.",
    )
    structured_output: bool = Field(
        default=True,
        description="Ask for OpenAI's score format as a JSON schema (response_format); off for servers that lack "
        "structured output (the score is then read from the reply's text).",
    )
    timeout_s: float = Field(default=60.0, gt=0, description="Seconds a request to the server may take.")

    @model_validator(mode="after")
    def _check_url(self) -> ScoreModelConfig:
        if not re.match(r"^https?://[^/\s]+", self.base_url):
            raise ValueError(f"base_url {self.base_url!r} is not an http(s) URL (e.g. http://127.0.0.1:8000/v1)")
        if self.api_key_env is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.api_key_env):
            raise ValueError(
                f"api_key_env {self.api_key_env!r} is not an environment variable's name: name the variable that "
                "holds the key (e.g. JUDGE_API_KEY), not the key"
            )
        return self


def grader_types(spec: Any) -> set[str]:
    """Every grader type in an OpenAI grader object, a multi grader's graders included."""
    if not isinstance(spec, dict):
        return set()
    out = {str(spec.get("type"))}
    graders = spec.get("graders")
    for sub in graders.values() if isinstance(graders, dict) else []:
        out |= grader_types(sub)
    return out


class RlConfig(Section):
    grader: dict[str, Any] | None = Field(
        default=None,
        description="The reward as an OpenAI grader object (string_check, text_similarity, python, score_model, "
        "multi), scoring each completion 0..1 against the row's fields ({{item.x}}, {{sample.output_text}}).",
    )
    reward: list[RewardFunction] = Field(
        default_factory=list,
        description="The reward as one or more reward functions (FILE.py:function or module:function, or {function, "
        "weight}), summed by weight; instead of `grader`.",
    )
    samples_per_prompt: int = Field(
        default=8, ge=2, description="Completions sampled per prompt (the group its advantages are relative to)."
    )
    max_new_tokens: int = Field(default=64, ge=1, description="Longest completion sampled.")
    temperature: float = Field(default=1.0, gt=0, description="Sampling temperature of the rollouts.")
    top_p: float = Field(default=1.0, gt=0, le=1, description="Nucleus sampling of the rollouts (1 = off).")
    beta: float = Field(
        default=0.0,
        ge=0,
        description="Weight of the KL penalty to the reference (the model with its adapter switched off); 0 = none, "
        "and no reference forward.",
    )
    clip_eps: float = Field(
        default=0.2, gt=0, description="PPO clip range of the probability ratio (matters when iterations > 1)."
    )
    clip_eps_high: float | None = Field(
        default=None, gt=0, description="Upper clip range (DAPO's clip-higher); unset = clip_eps."
    )
    iterations: int = Field(
        default=1, ge=1, description="Optimizer updates per batch of rollouts (the clipped ratio keeps reuse safe)."
    )
    advantage_scale: Literal["group", "batch", "none"] = Field(
        default="group",
        description="Advantage = reward minus its group's mean, divided by the std of its group (GRPO), of the "
        "whole batch, or by nothing (Dr. GRPO).",
    )
    loss: Literal["grpo", "dr_grpo", "dapo"] = Field(
        default="dapo",
        description="How token losses add up: grpo = mean per completion, then over completions; dr_grpo = sum over "
        "tokens / (completions x max_new_tokens); dapo = mean over every completion token of the step.",
    )
    resample_flat_groups: int = Field(
        default=0,
        ge=0,
        description="A group whose rewards are all equal carries no signal: sample it again with fresh seeds up to "
        "this many times, keeping its first draw with a spread (a form of DAPO's dynamic sampling that redraws the "
        "same prompts instead of drawing new ones; counted as resampled_groups). 0 = off.",
    )
    eval_samples: int = Field(
        default=1,
        ge=1,
        description="Completions per held-out prompt at eval (1 = greedy; more = the mean reward of that many "
        "samples at the training temperature).",
    )
    grader_timeout_s: float = Field(
        default=30.0, gt=0, description="A completion whose grading takes longer is scored failure_reward."
    )
    failure_reward: float = Field(
        default=0.0, description="The reward of a completion whose grader or reward function failed or timed out."
    )
    grader_cpus: float = Field(
        default=0.1, ge=0, description="Logical CPUs each grading Ray task reserves (tasks run beside the workers)."
    )
    score_model: ScoreModelConfig | None = Field(
        default=None,
        description="Where score_model graders reach their models: an OpenAI-compatible server (needed by a grader "
        "with a score_model in it).",
    )

    @model_validator(mode="after")
    def _check_reward(self) -> RlConfig:
        if self.grader is None and not self.reward:
            raise ValueError(
                "no reward: set training.rl.grader (an OpenAI grader object) or training.rl.reward (module:function "
                "reward functions)"
            )
        if self.grader is not None and self.reward:
            raise ValueError("set one of training.rl.grader and training.rl.reward, not both")
        if self.grader is not None:
            from rayft.training.graders import GraderError, parse_grader

            try:
                parse_grader(self.grader, where="grader")
            except GraderError as e:
                raise ValueError(str(e)) from None
        judged = "score_model" in grader_types(self.grader)
        if judged and self.score_model is None:
            raise ValueError(
                "the grader has a score_model grader, whose model must be reached: set "
                "training.rl.score_model.base_url to an OpenAI-compatible server that serves it (rayft serve, vLLM, "
                "OpenAI), and api_key_env to the environment variable holding its key if it needs one"
            )
        if self.score_model is not None and not judged:
            raise ValueError(
                "training.rl.score_model applies to a grader with a score_model grader in it; there is none"
            )
        return self


class TrainingConfig(Section):
    method: Literal["lora", "full"] = Field(
        default="lora", description="lora = train adapters only; full = all weights."
    )
    objective: Literal["sft", "dpo", "grpo"] = Field(
        default="sft",
        description="sft = learn the answers (cross-entropy); dpo = learn which of two answers is better, from "
        "preference pairs (training.dpo); grpo = learn to earn a reward on sampled answers to prompts "
        "(training.rl).",
    )
    lora: LoraConfig = Field(default_factory=LoraConfig, description="LoRA settings (method: lora).")
    dpo: DpoConfig = Field(default_factory=DpoConfig, description="Preference tuning settings (objective: dpo).")
    rl: RlConfig | None = Field(
        default=None, description="Reinforcement finetuning settings (objective: grpo): the reward and the sampling."
    )
    lr: float = Field(default=2e-4, gt=0, description="Peak learning rate.")
    epochs: float = Field(
        default=1.0, gt=0, description="Passes over the training data (ignored when max_steps is set)."
    )
    max_steps: int | None = Field(default=None, ge=1, description="Stop after this many optimizer steps.")
    micro_batch_size: int = Field(default=4, ge=1, description="Rows per worker per forward/backward pass.")
    global_batch_size: int = Field(
        default=8, ge=1, description="Rows per optimizer step = micro_batch_size x accumulation x workers."
    )
    warmup_ratio: float = Field(default=0.03, ge=0, le=1, description="Fraction of steps spent warming up the lr.")
    lr_schedule: Literal["cosine", "linear", "constant"] = Field(default="cosine", description="Decay after warm-up.")
    weight_decay: float = Field(default=0.0, ge=0, description="AdamW weight decay.")
    grad_clip: float = Field(default=1.0, ge=0, description="Clip the global gradient norm to this (0 = off).")
    zero_stage: Literal[0, 1, 2, 3] = Field(default=2, description="DeepSpeed ZeRO stage.")
    offload_optimizer: bool = Field(default=False, description="Keep optimizer states in CPU memory (ZeRO >= 1).")
    offload_params: bool = Field(default=False, description="Keep parameters in CPU memory (ZeRO 3).")
    precision: Literal["auto", "fast", "bf16", "fp16", "fp32"] = Field(
        default="auto",
        description="auto = bf16 on GPU, fp32 on CPU. fast = bf16 where the hardware computes it natively (a GPU; a "
        "CPU with AVX512-BF16 or AMX), else fp32: on other CPUs bf16 is emulated, many times slower than fp32.",
    )
    gradient_checkpointing: bool = Field(default=False, description="Recompute activations in backward to save memory.")
    skip_untrained_logits: bool = Field(
        default=True,
        description="Compute vocabulary logits and loss only where labels carry loss (same loss, less compute; "
        "used for Llama-style models, others fall back to the full forward).",
    )
    eval_every_steps: int = Field(default=0, ge=0, description="Evaluate every N steps (0 = only at the end).")
    eval_at_end: bool = Field(
        default=True, description="Compute the eval loss after the last step (off when a `rayft eval` follows anyway)."
    )
    eval_at_start: bool = Field(
        default=False,
        description="Also evaluate before the first step (step 0), so the curve starts at the base model's eval loss "
        "(GRPO: its held-out reward).",
    )
    checkpoint_every_steps: int = Field(default=0, ge=0, description="Checkpoint every N steps (0 = only at the end).")
    seed: int = Field(default=42, description="Seed for weight init of new layers and dropout.")
    log_every_steps: int = Field(
        default=10,
        ge=1,
        description="Report metrics to Ray (Tune, dashboards) every N steps and after every eval; "
        "metrics.jsonl and TensorBoard get every step.",
    )
    ds_config: dict[str, Any] = Field(
        default_factory=dict, description="Raw DeepSpeed config merged over the generated one (experts only)."
    )

    @model_validator(mode="after")
    def _check_objective(self) -> TrainingConfig:
        if self.objective == "grpo":
            if self.rl is None:
                raise ValueError(
                    "training.objective grpo needs training.rl: at least the reward (rl.grader or rl.reward)"
                )
            if self.method != "lora":
                raise ValueError(
                    "training.objective grpo trains LoRA adapters only (method: lora): rollouts sample from the "
                    "live policy by switching its adapter in, and a full finetune would need its weights synced "
                    "into the sampler at every step, which rayft does not do yet"
                )
        elif self.rl is not None:
            raise ValueError(f"training.rl applies to objective grpo (the objective is {self.objective})")
        return self

    @model_validator(mode="after")
    def _check_offload(self) -> TrainingConfig:
        if self.offload_params and self.zero_stage != 3:
            raise ValueError(f"offload_params needs zero_stage: 3 (got zero_stage: {self.zero_stage})")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("offload_optimizer needs zero_stage 1, 2 or 3 (got 0)")
        return self


class ExportConfig(Section):
    merge: bool = Field(
        default=True, description="LoRA runs: also write a merged full model into final/ (adapter in final/adapter)."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto", description="dtype of exported weights; auto = the dtype the model was trained in."
    )
    max_shard_gb: float = Field(
        default=5.0,
        gt=0,
        description="Largest safetensors file of an exported full model (GB); larger models are split into shards "
        "with an index.",
    )


class EvalConfig(Section):
    max_new_tokens: int = Field(
        default=128,
        ge=1,
        description="Longest answer generated per evaluation row (greedy). With training.objective grpo: "
        "training.rl.max_new_tokens unless set here, so answers are graded as in training.",
    )
    samples: int | None = Field(
        default=None,
        ge=0,
        description="With training.objective grpo: answers sampled per prompt (at training.rl.temperature and top_p) "
        "and graded besides the greedy one, reported as their mean reward; default training.rl.samples_per_prompt, "
        "0 = greedy only.",
    )
    batch_size: int = Field(default=16, ge=1, description="Prompts per generate call (left-padded together).")
    replicas: int = Field(default=2, ge=1, description="Model copies (Ray Data actors) generating in parallel.")
    cpus_per_replica: float = Field(
        default=1.0, gt=0, description="Logical CPUs (and torch threads) per replica on CPU."
    )
    max_rows: int | None = Field(
        default=None, ge=1, description="Evaluate a fixed sample of this many rows (default: all)."
    )
    dtype: Literal["auto", "fast", "float32", "bfloat16"] = Field(
        default="auto",
        description="Inference dtype; auto = bfloat16 on GPU, float32 on CPU. fast = bfloat16 where the hardware "
        "has native bf16 (a GPU; a CPU with AVX512-BF16 or AMX: ~1.4x faster generation), else float32.",
    )


class ScalingConfig(Section):
    num_workers: int = Field(default=2, ge=1, description="Ray Train workers (one per GPU on a GPU cluster).")
    use_gpu: bool = Field(default=False, description="Give each worker a GPU (NCCL); otherwise CPU workers (gloo).")
    cpus_per_worker: float = Field(default=1.0, gt=0, description="Logical CPUs reserved by each training worker.")
    gpus_per_worker: float = Field(default=1.0, gt=0, description="GPUs per worker when use_gpu is true.")
    resources_per_worker: dict[str, float] = Field(
        default_factory=dict, description="Extra custom Ray resources each worker needs (e.g. a node label)."
    )
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        default="PACK",
        description="How workers are placed on nodes: PACK fills nodes first, SPREAD spreads them when it can, "
        "STRICT_SPREAD puts each worker on its own node.",
    )


MLFLOW_SCHEMES = ("file", "http", "https", "sqlite", "postgresql", "mysql", "mssql", "databricks")


class MlflowTracking(Section):
    uri: str = Field(
        default="./mlruns",
        description="Tracking store: a local directory (relative to where the run's driver starts; rayft keeps an "
        "MLflow SQLite store in it: DIR/mlflow.db, artifacts in DIR/artifacts), http(s)://HOST:PORT of a tracking "
        "server, sqlite:///FILE.db, a database URI, or databricks.",
    )
    experiment: str = Field(default="rayft", description="MLflow experiment the runs go into (created when missing).")

    @model_validator(mode="after")
    def _check_uri(self) -> MlflowTracking:
        uri = self.uri.strip()
        scheme = uri.split(":", 1)[0].lower() if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", uri) else ""
        scheme = scheme.split("+", 1)[0]  # postgresql+psycopg2://...
        if not uri:
            raise ValueError("uri is empty: give a directory (./mlruns) or a tracking server http://HOST:PORT")
        if scheme and scheme not in MLFLOW_SCHEMES and not re.match(r"^[A-Za-z]:[\\/]", uri):
            raise ValueError(
                f"uri {self.uri!r}: MLflow has no {scheme!r} store; use a directory (./mlruns), "
                "sqlite:///mlflow.db, http(s)://HOST:PORT of a tracking server, or databricks"
            )
        if scheme in ("http", "https") and not re.match(r"^https?://[^/:\s]+", uri):
            raise ValueError(f"uri {self.uri!r} names no host: use http://HOST:PORT")
        return self


class WandbTracking(Section):
    project: str = Field(default="rayft", description="W&B project the runs go into.")
    entity: str | None = Field(default=None, description="W&B team or user (default: your W&B default).")
    mode: Literal["online", "offline"] = Field(
        default="online", description="online = send to W&B; offline = write to the run dir only (wandb sync later)."
    )
    dir: str | None = Field(
        default=None, description="Where W&B keeps its files (default: the run dir when it is local)."
    )


class TrackingConfig(Section):
    mlflow: MlflowTracking | None = Field(
        default=None, description="Track runs in MLflow: {} or true for ./mlruns, or {uri, experiment}. Off when unset."
    )
    wandb: WandbTracking | None = Field(
        default=None, description="Track runs in Weights & Biases: {project, mode, ...}. Off when unset."
    )
    log_model: bool = Field(
        default=False, description="Also upload the final model as an artifact (default: log its location as a tag)."
    )

    @model_validator(mode="before")
    @classmethod
    def _switches(cls, data: Any) -> Any:
        """`mlflow: true` (or `--set run.tracking.mlflow=true`) turns a backend on with its defaults."""
        if isinstance(data, dict):
            data = dict(data)
            for key in ("mlflow", "wandb"):
                if data.get(key) is True:
                    data[key] = {}
                elif data.get(key) is False:
                    data[key] = None
        return data

    @property
    def enabled(self) -> bool:
        return self.mlflow is not None or self.wandb is not None


class RunConfig(Section):
    name: str = Field(default="rayft-run", description="Run name; the run directory is <storage_path>/<name>.")
    storage_path: str = Field(
        default="runs",
        description="Where run directories go: a local or NFS path (relative to the current directory) or s3:// / gs://.",
    )

    max_failures: int = Field(
        default=2,
        ge=-1,
        description="Restart the worker group from the latest checkpoint this many times (-1 = forever).",
    )
    checkpoints_to_keep: int = Field(
        default=2, ge=1, description="Checkpoints kept on storage (the best by eval loss wins)."
    )
    tracking: TrackingConfig = Field(
        default_factory=TrackingConfig, description="Experiment tracking (MLflow, W&B): one tracked run per run."
    )

    @model_validator(mode="after")
    def _check_name(self) -> RunConfig:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", self.name):
            raise ValueError(
                f"name must be letters, digits, '.', '_' or '-' and start with a letter or digit (got {self.name!r})"
            )
        return self


class TrainJob(Section):
    """A training job: the model, the data, how to train, on which workers, where the run goes, what final/
    holds and how it is evaluated. The sweep job (rayft.tuning) and the job file (rayft.cluster) extend it."""

    model: ModelConfig = Field(default_factory=ModelConfig, description="Which model to start from.")
    data: DataConfig = Field(..., description="Training data and how it becomes token rows.")
    training: TrainingConfig = Field(default_factory=TrainingConfig, description="Optimisation settings.")
    scaling: ScalingConfig = Field(default_factory=ScalingConfig, description="Workers and their resources.")
    run: RunConfig = Field(default_factory=RunConfig, description="Run name and storage.")
    export: ExportConfig = Field(default_factory=ExportConfig, description="What final/ holds after training.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Base-vs-finetuned evaluation (rayft eval).")

    @model_validator(mode="after")
    def _check_batch_sizes(self) -> TrainJob:
        if self.training.objective == "grpo" and self.data.format not in ("auto", "prompt"):
            raise ValueError(
                f"data.format {self.data.format} does not apply to training.objective grpo, whose rows are prompts "
                "(messages ending in a user turn, or prompt): set data.format: prompt (or auto)"
            )
        if self.training.objective == "grpo" and self.data.format == "auto":
            self.data.format = "prompt"  # every row is a prompt to sample from
        if self.training.objective != "grpo" and self.data.format == "prompt":
            raise ValueError("data.format prompt holds prompts without answers, for training.objective grpo")
        if self.training.objective == "grpo" and self.data.packing:
            raise ValueError(
                "data.packing does not apply to training.objective grpo: its rows are prompts, each sampled on its "
                "own; set data.packing: false"
            )
        if self.training.objective == "dpo" and self.data.packing:
            raise ValueError(
                "data.packing does not apply to training.objective dpo: each preference pair (its chosen and "
                "rejected answers) runs as one sequence pair of its own, so a pair never straddles micro-batches "
                "or ranks; set data.packing: false"
            )
        per_step = self.training.micro_batch_size * self.scaling.num_workers
        if self.training.global_batch_size % per_step:
            raise ValueError(
                f"training.global_batch_size ({self.training.global_batch_size}) must be a multiple of "
                f"training.micro_batch_size x scaling.num_workers ({self.training.micro_batch_size} x "
                f"{self.scaling.num_workers} = {per_step})"
            )
        return self

    @property
    def grad_accum(self) -> int:
        """Micro-batches each worker accumulates per optimizer step."""
        return self.training.global_batch_size // (self.training.micro_batch_size * self.scaling.num_workers)

    @property
    def run_dir(self) -> str:
        return os.path.join(self.run.storage_path, self.run.name)


class LoopConfig(Section):
    """What a worker needs (rayft.training.loop.train_loop); built by the driver (training/trainer.py) from the
    job file."""

    model: ModelConfig
    data: DataConfig
    training: TrainingConfig
    grad_accum: int = Field(ge=1)
    total_steps: int = Field(ge=1)
    has_eval: bool
    use_gpu: bool
    run_dir: str
    reward_sources: dict[str, str] = Field(
        default_factory=dict, description="The code of training.rl's FILE.py reward functions, read by the driver."
    )
