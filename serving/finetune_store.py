"""What the fine-tuning service (rayft.serving.finetune) keeps of each job, and where: a typed JobRecord per job in
JOBS/<owner>/<job id>/job.json (rewritten whole), beside the job's cancel marker. The JSON's field names are the
ones every earlier rayft wrote, so a store an older endpoint filled loads as it is; fields added since have
defaults.
"""

from __future__ import annotations

import re
import secrets
import time
from typing import Any, Literal

from pydantic import BaseModel, Field

from rayft.serving.files import owners_seen
from rayft.serving.openai_api import ApiError, FineTuningJob, JobEvent
from rayft.training import storage

JOB_ID = re.compile(r"^ftjob-[0-9a-f]{32}$")
ACTIVE = ("validating_files", "queued", "running")  # the statuses of a job that has not ended


def new_job_id() -> str:
    """ftjob-<creation time in ns, 16 hex digits><16 random hex digits>: ids sort by creation time."""
    return f"ftjob-{time.time_ns():016x}{secrets.token_hex(8)}"


def event_id(t: float, tail: str) -> str:
    return f"ftevent-{int(t * 1e9):016x}{tail}"


def job_not_found(job_id: str) -> ApiError:
    return ApiError(
        404,
        f"no fine-tuning job {job_id!r}: it does not exist or was created with another API key",
        param="fine_tuning_job_id",
        code="fine_tuning_job_not_found",
    )


class FileRef(BaseModel):
    """An uploaded file (rayft.serving.files) a job trains or evaluates on."""

    id: str
    filename: str


class JobFiles(BaseModel):
    train: FileRef = Field(description="The training_file.")
    eval: FileRef | None = Field(default=None, description="The validation_file, if the job has one.")


class JobRecord(BaseModel):
    """One fine-tuning job: the job as the API shows it, and how the service runs it."""

    owner: str = Field(description="Whose job it is: the SHA-256 of the key that created it, or 'local'.")
    job: FineTuningJob = Field(description="The job as GET /v1/fine_tuning/jobs/{id} shows it.")
    job_file: dict[str, Any] = Field(
        description="The job file it trains with: serve.finetune.job with the served model and the request's "
        "hyperparameters, and once its files are validated their copies and its run."
    )
    files: JobFiles
    ray_job_id: str | None = Field(default=None, description="The Ray job of its latest attempt, once submitted.")
    run_dir: str = Field(description="RUNS/<job id>: where its run keeps metrics, checkpoints and final/.")
    cancel_requested: bool = Field(
        default=False, description="Cancelled (by a request, or by the cancel marker): its Ray job is to be stopped."
    )
    attempt: int = Field(default=1, description="Submissions so far: a driver that died is submitted again.")
    events: list[JobEvent] = Field(
        default_factory=list, description="Status changes and validation, oldest first (steps are read from the run)."
    )
    validation_tries: int = Field(
        default=0, description="Polls whose validation failed for a reason not in its rows (storage trouble)."
    )
    model_deleted: bool = Field(default=False, description="Its fine-tuned model was deleted; the job stays listed.")

    @property
    def id(self) -> str:
        return self.job.id

    @property
    def active(self) -> bool:
        """Whether the job has not ended (validating its files, queued or running)."""
        return self.job.status in ACTIVE

    def event(self, message: str, level: Literal["info", "warn", "error"] = "info") -> None:
        """Add one of the job's own events (GET .../events lists them with the run's steps)."""
        t = time.time()
        self.events.append(
            JobEvent(
                id=event_id(t, secrets.token_hex(8)), created_at=int(t), level=level, message=message, type="message"
            )  # fmt: skip
        )


class JobStore:
    """job.json of every job under JOBS; `owner` EVERY_OWNER means every owner (an admin key). A job's cancel
    marker is applied to every record read, so no write of a reader that missed the cancel can undo it."""

    def __init__(self, root: str):
        self.root = storage.join(root, "jobs")

    def dir(self, owner: str, job_id: str) -> str:
        return storage.join(self.root, owner, job_id)

    def save(self, rec: JobRecord) -> None:
        storage.write_text(storage.join(self.dir(rec.owner, rec.id), "job.json"), rec.model_dump_json())

    def mark_cancelled(self, owner: str, job_id: str) -> None:
        storage.write_text(storage.join(self.dir(owner, job_id), "cancel"), str(int(time.time())))

    def _read(self, owner: str, job_id: str) -> JobRecord | None:
        folder = self.dir(owner, job_id)
        try:
            rec = JobRecord.model_validate_json(storage.read_text(storage.join(folder, "job.json")))
        except FileNotFoundError:
            return None
        if rec.job.status != "cancelled" and storage.exists(storage.join(folder, "cancel")):
            rec.cancel_requested = True  # cancelled while another writer held an older copy: the cancel wins
            rec.job.status = "cancelled"
            rec.job.finished_at = rec.job.finished_at or int(time.time())
        return rec

    def owners(self, owner: str | None) -> list[str]:
        return owners_seen(owner, lambda: storage.listdir(self.root))

    def ids(self, owner: str | None) -> list[tuple[str, str]]:
        """(job id, owner) of every job `owner` may see, newest first."""
        return sorted(
            (
                (i, o)
                for o in self.owners(owner)
                for i in storage.listdir(storage.join(self.root, o))
                if JOB_ID.match(i)
            ),
            reverse=True,
        )

    def get(self, owner: str | None, job_id: str) -> JobRecord:
        if JOB_ID.match(job_id or ""):
            for o in self.owners(owner):
                rec = self._read(o, job_id)
                if rec is not None:
                    return rec
        raise job_not_found(job_id)

    def list(self, owner: str | None, after: str | None = None, limit: int = 20) -> tuple[list[JobRecord], bool]:
        out = []
        for job_id, o in self.ids(owner):
            if after and job_id >= after:
                continue
            rec = self._read(o, job_id)
            if rec is None:
                continue
            if len(out) == limit:
                return out, True
            out.append(rec)
        return out, False
