"""OpenAI's fine-tuning jobs on the endpoint: a key that uploaded a file (rayft.serving.files) starts a job, follows
it, and then calls the adapter it trained by name on the same endpoint.

    POST /v1/fine_tuning/jobs ─▶ validating_files: the file's rows checked with rayft's own row checks and copied
                                 next to the job (a bad file fails the job with its first bad lines as file:line)
                              ─▶ queued: a job file (serve.finetune.job, the served model, the request's
                                 hyperparameters) runs as a Ray job on the cluster: `python -m
                                 rayft.training.run`, submitted through rayft.training.launch
                              ─▶ running ─▶ succeeded: the run's final/ adapter is served as fine_tuned_model
                                        └─▶ failed (the reason) / cancelled (the Ray job stopped)

Everything lives in serve.finetune.storage_path, beside the files (JOBS is `jobs` for the namespace "default",
`namespaces/<namespace>/jobs` for another serve.finetune.namespace; RUNS likewise):

    JOBS/<owner>/<job id>/job.json    the job, its events and how it runs: a JobRecord (rayft.serving.finetune_store)
    JOBS/<owner>/<job id>/cancel      a cancel, a marker of its own that wins over any later job.json write
    JOBS/<owner>/<job id>/job.yaml    the job file the Ray job runs
    JOBS/<owner>/<job id>/train.jsonl the validated training rows (validation.jsonl: held-out rows)
    JOBS/lease.json                   which endpoint replica moves the namespace's jobs along, until when
    RUNS/<job id>/                    the run dir (rayft.training.run_dir): metrics.jsonl, checkpoints, final/
                                      (the adapter), status.json (how the run ended: why a job failed)

so an endpoint that restarts finds every job again and picks up the Ray jobs where they are. Only the replica
holding the namespace's lease polls: during a redeploy the old replica keeps it until it stops (or the lease runs
out), then the new one takes over; an endpoint on another Ray cluster finding a live lease is refused new jobs
(they would run on a cluster the owner cannot follow). Steps are not written as events: /events reads them from
the run's metrics.jsonl. Plain blocking calls (storage and the Ray Jobs API over HTTP): the ingress runs them in
threads and polls running jobs in a thread of its own.
"""

from __future__ import annotations

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
from typing import Literal

from rayft.serving.config import PLACEHOLDER_GRADER, FinetuneConfig, template_job
from rayft.serving.files import EVERY_OWNER, FileStore, StoredFile, namespace_root, read_chunks, storage_root
from rayft.serving.finetune_store import (
    ACTIVE,
    FileRef,
    JobFiles,
    JobRecord,
    JobStore,
    event_id,
    new_job_id,
)
from rayft.serving.openai_api import (
    ApiError,
    DpoHyperparameters,
    FineTuningJob,
    FineTuningJobCreate,
    JobError,
    ReinforcementHyperparameters,
    ResolvedHyperparameters,
)
from rayft.training import launch, storage
from rayft.training.config import RlConfig
from rayft.training.run_dir import JOB_FILE, RunDir, is_adapter

log = logging.getLogger("ray.serve.rayft")

CHECKPOINT_MODEL = re.compile(r"^(?P<model>ft:.+:ftjob-[0-9a-f]{32}):ckpt-step-(?P<step>[0-9]{1,12})$")
MAX_BAD_LISTED = 5  # bad lines named in a failed job's error.message
COPIES = ("train.jsonl", "validation.jsonl")  # a job's copies of its files, kept while it trains
VALIDATION_TRIES = 3  # polls that may fail to validate a job's files (storage trouble) before the job fails
RAY_JOB_PREFIX = "rayft-finetune-"
Ended = Literal["succeeded", "failed", "cancelled"]


@dataclass(frozen=True)
class ServedBase:
    """The model jobs train on: the served one. `ids`: what a request may name as `model`."""

    name: str
    path: str
    revision: str | None
    ids: tuple[str, ...]


