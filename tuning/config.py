"""The sweep job: the training job plus its `sweep:` section, what `rayft sweep` searches over and how it
schedules trials.

Defaults live here and only here; every field carries the one-line description that the
config reference (docs/config.md, `make docs`) and `rayft config show --describe` print.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from rayft.training.config import Section, TrainJob

# Metrics the training loop reports with every logged step, and the ones its eval pass adds.
STEP_METRICS = ("loss", "tokens_per_s", "nonpad_tokens_per_s", "step_time_s", "grad_norm")
EVAL_METRICS = ("eval_loss", "eval_perplexity")
# What DPO runs (training.objective: dpo) report besides: per step, and from their eval pass.
PREFERENCE_STEP_METRICS = ("reward_accuracy", "reward_margin", "reward_chosen", "reward_rejected")
PREFERENCE_EVAL_METRICS = tuple(f"eval_{m}" for m in PREFERENCE_STEP_METRICS)
# What GRPO runs (training.objective: grpo) report instead of a loss to rank by: per step, and from their eval pass
# (the held-out reward, which ranks their checkpoints too).
RL_STEP_METRICS = ("reward", "reward_std", "completion_length", "zero_std_groups", "completions_per_s")
RL_EVAL_METRICS = ("eval_reward",)
# Scores of the generation eval (`rayft eval`), run on each trial's exported model once it has trained.
GENERATION_METRICS = ("exact_match", "contained", "token_f1", "json_valid")
DISTRIBUTIONS = ("loguniform", "uniform", "randint", "choice", "grid")


class SchedulerConfig(Section):
    type: Literal["asha", "fifo"] = Field(
        default="asha",
        description="asha stops trials whose metric trails the others at each rung; fifo runs all to the end.",
    )
    grace_period: int = Field(
        default=2, ge=1, description="ASHA: optimizer steps every trial runs before it may be stopped."
    )
    reduction_factor: float = Field(
        default=2.0, gt=1, description="ASHA: about 1 in this many trials continues past each rung."
    )


class SweepConfig(Section):
    name: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="Sweep name; its directory is <run.storage_path>/<name> (default: <run.name>-sweep). "
        "Running the same name again resumes it.",
    )
    space: dict[str, Any] = Field(
        default_factory=dict,
        description="Search space: {config path: distribution}, e.g. training.lr: {loguniform: [1e-5, 1e-3]}; "
        "distributions are loguniform/uniform [low, high], randint [low, high] (inclusive), choice [values] and "
        "grid [values] (every value, combined with the other grids).",
    )
    metric: str = Field(
        default="eval_loss",
        description="What ranks trials: eval_loss (needs data.eval and training.eval_every_steps for ASHA), a "
        "training metric such as loss, or a generation score of `rayft eval` on each trial's model at its end "
        "(exact_match, contained, token_f1, json_valid; ASHA then compares eval_loss while trials train). GRPO "
        "trials: eval_reward (the held-out reward) or reward.",
    )
    mode: Literal["min", "max"] | None = Field(
        default=None, description="min or max the metric (default: min for losses and perplexity, else max)."
    )
    num_samples: int = Field(
        default=4, ge=1, description="Trials drawn from the space (with grid values: repeats of the whole grid)."
    )
    max_concurrent_trials: int | None = Field(
        default=None, ge=1, description="Trials running at once (default: as many as the cluster's CPUs/GPUs fit)."
    )
    time_budget_s: float | None = Field(
        default=None, gt=0, description="Stop starting and running trials after this many seconds (default: no limit)."
    )
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig, description="Early stopping of trials.")
    search: Literal["random", "grid", "optuna"] = Field(
        default="random",
        description="random samples the space (grid entries are all tried); grid needs only choice/grid "
        "entries and tries every combination; optuna is TPE, learning from finished trials.",
    )
    seed: int = Field(default=0, description="Seed of the search, so a sweep draws the same trials again.")

    @field_validator("space", mode="before")
    @classmethod
    def _numbers(cls, space: Any) -> Any:
        """YAML reads 1e-5 (no dot) as a string: bounds that parse as numbers are numbers."""
        if not isinstance(space, dict):
            return space
        out = {}
        for path, spec in space.items():
            if isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in ("loguniform", "uniform"):
                kind, args = next(iter(spec.items()))
                if isinstance(args, list):
                    spec = {kind: [_as_float(a) for a in args]}
            out[path] = spec
        return out

    @property
    def progress_metric(self) -> str:
        """What trials report while they train (and ASHA compares): the metric, or eval_loss for a
        generation score, which exists only once a trial has finished."""
        return "eval_loss" if self.metric in GENERATION_METRICS else self.metric

    @property
    def metric_mode(self) -> str:
        if self.mode:
            return self.mode
        return "min" if ("loss" in self.metric or "perplexity" in self.metric) else "max"


class SweepJob(TrainJob):
    """A training job with the `sweep:` section: what `rayft sweep` runs (each trial trains a TrainJob)."""

    sweep: SweepConfig = Field(default_factory=SweepConfig, description="Hyperparameter search (rayft sweep).")


def distribution_problems(spec: Any) -> list[str]:
    """What is wrong with one search-space entry (empty when it is usable). A plain value is fixed."""
    if not isinstance(spec, dict):
        return []
    if len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
        return [f"expected one of {', '.join(DISTRIBUTIONS)} (e.g. {{loguniform: [1e-5, 1e-3]}}), got {spec!r}"]
    kind, args = next(iter(spec.items()))
    if kind in ("choice", "grid"):
        if not isinstance(args, list) or not args:
            return [f"{kind} needs a non-empty list of values, got {args!r}"]
        return []
    if not (isinstance(args, list) and len(args) == 2 and all(_number(a) for a in args)):
        return [f"{kind} needs [low, high] numbers, got {args!r}"]
    low, high = args
    if kind == "randint" and not all(isinstance(a, int) and not isinstance(a, bool) for a in args):
        return [f"randint bounds must be integers, got {args!r}"]
    if low > high if kind == "randint" else low >= high:
        return [f"{kind} bounds are impossible: low ({low}) must be below high ({high})"]
    if kind == "loguniform" and low <= 0:
        return [f"loguniform needs a positive low bound, got {low}"]
    return []


def _number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def _as_float(x: Any) -> Any:
    if isinstance(x, str):
        try:
            return float(x)
        except ValueError:
            return x
    return x


def shape_problems(sw: SweepConfig) -> list[str]:
    """What is wrong with the space's distributions and their fit with the search algorithm."""
    problems = []
    for path, spec in sw.space.items():
        problems += [f"sweep.space.{path}: {p}" for p in distribution_problems(spec)]
    if sw.search == "grid":
        loose = [
            p
            for p, s in sw.space.items()
            if isinstance(s, dict) and next(iter(s), None) in ("loguniform", "uniform", "randint")
        ]
        if loose:
            problems.append(
                f"sweep.search: grid tries every value, so each entry must be a choice or grid; "
                f"{', '.join(loose)} {'is' if len(loose) == 1 else 'are'} continuous"
            )
    if sw.search == "optuna":
        grids = [p for p, s in sw.space.items() if isinstance(s, dict) and "grid" in s]
        if grids:
            problems.append(f"sweep.search: optuna cannot take grid entries ({', '.join(grids)}); use choice")
    return problems
