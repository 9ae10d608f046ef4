"""`rayft sweep`: Ray Tune runs many `rayft train` runs, stops the hopeless ones early (ASHA on
optimizer steps), and hands the best one on.

Each trial is a Tune function trial that builds and fits a TorchTrainer through `run_training`, the
same code as `rayft train` (the Ray Train V2 way of combining the two): the trainer's reports reach
Tune through a Train callback, and a trial Tune stops takes its training workers down with it.

<storage>/<sweep name>/
    runs/<trial id>/     each trial's run dir (metrics.jsonl, checkpoints, final/)
    results.csv, .md     the leaderboard         results.png   metric against each parameter
    best.yaml            the best trial's job file, ready for `rayft train`
    best.json            the best trial, its score and its model's path
    best/                link to the best trial's final/ (what `rayft serve` takes; local storage only:
                         object stores have no links, and best.json names the model there)
    (Tune's own state)   what a rerun with the same name resumes from

<storage> may be a local path, NFS, or s3:// / gs:// (every file goes through rayft.training.storage).
"""

from __future__ import annotations

import csv
import io
import math
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from rayft.training import storage
from rayft.training.run_dir import JOB_FILE, RunDir
from rayft.tuning.config import (
    EVAL_METRICS,
    GENERATION_METRICS,
    PREFERENCE_EVAL_METRICS,
    PREFERENCE_STEP_METRICS,
    RL_EVAL_METRICS,
    RL_STEP_METRICS,
    STEP_METRICS,
    shape_problems,
)
from rayft.tuning.space import apply_params, edge_values, space_problems, trial_count, tune_space

if TYPE_CHECKING:
    from rayft.training.config import TrainJob
    from rayft.tuning.config import SweepJob

TRIAL_DRIVER_CPU = 0.1  # the Tune trial itself only waits on its TorchTrainer
RUNS_DIR = "runs"


class SweepError(Exception):
    """A sweep that cannot start or did not finish; the message says what to do."""


@dataclass
class TrialRow:
    trial: str
    params: dict[str, Any]
    metric: float | None
    steps: int
    status: str  # completed | stopped early | unfinished | error
    wall_s: float
    run_dir: str
    error: str | None = None


@dataclass
class SweepResult:
    sweep_dir: str
    metric: str
    mode: str
    rows: list[TrialRow] = field(default_factory=list)
    best: TrialRow | None = None
    resumed: bool = False
    interrupted: bool = False  # Ctrl-C: some trials have not ended; the same command resumes them


def sweep_dir(job: SweepJob) -> str:
    return storage.join(job.run.storage_path, job.sweep.name or f"{job.run.name}-sweep")


def check_sweep(job: SweepJob) -> list[str]:
    """Problems that need no cluster: the space, the metric, the scheduler against the run length."""
    sw = job.sweep
    problems = []
    if not sw.space:
        problems.append(
            "sweep.space is empty: name at least one setting to search, e.g. training.lr: {loguniform: [1e-5, 1e-3]}"
        )
    problems += shape_problems(sw)
    problems += space_problems(job)
    has_eval = bool(job.data.eval) or job.data.eval_fraction > 0
    t = job.training
    dpo, rl = t.objective == "dpo", t.objective == "grpo"
    step_metrics = STEP_METRICS + (PREFERENCE_STEP_METRICS if dpo else ()) + (RL_STEP_METRICS if rl else ())
    eval_metrics = RL_EVAL_METRICS if rl else EVAL_METRICS + (PREFERENCE_EVAL_METRICS if dpo else ())
    scored = () if rl else GENERATION_METRICS  # a GRPO trial's held-out score is its eval_reward
    known = list(step_metrics) + (list(eval_metrics + scored) if has_eval else [])
    progress = sw.progress_metric
    if sw.metric not in step_metrics + eval_metrics + scored:
        problems.append(f"sweep.metric: the trials never report {sw.metric!r}; choose one of {', '.join(known)}")
    elif sw.metric in GENERATION_METRICS and sw.search == "optuna":
        problems.append(
            f"sweep.metric: {sw.metric} is scored once a trial ends, and optuna wants the metric in "
            "every report; use search: random or grid, or metric: eval_loss"
        )
    elif progress in eval_metrics:
        if not has_eval:
            problems.append(
                f"sweep.metric: {sw.metric} needs evaluation data: set data.eval or data.eval_fraction, "
                f"or pick a training metric ({', '.join(step_metrics)})"
            )
        elif sw.scheduler.type == "asha" and not t.eval_every_steps:
            problems.append(
                f"sweep.metric: ASHA compares {progress} while trials train, but it is only measured "
                "at the end (training.eval_every_steps is 0); set training.eval_every_steps, or "
                "sweep.scheduler.type: fifo"
            )
        elif sw.metric in eval_metrics and not t.eval_every_steps and not t.eval_at_end:
            problems.append(
                f"sweep.metric: {sw.metric} is never measured (training.eval_every_steps is 0 and "
                "training.eval_at_end is false)"
            )
    if sw.scheduler.type == "asha" and t.max_steps and sw.scheduler.grace_period >= t.max_steps:
        problems.append(
            f"sweep.scheduler.grace_period ({sw.scheduler.grace_period}) must be below "
            f"training.max_steps ({t.max_steps}), or ASHA can never stop a trial"
        )
    return problems