class FinetuneService:
    """The fine-tuning jobs of one endpoint: created by requests, moved along by `poll` (the ingress's thread).
    `on_model(fine_tuned_model, owner, adapter_path)` is called for every job that succeeds while this replica
    follows it; models of jobs that ended before are found by `find_model` at their first request."""

    def __init__(
        self,
        cfg: FinetuneConfig,
        files: FileStore,
        base: ServedBase,
        on_model: Callable[..., None],
        cluster: str | None = None,
    ):
        self.cfg, self.files, self.base, self.on_model = cfg, files, base, on_model
        self.root = namespace_root(storage_root(cfg.storage_path), cfg.namespace)
        self.store = JobStore(self.root)
        self.runs = storage.join(self.root, "runs")
        self._lock = threading.RLock()  # a job's read-modify-write: requests (cancel) and the poller
        self._client = None
        self._active: set[tuple[str, str]] = set()  # (owner, job id) of the jobs not yet ended
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lease = Lease(storage.join(self.store.root, "lease.json"), cluster or self._cluster_id(), cfg)
        self._scanned = 0.0  # when the store was last searched for live jobs

    @staticmethod
    def _cluster_id() -> str:
        """The Ray cluster this endpoint runs on (its GCS cluster id), or this process when Ray is not up."""
        import os

        try:
            import ray
            import ray._private.worker

            if ray.is_initialized():
                worker = ray._private.worker.global_worker
                return worker.gcs_client.cluster_id.hex()  # pyright: ignore[reportAttributeAccessIssue] - set by ray.init
        except Exception:  # noqa: BLE001
            pass
        return f"process-{os.getpid()}"

    # ---------------------------------------------------------------- start and the poller

    def start(self) -> None:
        """Start the thread that finds the jobs in storage (serving the succeeded ones, following the live
        ones), then polls the live ones every serve.finetune.poll_interval_s."""
        self._thread = threading.Thread(target=self._run, name="rayft-finetune-jobs", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop polling and hand the lease back (the replica is shutting down), so a new replica takes over now."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=max(10.0, 2 * self.cfg.poll_interval_s))
        self.lease.release()

    def _scan(self) -> None:
        """The store's live jobs added to the ones this replica follows: at start, then now and then, so that jobs
        another replica of this endpoint created (the ingress before a redeploy, or beside this one) are moved
        along too. A model of a job that ended before is registered at its first request (Ingress._adapter_for),
        not here: an endpoint with thousands of old jobs starts without checking (or copying) each adapter."""
        for job_id, owner in self.store.ids(EVERY_OWNER):
            if (owner, job_id) in self._active:
                continue
            rec = self.store._read(owner, job_id)
            if rec is not None and (rec.active or (rec.cancel_requested and rec.ray_job_id)):
                self._active.add((owner, job_id))
        self._scanned = time.monotonic()

    def _check_shared(self) -> None:
        """A local storage path on a cluster of several nodes must be a volume they all mount: the ingress may run
        on any of them and a job's driver on another. If one does not see it, new files and jobs are refused."""
        from rayft.serving.files import unshared_nodes

        try:
            missing = unshared_nodes(storage_root(self.cfg.storage_path))
        except Exception:  # noqa: BLE001 - the check itself failed: say so, refuse nothing
            log.exception("fine-tuning jobs: checking that every node sees %s failed", self.cfg.storage_path)
            return
        if missing:
            self.files.refused = (
                f"serve.finetune.storage_path {self.cfg.storage_path} is a local directory that {len(missing)} other "
                f"node(s) of this Ray cluster do not see (e.g. {missing[0][:16]}): uploads and jobs kept there would "
                "vanish with this node and a job's driver elsewhere could not read them. The operator points it at "
                "s3://, gs:// or a volume every node mounts"
            )
            log.error("fine-tuning jobs: %s", self.files.refused)

    def _run(self) -> None:
        self._check_shared()
        while not self._stop.is_set():
            try:
                self._scan()
                break
            except Exception:  # noqa: BLE001 - storage not reachable yet: jobs wait, requests still answer
                log.exception("fine-tuning jobs: reading %s failed; retrying", self.store.root)
                self._stop.wait(max(self.cfg.poll_interval_s, 5))
        while not self._stop.is_set():
            try:
                held = self.lease.hold()
            except Exception:  # noqa: BLE001 - storage trouble: try again at the next poll
                log.exception("fine-tuning jobs: renewing the lease in %s failed", self.store.root)
                held = False
            if held:
                if time.monotonic() - self._scanned > max(10.0, 5 * self.cfg.poll_interval_s):
                    self._scan()
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
        """A new job, validating its files (the poller moves it along); the job as the API shows it."""
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
        if self.files.refused:
            raise ApiError(503, self.files.refused, code="storage_not_shared")
        other = self.lease.foreign_holder()
        if other is not None:
            raise ApiError(
                503,
                f"serve.finetune.storage_path's namespace {self.cfg.namespace!r} is in use by another live endpoint "
                f"(Ray cluster {other[:16]}): its jobs run on that cluster, so this one takes none. The operator "
                "gives each endpoint sharing a storage path its own serve.finetune.namespace",
                code="namespace_in_use",
            )
        training = self._file(owner, body.training_file, "training_file")
        validation = self._file(owner, body.validation_file, "validation_file") if body.validation_file else None
        copies = training.bytes + (validation.bytes if validation else 0)  # what the job copies next to itself
        stored, quota = self.files.stored_bytes(owner), self.files.cfg.max_stored_bytes_per_key
        if stored + copies > quota:
            raise ApiError(
                429,
                f"storage quota exceeded: this API key stores {stored} bytes of files and fine-tuned models, and "
                f"the job's copy of its files ({copies} bytes) would take it over its quota of {quota} bytes "
                "(serve.finetune.max_stored_bytes_per_key); delete files or fine-tuned models it no longer needs",
                code="quota_exceeded",
                headers={"x-should-retry": "false"},
            )
        hp, job_file = self.resolve(body)
        method = body.method_type()
        shown = {"hyperparameters": hp}
        if method == "reinforcement":
            shown = {"grader": job_file["training"]["rl"]["grader"], "hyperparameters": hp}
        with self._lock:
            everyone = [r for r in self.store.list(EVERY_OWNER, limit=10**6)[0] if r.active]
            if len(everyone) >= self.cfg.max_active_jobs:
                raise ApiError(
                    429,
                    f"this server already has {len(everyone)} fine-tuning jobs validating, queued or running "
                    f"(serve.finetune.max_active_jobs = {self.cfg.max_active_jobs}); retry when one has ended",
                    code="rate_limit_exceeded",
                    headers={"Retry-After": "60"},
                )
            active = [r for r in everyone if r.owner == owner]
            if len(active) >= self.cfg.max_active_jobs_per_key:
                raise ApiError(
                    429,
                    f"this API key already has {len(active)} fine-tuning jobs validating, queued or running "
                    f"(serve.finetune.max_active_jobs_per_key = {self.cfg.max_active_jobs_per_key}); wait for one "
                    f"to end or cancel one ({', '.join(r.id for r in active)})",
                    code="rate_limit_exceeded",
                    headers={"x-should-retry": "false"},
                )
            job_id = new_job_id()
            job = FineTuningJob(
                id=job_id,
                model=body.model,
                created_at=int(time.time()),
                organization_id=f"key-{owner[:12]}",
                status="validating_files",
                validation_file=validation.id if validation else None,
                training_file=training.id,
                hyperparameters=ResolvedHyperparameters.model_validate(hp),
                method={"type": method, method: shown},
                seed=job_file["training"]["seed"],
                metadata=body.metadata,
                user_provided_suffix=body.suffix,
            )
            rec = JobRecord(
                owner=owner,
                job=job,
                job_file=job_file,
                files=JobFiles(train=_file_ref(training), eval=_file_ref(validation) if validation else None),
                run_dir=storage.join(self.runs, job_id),
            )
            rec.event(f"Created fine-tuning job: {job_id}")
            rec.event(
                f"Validating training file: {training.id}"
                + (f" and validation file: {validation.id}" if validation else ""),
            )
            self.store.save(rec)
            self._active.add((owner, job_id))
        return _shown(rec)

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
        and run, which come later); a 400 naming the field for values the template's workers cannot take, and for a
        reinforcement job's grader or hyperparameters that this server cannot honour."""
        from pydantic import ValidationError

        given = body.hyperparameters_given()
        where = body.hyperparameters_field()
        kind = body.method_type()
        dpo, rl = kind == "dpo", kind == "reinforcement"
        grader = None
        if rl:
            assert body.method is not None and body.method.reinforcement is not None  # Method's own check
            grader = body.method.reinforcement.grader
            self.check_grader(grader, "method.reinforcement.grader")
        job = copy.deepcopy(self.cfg.job)
        training = job.setdefault("training", {})
        rl_template = training.pop("rl", None) or {}  # the template's sampling of reinforcement jobs
        if dpo or rl:  # a preference pair, a prompt: each is one row of its own (packing does not apply)
            job.setdefault("data", {})["packing"] = False
        template = template_job(job)
        t = template.training
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
            assert isinstance(given, DpoHyperparameters)  # what hyperparameters_given gives for method dpo
            training["objective"] = "dpo"
            beta = t.dpo.beta if given.beta == "auto" else float(given.beta)
            training["dpo"] = dict(training.get("dpo") or {}) | {"beta": beta}
        elif rl:
            assert isinstance(given, ReinforcementHyperparameters) and grader is not None
            training["objective"] = "grpo"
            job["data"]["format"] = "prompt"  # every row is a prompt to sample answers to
            for field in ("eval_interval", "eval_samples"):
                if getattr(given, field) != "auto" and not body.validation_file:
                    raise ApiError(
                        400,
                        f"{field} {getattr(given, field)} cannot be honoured: evaluations sample answers to the "
                        "held-out prompts of validation_file, and this job has none; give a validation_file or "
                        f"leave {field} out",
                        param=f"{where}.{field}",
                    )
            if given.eval_interval != "auto":
                training["eval_every_steps"] = given.eval_interval
            eval_samples = RlConfig.model_validate(rl_template | {"grader": PLACEHOLDER_GRADER}).eval_samples
            eval_samples = eval_samples if given.eval_samples == "auto" else given.eval_samples
            training["rl"] = rl_template | {"grader": grader, "eval_samples": eval_samples}
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
        if rl:
            hp["eval_interval"] = training.get("eval_every_steps", t.eval_every_steps)  # 0: only after the last step
            hp["eval_samples"] = training["rl"]["eval_samples"]
        return hp, job

    def check_grader(self, spec: dict, where: str = "grader"):
        """The grader of a reinforcement job or a /graders request, parsed (rayft.training.graders), or a 400
        naming each field at fault: python graders only where serve.finetune.python_graders allows them, and no
        score_model grader (nothing here reaches a grading model: each of its scores would be a failure)."""
        from rayft.training.graders import GraderError, parse_grader

        try:
            grader = parse_grader(
                spec, allow_python=self.cfg.python_graders, where=where, python_setting="serve.finetune.python_graders"
            )
            refused = [
                f"{at}.type: score_model graders are not supported here: neither this endpoint nor its jobs reach "
                "a grading model, so every score would be a failure; use string_check, text_similarity, multi"
                + (" or python" if self.cfg.python_graders else "")
                for at in graders_of_type(spec, "score_model", where)
            ]
            if refused:
                raise GraderError(refused)
        except GraderError as e:
            raise ApiError(
                400, f"invalid grader: {e}", param=e.problems[0].split(": ", 1)[0], code="invalid_grader"
            ) from None
        return grader

    def get(self, viewer: str | None, job_id: str) -> dict:
        return _shown(self.store.get(viewer, job_id))

    def list(self, viewer: str | None, after: str | None, limit: int) -> dict:
        recs, more = self.store.list(viewer, after, limit)
        return {"object": "list", "data": [_shown(r) for r in recs], "has_more": more}

    def cancel(self, viewer: str | None, job_id: str) -> dict:
        with self._lock:
            rec = self.store.get(viewer, job_id)
            status = rec.job.status
            if not rec.active:
                raise ApiError(
                    400,
                    f"job {job_id} has ended ({status}); only a job that has not ended can be cancelled",
                    param="fine_tuning_job_id",
                    code="job_not_cancellable",
                )
            self.store.mark_cancelled(rec.owner, job_id)  # first: no other writer's copy can undo it
            rec.cancel_requested = True
            self._end(rec, "cancelled")
            rec.event("Fine-tuning job cancelled" + (": its Ray job is being stopped" if rec.ray_job_id else ""))
            self.store.save(rec)
            ray_job = rec.ray_job_id
        if ray_job:
            try:
                self.client().stop_job(ray_job)
            except Exception as e:  # noqa: BLE001 - the job stays cancelled; the poller tries again
                log.warning("fine-tuning job %s: stopping Ray job %s failed: %s", job_id, ray_job, e)
        return _shown(rec)

    def events(self, viewer: str | None, job_id: str, after: str | None, limit: int) -> dict:
        """The job's events, newest first: its own (status changes, validation) and a line per logged step."""
        rec = self.store.get(viewer, job_id)
        events = [e.model_dump(mode="json") for e in rec.events]
        events += self._step_events(rec)
        events.sort(key=lambda e: e["id"], reverse=True)
        if after:
            events = [e for e in events if e["id"] < after]
        return {"object": "list", "data": events[:limit], "has_more": len(events) > limit}

    def _step_events(self, rec: JobRecord) -> list[dict]:
        if rec.ray_job_id is None:
            return []
        try:
            records = RunDir(rec.run_dir).metrics()
        except Exception:  # noqa: BLE001 - an unreadable run dir shows no steps, not an error
            return []
        total = next((r["total_steps"] for r in records if "total_steps" in r), None)
        out, seen = [], set()
        for r in records:
            if "step" not in r or "time" not in r or not ("loss" in r or "eval_loss" in r or "eval_reward" in r):
                continue
            kind = "e" if "eval_loss" in r or "loss" not in r else "s"
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
                if "reward" in r:  # a reinforcement job: the mean reward of the step's sampled answers
                    data |= {k: r[k] for k in ("reward", "reward_std", "eval_reward") if k in r}
                    message += f", reward={r['reward']:.4f}"
                    if "eval_reward" in r:
                        message += f", validation reward={r['eval_reward']:.4f}"
            elif "eval_loss" in r:
                data = {"step": r["step"], "valid_loss": r["eval_loss"], "total_steps": total}
                message = f"Step {r['step']}{of}: validation loss={r['eval_loss']:.4f}"
            else:  # a reinforcement job's evaluation after its last step: the held-out reward
                data = {"step": r["step"], "eval_reward": r["eval_reward"], "total_steps": total}
                message = f"Step {r['step']}{of}: validation reward={r['eval_reward']:.4f}"
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
        rec = self.store.get(viewer, job_id)
        if rec.ray_job_id is None:
            return {"object": "list", "data": [], "has_more": False, "first_id": None, "last_id": None}
        run = RunDir(rec.run_dir)
        try:
            kept = run.checkpoints()
            records = run.metrics()
        except Exception:  # noqa: BLE001
            kept, records = [], []
        losses = {r["step"]: r["loss"] for r in records if "loss" in r and "step" in r}
        evals = {r["step"]: r["eval_loss"] for r in records if "eval_loss" in r and "step" in r}
        times = {r["step"]: r["time"] for r in records if "step" in r and "time" in r}
        base = rec.job.fine_tuned_model or self.model_name(rec)
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
                "created_at": int(times.get(step, rec.job.created_at)),
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

    def model_name(self, rec: JobRecord) -> str:
        return f"ft:{rec.job.model}:{rec.job.user_provided_suffix or ''}:{rec.job.id}"

    def find_model(self, viewer: str | None, name: str) -> tuple[str, str] | None:
        """(owner, adapter dir) of a succeeded job's fine_tuned_model `name`, or of one of its checkpoints
        (`<model>:ckpt-step-N`, as /checkpoints lists them), that `viewer` may use; None if not."""
        checkpoint = CHECKPOINT_MODEL.match(name)
        if checkpoint:
            return self._checkpoint_model(viewer, checkpoint["model"], int(checkpoint["step"]))
        rec = self._model_record(viewer, name)
        if rec is None:
            return None
        adapter = RunDir(rec.run_dir).adapter()
        assert adapter is not None, f"{rec.run_dir}: a succeeded fine-tuning job's run has no adapter"
        return rec.owner, adapter

    def _model_record(self, viewer: str | None, name: str) -> JobRecord | None:
        """The record of the succeeded job whose fine_tuned_model, not deleted, is `name`, if `viewer` may see it."""
        try:
            rec = self.store.get(viewer, name.rsplit(":", 1)[-1])
        except ApiError:
            return None
        if rec.job.status != "succeeded" or rec.job.fine_tuned_model != name or rec.model_deleted:
            return None
        return rec

    def _checkpoint_model(self, viewer: str | None, model: str, step: int) -> tuple[str, str] | None:
        """A succeeded job's checkpoint at `step` as an adapter: exported once, at its first request, into
        RUNS/<job id>/checkpoint-models/step-N by a Ray task of one CPU (the ingress holds none)."""
        import ray

        from rayft.training.config import TrainJob
        from rayft.training.export import export_checkpoint

        rec = self._model_record(viewer, model)
        if rec is None:
            return None
        run = RunDir(rec.run_dir)
        out = run.join("checkpoint-models", f"step-{step}")
        if not is_adapter(out):
            kept = dict(run.checkpoints())
            if step not in kept:
                return None
            job = TrainJob.model_validate(run.read_job())
            job = job.model_copy(update={"export": job.export.model_copy(update={"merge": False})})
            ray.get(ray.remote(num_cpus=1)(export_checkpoint).remote(kept[step], job, out))
        return rec.owner, out

    def models(self, viewer: str | None) -> list[tuple[str, str]]:
        """(fine_tuned_model, owner) of every succeeded job `viewer` may use whose model was not deleted, by name."""
        out = []
        for job_id, owner in self.store.ids(viewer):
            rec = self.store._read(owner, job_id)
            if rec and rec.job.status == "succeeded" and rec.job.fine_tuned_model:
                if not rec.model_deleted:
                    out.append((rec.job.fine_tuned_model, owner))
        return sorted(out)

    def delete_model(self, viewer: str | None, name: str) -> dict:
        """DELETE /v1/models/{fine_tuned_model}: the model's run (adapter, checkpoints) and the job's copies of its
        files are removed; the job stays listed, as OpenAI's does. A 404 for anyone but its owner (or an admin)."""
        job_id = name.rsplit(":", 1)[-1]
        with self._lock:
            rec = self._model_record(viewer, name)
            if rec is None:
                raise ApiError(
                    404,
                    f"model {name!r} does not exist: no fine-tuning job of this API key has produced it",
                    param="model",
                    code="model_not_found",
                )
            rec.model_deleted = True
            rec.event(f"Fine-tuned model deleted: {name}")
            self.store.save(rec)
        storage.remove(rec.run_dir)
        folder = self.store.dir(rec.owner, job_id)
        for copy_name in COPIES:
            storage.remove(storage.join(folder, copy_name))
        self.files.charge(rec.owner, job_id, None)
        return {"id": name, "object": "model", "deleted": True}

    # ---------------------------------------------------------------- moving a job along

    def client(self):
        """A Ray Jobs API client (rayft.training.launch: with the cluster's auth token when one is found):
        serve.finetune.ray_address, else the dashboard of the cluster this runs on."""
        if self._client is None:
            address = self.cfg.ray_address
            if not address:
                import ray
                import ray._private.worker

                url = ray._private.worker.get_dashboard_url() if ray.is_initialized() else None
                if not url:
                    raise RuntimeError(
                        "fine-tuning jobs run through Ray's Jobs API, and the cluster this endpoint runs on has no "
                        "dashboard: start Ray with its dashboard (ray start --head --include-dashboard=true) or "
                        "set serve.finetune.ray_address"
                    )
                address = url if "://" in url else f"http://{url}"
            self._client = launch.client(address)
        return self._client

    def _advance(self, owner: str, job_id: str) -> None:
        rec = self.store._read(owner, job_id)
        if rec is None or rec.job.status not in ACTIVE:
            if rec is not None and rec.cancel_requested and rec.ray_job_id:
                self._make_sure_stopped(rec)
            self._active.discard((owner, job_id))
            return
        if rec.job.status == "validating_files":
            try:
                self._validate_and_submit(rec)
            except Exception as e:  # noqa: BLE001 - not the data's fault (storage, the cluster): a few more tries
                self._validation_trouble(owner, job_id, e)
        else:
            self._follow(rec)

    def _validation_trouble(self, owner: str, job_id: str, e: Exception) -> None:
        """Validating a job's files failed for a reason that is not its rows' (storage, a copy cut off): tried
        again at the next polls, VALIDATION_TRIES times in all, then the job fails with the reason."""
        log.warning("fine-tuning job %s: validating its files failed: %r", job_id, e)
        with self._lock:
            rec = self.store._read(owner, job_id)
            if rec is None or rec.job.status != "validating_files":
                return
            rec.validation_tries = rec.validation_tries + 1
            if rec.validation_tries < VALIDATION_TRIES:
                self.store.save(rec)
                return
            message = f"validating the files failed {VALIDATION_TRIES} times, not for their rows: {e}"[:2000]
            rec.event(f"Job failed: {message}", "error")
            self._fail(rec, "validation_failed", message, None)

    def _make_sure_stopped(self, rec: JobRecord) -> None:
        """A cancelled job's Ray job, stopped for sure (a stop request can be lost with a restarting endpoint)."""
        ray_job = rec.ray_job_id
        assert ray_job is not None  # only a job that went to the cluster has one to stop
        try:
            c = self.client()
            if str(c.get_job_status(ray_job)) in ("PENDING", "RUNNING"):
                c.stop_job(ray_job)
                return  # looked at again at the next poll
        except Exception as e:  # noqa: BLE001
            log.warning("fine-tuning job %s: stopping its Ray job failed: %s", rec.job.id, e)
            return
        self._active.discard((rec.owner, rec.job.id))

    def _validate_and_submit(self, rec: JobRecord) -> None:
        job_id = rec.job.id
        folder = self.store.dir(rec.owner, job_id)
        problems, counts = [], {}
        for split, name in (("train", "train.jsonl"), ("eval", "validation.jsonl")):
            ref = rec.files.train if split == "train" else rec.files.eval
            if ref is None:
                continue
            param = "training_file" if split == "train" else "validation_file"
            try:
                f = self.files.get(rec.owner, ref.id)
            except ApiError:
                problems.append((param, f"{param} {ref.id} was deleted before the job could read it"))
                continue
            method = METHODS[rec.job_file["training"].get("objective", "sft")]
            rows, bad = copy_checked_rows(
                self.files, f, storage.join(folder, name), method=method, max_line_bytes=self.cfg.max_line_bytes
            )
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
        batch = rec.job_file["training"]["global_batch_size"]
        if not problems and counts.get("train", 0) < batch:
            problems.append((
                "training_file",
                f"training_file has {counts['train']} rows, fewer than one optimizer step takes (batch_size "
                f"{batch}); add rows or ask for a smaller batch_size",
            ))  # fmt: skip
        with self._lock:
            fresh = self.store._read(rec.owner, job_id)
            if fresh is None or fresh.job.status != "validating_files":  # cancelled meanwhile
                return
            rec = fresh
            if problems:
                param, message = problems[0]
                message = "\n".join(m for _, m in problems)
                rec.event(f"Validation failed: {message}", "error")
                self._fail(rec, "invalid_file", message, param)
                return
            copies = [storage.join(folder, n) for n in COPIES]
            copied = sum(storage.size(c) for c in copies if storage.exists(c))
            self.files.charge(rec.owner, job_id, copied)
            summary = ", ".join(f"{n} {'training' if s == 'train' else 'validation'} rows" for s, n in counts.items())
            rec.event(f"Files validated: {summary}")
            job = rec.job_file
            job.setdefault("data", {})["train"] = storage.join(folder, "train.jsonl")
            if rec.files.eval:
                job["data"]["eval"] = storage.join(folder, "validation.jsonl")
            job.setdefault("run", {}).update(name=job_id, storage_path=self.runs)
            text = f"# fine-tuning job {job_id}, written by the endpoint's fine-tuning API\n"
            text += _yaml(job)
            storage.write_text(storage.join(folder, JOB_FILE), text)
            ray_job = RAY_JOB_PREFIX + job_id
            try:
                self._submit(ray_job, text, job_id)
            except Exception as e:  # noqa: BLE001 - the cluster would not take it
                rec.event(f"The cluster did not accept the job: {e}", "error")
                self._fail(rec, "submission_failed", f"the Ray cluster did not accept the job: {e}", None)
                return
            rec.ray_job_id = ray_job
            rec.job.status = "queued"
            rec.event(f"Fine-tuning job queued as Ray job {ray_job}")
            self.store.save(rec)

    def _submit(self, ray_job: str, job_yaml: str, job_id: str) -> None:
        """The job file's finetune as a Ray job on the cluster, through rayft.training.launch (as `rayft submit`
        sends one): `python -m rayft.training.run` with the job file inside the entrypoint, so no working directory
        is uploaded and the cluster runs the rayft this endpoint runs. An id already taken is this job, submitted
        before a restart."""
        entrypoint = launch.entrypoint("train", None, job_text=job_yaml, python=shlex.quote(sys.executable))
        try:
            self.client().submit_job(
                entrypoint=entrypoint,
                submission_id=ray_job,
                metadata=launch.metadata("train", job_id, self.runs, rayft_fine_tuning_job=job_id),
                runtime_env=launch.runtime_env(),
                entrypoint_num_cpus=self.cfg.driver_cpus,  # Ray queues a driver until a node has room for it
            )
        except RuntimeError as e:
            if "already exists" not in str(e):
                raise

    def _follow(self, rec: JobRecord) -> None:
        assert rec.ray_job_id is not None  # queued or running: it went to the cluster
        c = self.client()
        try:
            info = c.get_job_info(rec.ray_job_id)
        except RuntimeError as e:
            if "does not exist" in str(e) or "not found" in str(e).lower():
                with self._lock:
                    fresh = self.store._read(rec.owner, rec.job.id)
                    if fresh is not None and fresh.job.status in ACTIVE:
                        rec = fresh
                        message = (
                            f"its Ray job {rec.ray_job_id} is gone from the cluster (the cluster was restarted or "
                            "its job history was cleared); create the job again"
                        )
                        rec.event(f"Job failed: {message}", "error")
                        self._fail(rec, "job_lost", message, None)
                return
            raise
        status = str(info.status)
        with self._lock:
            fresh = self.store._read(rec.owner, rec.job.id)
            if fresh is None or fresh.job.status not in ACTIVE:
                return
            rec = fresh
            job = rec.job
            if status == "RUNNING" and job.status == "queued":
                job.status = "running"
                rec.event("Fine-tuning job started")
                self.store.save(rec)
            elif status == "SUCCEEDED":
                self._succeed(rec)
            elif status == "FAILED":
                reason, own, succeeded = self._outcome(rec, info.message)
                if succeeded:  # the run ended well, then its driver failed on its way out
                    self._succeed(rec)
                    return
                attempt = rec.attempt
                if own or attempt > self.cfg.job_restarts:
                    rec.event(f"Job failed: {reason}", "error")
                    self._fail(rec, "training_failed", reason, None)
                    return
                # it died rather than failed (a killed driver, a lost node): run it again, from its checkpoint
                ray_job = f"{RAY_JOB_PREFIX}{job.id}-{attempt + 1}"
                text = storage.read_text(storage.join(self.store.dir(rec.owner, job.id), JOB_FILE))
                self._submit(ray_job, text, job.id)
                rec.event(
                    f"Ray job {rec.ray_job_id} died ({reason.splitlines()[0][:300]}); submitted again as {ray_job}, "
                    "resuming from the run's last checkpoint",
                    "warn",
                )
                rec.ray_job_id, rec.attempt = ray_job, attempt + 1
                job.status = "queued"
                self.store.save(rec)
            elif status == "STOPPED":
                message = f"its Ray job {rec.ray_job_id} was stopped outside the fine-tuning API"
                rec.event(f"Job failed: {message}", "error")
                self._fail(rec, "job_stopped", message, None)

    def _succeed(self, rec: JobRecord) -> None:
        run = RunDir(rec.run_dir)
        if not run.adapter():
            message = f"training ended but the run has no LoRA adapter in {run.final}"
            rec.event(f"Job failed: {message}", "error")
            self._fail(rec, "no_adapter", message, None)
            return
        job = rec.job
        job.trained_tokens = int(sum(v for _, v in run.curve("nonpad_tokens")))
        job.fine_tuned_model = self.model_name(rec)
        self._end(rec, "succeeded")
        rec.event(f"New fine-tuned model created: {job.fine_tuned_model}")
        rec.event("The job has successfully completed")
        self.store.save(rec)
        self._register(rec)

    def _register(self, rec: JobRecord) -> None:
        try:
            self.on_model(rec.job.fine_tuned_model, rec.owner, RunDir(rec.run_dir).adapter())
        except Exception:  # noqa: BLE001 - requests still find it through the store
            log.exception("fine-tuning job %s: serving its adapter failed", rec.job.id)

    def _outcome(self, rec: JobRecord, message: str | None) -> tuple[str, bool, bool]:
        """Why a job's Ray job failed, from the run's status.json (rayft.training.run_dir), never from its log:
        (reason, whether `rayft train` itself failed the run, whether the run in fact succeeded).
        Failed with an error kind (data, model, training, storage, ...): rayft's verdict, the same on any
        attempt, so the job fails with its message. No status, "running", or failed without a kind (a crash, an
        interruption): the driver died or was lost, and the job runs again from its checkpoint; Ray's message
        (its exit code, the log's last lines) and the crash's own say what happened. A storage that cannot be
        read raises, so the job is looked at again at the next poll rather than judged on nothing."""
        status = RunDir(rec.run_dir).status()
        state = status["state"] if status else None
        if state == "failed" and status and status.get("error_kind"):
            return f"{status['error_kind']} error: {status.get('message') or ''}".strip()[:2000], True, False
        if state == "succeeded":
            return "", False, True
        reason = (message or "the Ray job failed").strip()
        if state == "failed" and status and status.get("message"):
            reason = f"{status['message']}\n{reason}"
        return reason[:2000], False, False

    def _end(self, rec: JobRecord, status: Ended) -> None:
        rec.job.status = status
        rec.job.finished_at = int(time.time())
        try:
            self._settle_storage(rec, status)
        except Exception:  # noqa: BLE001 - the job's end stands; its usage is settled again at the next end
            log.exception("fine-tuning job %s: settling what it stores failed", rec.job.id)

    def _settle_storage(self, rec: JobRecord, status: Ended) -> None:
        """What an ended job keeps, counted against its key's quota: the job's copies of its files go (training is
        over); a job that did not succeed also drops its checkpoints (nothing can resume it), keeping its
        metrics; what is left of the run (a succeeded job's adapter and checkpoints) is charged until the model is
        deleted."""
        folder = self.store.dir(rec.owner, rec.job.id)
        for name in COPIES:
            storage.remove(storage.join(folder, name))
        run = rec.run_dir
        if status != "succeeded":
            for checkpoint in RunDir(run).checkpoint_dirs():
                storage.remove(checkpoint)
        kept = sum(storage.size(f) for f in storage.find_files(run)) if storage.exists(run) else 0
        self.files.charge(rec.owner, rec.job.id, kept or None)

    def _fail(self, rec: JobRecord, code: str, message: str, param: str | None) -> None:
        rec.job.error = JobError(code=code, message=message, param=param)
        self._end(rec, "failed")
        self.store.save(rec)
        self._active.discard((rec.owner, rec.job.id))


