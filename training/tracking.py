"""Experiment tracking: each rayft run is one MLflow run (and, if asked, one W&B run).

The driver of a run (`rayft train`, a sweep's trial, `rayft eval`) is the only tracking client. It opens the
run before the workers start and keeps its id in <run_dir>/tracking.json, so a restarted worker group, a new
driver resuming the run and a later `rayft eval` all log into the same run. Step metrics come from rank 0's
metrics.jsonl, which the driver follows: workers need neither the tracking package nor a route to the server,
and a driver that resumes first logs the steps a dead one never saw. A sweep is a parent run whose trials are
its child runs, each with its searched values as params.

Tracking never stops training: a failing call (server down, a full disk) warns once and switches that
backend off for the rest of the run. A URI that cannot work is a config error before launch
(rayft.training.config.MlflowTracking).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
import uuid
from typing import Any

from rayft.training import storage

log = logging.getLogger("rayft.tracking")

TRACKING_FILE = "tracking.json"
# metrics.jsonl fields that are not metrics (or are the x axis)
NOT_METRICS = {"time", "step", "final", "resumed", "event"}
MAX_PARAM_LEN = 6000  # MLflow's limit on a param value


def flatten(value: Any, prefix: str = "") -> dict[str, str]:
    """A nested job as dotted params: {"training.lr": "0.0002", ...}; lists as JSON."""
    if isinstance(value, dict):
        out: dict[str, str] = {}
        for k, v in value.items():
            out |= flatten(v, f"{prefix}{k}.")
        return out
    text = json.dumps(value) if isinstance(value, list | tuple) else str(value)
    return {prefix.rstrip("."): text[:MAX_PARAM_LEN]}


def step_metrics(record: dict) -> dict[str, float]:
    """The numeric metrics of a metrics.jsonl record (a step or an eval), by name."""
    return {
        k: float(v)
        for k, v in record.items()
        if k not in NOT_METRICS and isinstance(v, int | float) and not isinstance(v, bool)
    }


class Tracker:
    """The run's open tracking backends. Every method is safe to call: a backend that fails warns once and is
    dropped."""

    def __init__(self, run_dir: str, backends: list):
        self.run_dir, self.backends = run_dir, backends

    @classmethod
    def open(
        cls,
        tracking,
        run_dir: str,
        name: str,
        params: dict | None = None,
        parent_dir: str | None = None,
        tags: dict | None = None,
    ) -> Tracker | None:
        """Start or resume the tracked run of `run_dir` (None when `tracking` (run.tracking) tracks nothing).
        `parent_dir`: a sweep's directory, whose tracked run becomes the parent."""
        if tracking is None or not (tracking.mlflow or tracking.wandb):
            return None
        state = read_state(run_dir)
        parent = read_state(parent_dir) if parent_dir else {}
        backends = []
        for kind, cfg in (("mlflow", tracking.mlflow), ("wandb", tracking.wandb)):
            if cfg is None:
                continue
            opener = MlflowRun if kind == "mlflow" else WandbRun
            try:
                backends.append(opener(cfg, run_dir, name, state.get(kind) or {}, parent.get(kind) or {}, tags or {}))
            except Exception as e:  # noqa: BLE001 - tracking must never stop the run
                _warn(kind, "could not start the run", e)
        tracker = cls(run_dir, backends)
        tracker._save_state()
        if params:
            tracker.log_params(params)
        return tracker if backends else None

    def _save_state(self) -> None:
        state = read_state(self.run_dir)
        for b in self.backends:
            state[b.kind] = b.state()
        try:
            storage.write_text(storage.join(self.run_dir, TRACKING_FILE), json.dumps(state, indent=2) + "\n")
        except Exception as e:  # noqa: BLE001
            _warn("tracking", f"could not write {TRACKING_FILE}", e)

    def _each(self, what: str, fn) -> None:
        for b in list(self.backends):
            try:
                fn(b)
            except Exception as e:  # noqa: BLE001
                _warn(b.kind, what, e)
                self.backends.remove(b)

    def log_params(self, params: dict) -> None:
        """Nested params as dotted ones, any credential among them shown as *** (rayft.training.redact)."""
        from rayft.training.redact import redacted

        flat = flatten(redacted(params))
        self._each("could not log params", lambda b: b.log_params(flat))

    def log_record(self, record: dict) -> None:
        """One metrics.jsonl record: a step's metrics (or the final eval's) at its step."""
        if "step" not in record or record.get("event"):
            return
        metrics = step_metrics(record)
        if metrics:
            self._each("could not log metrics", lambda b: b.log_metrics(metrics, int(record["step"]), record))

    def catch_up(self, records: list[dict]) -> None:
        """Log the records a previous driver did not: those past the last step each backend holds."""
        for b in list(self.backends):
            try:
                last = b.last_step()
                for r in records:
                    if "step" in r and not r.get("event") and r["step"] > last:
                        metrics = step_metrics(r)
                        if metrics:
                            b.log_metrics(metrics, int(r["step"]), r)
            except Exception as e:  # noqa: BLE001
                _warn(b.kind, "could not log the earlier steps", e)
                self.backends.remove(b)

    def log_artifact(self, path: str, folder: str | None = None) -> None:
        """A file or directory (local or in cloud storage) as an artifact under `folder`."""
        if not self.backends or not storage.exists(path):
            return
        with storage.local_copy(path) as local:
            self._each(f"could not log {storage.basename(path)}", lambda b: b.log_artifact(local, folder))

    def set_tags(self, tags: dict) -> None:
        self._each("could not set tags", lambda b: b.set_tags({k: str(v) for k, v in tags.items()}))

    def finish(self, status: str = "FINISHED") -> None:
        """End the tracked run: FINISHED, FAILED or KILLED."""
        self._each("could not end the run", lambda b: b.finish(status))

    def fail(self, error: BaseException) -> None:
        """End the tracked run on the error that stopped it: KILLED for Ctrl-C, else FAILED with the reason."""
        text = str(error).splitlines()[0][:500] if str(error) else type(error).__name__
        self.set_tags({"rayft.error": text})
        self.finish("KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED")


