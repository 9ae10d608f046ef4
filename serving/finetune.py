"""OpenAI's fine-tuning jobs on the endpoint: a key that uploaded a file (rayft.serving.files) starts a job, follows
it, and then calls the adapter it trained by name on the same endpoint.

    POST /v1/fine_tuning/jobs ─▶ validating_files: the file's rows checked with rayft's own row checks and copied
                                 next to the job (a bad file fails the job with its first bad lines as file:line)
                              ─▶ queued: a job file (serve.finetune.job, the served model, the request's
                                 hyperparameters) runs as a Ray job, `rayft train` on the cluster
                              ─▶ running ─▶ succeeded: the run's final/ adapter is served as fine_tuned_model
                                        └─▶ failed (the reason) / cancelled (the Ray job stopped)

Everything lives in serve.finetune.storage_path, beside the files:

    <storage_path>/jobs/<owner>/<job id>/job.json    the job, its events and how it runs (rewritten whole)
    <storage_path>/jobs/<owner>/<job id>/job.yaml    the job file the Ray job runs
    <storage_path>/jobs/<owner>/<job id>/train.jsonl the validated training rows (validation.jsonl: held-out rows)
    <storage_path>/runs/<job id>/                    the run dir: metrics.jsonl, checkpoints, final/ (the adapter)

so an endpoint that restarts finds every job again and picks up the Ray jobs where they are. Steps are not
written as events: /events reads them from the run's metrics.jsonl. Plain blocking calls (storage and the Ray
Jobs API over HTTP): the ingress runs them in threads and polls running jobs in a thread of its own.
"""

from __future__ import annotations

import base64
import copy
import json
import logging
import re
import secrets
import shlex
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from rayft.serving.config import FinetuneConfig, template_job
from rayft.serving.files import OWNER, FileStore, StoredFile, read_chunks, storage_root
from rayft.serving.openai_api import ApiError, FineTuningJobCreate
from rayft.training import storage

log = logging.getLogger("ray.serve.rayft")

JOB_ID = re.compile(r"^ftjob-[0-9a-f]{32}$")
ACTIVE = ("validating_files", "queued", "running")
MAX_BAD_LISTED = 5  # bad lines named in a failed job's error.message
RAY_JOB_PREFIX = "rayft-finetune-"
RAYFT_ERROR = re.compile(r"^(config|data|training|plan|storage|cluster|usage) error\b")  # what `rayft train` prints


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


@dataclass(frozen=True)
class ServedBase:
    """The model jobs train on: the served one. `ids`: what a request may name as `model`."""

    name: str
    path: str
    revision: str | None
    ids: tuple[str, ...]


class JobStore:
    """job.json of every job under <storage_path>/jobs; `owner` None means every owner (an admin key)."""

    def __init__(self, root: str):
        self.root = storage.join(root, "jobs")

    def dir(self, owner: str, job_id: str) -> str:
        return storage.join(self.root, owner, job_id)

    def save(self, rec: dict) -> None:
        storage.write_text(storage.join(self.dir(rec["owner"], rec["job"]["id"]), "job.json"), json.dumps(rec))

    def _read(self, owner: str, job_id: str) -> dict | None:
        try:
            return json.loads(storage.read_text(storage.join(self.dir(owner, job_id), "job.json")))
        except FileNotFoundError:
            return None

    def owners(self, owner: str | None) -> list[str]:
        if owner is not None:
            return [owner]
        return [o for o in storage.listdir(self.root) if OWNER.match(o)]

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

    def get(self, owner: str | None, job_id: str) -> dict:
        if JOB_ID.match(job_id or ""):
            for o in self.owners(owner):
                rec = self._read(o, job_id)
                if rec is not None:
                    return rec
        raise job_not_found(job_id)

    def list(self, owner: str | None, after: str | None = None, limit: int = 20) -> tuple[list[dict], bool]:
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