class Lease:
    """One holder at a time for a namespace's jobs: {holder, cluster, expires} in storage, renewed at every poll
    and handed back when the replica stops. Storage offers no compare-and-swap, so a take is written, then read
    back after a moment: of two replicas taking a free lease at once, the last writer holds it and the other sees
    that. A lease is taken over once it expires (its holder died without handing it back)."""

    def __init__(self, path: str, cluster: str, cfg: FinetuneConfig):
        self.path, self.cluster = path, cluster
        self.holder = f"{cluster[:16]}-{secrets.token_hex(6)}"
        self.ttl_s = max(15.0, 6 * cfg.poll_interval_s)
        self.settle_s = min(1.0, cfg.poll_interval_s)
        self.held = False

    def _read(self) -> dict | None:
        try:
            return json.loads(storage.read_text(self.path))
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def _write(self) -> None:
        storage.write_text(
            self.path, json.dumps({"holder": self.holder, "cluster": self.cluster, "expires": time.time() + self.ttl_s})
        )

    def hold(self) -> bool:
        """Renew the lease if this replica holds it, take it if it is free or expired; whether it is held now."""
        now = self._read()
        if now is not None and now.get("holder") == self.holder:
            self._write()
            self.held = True
            return True
        if now is not None and now.get("expires", 0) > time.time():
            if self.held:
                log.warning("fine-tuning jobs: the lease went to %s; this replica stops polling", now.get("holder"))
            self.held = False
            return False
        self._write()
        time.sleep(self.settle_s)
        after = self._read()
        self.held = after is not None and after.get("holder") == self.holder
        if self.held:
            log.info("fine-tuning jobs: this replica (%s) now follows the namespace's jobs", self.holder)
        return self.held

    def foreign_holder(self) -> str | None:
        """The cluster of a live holder on another Ray cluster, if there is one (not this endpoint's replicas)."""
        now = self._read()
        if now is None or now.get("expires", 0) <= time.time() or now.get("cluster") == self.cluster:
            return None
        return str(now.get("cluster"))

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        try:
            now = self._read()
            if now is not None and now.get("holder") == self.holder:
                storage.remove(self.path)
        except Exception:  # noqa: BLE001 - it runs out on its own
            log.warning("fine-tuning jobs: handing back the lease in %s failed; it expires in %.0f s", self.path,
                        self.ttl_s)  # fmt: skip