def trial_resources(job: SweepJob) -> tuple[float, float]:
    """(CPUs, GPUs) one trial holds: its workers, room for its data stages, and the trial itself."""
    from rayft.training.trainer import DATA_CPU_HEADROOM

    s = job.scaling
    workers = s.num_workers
    if "scaling.num_workers" in job.sweep.space:
        workers = max(int(v) for v in edge_values(job.sweep.space["scaling.num_workers"]))
    cpus = workers * s.cpus_per_worker + DATA_CPU_HEADROOM + TRIAL_DRIVER_CPU
    return cpus, (workers * s.gpus_per_worker if s.use_gpu else 0.0)


def concurrency(job: SweepJob, total: Mapping[str, float]) -> int:
    """Trials at once: the configured number (refused when the cluster cannot hold it), else what fits."""
    cpus, gpus = trial_resources(job)
    have_cpu, have_gpu = total.get("CPU", 0.0), total.get("GPU", 0.0)
    fit = math.floor(have_cpu / cpus + 1e-9)
    if gpus:
        fit = min(fit, math.floor(have_gpu / gpus + 1e-9))
    want = job.sweep.max_concurrent_trials
    need = f"{cpus:g} CPUs" + (f" and {gpus:g} GPUs" if gpus else "")
    has = f"{have_cpu:g} CPUs" + (f" and {have_gpu:g} GPUs" if gpus else "")
    if fit < 1:
        raise SweepError(
            f"one trial needs {need} ({job.scaling.num_workers} workers plus data stages), the cluster "
            f"has {has}; lower scaling.num_workers or scaling.cpus_per_worker"
        )
    if want and want > fit:
        raise SweepError(
            f"sweep.max_concurrent_trials is {want}, but each trial needs {need} and the cluster has "
            f"{has}: at most {fit} fit; lower sweep.max_concurrent_trials or the workers per trial"
        )
    return want or fit


def sweep_cpus(job: SweepJob) -> float:
    """CPUs the configured concurrency of trials holds at once."""
    cpus, _ = trial_resources(job)
    return cpus * (job.sweep.max_concurrent_trials or 1)


