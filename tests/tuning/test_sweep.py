"""`rayft sweep`: the sweep section's checks, and real sweeps of tiny 1-worker DeepSpeed finetunes on
the suite's local Ray: ASHA stops the hopeless trials, the leaderboard and best trial are written, the
best config reruns with `rayft train`, and an interrupted sweep resumes without rerunning what ended."""

from __future__ import annotations

import csv
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from helpers import rayft_cli, sweep_job_file
from rayft.cluster.config import ConfigError, load_config


def problems_of(tmp_path, sweep: dict, **training) -> list[str]:
    from rayft.tuning.sweep import check_sweep

    try:
        job = load_config(sweep_job_file(tmp_path, "smollm2-135m-instruct", sweep, **training))
    except ConfigError as e:
        return e.problems
    return check_sweep(job)


# ------------------------------------------------------------------ checks before any trial starts


def test_space_paths_bounds_and_metric_are_checked_together(tmp_path):
    problems = problems_of(
        tmp_path,
        {
            "space": {
                "training.lrr": {"loguniform": [1e-5, 1e-3]},
                "training.lora": {"choice": [8]},
                "training.warmup_ratio": {"uniform": [0.2, 0.1]},
                "training.lora.r": {"choice": [8, 0]},
                "run.name": {"choice": ["a", "b"]},
            },
            "metric": "eval_accuracy",
        },
    )
    text = "\n".join(problems)
    assert "sweep.space.training.lrr: training has no setting 'lrr'" in text
    assert "sweep.space.training.lora: training.lora is a section" in text
    assert "sweep.space.training.warmup_ratio" in text and "low (0.2) must be below high (0.1)" in text
    assert "sweep.space.training.lora.r: the value 0 is refused" in text
    assert "sweep.space.run.name" in text and "cannot vary" in text
    assert "never report 'eval_accuracy'" in text and "eval_loss" in text and "exact_match" in text
    assert len(problems) == 6, problems


def test_distribution_shapes_are_config_errors(tmp_path):
    problems = problems_of(
        tmp_path,
        {
            "space": {
                "training.lr": {"loguniform": [0, 1e-3]},
                "training.epochs": {"normal": [1, 2]},
                "training.seed": {"randint": [1.5, 3]},
                "data.packing": {"choice": []},
            },
            "search": "grid",
        },
    )
    text = "\n".join(problems)
    assert "loguniform needs a positive low bound" in text
    assert "expected one of loguniform, uniform, randint, choice, grid" in text
    assert "randint bounds must be integers" in text
    assert "choice needs a non-empty list" in text
    assert "sweep.search: grid tries every value" in text


def test_asha_needs_the_metric_during_training(tmp_path):
    space = {"space": {"training.lr": {"choice": [1e-3, 1e-4]}}}
    text = "\n".join(problems_of(tmp_path, space, eval_every_steps=0))
    assert "only measured at the end (training.eval_every_steps is 0)" in text
    assert problems_of(tmp_path, space | {"scheduler": {"type": "fifo"}}, eval_every_steps=0) == []
    text = "\n".join(problems_of(tmp_path, space | {"scheduler": {"grace_period": 8}}))
    assert "grace_period (8) must be below training.max_steps (8)" in text
    # YAML reads 1e-5 (no dot) as a string; the sweep reads it as the number it is
    job = load_config(
        sweep_job_file(tmp_path, "smollm2-135m-instruct", {"space": {"training.lr": {"loguniform": ["1e-5", "1e-3"]}}})
    )
    assert job.sweep.space["training.lr"] == {"loguniform": [1e-5, 1e-3]}