def graders_of_type(spec: dict, kind: str, where: str = "grader") -> list[str]:
    """Where the graders of type `kind` are in a (parsed, so well-formed) grader object: its own path, or its
    multi grader's graders'."""
    if spec.get("type") == kind:
        return [where]
    graders = spec.get("graders") if spec.get("type") == "multi" else None
    if not isinstance(graders, dict):
        return []
    if isinstance(graders.get("type"), str):  # the SDK's form: one grader object
        return graders_of_type(graders, kind, f"{where}.graders")
    children = [(g, f"{where}.graders.{k}") for k, g in graders.items() if isinstance(g, dict)]
    return [at for g, path in children for at in graders_of_type(g, kind, path)]


def _file_ref(f: StoredFile) -> FileRef:
    return FileRef(id=f.id, filename=f.filename)


def _shown(rec: JobRecord) -> dict:
    """The job as the API answers with it (FineTuningJob)."""
    return rec.job.model_dump(mode="json")


def _yaml(job: dict) -> str:
    import yaml

    return yaml.safe_dump(job, sort_keys=False)


METHODS = {"sft": "supervised", "dpo": "dpo", "grpo": "reinforcement"}  # training.objective -> the API's method
NOT_A_PAIR = (
    "not a preference pair: a dpo job trains on rows {input: {messages}, preferred_output, non_preferred_output} "
    "(or {prompt, chosen, rejected})"
)
A_PAIR = "a preference pair: train on pairs with method {type: dpo}"
A_PROMPT = (
    "a prompt row with no answer to learn: train on prompts with method {type: reinforcement} and a grader, or give "
    "supervised rows ({messages} ending in the assistant's answer, or prompt+completion)"
)
PROMPT_ROWS = (
    "a reinforcement job trains on prompt rows: {messages} ending in the user turn the model answers (or {prompt}), "
    "plus the fields its grader reads (e.g. reference_answer)"
)