def read_state(run_dir: str | None) -> dict:
    if not run_dir:
        return {}
    try:
        return json.loads(storage.read_text(storage.join(run_dir, TRACKING_FILE)))
    except (FileNotFoundError, ValueError, storage.StorageError):
        return {}


_WARNED: set[str] = set()


def _warn(kind: str, what: str, e: BaseException) -> None:
    key = f"{kind}: {what}"
    if key in _WARNED:
        return
    _WARNED.add(key)
    message = f"{kind} tracking {what} ({type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}); "
    log.warning(message + "training goes on without it")


def mlflow_uri(uri: str) -> str:
    """run.tracking.mlflow.uri made independent of the working directory: a plain path becomes an absolute one
    (relative to the current directory), anything with a scheme is kept."""
    if "://" in uri or uri.startswith(("databricks", "sqlite:")):
        return uri
    return os.path.abspath(os.path.expanduser(uri))


def mlflow_store(uri: str) -> tuple[str, str | None]:
    """(tracking URI, artifact root for new experiments) for run.tracking.mlflow.uri. A plain path is a local
    directory holding an MLflow SQLite store (DIR/mlflow.db, artifacts in DIR/artifacts: MLflow 3 keeps its
    file store in maintenance mode); a URI with a scheme is MLflow's own (a server, a database, databricks)."""
    uri = mlflow_uri(uri)
    if "://" in uri or uri.startswith(("databricks", "sqlite:")):
        return uri, None
    os.makedirs(uri, exist_ok=True)
    return f"sqlite:///{os.path.join(uri, 'mlflow.db')}", os.path.join(uri, "artifacts")


# --------------------------------------------------------------------------- MLflow


class MlflowRun:
    kind = "mlflow"

    def __init__(self, cfg, run_dir: str, name: str, state: dict, parent: dict, tags: dict):
        from mlflow.tracking import MlflowClient

        # A tracking server that is down fails fast (MLflow's own default retries for minutes), then warns.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
        self.uri, artifacts = mlflow_store(cfg.uri)
        self.client = MlflowClient(tracking_uri=self.uri)
        run_id = state.get("run_id") if state.get("uri") == self.uri else None
        if run_id:
            self.client.update_run(run_id, status="RUNNING")
            self.experiment_id = state["experiment_id"]
        else:
            exp = self.client.get_experiment_by_name(cfg.experiment)
            if exp:
                self.experiment_id = exp.experiment_id
            else:
                self.experiment_id = self.client.create_experiment(cfg.experiment, artifact_location=artifacts)
            all_tags = {"rayft.run_dir": run_dir, **tags}
            if parent.get("run_id") and parent.get("uri") == self.uri:
                all_tags["mlflow.parentRunId"] = parent["run_id"]
            run_id = self.client.create_run(self.experiment_id, run_name=name, tags=all_tags).info.run_id
        self.run_id = run_id

    def state(self) -> dict:
        return {"uri": self.uri, "experiment_id": self.experiment_id, "run_id": self.run_id}

    def log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        logged = self.client.get_run(self.run_id).data.params
        new = [Param(k, v) for k, v in params.items() if k not in logged]
        for i in range(0, len(new), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=new[i : i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int, record: dict) -> None:
        from mlflow.entities import Metric

        ms = int(record.get("time", time.time()) * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, ms, step) for k, v in metrics.items()])

    def last_step(self) -> int:
        run = self.client.get_run(self.run_id)
        keys = list(run.data.metrics)
        if not keys:
            return -1
        key = "loss" if "loss" in keys else keys[0]
        return max((m.step for m in self.client.get_metric_history(self.run_id, key)), default=-1)

    def log_artifact(self, local: str, folder: str | None) -> None:
        if os.path.isdir(local):
            self.client.log_artifacts(self.run_id, local, artifact_path=folder)
        else:
            self.client.log_artifact(self.run_id, local, artifact_path=folder)

    def set_tags(self, tags: dict[str, str]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, v)

    def finish(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status=status)