def run_sweep(job: SweepJob, restart: bool = False) -> SweepResult:
    """Run (or resume) the sweep to the end and write its results. Ray must be connected."""
    import ray
    from ray import tune

    problems = check_sweep(job)
    if problems:
        raise SweepError("the sweep cannot start:\n  " + "\n  ".join(problems))
    from rayft.training.data import check_rows
    from rayft.training.models import resolve_model

    sw = job.sweep
    root = sweep_dir(job)
    parent, name = storage.absolute(job.run.storage_path), storage.basename(root)
    if restart and storage.exists(root):
        import time

        storage.move_aside(root, f"{root}.prev-{time.strftime('%Y%m%d-%H%M%S')}")
    _check_saved_by_this_rayft(root)
    resolve_model(job.model.name)  # once, not in every trial
    check_rows(job.data)
    n_at_once = concurrency(job, ray.cluster_resources())
    storage.makedirs(storage.join(root, RUNS_DIR))
    _mark_version(root)

    base = _train_job(job)
    tracking = job.run.tracking
    if tracking.mlflow:  # a trial runs in its own working directory: give it the store's absolute location
        from rayft.training.tracking import mlflow_uri

        base["run"]["tracking"]["mlflow"]["uri"] = mlflow_uri(tracking.mlflow.uri)
    if tracking.enabled:  # the sweep's parent run, before any trial starts its child run
        from rayft.training.redact import redacted
        from rayft.training.tracking import Tracker
        from rayft.tuning.config import SweepJob

        # the sweep job's own sections (the training job and `sweep`), never serve or submit (its env_vars)
        params = redacted(job.model_dump(mode="json", include=set(SweepJob.model_fields)))
        Tracker.open(tracking, root, name, params, tags={"rayft.sweep": name})
    trainable = tune.with_resources(
        tune.with_parameters(trial_main, base=base, root=root, metric=sw.metric, progress=sw.progress_metric),
        {"cpu": TRIAL_DRIVER_CPU},
    )
    resumed = tune.Tuner.can_restore(root)
    param_space = tune_space(sw.space, sw.search)
    if resumed:
        say(f"resuming sweep {name}: finished trials are kept, unfinished ones continue")
        tuner = tune.Tuner.restore(root, trainable=trainable, resume_errored=True)
    else:
        # A generation score exists only at a trial's end: the scheduler then judges trials by eval_loss
        # while they train, and the score ranks them (Tune checks every result for TuneConfig's metric).
        ranked_by_tune = sw.metric not in GENERATION_METRICS
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(
                metric=sw.metric if ranked_by_tune else None,
                mode=sw.metric_mode if ranked_by_tune else None,
                num_samples=sw.num_samples,
                time_budget_s=sw.time_budget_s,
                scheduler=_scheduler(job),
                search_alg=_searcher(job, n_at_once),
                trial_dirname_creator=lambda t: t.trial_id,
            ),
            run_config=tune.RunConfig(
                name=name,
                storage_path=parent,
                verbose=0,
                callbacks=[_Lines(sw.metric)],
                failure_config=tune.FailureConfig(max_failures=0),
            ),
        )
    say(
        f"sweep {name}: {trial_count(param_space, sw.num_samples)} trial(s), {n_at_once} at a time, "
        f"{sw.search} search, "
        f"{sw.scheduler.type} scheduler, {sw.metric_mode} {sw.metric}"
    )
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # with verbose=0: Tune's own tables stay off the console
    grid = tuner.fit()
    rows = [_row(r, root, sw.metric) for r in grid]
    result = SweepResult(root, sw.metric, sw.metric_mode, rows, resumed=resumed)
    result.interrupted = any(r.status == "unfinished" for r in rows)
    write_results(result, job)
    if tracking.enabled:
        from rayft.training.tracking import close_sweep

        files = [storage.join(root, f) for f in ("results.md", "results.csv", "results.png", "best.yaml")]
        close_sweep(tracking, root, result.rows, sw.metric, sw.metric_mode, files)
    return result


VERSION_FILE = "rayft-version"  # which rayft started the sweep: Tune's saved state names rayft's modules


def _check_saved_by_this_rayft(root: str) -> None:
    """A sweep saved by rayft 0.1 (modules named cluster/training/tuning, no version file) cannot resume:
    Tune's saved state refers to modules that no longer exist. Say so instead of Tune's unpickling error."""
    from ray import tune

    if tune.Tuner.can_restore(root) and not storage.exists(storage.join(root, VERSION_FILE)):
        import rayft

        raise SweepError(
            f"the sweep in {root} was saved by rayft 0.1, before its modules moved to rayft.*, and rayft "
            f"{rayft.__version__} cannot resume it. Start it over with --restart (the old sweep is moved aside, "
            "its trial runs and results stay readable), or finish it with rayft 0.1 first"
        )