def check_row(row, method: str) -> None:
    """One parsed row of a job's file checked with rayft's row checks (the formats `rayft train` reads) for the
    job's method: supervised rows, preference pairs (dpo) or prompt rows (reinforcement). Raises RowError, saying
    what the row is when it is another method's."""
    from rayft.training.formats import RowError, detect_format, normalize

    if method == "reinforcement":
        try:
            other = detect_format(row) if isinstance(row, dict) else None
        except RowError:
            other = None
        if other == "preference":  # {prompt, chosen, rejected} would pass as a prompt with two grader fields
            raise RowError(f"a preference pair, not a prompt row: {PROMPT_ROWS}; train pairs with method {{type: dpo}}")
        try:
            normalize(row, "prompt")
            return
        except RowError as e:
            problem = e
        last = row["messages"][-1] if other == "messages" and isinstance(row["messages"], list) else None
        if isinstance(last, dict) and last.get("role") == "assistant":
            raise RowError(
                f"a supervised conversation (it ends with the assistant's answer), not a prompt row: {PROMPT_ROWS}; "
                "train conversations with method {type: supervised}"
            )
        raise problem
    try:
        doc = normalize(row)
    except RowError as e:
        try:
            normalize(row, "prompt")
        except RowError:
            raise e from None  # the row's own problem (the first error, not the prompt check's)
        raise RowError(NOT_A_PAIR if method == "dpo" else A_PROMPT) from None
    if (doc["kind"] == "pair") != (method == "dpo"):
        raise RowError(NOT_A_PAIR if method == "dpo" else f"{A_PAIR}, or give supervised rows {{messages}}")