def test_grpo_sweeps_rank_trials_by_the_held_out_reward(tmp_path):
    """A GRPO trial reports its reward and its held-out eval_reward (maximised), no eval loss and no rayft eval
    score: those are refused with what it does report."""
    space = {"space": {"training.lr": {"choice": [1e-3, 1e-4]}}}
    grpo = {"objective": "grpo", "rl": {"reward": ["rewards.py:f"]}}
    assert problems_of(tmp_path, space | {"metric": "eval_reward"}, **grpo) == []
    job = load_config(sweep_job_file(tmp_path, "smollm2-135m-instruct", space | {"metric": "eval_reward"}, **grpo))
    assert job.sweep.metric_mode == "max" and job.sweep.progress_metric == "eval_reward"
    for metric in ("eval_loss", "exact_match"):
        text = "\n".join(problems_of(tmp_path, space | {"metric": metric}, **grpo))
        assert f"never report {metric!r}" in text and "eval_reward" in text and "reward" in text, text


def test_concurrency_fits_the_cluster_or_says_why(tmp_path):
    from rayft.tuning.sweep import SweepError, concurrency

    job = load_config(
        sweep_job_file(tmp_path, "smollm2-135m-instruct", {"space": {"training.lr": {"choice": [1e-3]}}}),
        ["scaling.num_workers=2"],
    )
    assert concurrency(job, {"CPU": 8.0}) == 3  # 2 workers + 0.5 for data + 0.1 for the trial = 2.6 each
    job.sweep.max_concurrent_trials = 4
    with pytest.raises(SweepError, match=r"max_concurrent_trials is 4.*at most 3 fit"):
        concurrency(job, {"CPU": 8.0})
    with pytest.raises(SweepError, match="one trial needs 2.6 CPUs"):
        concurrency(job, {"CPU": 2.0})


def test_cli_refuses_a_bad_sweep_before_starting_ray(tmp_path):
    path = sweep_job_file(tmp_path, "smollm2-135m-instruct", {"space": {"training.nope": {"choice": [1]}}})
    proc = rayft_cli("sweep", str(path))
    assert proc.returncode == 2
    assert "sweep.space.training.nope: training has no setting 'nope'" in proc.stderr
    assert "starting Ray" not in proc.stderr


# ------------------------------------------------------------------ real sweeps