def _mark_version(root: str) -> None:
    import rayft

    path = storage.join(root, VERSION_FILE)
    if not storage.exists(path):
        storage.write_text(path, rayft.__version__ + "\n")


def _scheduler(job: SweepJob):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    sw = job.sweep
    sc = sw.scheduler
    if sc.type == "fifo":
        return FIFOScheduler()
    own: dict[str, Any] = {} if sw.metric == sw.progress_metric else {"metric": sw.progress_metric, "mode": "min"}
    # max_t past the last step: ASHA stops a trial that reaches max_t, and a trial must end by itself
    # (export its model, release its workers), not be killed at its last report.
    return ASHAScheduler(
        **own,
        time_attr="step",
        max_t=(job.training.max_steps or 1_000_000) + 1,
        grace_period=sc.grace_period,
        reduction_factor=sc.reduction_factor,
    )


def _searcher(job: SweepJob, n_at_once: int):
    sw = job.sweep
    if sw.search == "optuna":
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        return ConcurrencyLimiter(OptunaSearch(seed=sw.seed), max_concurrent=n_at_once)
    from ray.tune.search import BasicVariantGenerator

    # Tune ignores TuneConfig.max_concurrent_trials for a generator passed in: it gets the limit itself.
    return BasicVariantGenerator(max_concurrent=n_at_once, random_state=sw.seed)


def _train_job(job: SweepJob) -> dict:
    """The training job of each trial, as plain data: the sweep job without the sections only the sweep (or
    another command) reads."""
    from rayft.training.config import TrainJob

    return job.model_dump(mode="json", include=set(TrainJob.model_fields))


def trial_main(config: dict, base: dict, root: str, metric: str, progress: str) -> None:
    """One trial (runs in a Tune trial actor): the job with this trial's values, trained as `rayft train`
    trains it, its reports forwarded to Tune."""
    import ray.tune

    from rayft.training.config import TrainJob
    from rayft.training.data import quiet_ray_data
    from rayft.training.trainer import run_training

    trial_id = ray.tune.get_context().get_trial_id()
    raw = apply_params(base, config)
    raw["run"] |= {"name": trial_id, "storage_path": storage.join(root, RUNS_DIR)}
    job = TrainJob.model_validate(raw)
    quiet_ray_data()  # the trial's own process: its console is the sweep's log
    result = run_training(job, callbacks=[_tune_report(progress)], tracking_parent=root, tracking_params=config)
    # The final figures go to Tune only now, after export: a scheduler that stops the trial on them
    # then stops a finished trial, not one still writing its model.
    final = dict(result.metrics)
    if progress not in final:
        final |= next((r for r in reversed(RunDir(job.run_dir).metrics()) if progress in r), {})
    if metric in GENERATION_METRICS:
        final |= generation_scores(job)
    if metric in final:
        ray.tune.report({k: v for k, v in final.items() if isinstance(v, int | float)} | {"step": result.steps})


def generation_scores(job: TrainJob) -> dict:
    """`rayft eval`'s scores of the trial's exported model (no base model), within the CPUs/GPUs the
    trial's workers held; predictions are kept in the trial's eval/ like `rayft eval` keeps them."""
    import dataclasses

    from rayft.training.evaluate import eval_rows, inference_config, predict, score
    from rayft.training.inference import resolve_inference_model

    rows = eval_rows(job, job.eval.max_rows)
    icfg = inference_config(job)
    s = job.scaling
    icfg = dataclasses.replace(
        icfg, replicas=min(icfg.replicas, s.num_workers), cpus_per_replica=min(icfg.cpus_per_replica, s.cpus_per_worker)
    )
    model = resolve_inference_model(job.run_dir, base_model=job.model.name, revision=job.model.revision)
    predictions, _ = predict(model, rows, icfg, RunDir(job.run_dir).eval_dir, "finetuned", reuse=False)
    return {k: v for k, v in score(predictions).items() if k in GENERATION_METRICS and v is not None}