class FinetuneService:
    """The fine-tuning jobs of one endpoint: created by requests, moved along by `poll` (the ingress's thread).
    `on_model(fine_tuned_model, owner, adapter_path)` is called for every succeeded job, at start for the
    ones already done."""

    def __init__(self, cfg: FinetuneConfig, files: FileStore, base: ServedBase, on_model: Callable[..., None]):
        self.cfg, self.files, self.base, self.on_model = cfg, files, base, on_model
        self.root = storage_root(cfg.storage_path)
        self.store = JobStore(self.root)
        self.runs = storage.join(self.root, "runs")
        self._lock = threading.RLock()  # a job's read-modify-write: requests (cancel) and the poller
        self._client = None
        self._active: set[tuple[str, str]] = set()  # (owner, job id) of the jobs not yet ended
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---------------------------------------------------------------- start and the poller

    def start(self) -> None:
        """Start the thread that finds the jobs in storage (serving the succeeded ones, following the live
        ones), then polls the live ones every serve.finetune.poll_interval_s."""
        self._thread = threading.Thread(target=self._run, name="rayft-finetune-jobs", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _load(self) -> None:
        for job_id, owner in self.store.ids(None):
            rec = self.store._read(owner, job_id)
            if rec is None:
                continue
            status = rec["job"]["status"]
            if status in ACTIVE or (rec["cancel_requested"] and rec["ray_job_id"]):
                self._active.add((owner, job_id))
            elif status == "succeeded" and rec["job"].get("fine_tuned_model"):
                self._register(rec)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._load()
                break
            except Exception:  # noqa: BLE001 - storage not reachable yet: jobs wait, requests still answer
                log.exception("fine-tuning jobs: reading %s failed; retrying", self.store.root)
                self._stop.wait(max(self.cfg.poll_interval_s, 5))
        while not self._stop.is_set():
            self.poll()
            self._stop.wait(self.cfg.poll_interval_s)

    def poll(self) -> None:
        """Move every live job along one stage (each failure stays with its job)."""
        for owner, job_id in sorted(self._active, key=lambda x: x[1]):
            try:
                self._advance(owner, job_id)
            except Exception:  # noqa: BLE001 - one job's trouble (storage, the cluster) must not stop the others
                log.exception("fine-tuning job %s: checking it failed; retrying", job_id)

    # ---------------------------------------------------------------- requests

    def create(self, owner: str, body: FineTuningJobCreate) -> dict:
        if not self.base.ids:
            raise ApiError(
                400,
                "fine-tuning jobs are turned off on this server (serve.finetune.models is empty)",
                param="model",
                code="fine_tuning_disabled",
            )
        if body.model not in self.base.ids:
            raise ApiError(
                400,
                f"model {body.model!r} cannot be fine-tuned here; this server fine-tunes {', '.join(self.base.ids)} "
                "(jobs train a LoRA adapter for the model it serves)",
                param="model",
                code="model_not_available",
            )
        training = self._file(owner, body.training_file, "training_file")
        validation = self._file(owner, body.validation_file, "validation_file") if body.validation_file else None
        hp, job_file = self.resolve(body)
        method = job_file["training"]["objective"].replace("sft", "supervised")
        with self._lock:
            active = [r for r in self.store.list(owner, limit=10**6)[0] if r["job"]["status"] in ACTIVE]
            if len(active) >= self.cfg.max_active_jobs_per_key:
                raise ApiError(
                    429,
                    f"this API key already has {len(active)} fine-tuning jobs validating, queued or running "
                    f"(serve.finetune.max_active_jobs_per_key = {self.cfg.max_active_jobs_per_key}); wait for one "
                    f"to end or cancel one ({', '.join(r['job']['id'] for r in active)})",
                    code="rate_limit_exceeded",
                    headers={"x-should-retry": "false"},
                )
            job_id = new_job_id()
            now = int(time.time())
            job = {
                "object": "fine_tuning.job",
                "id": job_id,
                "model": body.model,
                "created_at": now,
                "finished_at": None,
                "fine_tuned_model": None,
                "organization_id": f"key-{owner[:12]}",
                "result_files": [],
                "status": "validating_files",
                "validation_file": validation.id if validation else None,
                "training_file": training.id,
                "hyperparameters": hp,
                "method": {"type": method, method: {"hyperparameters": hp}},
                "trained_tokens": None,
                "error": None,
                "seed": job_file["training"]["seed"],
                "estimated_finish": None,
                "integrations": [],
                "metadata": body.metadata,
                "user_provided_suffix": body.suffix,
            }
            rec = {
                "owner": owner,
                "job": job,
                "job_file": job_file,
                "files": {"train": _file_ref(training), "eval": _file_ref(validation) if validation else None},
                "ray_job_id": None,
                "run_dir": storage.join(self.runs, job_id),
                "cancel_requested": False,
                "attempt": 1,
                "events": [],
            }
            _event(rec, f"Created fine-tuning job: {job_id}")
            _event(
                rec,
                f"Validating training file: {training.id}"
                + (f" and validation file: {validation.id}" if validation else ""),
            )
            self.store.save(rec)
            self._active.add((owner, job_id))
        return job

    def _file(self, owner: str, file_id: str, param: str) -> StoredFile:
        try:
            return self.files.get(owner, file_id)
        except ApiError:
            raise ApiError(
                400,
                f"{param} {file_id!r} is not a file of this API key: upload it first (POST /v1/files, "
                "purpose=fine-tune) and pass the id it returns",
                param=param,
                code="invalid_file",
            ) from None

    def resolve(self, body: FineTuningJobCreate) -> tuple[dict, dict]:
        """The job's hyperparameters with "auto" resolved from the template, and its job file (without the data
        and run, which come later); a 400 naming the field for values the template's workers cannot take."""
        from pydantic import ValidationError

        given = body.hyperparameters_given()
        where = body.hyperparameters_field()
        dpo = body.method is not None and body.method.type == "dpo"
        job = copy.deepcopy(self.cfg.job)
        if dpo:  # preference pairs: each pair is one row of its own (packing does not apply)
            job.setdefault("data", {})["packing"] = False
        template = template_job(job)
        t = template.training
        training = job.setdefault("training", {})
        epochs = t.epochs if given.n_epochs == "auto" else given.n_epochs
        if epochs > self.cfg.max_epochs:
            raise ApiError(
                400,
                f"n_epochs is {given.n_epochs}; this server allows at most {self.cfg.max_epochs} "
                "(serve.finetune.max_epochs)",
                param=f"{where}.n_epochs",
            )
        multiplier = 1.0 if given.learning_rate_multiplier == "auto" else float(given.learning_rate_multiplier)
        batch = t.global_batch_size if given.batch_size == "auto" else given.batch_size
        workers = template.scaling.num_workers
        if batch % workers:
            raise ApiError(
                400,
                f"batch_size {batch} cannot be split evenly over this server's {workers} training workers; use a "
                f"multiple of {workers}",
                param=f"{where}.batch_size",
            )
        micro = max(m for m in range(1, min(t.micro_batch_size, batch // workers) + 1) if (batch // workers) % m == 0)
        training.update(
            method="lora", epochs=epochs, lr=t.lr * multiplier, global_batch_size=batch, micro_batch_size=micro
        )
        if dpo:
            training["objective"] = "dpo"
            beta = t.dpo.beta if given.beta == "auto" else float(given.beta)
            training["dpo"] = dict(training.get("dpo") or {}) | {"beta": beta}
        else:
            training["objective"] = "sft"
        if given.n_epochs != "auto":  # asked for epochs: the template's step count no longer applies
            training.pop("max_steps", None)
        if body.seed is not None:
            training["seed"] = body.seed
            job.setdefault("data", {})["seed"] = body.seed
        training.setdefault("seed", t.seed)
        job.setdefault("export", {}).setdefault("merge", False)  # the endpoint serves the adapter: final/ is it
        model = job.setdefault("model", {})
        model["name"] = self.base.path
        if self.base.revision:
            model["revision"] = self.base.revision
        try:
            template_job(job)
        except ValidationError as e:
            problems = "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors())
            raise ApiError(400, f"these hyperparameters make an invalid job: {problems}", param=where) from None
        hp = {
            "n_epochs": int(epochs) if float(epochs).is_integer() else epochs,
            "batch_size": batch,
            "learning_rate_multiplier": multiplier,
        }
        if dpo:
            hp["beta"] = training["dpo"]["beta"]
        return hp, job

    def get(self, viewer: str | None, job_id: str) -> dict:
        return self.store.get(viewer, job_id)["job"]

    def list(self, viewer: str | None, after: str | None, limit: int) -> dict:
        recs, more = self.store.list(viewer, after, limit)
        return {"object": "list", "data": [r["job"] for r in recs], "has_more": more}

    def cancel(self, viewer: str | None, job_id: str) -> dict:
        with self._lock:
            rec = self.store.get(viewer, job_id)
            status = rec["job"]["status"]
            if status not in ACTIVE:
                raise ApiError(
                    400,
                    f"job {job_id} has ended ({status}); only a job that has not ended can be cancelled",
                    param="fine_tuning_job_id",
                    code="job_not_cancellable",
                )
            rec["cancel_requested"] = True
            self._end(rec, "cancelled")
            _event(rec, "Fine-tuning job cancelled" + (": its Ray job is being stopped" if rec["ray_job_id"] else ""))
            self.store.save(rec)
            ray_job = rec["ray_job_id"]
        if ray_job:
            try:
                self.client().stop_job(ray_job)
            except Exception as e:  # noqa: BLE001 - the job stays cancelled; the poller tries again
                log.warning("fine-tuning job %s: stopping Ray job %s failed: %s", job_id, ray_job, e)
        return rec["job"]

    def events(self, viewer: str | None, job_id: str, after: str | None, limit: int) -> dict:
        """The job's events, newest first: its own (status changes, validation) and a line per logged step."""
        rec = self.store.get(viewer, job_id)
        events = [e | {"object": "fine_tuning.job.event"} for e in rec["events"]]
        events += self._step_events(rec)
        events.sort(key=lambda e: e["id"], reverse=True)
        if after:
            events = [e for e in events if e["id"] < after]
        return {"object": "list", "data": events[:limit], "has_more": len(events) > limit}

    def _step_events(self, rec: dict) -> list[dict]:
        from rayft.training.trainer import read_metrics

        if rec["ray_job_id"] is None:
            return []
        try:
            records = read_metrics(rec["run_dir"])
        except Exception:  # noqa: BLE001 - an unreadable run dir shows no steps, not an error
            return []
        total = next((r["total_steps"] for r in records if "total_steps" in r), None)
        out, seen = [], set()
        for r in records:
            if "step" not in r or "time" not in r or not ("loss" in r or "eval_loss" in r):
                continue
            kind = "e" if "eval_loss" in r else "s"
            if (r["step"], kind) in seen:  # a resumed run logs the steps since its checkpoint again
                continue
            seen.add((r["step"], kind))
            of = f"/{total}" if total else ""
            if kind == "s":
                data = {"step": r["step"], "train_loss": r["loss"], "total_steps": total}
                message = f"Step {r['step']}{of}: training loss={r['loss']:.4f}"
                if "reward_accuracy" in r:  # a dpo job
                    data |= {k: r[k] for k in ("reward_accuracy", "reward_margin")}
                    message += f", reward accuracy={r['reward_accuracy']:.2f}"
            else:
                data = {"step": r["step"], "valid_loss": r["eval_loss"], "total_steps": total}
                message = f"Step {r['step']}{of}: validation loss={r['eval_loss']:.4f}"
            out.append({
                "object": "fine_tuning.job.event",
                "id": event_id(r["time"], f"{r['step']:015x}{1 if kind == 'e' else 0}"),
                "created_at": int(r["time"]),
                "level": "info",
                "message": message,
                "data": data,
                "type": "metrics",
            })  # fmt: skip
        return out

    def checkpoints(self, viewer: str | None, job_id: str, after: str | None, limit: int) -> dict:
        """The checkpoints the run keeps, newest first, with the loss logged at their step."""
        from rayft.training.export import list_checkpoints
        from rayft.training.trainer import read_metrics

        rec = self.store.get(viewer, job_id)
        if rec["ray_job_id"] is None:
            return {"object": "list", "data": [], "has_more": False, "first_id": None, "last_id": None}
        try:
            kept = list_checkpoints(rec["run_dir"])
            records = read_metrics(rec["run_dir"])
        except Exception:  # noqa: BLE001
            kept, records = [], []
        losses = {r["step"]: r["loss"] for r in records if "loss" in r and "step" in r}
        evals = {r["step"]: r["eval_loss"] for r in records if "eval_loss" in r and "step" in r}
        times = {r["step"]: r["time"] for r in records if "step" in r and "time" in r}
        base = rec["job"]["fine_tuned_model"] or self.model_name(rec)
        data = []
        for step, _path in reversed(kept):
            if step is None:
                continue
            metrics = {"step": step, "train_loss": losses.get(step)}
            if step in evals:
                metrics["valid_loss"] = evals[step]
            data.append({
                "object": "fine_tuning.job.checkpoint",
                "id": f"ftckpt-{job_id[6:]}{step:08x}",
                "created_at": int(times.get(step, rec["job"]["created_at"])),
                "fine_tuned_model_checkpoint": f"{base}:ckpt-step-{step}",
                "fine_tuning_job_id": job_id,
                "metrics": metrics,
                "step_number": step,
            })  # fmt: skip
        if after:
            data = [c for c in data if c["id"] < after]
        page = data[:limit]
        first, last = (page[0]["id"], page[-1]["id"]) if page else (None, None)
        return {"object": "list", "data": page, "has_more": len(data) > limit, "first_id": first, "last_id": last}

    def model_name(self, rec: dict) -> str:
        return f"ft:{rec['job']['model']}:{rec['job']['user_provided_suffix'] or ''}:{rec['job']['id']}"

    def find_model(self, viewer: str | None, name: str) -> tuple[str, str] | None:
        """(owner, adapter dir) of a succeeded job's fine_tuned_model `name` that `viewer` may use; None if not."""
        job_id = name.rsplit(":", 1)[-1]
        try:
            rec = self.store.get(viewer, job_id)
        except ApiError:
            return None
        if rec["job"]["status"] != "succeeded" or rec["job"]["fine_tuned_model"] != name:
            return None
        return rec["owner"], adapter_dir(rec["run_dir"])

    # ---------------------------------------------------------------- moving a job along

    def client(self):
        """A Ray Jobs API client: serve.finetune.ray_address, else the dashboard of the cluster this runs on."""
        if self._client is None:
            from ray.job_submission import JobSubmissionClient

            address = self.cfg.ray_address
            if not address:
                import ray

                url = ray._private.worker.get_dashboard_url() if ray.is_initialized() else None
                if not url:
                    raise RuntimeError(
                        "fine-tuning jobs run through Ray's Jobs API, and the cluster this endpoint runs on has no "
                        "dashboard: start Ray with its dashboard (ray start --head --include-dashboard=true) or "
                        "set serve.finetune.ray_address"
                    )
                address = url if "://" in url else f"http://{url}"
            self._client = JobSubmissionClient(address)
        return self._client

    def _advance(self, owner: str, job_id: str) -> None:
        rec = self.store._read(owner, job_id)
        if rec is None or rec["job"]["status"] not in ACTIVE:
            if rec is not None and rec["cancel_requested"] and rec["ray_job_id"]:
                self._make_sure_stopped(rec)
            self._active.discard((owner, job_id))
            return
        if rec["job"]["status"] == "validating_files":
            self._validate_and_submit(rec)
        else:
            self._follow(rec)

    def _make_sure_stopped(self, rec: dict) -> None:
        """A cancelled job's Ray job, stopped for sure (a stop request can be lost with a restarting endpoint)."""
        try:
            c = self.client()
            if str(c.get_job_status(rec["ray_job_id"])) in ("PENDING", "RUNNING"):
                c.stop_job(rec["ray_job_id"])
                return  # looked at again at the next poll
        except Exception as e:  # noqa: BLE001
            log.warning("fine-tuning job %s: stopping its Ray job failed: %s", rec["job"]["id"], e)
            return
        self._active.discard((rec["owner"], rec["job"]["id"]))

    def _validate_and_submit(self, rec: dict) -> None:
        job_id = rec["job"]["id"]
        folder = self.store.dir(rec["owner"], job_id)
        problems, counts = [], {}
        for split, name in (("train", "train.jsonl"), ("eval", "validation.jsonl")):
            ref = rec["files"][split]
            if ref is None:
                continue
            param = "training_file" if split == "train" else "validation_file"
            try:
                f = self.files.get(rec["owner"], ref["id"])
            except ApiError:
                problems.append((param, f"{param} {ref['id']} was deleted before the job could read it"))
                continue
            pairs = rec["job_file"]["training"].get("objective") == "dpo"
            rows, bad = copy_checked_rows(self.files, f, storage.join(folder, name), pairs)
            counts[split] = rows
            if bad:
                listing = "\n".join(bad[:MAX_BAD_LISTED])
                more = f" (first {MAX_BAD_LISTED} shown)" if len(bad) > MAX_BAD_LISTED else ""
                problems.append((
                    param,
                    f"{param} {f.id} ({f.filename}): {len(bad)} of {rows} rows are bad{more}:\n{listing}\n"
                    "Fix these lines and upload the file again.",
                ))  # fmt: skip
            elif rows == 0:
                problems.append((param, f"{param} {f.id} ({f.filename}) holds no rows"))
        batch = rec["job_file"]["training"]["global_batch_size"]
        if not problems and counts.get("train", 0) < batch:
            problems.append((
                "training_file",
                f"training_file has {counts['train']} rows, fewer than one optimizer step takes (batch_size "
                f"{batch}); add rows or ask for a smaller batch_size",
            ))  # fmt: skip
        with self._lock:
            rec = self.store._read(rec["owner"], job_id)
            if rec["job"]["status"] != "validating_files":  # cancelled meanwhile
                return
            if problems:
                param, message = problems[0]
                message = "\n".join(m for _, m in problems)
                _event(rec, f"Validation failed: {message}", "error")
                self._fail(rec, "invalid_file", message, param)
                return
            summary = ", ".join(f"{n} {'training' if s == 'train' else 'validation'} rows" for s, n in counts.items())
            _event(rec, f"Files validated: {summary}")
            job = rec["job_file"]
            job.setdefault("data", {})["train"] = storage.join(folder, "train.jsonl")
            if rec["files"]["eval"]:
                job["data"]["eval"] = storage.join(folder, "validation.jsonl")
            job.setdefault("run", {}).update(name=job_id, storage_path=self.runs)
            text = f"# fine-tuning job {job_id}, written by the endpoint's fine-tuning API\n"
            text += _yaml(job)
            storage.write_text(storage.join(folder, "job.yaml"), text)
            ray_job = RAY_JOB_PREFIX + job_id
            try:
                self._submit(ray_job, text, job_id)
            except Exception as e:  # noqa: BLE001 - the cluster would not take it
                _event(rec, f"The cluster did not accept the job: {e}", "error")
                self._fail(rec, "submission_failed", f"the Ray cluster did not accept the job: {e}", None)
                return
            rec["ray_job_id"] = ray_job
            rec["job"]["status"] = "queued"
            _event(rec, f"Fine-tuning job queued as Ray job {ray_job}")
            self.store.save(rec)

    def _submit(self, ray_job: str, job_yaml: str, job_id: str) -> None:
        """`rayft train` of the job file as a Ray job on the cluster. The job file travels inside the entrypoint
        (as `rayft submit --image` sends it), so no working directory is uploaded: the cluster runs the rayft
        this endpoint runs. An id already taken is this job, submitted before a restart."""
        text = base64.b64encode(job_yaml.encode()).decode()
        python = shlex.quote(sys.executable)
        entrypoint = (
            f'd="$(mktemp -d)" && echo {text} | base64 -d > "$d/job.yaml" && exec {python} -m rayft train "$d/job.yaml"'
        )
        metadata = {
            "rayft_command": "train",
            "rayft_run": job_id,
            "rayft_storage": self.runs,
            "rayft_fine_tuning_job": job_id,
        }
        c = self.client()
        try:
            c.submit_job(
                entrypoint=entrypoint,
                submission_id=ray_job,
                metadata=metadata,
                runtime_env={"env_vars": {"PYTHONUNBUFFERED": "1"}},
            )
        except RuntimeError as e:
            if "already exists" not in str(e):
                raise

    def _follow(self, rec: dict) -> None:
        c = self.client()
        try:
            info = c.get_job_info(rec["ray_job_id"])
        except RuntimeError as e:
            if "does not exist" in str(e) or "not found" in str(e).lower():
                with self._lock:
                    rec = self.store._read(rec["owner"], rec["job"]["id"])
                    if rec["job"]["status"] in ACTIVE:
                        message = (
                            f"its Ray job {rec['ray_job_id']} is gone from the cluster (the cluster was restarted or "
                            "its job history was cleared); create the job again"
                        )
                        _event(rec, f"Job failed: {message}", "error")
                        self._fail(rec, "job_lost", message, None)
                return
            raise
        status = str(info.status)
        with self._lock:
            rec = self.store._read(rec["owner"], rec["job"]["id"])
            if rec["job"]["status"] not in ACTIVE:
                return
            job = rec["job"]
            if status == "RUNNING" and job["status"] == "queued":
                job["status"] = "running"
                _event(rec, "Fine-tuning job started")
                self.store.save(rec)
            elif status == "SUCCEEDED":
                self._succeed(rec)
            elif status == "FAILED":
                reason, own = self._failure_reason(c, rec["ray_job_id"], info.message)
                attempt = rec.get("attempt", 1)
                if own or attempt > self.cfg.job_restarts:
                    _event(rec, f"Job failed: {reason}", "error")
                    self._fail(rec, "training_failed", reason, None)
                    return
                # it died rather than failed (a killed driver, a lost node): run it again, from its checkpoint
                ray_job = f"{RAY_JOB_PREFIX}{job['id']}-{attempt + 1}"
                text = storage.read_text(storage.join(self.store.dir(rec["owner"], job["id"]), "job.yaml"))
                self._submit(ray_job, text, job["id"])
                _event(
                    rec,
                    f"Ray job {rec['ray_job_id']} died ({reason.splitlines()[0][:300]}); submitted again as {ray_job}, "
                    "resuming from the run's last checkpoint",
                    "warn",
                )
                rec["ray_job_id"], rec["attempt"] = ray_job, attempt + 1
                job["status"] = "queued"
                self.store.save(rec)
            elif status == "STOPPED":
                message = f"its Ray job {rec['ray_job_id']} was stopped outside the fine-tuning API"
                _event(rec, f"Job failed: {message}", "error")
                self._fail(rec, "job_stopped", message, None)

    def _succeed(self, rec: dict) -> None:
        from rayft.training.trainer import curve, read_metrics

        final = storage.join(rec["run_dir"], "final")
        if not adapter_dir(rec["run_dir"]):
            message = f"training ended but the run has no LoRA adapter in {final}"
            _event(rec, f"Job failed: {message}", "error")
            self._fail(rec, "no_adapter", message, None)
            return
        job = rec["job"]
        records = read_metrics(rec["run_dir"])
        job["trained_tokens"] = int(sum(v for _, v in curve(records, "nonpad_tokens")))
        job["fine_tuned_model"] = self.model_name(rec)
        self._end(rec, "succeeded")
        _event(rec, f"New fine-tuned model created: {job['fine_tuned_model']}")
        _event(rec, "The job has successfully completed")
        self.store.save(rec)
        self._register(rec)

    def _register(self, rec: dict) -> None:
        try:
            self.on_model(rec["job"]["fine_tuned_model"], rec["owner"], adapter_dir(rec["run_dir"]))
        except Exception:  # noqa: BLE001 - requests still find it through the store
            log.exception("fine-tuning job %s: serving its adapter failed", rec["job"]["id"])

    def _failure_reason(self, c, ray_job: str, message: str | None) -> tuple[str, bool]:
        """What made the Ray job fail, and whether rayft said so itself: the last error `rayft train` printed
        (`training error ...`, `data error ...`, with the lines that follow it), else Ray's message (an exit
        code: the driver was killed or lost)."""
        try:
            lines = [line.rstrip() for line in c.get_job_logs(ray_job).splitlines() if line.strip()]
        except Exception:  # noqa: BLE001
            lines = []
        own = [i for i, line in enumerate(lines) if RAYFT_ERROR.match(line)]
        if own:
            return "\n".join(lines[own[-1] : own[-1] + 12])[:2000], True
        return (message or "the Ray job failed").strip()[:2000], False

    def _end(self, rec: dict, status: str) -> None:
        rec["job"]["status"] = status
        rec["job"]["finished_at"] = int(time.time())

    def _fail(self, rec: dict, code: str, message: str, param: str | None) -> None:
        rec["job"]["error"] = {"code": code, "message": message, "param": param}
        self._end(rec, "failed")
        self.store.save(rec)
        self._active.discard((rec["owner"], rec["job"]["id"]))


def adapter_dir(run_dir: str) -> str | None:
    """The LoRA adapter a run exported: final/ itself, or final/adapter beside a copy of the base model."""
    for d in (storage.join(run_dir, "final", "adapter"), storage.join(run_dir, "final")):
        if storage.exists(storage.join(d, "adapter_config.json")):
            return d
    return None


def _file_ref(f: StoredFile) -> dict:
    return {"id": f.id, "filename": f.filename}


def _event(rec: dict, message: str, level: str = "info") -> None:
    t = time.time()
    rec["events"].append({
        "id": event_id(t, secrets.token_hex(8)),
        "created_at": int(t),
        "level": level,
        "message": message,
        "data": {},
        "type": "message",
    })  # fmt: skip


def _yaml(job: dict) -> str:
    import yaml

    return yaml.safe_dump(job, sort_keys=False)


WRONG_KIND = {
    True: "not a preference pair: a dpo job trains on rows {input: {messages}, preferred_output, "
    "non_preferred_output} (or {prompt, chosen, rejected})",
    False: "a preference pair: train on pairs with method {type: dpo}, or give supervised rows {messages}",
}


def _lines(chunks) -> Iterator[bytes]:
    """The lines (with their newline) of a stream of byte chunks."""
    rest = b""
    for chunk in chunks:
        rest += chunk
        *lines, rest = rest.split(b"\n")
        for line in lines:
            yield line + b"\n"
    if rest:
        yield rest


def copy_checked_rows(files: FileStore, f: StoredFile, dest: str, pairs: bool = False) -> tuple[int, list[str]]:
    """Check each line of an uploaded JSONL file with rayft's row checks (the formats `rayft train` reads) while
    copying it to `dest`; returns (rows, ["filename:line: problem", ...]). `pairs`: a DPO job's file, whose
    rows must be preference pairs (and an SFT job's must not be)."""
    from rayft.training.formats import RowError, normalize, parse_json_line

    rows, bad = 0, []
    with storage.open_output(dest) as out:
        for lineno, line in enumerate(_lines(read_chunks(files.open(f))), 1):
            out.write(line)
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError:
                rows += 1
                bad.append(f"{f.filename}:{lineno}: the line is not UTF-8 text")
                continue
            if not text.strip():
                continue
            rows += 1
            try:
                if (normalize(parse_json_line(text))["kind"] == "pair") != pairs:
                    raise RowError(WRONG_KIND[pairs])
            except RowError as e:
                bad.append(f"{f.filename}:{lineno}: {e}")
    return rows, bad