@pytest.mark.slow
@pytest.mark.usefixtures("ray_local")
def test_asha_stops_hopeless_trials_and_the_best_reruns_and_serves(asha_sweep):
    from rayft.serving.config import ServeConfig
    from rayft.serving.spec import build_spec
    from rayft.training.trainer import read_metrics, run_training

    _, _, result, _ = asha_sweep  # two learning rates that learn, two that cannot (conftest.py)
    assert len(result.rows) == 4
    by_lr = {r.params["training.lr"]: r for r in result.rows}
    # 5e-3 leads at every rung, so it always runs to the end; 2e-3 may be cut at a rung behind it
    assert by_lr[5e-3].status == "completed" and result.best is by_lr[5e-3]
    hopeless = [by_lr[1e-8], by_lr[1e-9]]
    assert [r.status for r in hopeless] == ["stopped early", "stopped early"]
    for r in hopeless:  # stopped at the first rung, long before the end; their own records say so too
        assert r.steps < 8
        assert max(m["step"] for m in read_metrics(r.run_dir) if "loss" in m) < 8
        assert not os.path.exists(os.path.join(r.run_dir, "final"))
    assert result.best.metric < min(r.metric for r in hopeless)

    root = Path(result.sweep_dir)
    with open(root / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert [row["trial"] for row in table][0] == result.best.trial
    assert {row["status"] for row in table} >= {"completed", "stopped early"}
    assert set(table[0]) >= {"training.lr", "eval_loss", "steps", "status", "wall_s"}
    assert "| 1 | " + result.best.trial in (root / "results.md").read_text()
    assert (root / "results.png").stat().st_size > 5000
    assert (root / "best").resolve() == (Path(result.best.run_dir) / "final").resolve()
    assert (root / "best" / "config.json").exists() or (root / "best" / "adapter_config.json").exists()
    build_spec(str(root / "best"), ServeConfig())  # what `rayft serve <sweep>/best` resolves

    # best.yaml is a job file `rayft train` takes: the winning value, a fresh run name
    best = load_config(root / "best.yaml", ["training.max_steps=2", "run.tracking.mlflow=false"])
    assert best.training.lr == result.best.params["training.lr"]
    assert best.run.name == "lr-best"
    rerun = run_training(best)
    assert rerun.steps == 2 and rerun.final_dir and os.path.isdir(rerun.final_dir)


@pytest.mark.cluster  # a failure drill: Ctrl-C
@pytest.mark.slow
@pytest.mark.usefixtures("ray_local")
def test_interrupted_sweep_resumes_without_rerunning_finished_trials(tmp_path, tiny_model_dir):
    from rayft.training.trainer import read_metrics
    from rayft.tuning.sweep import SweepError, run_sweep

    # Ranked by a generation score, which each trial measures on its exported model at its end.
    sweep = {
        "name": "resume",
        "space": {"training.lr": {"grid": [5e-3, 2e-3]}},
        "num_samples": 1,
        "max_concurrent_trials": 1,
        "metric": "exact_match",
        "scheduler": {"type": "fifo"},
    }
    # 32 steps, then export and scoring: the second trial is still at work when the Ctrl-C comes (0.1 s a step)
    overrides = ["eval.max_new_tokens=8", "eval.replicas=1", "training.max_steps=32", "training.eval_every_steps=16"]
    job = load_config(sweep_job_file(tmp_path, tiny_model_dir, sweep), overrides)
    runs = tmp_path / "runs" / "resume" / "runs"

    def training(metrics: Path) -> bool:
        return any('"loss"' in line for line in metrics.read_text().splitlines())

    def ctrl_c_after_first_trial():  # what a user's Ctrl-C does: Tune saves its state and returns
        deadline = time.time() + 600
        while time.time() < deadline:
            finals = list(runs.glob("*/final"))
            second = [p for p in runs.glob("*/metrics.jsonl") if p.parent not in {f.parent for f in finals}]
            if finals and second and training(second[0]):  # the second trial has made its first step
                os.kill(os.getpid(), signal.SIGINT)
                return
            time.sleep(0.1)

    killer = threading.Thread(target=ctrl_c_after_first_trial, daemon=True)
    killer.start()
    first = run_sweep(job)
    killer.join(timeout=5)
    assert first.interrupted
    done = [r for r in first.rows if r.status == "completed"]
    assert len(done) == 1 and [r.status for r in first.rows if r is not done[0]] == ["unfinished"]
    finished_dir = Path(done[0].run_dir)
    stamp = (finished_dir / "final").stat().st_mtime_ns
    starts = len([m for m in read_metrics(str(finished_dir)) if m.get("event") == "start"])

    marker = tmp_path / "runs" / "resume" / "rayft-version"
    saved = marker.read_text()
    marker.unlink()  # how a sweep saved by rayft 0.1 (modules not yet under rayft.*) looks
    with pytest.raises(SweepError, match=r"saved by rayft 0\.1, .* Start it over with --restart"):
        run_sweep(job)
    marker.write_text(saved)
    second = run_sweep(job)  # the same command again
    assert second.resumed and not second.interrupted
    assert sorted(r.status for r in second.rows) == ["completed", "completed"]
    assert {r.trial for r in second.rows} == {r.trial for r in first.rows}
    assert (finished_dir / "final").stat().st_mtime_ns == stamp  # not trained again
    assert len([m for m in read_metrics(str(finished_dir)) if m.get("event") == "start"]) == starts
    assert json.loads(json.dumps(second.best.params)) in ({"training.lr": 5e-3}, {"training.lr": 2e-3})
    for r in second.rows:  # the score of each trial's own model, from predictions kept in its run dir
        assert r.metric is not None and 0.0 <= r.metric <= 1.0
        assert (Path(r.run_dir) / "eval" / "predictions-finetuned.jsonl").exists()
