"""The training job's own entrypoint: `python -m rayft.training.run JOB.yaml` runs one finetune to its end (or
resumes it) on the Ray cluster it finds (RAY_ADDRESS, which a Ray job's driver has, else a local Ray), and the run
keeps its outcome in status.json (run_training writes it: rayft.training.run_dir). It is what a finetune submitted
to a cluster runs, whoever submitted it: `rayft submit` and the endpoint's fine-tuning API both go through
rayft.training.launch, and read the outcome back from the run dir, never from this process's output.

The job file is the one `rayft submit` checked (or the endpoint wrote), read with the training job's own schema;
its sections that other commands read (OTHER_SECTIONS) are left to them. The output is for a job's log: a line per
training.log_every_steps and per evaluation, then a summary; an error a user can fix ends it with "<kind> error
<message>" and exit status 2 (config, usage, cluster, plan) or 1, as `rayft train` does. Imports stay light until
the job is read.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from rayft.training.config import TrainJob

OTHER_SECTIONS = ("sweep", "serve", "submit")  # job file sections for `rayft sweep`, `rayft serve`, `rayft submit`
RELATIVE_KEYS = ("train", "eval")  # data.<key>: paths relative to the job file (a job file travels with its data)
EXIT_STATUS = {"config": 2, "usage": 2, "cluster": 2, "plan": 2}  # per error kind; 1 for the others
SPARK = "▁▂▃▄▅▆▇█"


class JobFileError(Exception):
    """A job file this entrypoint cannot run: not found, not YAML, or not a valid training job."""

    error_kind = "config"  # what `rayft` calls it ("config error ..."); rayft.training.run_dir.user_error


def load_job(path: str | os.PathLike) -> TrainJob:
    """The training job of a job file: data paths relative to the file, a local run.storage_path (and a model
    directory given by a relative path) relative to where this runs, as `rayft train` resolves them."""
    import yaml
    from pydantic import ValidationError

    p = Path(path)
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except FileNotFoundError:
        raise JobFileError(f"job file not found: {p} (pass the path of a YAML job file)") from None
    except yaml.YAMLError as e:
        raise JobFileError(f"{p}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise JobFileError(f"{p}: the job file must be a mapping of sections (model:, data:, ...)")
    raw = {k: v for k, v in raw.items() if k not in OTHER_SECTIONS}
    _resolve_paths(raw, p.parent.resolve())
    try:
        job = TrainJob.model_validate(raw)
    except ValidationError as e:
        problems = [f"{'.'.join(map(str, x['loc'])) or '(top level)'}: {x['msg']}" for x in e.errors()]
        n = len(problems)
        head = f"{p}: {n} problem{'s' if n != 1 else ''} in the job config"
        raise JobFileError("\n".join([head, *(f"  - {x}" for x in problems)])) from None
    if "://" not in job.run.storage_path:
        job.run.storage_path = str(Path(job.run.storage_path).expanduser().resolve())
    model_dir = Path(job.model.name).expanduser()
    if "://" not in job.model.name and not model_dir.is_absolute() and model_dir.is_dir():
        job.model.name = str(model_dir.resolve())
    return job


def _resolve_paths(raw: dict[str, Any], base: Path) -> None:
    def resolve(value: Any) -> Any:
        if not isinstance(value, str) or "://" in value or os.path.isabs(os.path.expanduser(value)):
            return os.path.expanduser(value) if isinstance(value, str) else value
        return str(base / value)

    data = raw.get("data")
    if isinstance(data, dict):
        for key in RELATIVE_KEYS:
            value = data.get(key)
            if isinstance(value, list):
                data[key] = [resolve(v) for v in value]
            elif value is not None:
                data[key] = resolve(value)
    model = raw.get("model")
    if isinstance(model, dict) and isinstance(model.get("name"), str):
        name = model["name"]
        if name.startswith((".", "~", "/")) or (base / name).is_dir():
            model["name"] = resolve(name)


# ---------------------------------------------------------------------------------------------- what it prints


def plan_line(r: dict) -> str:
    """The "planned" event (rank 0's first record) as a line."""
    what = "resuming" if r.get("resuming") else "planned"
    rows = f" from {r['train_rows']:,} training rows" if r.get("train_rows") else ""
    return f"{what}: {r['total_steps']} optimizer steps{rows}"


def step_figures(r: dict) -> tuple[str, str]:
    """A step record's headline and speed: loss and tokens/s; for GRPO the reward and completions/s."""
    if "reward" in r and "completions_per_s" in r:
        return f"reward {r['reward']:.3f}", f"{r['completions_per_s']:.1f} completions/s"
    return f"loss {r['loss']:.4f}", f"{r['nonpad_tokens_per_s']:,.0f} tok/s"


def eval_figure(r: dict) -> str | None:
    """An eval record's headline: the eval loss, or GRPO's held-out reward."""
    if "eval_reward" in r:
        return f"{r['eval_reward']:.3f}"
    return f"{r['eval_loss']:.4f}" if "eval_loss" in r else None


def step_line(r: dict, total: int | None, log_every: int) -> str | None:
    """A metrics record as a log line: every evaluation, and every `log_every`-th step (and the last); None for
    the others."""
    step = r.get("step")
    if "eval_reward" in r:  # GRPO
        return f"step {step}/{total}  eval reward {r['eval_reward']:.3f}"
    if "eval_loss" in r:
        pairs = f"  eval reward accuracy {r['eval_reward_accuracy']:.2f}" if "eval_reward_accuracy" in r else ""
        return f"step {step}/{total}  eval loss {r['eval_loss']:.4f}{pairs}"
    if "loss" in r and step and (step % log_every == 0 or step == total):
        main, speed = step_figures(r)
        pairs = f"  reward accuracy {r['reward_accuracy']:.2f}" if "reward_accuracy" in r else ""  # DPO
        return f"step {step}/{total}  {main}{pairs}  {speed}"
    return None


class LogLines:
    """run_training's events as plain lines on stderr, for a job's log (`rayft train` draws a progress bar)."""

    def __init__(self, log_every: int = 10):
        self.log_every, self.total = log_every, None

    def on_event(self, r: dict) -> None:
        line = None
        if r.get("event") == "warning":
            line = f"warning {r['message']}"
        elif r.get("event") == "planned":
            self.total = r["total_steps"]
            line = plan_line(r)
        elif r.get("event") == "start" and r.get("resumed"):
            line = f"resumed from the checkpoint at step {r['step']}"
        else:
            line = step_line(r, self.total, self.log_every)
        if line:
            print(line, file=sys.stderr, flush=True)


def summary_lines(result) -> list[str]:
    """What a finished run says after "done: N steps" (a TrainResult): its eval, its loss curve, where the run and
    its model are, and its tracked runs."""
    from rayft.training.run_dir import RunDir
    from rayft.training.tracking import read_state

    run = RunDir(result.run_dir)
    m, lines = result.metrics, []
    if "eval_reward_accuracy" in m:  # DPO: the held-out pairs
        lines.append(
            f"  eval loss {m['eval_loss']:.4f}  reward accuracy {m['eval_reward_accuracy']:.1%}  "
            f"margin {m['eval_reward_margin']:.2f}"
        )
    elif "eval_reward" in m:  # GRPO: the held-out prompts' reward, from the base's when it was measured (step 0)
        evals = run.curve("eval_reward")
        start = f"{evals[0][1]:.3f} at step 0 -> " if evals and evals[0][0] == 0 else ""
        lines.append(f"  eval reward {start}{m['eval_reward']:.3f}  ({m['eval_completions']} completions)")
    elif "eval_loss" in m:
        lines.append(f"  eval loss {m['eval_loss']:.4f}  perplexity {m['eval_perplexity']:.2f}")
    rewards = [v for _, v in run.curve("reward")]
    if rewards:
        lines.append(f"  reward    {rewards[0]:.3f} {sparkline(rewards)} {rewards[-1]:.3f}")
    losses = [v for _, v in run.curve("loss")]
    if losses:
        lines.append(f"  loss      {losses[0]:.3f} {sparkline(losses)} {losses[-1]:.3f}  (plot: {run.loss_plot})")
    lines.append(f"  run dir   {result.run_dir}  (metrics.jsonl, loss.png, tensorboard/, checkpoints)")
    if result.final_dir:
        lines.append(f"  model     {result.final_dir}")
    tracked = read_state(result.run_dir)
    if "mlflow" in tracked:
        lines.append(f"  mlflow    run {tracked['mlflow']['run_id']} in {tracked['mlflow']['uri']}")
    if "wandb" in tracked:
        lines.append(f"  wandb     run {tracked['wandb']['run_id']} ({tracked['wandb'].get('dir') or ''})")
    return lines


def sparkline(values: list[float], width: int = 48) -> str:
    """One line of block characters, one per group of consecutive values (their mean), scaled from the
    lowest group (▁) to the highest (█)."""
    n = min(width, len(values))
    groups = [values[i * len(values) // n : (i + 1) * len(values) // n] for i in range(n)]
    means = [sum(g) / len(g) for g in groups]
    lo, hi = min(means), max(means)
    return "".join(SPARK[round((v - lo) / (hi - lo) * (len(SPARK) - 1)) if hi > lo else 0] for v in means)


# ---------------------------------------------------------------------------------------------- the entrypoint


def main(argv: list[str] | None = None) -> int:
    """Run the job file's finetune; the exit status (0 when it succeeded)."""
    import argparse

    from rayft.training.run_dir import user_error

    parser = argparse.ArgumentParser(
        prog="python -m rayft.training.run",
        description="Run a rayft training job (a finetune) on the Ray cluster of RAY_ADDRESS, else a local Ray; the "
        "run's outcome is kept in its status.json.",
    )
    parser.add_argument("job_file", help="YAML job file")
    args = parser.parse_args(argv)
    try:
        job = load_job(args.job_file)
        from rayft.training.resources import connect
        from rayft.training.trainer import required_cpus, run_training

        joined = connect(need_cpus=required_cpus(job))
        lines = LogLines(job.training.log_every_steps)
        result = run_training(job, on_event=lines.on_event, cluster_can_grow=joined)
    except Exception as e:
        cause = user_error(e)  # run_training has left the same kind and message in status.json
        if cause is None:
            raise
        print(f"{cause.error_kind} error {cause}", file=sys.stderr, flush=True)
        return EXIT_STATUS.get(cause.error_kind, 1)
    print("\n".join([f"done: {result.steps} steps", *summary_lines(result)]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