# --------------------------------------------------------------------------- Weights & Biases


class WandbRun:
    kind = "wandb"

    def __init__(self, cfg, run_dir: str, name: str, state: dict, parent: dict, tags: dict):
        import wandb

        self.dir = cfg.dir or (run_dir if not storage.is_remote(run_dir) else tempfile.mkdtemp(prefix="rayft-wandb-"))
        os.makedirs(self.dir, exist_ok=True)
        self.run_id = state.get("run_id") or uuid.uuid4().hex[:12]
        self.run = wandb.init(
            project=cfg.project,
            entity=cfg.entity,
            mode=cfg.mode,
            id=self.run_id,
            resume="allow",
            name=name,
            group=parent.get("group") or tags.get("rayft.sweep"),
            dir=self.dir,
            tags=[f"{k}={v}" for k, v in tags.items()][:64],
            reinit="create_new",
            settings=wandb.Settings(silent=True, console="off"),
        )
        self.group = self.run.group

    def state(self) -> dict:
        return {"run_id": self.run_id, "group": self.group, "dir": self.dir}

    def log_params(self, params: dict[str, str]) -> None:
        self.run.config.update(params, allow_val_change=True)

    def log_metrics(self, metrics: dict[str, float], step: int, record: dict) -> None:
        self.run.log(metrics, step=step)

    def last_step(self) -> int:
        return int(self.run.step) - 1

    def log_artifact(self, local: str, folder: str | None) -> None:
        base = os.path.dirname(local.rstrip("/"))
        self.run.save(os.path.join(local, "*") if os.path.isdir(local) else local, base_path=base, policy="now")

    def set_tags(self, tags: dict[str, str]) -> None:
        self.run.summary.update(tags)

    def finish(self, status: str) -> None:
        self.run.finish(exit_code=0 if status == "FINISHED" else 1)


# --------------------------------------------------------------------------- eval and sweeps


def log_eval(job, report: dict) -> None:
    """`rayft eval`'s figures into the run's tracked run (the one training logged into, or a new one): each
    split's metrics per model as eval/<split>/<base|finetuned>/<metric> at the run's last step, and the report
    files as artifacts under eval/."""
    from rayft.training.run_dir import RunDir

    tracker = Tracker.open(job.run.tracking, job.run_dir, job.run.name)
    if tracker is None:
        return
    step = max((int(r["step"]) for r in RunDir(job.run_dir).metrics() if "step" in r), default=0)
    metrics = {
        f"eval/{split}/{label}/{k}": v
        for split, by_label in report.get("splits", {}).items()
        for label, scores in by_label.items()
        for k, v in scores.items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    }
    if metrics:
        tracker.log_record({"step": step, **metrics})
    for path in (report.get("files") or {}).values():
        if path:
            tracker.log_artifact(path, "eval")
    tracker.finish("FINISHED")


TRIAL_STATUS = {"completed": "FINISHED", "stopped early": "KILLED", "error": "FAILED", "unfinished": "KILLED"}


def close_sweep(tracking, sweep_dir: str, rows: list, metric: str, mode: str, files: list[str]) -> None:
    """A sweep's end in its tracked parent run: the best trial's metric, the leaderboard files, and every
    trial's run ended with its status (a trial the scheduler stopped never ended its own)."""
    tracker = Tracker.open(tracking, sweep_dir, storage.basename(sweep_dir))
    if tracker is None:
        return
    values = [r.metric for r in rows if r.status == "completed" and r.metric is not None]
    tracker.set_tags({"rayft.trials": len(rows), "rayft.completed": sum(r.status == "completed" for r in rows)})
    for path in files:
        tracker.log_artifact(path)
    for b in tracker.backends:
        if b.kind != "mlflow":
            continue
        for r in rows:
            child = read_state(r.run_dir).get("mlflow") or {}
            if child.get("run_id") and child.get("uri") == b.uri:
                try:
                    b.client.set_tag(child["run_id"], "rayft.trial_status", r.status)
                    b.client.set_terminated(child["run_id"], status=TRIAL_STATUS[r.status])
                except Exception as e:  # noqa: BLE001
                    _warn("mlflow", "could not end a trial's run", e)
    if values:
        best = min(values) if mode == "min" else max(values)
        tracker.log_record({"step": 0, f"best_{metric}": best})
    tracker.finish("FINISHED" if any(r.status == "completed" for r in rows) else "FAILED")
