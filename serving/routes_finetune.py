"""The fine-tuning routes: OpenAI's fine-tuning jobs (rayft.serving.finetune.FinetuneService) and graders (running
and validating a reinforcement job's grader), deleting the model a job made, and /admin/adapters, where an admin key
registers a LoRA adapter every key is served. The work is the service's and the Ingress replica's
(rayft.serving.ingress); these routes hand each request over with who called."""

import threading

from fastapi import FastAPI, Query, Request

from rayft.serving.finetune import FinetuneService, graders_of_type
from rayft.serving.http import errors, viewer
from rayft.serving.openai_api import (
    AdapterRegistration,
    ApiError,
    CheckpointList,
    EventList,
    FineTuningJob,
    FineTuningJobCreate,
    FineTuningJobList,
    GraderRunRequest,
    GraderRunResponse,
    GraderValidateRequest,
    GraderValidateResponse,
    ModelDeleted,
)


def adapter_routes(api: FastAPI, ing) -> None:
    """Deleting a fine-tuned model, and registering an adapter every key is served, on the ingress replica `ing`."""

    @api.delete(
        "/v1/models/{model_id:path}",
        response_model=ModelDeleted,
        responses=errors(401, 404, 500, say={404: "No fine-tuned model of this API key by that id."}),
    )
    def delete_model(model_id: str, request: Request):
        """Delete a fine-tuned model (its adapter and run); the job that made it stays listed."""
        if not model_id.startswith("ft:"):
            raise ApiError(
                404, f"model {model_id!r} is not a fine-tuned model of this API key", param="model",
                code="model_not_found",
            )  # fmt: skip
        deleted = ing.finetune.delete_model(viewer(request), model_id)
        ing.forget_fine_tuned(model_id)
        return deleted

    @api.post(
        "/admin/adapters",
        responses=errors(400, 401, 403, 404, 413, say={404: "The path holds no LoRA adapter."}),
    )
    async def add_adapter(body: AdapterRegistration):
        return ing.add_adapter(body)


def job_routes(api: FastAPI, jobs: FinetuneService) -> None:
    """OpenAI's fine-tuning jobs: each key sees only its own jobs (an admin key every key's). The service's calls
    block on storage and the Ray Jobs API, so the routes are sync (FastAPI runs them in threads)."""
    say = {
        400: "Invalid request: the message names the field.",
        404: "No such fine-tuning job for this API key.",
        429: "The key has serve.finetune.max_active_jobs_per_key jobs that have not ended.",
        500: "The storage or the Ray cluster failed.",
        503: "Jobs cannot start here: another cluster's endpoint holds the namespace (namespace_in_use), or the "
        "storage is a local directory other nodes do not see (storage_not_shared).",
    }
    page = {
        "after": Query(None, description="An id from the previous page: return what comes after it."),
        "limit": Query(20, ge=1, le=1000, description="The most items to return."),
    }

    @api.post("/v1/fine_tuning/jobs", response_model=FineTuningJob, responses=errors(400, 401, 429, 500, 503, say=say))
    def create_job(body: FineTuningJobCreate, request: Request):
        """Start a fine-tuning job: a LoRA adapter of the served model, trained on an uploaded file."""
        return jobs.create(request.state.owner, body)

    @api.get("/v1/fine_tuning/jobs", response_model=FineTuningJobList, responses=errors(400, 401, 500, say=say))
    def list_jobs(request: Request, after: str | None = page["after"], limit: int = page["limit"]):
        return jobs.list(viewer(request), after, limit)

    @api.get(
        "/v1/fine_tuning/jobs/{fine_tuning_job_id}",
        response_model=FineTuningJob,
        responses=errors(401, 404, 500, say=say),
    )
    def retrieve_job(fine_tuning_job_id: str, request: Request):
        return jobs.get(viewer(request), fine_tuning_job_id)

    @api.post(
        "/v1/fine_tuning/jobs/{fine_tuning_job_id}/cancel",
        response_model=FineTuningJob,
        responses=errors(400, 401, 404, 500, say=say),
    )
    def cancel_job(fine_tuning_job_id: str, request: Request):
        """Cancel a job that has not ended; its Ray job is stopped."""
        return jobs.cancel(viewer(request), fine_tuning_job_id)

    @api.get(
        "/v1/fine_tuning/jobs/{fine_tuning_job_id}/events",
        response_model=EventList,
        responses=errors(400, 401, 404, 500, say=say),
    )
    def job_events(
        fine_tuning_job_id: str, request: Request, after: str | None = page["after"], limit: int = page["limit"]
    ):
        """The job's events, newest first: status changes, validation, and a line per logged step."""
        return jobs.events(viewer(request), fine_tuning_job_id, after, limit)

    @api.get(
        "/v1/fine_tuning/jobs/{fine_tuning_job_id}/checkpoints",
        response_model=CheckpointList,
        responses=errors(400, 401, 404, 500, say=say),
    )
    def job_checkpoints(
        fine_tuning_job_id: str, request: Request, after: str | None = page["after"], limit: int = page["limit"]
    ):
        """The checkpoints the job's run keeps, newest first."""
        return jobs.checkpoints(viewer(request), fine_tuning_job_id, after, limit)


PYTHON_RUNS = 2  # python graders a replica's /graders/run runs at once (each a sandboxed process); 429 beyond


def grader_routes(api: FastAPI, jobs: FinetuneService) -> None:
    """OpenAI's graders routes (client.fine_tuning.alpha.graders), taking any key like every route: a grader
    checked as a reinforcement job's is (FinetuneService.check_grader), and run on one sample. A python grader
    (only where serve.finetune.python_graders allows it) runs in the sandboxed process of
    rayft.training.grader_sandbox, never in the ingress itself, PYTHON_RUNS at a time. Sync routes: grading
    blocks (FastAPI runs them in threads)."""
    say = {
        400: "An invalid grader, or one this server refuses (python graders while serve.finetune.python_graders is "
        "false, score_model): the message names each field.",
        429: "This replica is already running as many python graders as it runs at once; retry.",
    }
    sandboxes = threading.BoundedSemaphore(PYTHON_RUNS)

    @api.post(
        "/v1/fine_tuning/alpha/graders/run",
        response_model=GraderRunResponse,
        responses=errors(400, 401, 429, 500, say=say),
    )
    def run_grader(body: GraderRunRequest):
        """Grade one model sample against a dataset item: OpenAI's GraderRunResponse (a failed grading scores 0
        and says why in metadata.errors)."""
        from rayft.training.graders import make_sample, run_response

        grader = jobs.check_grader(body.grader)
        sample, item = make_sample(body.model_sample), {} if body.item is None else body.item
        if not graders_of_type(body.grader, "python"):
            return run_response(grader, grader.grade(sample, item))
        if not sandboxes.acquire(blocking=False):
            raise ApiError(
                429,
                f"this server is already running {PYTHON_RUNS} python graders (each in a sandboxed process); retry",
                code="rate_limit_exceeded",
                headers={"Retry-After": "1"},
            )
        try:
            return run_response(grader, grader.grade(sample, item))
        finally:
            sandboxes.release()

    @api.post(
        "/v1/fine_tuning/alpha/graders/validate",
        response_model=GraderValidateResponse,
        responses=errors(400, 401, say=say),
    )
    def validate_grader(body: GraderValidateRequest):
        """Check a grader as a reinforcement job's is checked: the grader back, or a 400 naming each problem."""
        jobs.check_grader(body.grader)
        return {"grader": body.grader}
