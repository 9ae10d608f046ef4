"""The run directory: where one `rayft train` run keeps everything, and the one module that knows its layout.
Every stage after training (eval, export, serve, sweeps, the fine-tuning API, `rayft jobs status`) reads a run
through `RunDir`, in whatever storage `run.storage_path` points at (a local or NFS path, s3://, gs://, ...).

    <run>/job.yaml                         the resolved job (trainer.save_job), credentials shown as ***
    <run>/status.json                      how the run ended, or that it is running (below)
    <run>/metrics.jsonl                    rank 0's records, one JSON object a line; the driver tails it
    <run>/tensorboard/                     the same metrics as TensorBoard events
    <run>/loss.png                         train and eval loss per step (trainer.plot_losses)
    <run>/checkpoint_*/                    Ray Train's checkpoints: each rank's DeepSpeed files under ds/ and
                                           its data position (trainer_state_rank<N>.json)
    <run>/checkpoint_manager_snapshot.json Ray Train's record of the checkpoints it registered (complete ones)
    <run>/final/                           the exported model: a Hugging Face model dir (a full finetune, or a
                                           merged LoRA with the adapter in final/adapter/), or, for LoRA
                                           without export.merge, the adapter itself
    <run>/eval/                            `rayft eval`: predictions, report.json, report.md, metrics.png
    <run>/tracking.json                    the tracked runs (rayft.training.tracking)

status.json is the run's outcome, written by `run_training` (the driver of `rayft train` and of each sweep
trial): {"state": "running" | "succeeded" | "failed", "error_kind": ..., "message": ..., "time": seconds}.
"running" is written once the run dir is prepared, "succeeded" after the export, and "failed" for any error
that ends the run: with `error_kind` the kind of user-facing error (what `rayft` prints before "error":
data, model, storage, training, ...; see `user_error`), whose message says what to fix; with `error_kind`
null for anything else (a crash, an interruption), which running the same command again may get past. A
driver killed outright writes nothing, so its run stays "running". Errors before there is a run (a job file
that does not validate, a wrong option) leave no status: the run dir is not known yet.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Protocol, cast

from rayft.training import storage

log = logging.getLogger("rayft")

JOB_FILE = "job.yaml"
STATUS_FILE = "status.json"
METRICS_FILE = "metrics.jsonl"
LOSS_PLOT = "loss.png"
FINAL_DIR = "final"
ADAPTER_DIR = "adapter"  # final/adapter/: the LoRA adapter beside a merged model
ADAPTER_CONFIG = "adapter_config.json"  # PEFT's: the file that makes a directory a LoRA adapter
EVAL_DIR = "eval"
EVAL_REPORT = "report.json"
CHECKPOINT_GLOB = "checkpoint_*"
CHECKPOINT_RECORD = "checkpoint_manager_snapshot.json"
STATE_FILE = "trainer_state_rank{rank}.json"  # in each checkpoint: a rank's step, epoch and rows consumed

STATES = ("running", "succeeded", "failed")
# The kinds of error `rayft` reports to people (its "<kind> error" lines). Each user-facing exception class
# says its own as a class attribute `error_kind`.
ERROR_KINDS = ("config", "data", "training", "plan", "storage", "cluster", "usage", "model")
MAX_MESSAGE_CHARS = 8000


class UserFacing(Protocol):
    """What `user_error` finds: an exception whose class says its kind (the type checkers' view of it)."""

    error_kind: str


@dataclass(frozen=True)
class RunDir:
    """One run directory, local or in cloud storage: where its files are and how to read them."""

    path: str

    def __str__(self) -> str:
        return self.path

    @property
    def name(self) -> str:
        return storage.basename(self.path)

    def join(self, *parts: str) -> str:
        return storage.join(self.path, *parts)

    # ------------------------------------------------------------------ where things are

    @property
    def job_file(self) -> str:
        return self.join(JOB_FILE)

    @property
    def status_file(self) -> str:
        return self.join(STATUS_FILE)

    @property
    def metrics_file(self) -> str:
        return self.join(METRICS_FILE)

    @property
    def loss_plot(self) -> str:
        return self.join(LOSS_PLOT)

    @property
    def final(self) -> str:
        return self.join(FINAL_DIR)

    @property
    def eval_dir(self) -> str:
        return self.join(EVAL_DIR)

    @property
    def eval_report(self) -> str:
        return self.join(EVAL_DIR, EVAL_REPORT)

    # ------------------------------------------------------------------ what is there

    def has_final(self) -> bool:
        return storage.is_dir(self.final)

    def has_metrics(self) -> bool:
        return storage.exists(self.metrics_file)

    def has_run(self) -> bool:
        """Whether an earlier `rayft train` left something here to resume from or keep: its metrics, job file,
        final/ or a checkpoint (a dir holding only `rayft eval --base`'s eval/, or a status.json of a run that
        failed before training, has nothing to resume)."""
        names = storage.listdir(self.path)
        return any(n in (METRICS_FILE, JOB_FILE, FINAL_DIR) or n.startswith("checkpoint_") for n in names)

    def read_job(self) -> dict | None:
        """The run's job (job.yaml) as plain data, None when the run has none."""
        import yaml

        try:
            return yaml.safe_load(storage.read_text(self.job_file)) or {}
        except FileNotFoundError:
            return None

    def metrics(self) -> list[dict]:
        """Every record of metrics.jsonl in the order written (empty before the first)."""
        return read_metrics(self.path)

    def curve(self, key: str) -> list[tuple[int, float]]:
        """(step, value) of one metric in step order (see `curve`)."""
        return curve(self.metrics(), key)

    def adapter(self) -> str | None:
        """The LoRA adapter the run exported, None if it has none (a full finetune, no export yet). One order,
        for every reader: final/ itself (LoRA without export.merge: final/ is the adapter), then final/adapter
        (beside the merged model)."""
        for d in (self.final, self.join(FINAL_DIR, ADAPTER_DIR)):
            if is_adapter(d):
                return d
        return None

    # ------------------------------------------------------------------ checkpoints

    def checkpoint_dirs(self) -> list[str]:
        """Every checkpoint_* entry, complete or not (a killed worker may have left one half-written)."""
        return storage.glob(self.path, CHECKPOINT_GLOB)

    def committed_checkpoints(self) -> list[dict] | None:
        """Ray Train's record of the checkpoints it registered (checkpoint_dir_name, metrics); None when the run
        has no such record yet."""
        try:
            snapshot = json.loads(storage.read_text(self.join(CHECKPOINT_RECORD)))
            return [c for c in snapshot.get("checkpoint_results", []) if "checkpoint_dir_name" in c]
        except (FileNotFoundError, ValueError, AttributeError):
            return None

    def checkpoints(self) -> list[tuple[int | None, str]]:
        """(step, path) of every complete checkpoint kept, oldest first. Complete: registered by Ray Train, when
        the run has that record, so a directory a killed worker left half-written is never offered."""
        results = self.committed_checkpoints()
        committed = None if results is None else {c["checkpoint_dir_name"] for c in results}
        out = []
        for path in self.checkpoint_dirs():
            if committed is not None and storage.basename(path) not in committed or not storage.is_dir(path):
                continue
            out.append((checkpoint_step(path), path))
        return sorted(out, key=lambda x: (x[0] is None, x[0] or 0))

    # ------------------------------------------------------------------ the outcome

    def status(self) -> dict | None:
        """status.json ({state, error_kind, message, time}), None when the run has none (or an unreadable one).
        A storage that cannot be reached raises StorageError: not knowing is not "no status"."""
        try:
            status = json.loads(storage.read_text(self.status_file))
        except (FileNotFoundError, ValueError):
            return None
        if not isinstance(status, dict) or status.get("state") not in STATES:
            return None
        return status

    def write_status(self, state: str, error_kind: str | None = None, message: str | None = None) -> dict:
        """Write status.json (replacing the last one); returns what was written."""
        if state not in STATES:
            raise ValueError(f"state {state!r} is not one of {', '.join(STATES)}")
        if error_kind is not None and (state != "failed" or error_kind not in ERROR_KINDS):
            raise ValueError(f"error_kind {error_kind!r} goes only with state failed, as one of {ERROR_KINDS}")
        status = {
            "state": state,
            "error_kind": error_kind,
            "message": message[:MAX_MESSAGE_CHARS] if message else None,
            "time": time.time(),
        }
        storage.write_text(self.status_file, json.dumps(status, indent=2) + "\n")
        return status

    def record_failure(self, e: BaseException) -> dict | None:
        """Write "failed" for the exception that ended the run: with its kind and message when it is a
        user-facing error (user_error), else with no kind. Never raises: a run dir that cannot be written
        (the very error, perhaps) leaves the exception itself to tell; returns what was written, if anything."""
        cause = user_error(e)
        if cause is not None:
            kind, message = cause.error_kind, str(cause)
        elif isinstance(e, KeyboardInterrupt):
            kind, message = None, "interrupted; the same command resumes the run"
        else:
            kind, message = None, f"{type(e).__name__}: {e}"
        try:
            return self.write_status("failed", kind, message)
        except Exception as write_error:  # noqa: BLE001
            log.warning("could not write %s: %s", self.status_file, write_error)
            return None

    # ------------------------------------------------------------------ from a model back to its run

    @classmethod
    def of_model(cls, path: str | None) -> RunDir | None:
        """The run a served model or adapter directory was exported into (<run>/final or <run>/final/adapter),
        by its path alone; None for any other path. Whether the run is readable is the caller's to check."""
        if not path:
            return None
        p = str(path).rstrip("/")
        if storage.basename(p) == ADAPTER_DIR:
            p = p[: -len(ADAPTER_DIR) - 1]
        if storage.basename(p) != FINAL_DIR:
            return None
        run = p[: -len(FINAL_DIR) - 1]
        return cls(run) if run else None


def is_adapter(path: str) -> bool:
    """Whether `path` is a LoRA adapter directory (PEFT's adapter_config.json in it)."""
    return storage.exists(storage.join(path, ADAPTER_CONFIG))


def find_adapter(path: str) -> str | None:
    """The LoRA adapter at `path`: an adapter dir itself, a final/ export holding one in adapter/, or a run dir
    (RunDir.adapter's order); None if there is none."""
    if is_adapter(path):
        return path
    if is_adapter(storage.join(path, ADAPTER_DIR)):
        return storage.join(path, ADAPTER_DIR)
    return RunDir(path).adapter()


def read_metrics(run_dir: str) -> list[dict]:
    """The records of <run_dir>/metrics.jsonl, in the order written (empty when there is none yet)."""
    try:
        text = storage.read_text(storage.join(run_dir, METRICS_FILE))
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def curve(records: list[dict], key: str) -> list[tuple[int, float]]:
    """(step, value) of a metric in step order. After a restart the steps since the last checkpoint appear
    twice; the later value is the one kept."""
    return sorted({r["step"]: r[key] for r in records if key in r}.items())


def checkpoint_step(ckpt_dir: str) -> int | None:
    """The step a checkpoint directory was saved at (from its ranks' trainer state), None if it has none."""
    for path in storage.glob(ckpt_dir, STATE_FILE.format(rank="*")):
        return json.loads(storage.read_text(path))["step"]
    return None


def user_error(e: BaseException | None) -> UserFacing | None:
    """The user-facing rayft error behind `e` (one whose class has an `error_kind`): `e` itself, or the one
    Ray wrapped it in (a data task's, a worker's); None when `e` is something else (a bug, a crash)."""
    seen = 0
    while isinstance(e, BaseException) and seen < 10:
        if isinstance(getattr(type(e), "error_kind", None), str):
            return cast(UserFacing, e)
        # Ray's wrappers keep the original as `cause`; others chain it (some `from None`, so the context counts)
        wrapped = getattr(e, "cause", None)
        e = wrapped if isinstance(wrapped, BaseException) else e.__cause__ or e.__context__
        seen += 1
    return None