def _tune_report(metric: str):
    """Forwards the Train run's step reports that carry the sweep's metric (Tune wants it in every
    result); the final report is sent by the trial itself once the model is exported."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class _Report(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            if metrics and metric in metrics[0] and not metrics[0].get("final"):
                super().after_report(run_context, metrics, None)  # checkpoints stay in the trial's run dir

    return _Report()


from ray.tune import Callback  # noqa: E402 - this module is imported only when a sweep runs


def say(line: str) -> None:
    print(f"sweep: {line}", file=sys.stderr, flush=True)


class _Lines(Callback):
    """One console line per trial event (kept in the sweep's saved state, so it must pickle: no handles)."""

    def __init__(self, metric: str):
        self.metric = metric

    def on_trial_start(self, iteration, trials, trial, **info):
        params = ", ".join(f"{k}={fmt_value(v)}" for k, v in (trial.config or {}).items())
        say(f"trial {trial.trial_id} started: {params}")

    def on_trial_complete(self, iteration, trials, trial, **info):
        r = trial.last_result or {}
        how = "finished" if r.get("final") else "stopped by the scheduler"
        say(f"trial {trial.trial_id} {how} at step {r.get('step', 0)}: {self.metric} {fmt_value(r.get(self.metric))}")

    def on_trial_error(self, iteration, trials, trial, **info):
        say(f"trial {trial.trial_id} failed (see {trial.path})")


def _row(result, root: str, metric: str) -> TrialRow:
    trial_id = storage.basename(result.path.rstrip("/"))
    run_dir = storage.join(root, RUNS_DIR, trial_id)
    run = RunDir(run_dir)
    m = result.metrics or {}
    records = run.metrics()
    steps = max([int(r.get("step", 0)) for r in records] + [int(m.get("step", 0) or 0)])
    done = run.has_final()
    if result.error is not None:
        status = "error"
    elif done:
        status = "completed"
    elif m.get("done"):
        status = "stopped early"  # the scheduler's decision on its last report
    else:
        status = "unfinished"  # interrupted (or never started): the same command resumes it
    value = m.get(metric)
    if done and value is None:  # the last report had no eval (eval_at_end false): the run's last one
        values = [r[metric] for r in records if r.get(metric) is not None]
        value = values[-1] if values else None
    return TrialRow(
        trial=trial_id,
        params=dict(result.config or {}),
        metric=float(value) if value is not None else None,
        steps=steps,
        status=status,
        wall_s=float(m.get("time_total_s", 0.0) or 0.0),
        run_dir=run_dir,
        error=str(result.error).splitlines()[0][:300] if result.error is not None else None,
    )


def ranked(rows: list[TrialRow], mode: str) -> list[TrialRow]:
    """Completed trials first (best metric first), then stopped ones by metric, then the rest."""
    order = {"completed": 0, "stopped early": 1, "unfinished": 2, "error": 3}
    sign = 1 if mode == "min" else -1

    def key(r: TrialRow):
        return (order[r.status], r.metric is None, sign * (r.metric if r.metric is not None else 0.0))

    return sorted(rows, key=key)


def write_results(result: SweepResult, job: SweepJob) -> None:
    """results.csv/.md/.png, best.yaml and the best/ link."""
    rows = ranked(result.rows, result.mode)
    result.rows = rows
    params = list(job.sweep.space)
    head = ["rank", "trial", *params, result.metric, "steps", "status", "wall_s"]
    table = [
        [
            str(i + 1),
            r.trial,
            *(fmt_value(r.params.get(p)) for p in params),
            fmt_value(r.metric),
            str(r.steps),
            r.status,
            f"{r.wall_s:.1f}",
        ]
        for i, r in enumerate(rows)
    ]
    buf = io.StringIO(newline="")
    w = csv.writer(buf)
    w.writerow(head)
    w.writerows(table)
    storage.write_text(storage.join(result.sweep_dir, "results.csv"), buf.getvalue())
    best = next((r for r in rows if r.status == "completed" and r.metric is not None), None)
    result.best = best
    md = [
        f"# Sweep {storage.basename(result.sweep_dir)}",
        "",
        f"{len(rows)} trials, {result.mode} {result.metric}; best: {best.trial if best else 'none completed'}",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    md += ["| " + " | ".join(row) + " |" for row in table]
    storage.write_text(storage.join(result.sweep_dir, "results.md"), "\n".join(md) + "\n")
    plot_results(result, params)
    if best:
        write_best(result, best, job)


def write_best(result: SweepResult, best: TrialRow, job: SweepJob) -> None:
    """best.yaml (the winner's job file under a new run name), best.json, and locally the best/ link."""
    import json

    import yaml

    run = RunDir(best.run_dir)
    raw = run.read_job()
    if raw is None:
        raise SweepError(f"the best trial's run {best.run_dir} has no {JOB_FILE}")
    raw.pop("sweep", None)
    name = storage.basename(result.sweep_dir)
    raw["run"] |= {"name": f"{name}-best", "storage_path": job.run.storage_path}
    params = ", ".join(f"{k}={fmt_value(v)}" for k, v in best.params.items())
    score = f"{result.metric} {fmt_value(best.metric)}"
    text = (
        f"# The best trial of sweep {name} ({best.trial}: {score}; {params}).\n"
        f"#   rayft train {storage.join(result.sweep_dir, 'best.yaml')}\n"
    ) + yaml.safe_dump(raw, sort_keys=False)
    storage.write_text(storage.join(result.sweep_dir, "best.yaml"), text)
    model = run.final
    pointer = {"trial": best.trial, "metric": result.metric, "value": best.metric, "params": best.params}
    pointer |= {"run_dir": best.run_dir, "model": model}
    storage.write_text(storage.join(result.sweep_dir, "best.json"), json.dumps(pointer, indent=2) + "\n")
    if storage.is_remote(result.sweep_dir):
        return
    link = os.path.join(result.sweep_dir, "best")
    if os.path.islink(link) or os.path.exists(link):
        os.remove(link)
    os.symlink(os.path.relpath(model, result.sweep_dir), link)


def best_model(sweep_dir: str, best: TrialRow) -> str:
    """What `rayft serve` takes for the best trial: the best/ link locally, the trial's run dir in cloud
    storage (no links there)."""
    return best.run_dir if storage.is_remote(sweep_dir) else storage.join(sweep_dir, "best")


def plot_results(result: SweepResult, params: list[str]) -> str | None:
    """results.png: the metric against each searched parameter, one panel each; stopped trials hollow."""
    shown = [p for p in params if any(isinstance(r.params.get(p), int | float) for r in result.rows)][:4]
    scored = [r for r in result.rows if r.metric is not None]
    if not shown or not scored:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(shown), figsize=(4.2 * len(shown), 3.6), squeeze=False)
    for ax, p in zip(axes[0], shown, strict=True):
        for status, style in (("completed", "o"), ("stopped early", "x")):
            pts = [
                (r.params[p], r.metric)
                for r in scored
                if r.status == status and isinstance(r.params.get(p), int | float)
            ]
            if pts:
                ax.plot([x for x, _ in pts], [y for _, y in pts], style, label=status, markersize=7)
        values = [r.params[p] for r in scored if isinstance(r.params.get(p), int | float) and r.params[p] > 0]
        if values and max(values) / max(min(values), 1e-300) > 50:
            ax.set_xscale("log")
        ax.set_xlabel(p)
        ax.set_ylabel(result.metric)
        ax.grid(alpha=0.3)
    axes[0][0].legend()
    fig.suptitle(f"{storage.basename(result.sweep_dir)}: {result.metric} ({result.mode}) per trial")
    fig.tight_layout()
    out = storage.join(result.sweep_dir, "results.png")
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    plt.close(fig)
    storage.write_bytes(out, png.getvalue())
    return out


def fmt_value(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