def _lines(chunks, max_bytes: int) -> Iterator[bytes | None]:
    """The lines (with their newline) of a stream of byte chunks, in time linear in its length; None in place of
    a line longer than `max_bytes`, whose bytes are skipped as they arrive rather than held."""
    rest, skipping = bytearray(), False
    for chunk in chunks:
        start = 0
        while True:
            end = chunk.find(b"\n", start)
            if end < 0:
                if not skipping:
                    rest += chunk[start:]
                    if len(rest) > max_bytes:
                        rest.clear()
                        skipping = True
                break
            if skipping:
                yield None
                skipping = False
            else:
                rest += chunk[start : end + 1]
                yield bytes(rest) if len(rest) <= max_bytes + 1 else None
                rest.clear()
            start = end + 1
    if skipping:
        yield None
    elif rest:
        yield bytes(rest)


def copy_checked_rows(
    files: FileStore, f: StoredFile, dest: str, method: str = "supervised", max_line_bytes: int = 8 << 20
) -> tuple[int, list[str]]:
    """Check each line of an uploaded JSONL file with rayft's row checks (check_row, for the job's `method`:
    supervised, dpo or reinforcement) while copying it to `dest`; returns (rows, ["filename:line: problem", ...]).
    A line over `max_line_bytes` is a bad row, never read whole."""
    from rayft.training.formats import RowError, parse_json_line

    rows, bad = 0, []
    with storage.open_output(dest) as out:
        for lineno, line in enumerate(_lines(read_chunks(files.open(f)), max_line_bytes), 1):
            if line is None:
                rows += 1
                bad.append(
                    f"{f.filename}:{lineno}: the line is longer than {max_line_bytes} bytes "
                    "(serve.finetune.max_line_bytes); split the row or shorten it"
                )
                continue
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
                check_row(parse_json_line(text), method)
            except RowError as e:
                bad.append(f"{f.filename}:{lineno}: {e}")
    return rows, bad
