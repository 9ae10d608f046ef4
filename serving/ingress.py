"""The HTTP ingress: a FastAPI app speaking the OpenAI API in front of the model deployment.

    client ──HTTP──▶ Ingress (API keys and body limit, validation, chat template, token budget, SSE, access log)
                        │  DeploymentHandle, streaming, multiplexed by adapter name
                        ▼
                     LLMServer × N (rayft.serving.model)

The files of OpenAI's fine-tuning API (/v1/files) stream to and from the store in rayft.serving.files, under the
caller's key. Errors leave in OpenAI's shape (rayft.serving.openai_api.ApiError). Imported by the Serve app only (it
loads ray and fastapi at import).
"""

import asyncio
import hashlib
import json
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from python_multipart.multipart import parse_options_header
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Route

from rayft.serving.files import EVERY_OWNER, LOCAL_OWNER, PURPOSES, FileStore, read_chunks, too_large
from rayft.serving.finetune import FinetuneService, ServedBase
from rayft.serving.openai_api import (
    AdapterRegistration,
    ApiError,
    ChatCompletionRequest,
    CheckpointList,
    CompletionRequest,
    ErrorResponse,
    EventList,
    FileDeleted,
    FileList,
    FileObject,
    FineTuningJob,
    FineTuningJobCreate,
    FineTuningJobList,
    ModelDeleted,
    validation_error,
)
from rayft.serving.spec import KeyRing, NoAdapter, OutsideRoots, ServeSpec, check_bind, hash_key, validate_adapter
from rayft.training import storage

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks

access_log = logging.getLogger("ray.serve.rayft.access")
CANCELLED = 499  # the access log's status of a request whose client left or whose call was cancelled


BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
# Requests whose body the route streams itself, under limits of its own, instead of the guard reading it into
# memory under serve.max_body_bytes: file uploads (serve.finetune.max_file_bytes).
STREAMED_BODIES = frozenset({("POST", "/v1/files")})
# The only routes that answer without a key when the endpoint requires keys: the playground page (it holds no data;
# the key is typed into it) and the health probes. Everything else, /docs and /openapi.json included, needs a key.
OPEN_ROUTES = frozenset({"/", "/playground", "/healthz", "/readyz"})


def route_path(scope) -> str:
    """The path as the app's routes see it: Serve's proxy keeps the application's route prefix (`root_path`, e.g.
    /llm) in `path`, so /llm/v1/files is the route /v1/files. A path outside the prefix is returned whole (no route
    matches it)."""
    path, root = scope.get("path", ""), (scope.get("root_path") or "").rstrip("/")
    if root and (path == root or path.startswith(root + "/")):
        return path[len(root) :] or "/"
    return path


class _Guard:
    """Before any route runs: API keys on every route but OPEN_ROUTES, the admin role on /admin routes, and the
    body size limit, counted as the bytes arrive (a chunked body has no Content-Length to trust). A plain ASGI
    middleware: Starlette's decorator-style middleware costs milliseconds per request.

    It leaves who called in the request's state for the routes: `owner`, the SHA-256 of the caller's key (or
    "local" when the endpoint takes no keys; None on an open route called without a key, which no store accepts),
    and `admin`, whether it is an admin key. Only `admin` widens what a caller sees, never a missing owner."""

    def __init__(self, app, keys: KeyRing, limit: int):
        self.app, self.keys, self.limit = app, keys, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        # Serve's proxy gives every request an id (the client's x-request-id, else a new one), passes it in the
        # request's headers and puts it on the response; the access log records it.
        state = scope.setdefault("state", {})
        state["request_id"] = headers.get("x-request-id") or "-"
        state["owner"], state["admin"] = None if self.keys.required else LOCAL_OWNER, False

        path = route_path(scope)
        error = None
        if self.keys.required and path not in OPEN_ROUTES:
            header = headers.get("authorization", "")
            token = header[7:].strip() if header.lower().startswith("bearer ") else ""
            role = self.keys.role(token)
            if role is None:
                reason = "missing API key" if not token else "invalid API key"
                error = ApiError(401, f"{reason}: send 'Authorization: Bearer <key>'", code="invalid_api_key")
            else:
                state["owner"], state["admin"] = hash_key(token), role == "admin"
                if (path == "/admin" or path.startswith("/admin/")) and role != "admin":
                    error = ApiError(
                        403,
                        "this route changes what every client is served: it takes an admin key "
                        "(serve.admin_keys_file), not a tenant's key",
                        code="admin_key_required",
                    )
        streamed = (scope.get("method"), path) in STREAMED_BODIES
        size = headers.get("content-length")
        if error is None and not streamed and size is not None and size.isdigit() and int(size) > self.limit:
            error = self._too_large(f"{size} bytes")
        if error is None and not streamed and scope.get("method") in BODY_METHODS:
            body = await self._read_body(receive)
            if body is None:  # the client left while sending
                return
            if len(body) > self.limit:
                error = self._too_large(f"over {self.limit} bytes")
            else:
                receive = _replay(body, receive)
        if error is None:
            return await self.app(scope, receive, send)
        response = JSONResponse(error.body(), status_code=error.status, headers=error.headers)
        return await response(scope, receive, send)

    def _too_large(self, size: str) -> ApiError:
        return ApiError(413, f"request body is {size}; the limit is {self.limit} bytes (serve.max_body_bytes)")

    async def _read_body(self, receive) -> bytes | None:
        """The whole body, or its first limit+1 bytes once it is over the limit; None if the client left."""
        chunks, total = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            total += len(chunk)
            chunks.append(chunk)
            if total > self.limit or not message.get("more_body", False):
                return b"".join(chunks)


def _replay(body: bytes, receive):
    """An ASGI receive that hands the app the body already read, then the client's later messages
    (its disconnect, which streaming responses listen for)."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


# ---------------------------------------------------------------------------------------------------- file uploads

# How much of a refused upload (over a limit, a bad purpose) is still read and thrown away, so that a client
# still sending reads the error instead of a reset connection; a body longer than the limit plus this is cut off.
DRAIN_BYTES = 64 << 20
FLUSH_BYTES = 1 << 20  # file bytes gathered before each write to storage (in a thread)
FIELD_BYTES = 4096  # the most a kept form field (purpose) may hold
UPLOAD_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["file", "purpose"],
                "properties": {
                    "file": {"type": "string", "format": "binary", "description": "The file (for fine-tune: JSONL)."},
                    "purpose": {"type": "string", "enum": list(PURPOSES), "description": "What the file is for."},
                },
            }
        }
    },
}


class _UploadForm:
    """python-multipart's callbacks for one POST /v1/files body. The `file` part's bytes are queued as they are
    parsed (the caller stores them and empties the queue); `purpose` is kept; other fields are skipped."""

    KEPT = frozenset({"purpose"})

    def __init__(self):
        self.fields: dict[str, str] = {}
        self.filename = "file"
        self.files = 0
        self.queued: list[bytes] = []
        self.queued_bytes = 0
        self.ended = False
        self._header, self._value, self._disposition = b"", b"", b""
        self._name, self._data = "", bytearray()

    def callbacks(self) -> "MultipartCallbacks":
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": self._header_field,
            "on_header_value": self._header_value,
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
            "on_end": self._end,
        }

    def take(self) -> bytes:
        data = b"".join(self.queued)
        self.queued.clear()
        self.queued_bytes = 0
        return data

    def _part_begin(self) -> None:
        self._disposition, self._name, self._data = b"", "", bytearray()

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._header += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _header_end(self) -> None:
        if self._header.lower() == b"content-disposition":
            self._disposition = self._value
        self._header, self._value = b"", b""

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        if b"name" not in options:
            raise ApiError(400, "a part of the multipart body has no name (Content-Disposition: form-data; name=...)")
        self._name = options[b"name"].decode("utf-8", "replace")
        if self._name == "file":
            self.files += 1
            if self.files > 1:
                raise ApiError(400, "send one file per request", param="file")
            self.filename = options.get(b"filename", b"").decode("utf-8", "replace") or "file"

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._name == "file":
            self.queued.append(data[start:end])
            self.queued_bytes += end - start
        elif self._name in self.KEPT:
            self._data += data[start:end]
            if len(self._data) > FIELD_BYTES:
                raise ApiError(400, f"{self._name} is over {FIELD_BYTES} bytes", param=self._name)

    def _part_end(self) -> None:
        if self._name in self.KEPT:
            self.fields[self._name] = self._data.decode("utf-8", "replace")

    def _end(self) -> None:
        self.ended = True

    def problem(self) -> ApiError | None:
        """What is wrong with the form so far (a purpose that will never do), or, once `done`, what is missing."""
        purpose = self.fields.get("purpose")
        if purpose is not None and purpose not in PURPOSES:
            return ApiError(
                400,
                f"purpose {purpose[:100]!r} is not supported: this server keeps files for fine-tuning only "
                "(purpose=fine-tune)",
                param="purpose",
            )
        return None

    def missing(self) -> ApiError | None:
        """What a complete request still lacks, once the body has ended."""
        if not self.ended:
            return ApiError(400, "the multipart body ended before its closing boundary; send the file again")
        if not self.files:
            return ApiError(400, "the request has no `file` field: send the file's bytes as `file`", param="file")
        if "purpose" not in self.fields:
            return ApiError(400, "the request has no `purpose` field: send purpose=fine-tune", param="purpose")
        return None


async def _receive_upload(request: Request, store: FileStore, owner: str) -> dict:
    """POST /v1/files: the multipart body parsed as it arrives and the file's bytes written to storage in
    FLUSH_BYTES pieces, so no upload is held in memory; a limit broken halfway leaves nothing stored."""
    from python_multipart.exceptions import FormParserError
    from python_multipart.multipart import MultipartParser
    from starlette.requests import ClientDisconnect

    kind, params = parse_options_header(request.headers.get("content-type"))
    if kind != b"multipart/form-data" or not params.get(b"boundary"):
        raise ApiError(400, "send the file as multipart/form-data with the fields `file` and `purpose` (fine-tune)")
    cap = store.cfg.max_file_bytes + DRAIN_BYTES
    size = request.headers.get("content-length", "")
    if size.isdigit() and int(size) > cap:
        raise too_large(store.cfg)
    form = _UploadForm()
    parser = MultipartParser(params[b"boundary"], form.callbacks())
    upload, error, received = None, None, 0
    try:
        try:
            upload = await asyncio.to_thread(store.begin, owner)
        except ApiError as e:  # its quota is already full
            error = e
        async for chunk in request.stream():
            received += len(chunk)
            if error is not None:  # refused: read on (up to the cap) so the client gets the answer; store nothing
                if received > cap:
                    break
                continue
            assert upload is not None  # error stays None only once store.begin has given one
            try:
                parser.write(chunk)
                error = form.problem()
                if error is None and form.queued_bytes >= FLUSH_BYTES:
                    await asyncio.to_thread(upload.write, form.take())
            except ApiError as e:
                error = e
            except FormParserError as e:
                error = ApiError(400, f"the multipart body is malformed: {e}")
            if error is not None:
                await asyncio.to_thread(upload.abort)
        error = error or form.missing()
        if error is not None:
            raise error
        assert upload is not None
        await asyncio.to_thread(upload.write, form.take())
        stored = await asyncio.to_thread(upload.commit, form.filename, form.fields["purpose"])
        return stored.object()
    except ClientDisconnect:
        raise ApiError(400, "the client left before the upload ended; nothing was stored") from None
    finally:
        if upload is not None:
            upload.abort()  # nothing, after a commit


def _errors(*statuses: int, say: dict[int, str] | None = None) -> dict:
    """OpenAPI `responses` for the error statuses a route really answers with (`say`: a route's own reasons)."""
    what = {
        400: "Invalid request: the message names the field.",
        401: "Missing or invalid API key (when the server requires keys).",
        403: "The route takes an admin key (serve.admin_keys_file), or the path lies outside serve.adapter_roots.",
        404: "Unknown model or adapter.",
        413: "Request body over serve.max_body_bytes.",
        429: "Every queue is full; retry after Retry-After seconds.",
        500: "The request failed on the model replica.",
        503: "The model is loading, or its replica failed; retry.",
        504: "Generation took longer than serve.request_timeout_s.",
    } | (say or {})
    return {s: {"model": ErrorResponse, "description": what[s]} for s in statuses}


def _openapi(api: FastAPI, max_tokens_limit: int, job_models: tuple[str, ...] = ()) -> dict:
    """FastAPI's document, made to say what the server really does: bad bodies are 400s in OpenAI's error shape
    (not FastAPI's 422), every response carries x-request-id, 429s carry Retry-After, and completions answer
    text/event-stream when `stream` is true."""
    from fastapi.openapi.utils import get_openapi

    if api.openapi_schema:
        return api.openapi_schema
    doc = get_openapi(title=api.title, version=api.version, description=api.description, routes=api.routes)
    request_id = {"description": "The request's id (the client's x-request-id if it sent one, else a new one).",
                  "schema": {"type": "string"}}  # fmt: skip
    retry = {"description": "Seconds to wait before retrying.", "schema": {"type": "integer"}}
    for path, ops in doc.get("paths", {}).items():
        for op in ops.values():
            responses = op.get("responses", {})
            responses.pop("422", None)
            for status, response in responses.items():
                response.setdefault("headers", {})["x-request-id"] = request_id
                if status == "429":
                    response["headers"]["Retry-After"] = retry
            if path in ("/v1/chat/completions", "/v1/completions") and "200" in responses:
                responses["200"]["content"]["text/event-stream"] = {
                    "schema": {
                        "description": "Server-sent events when stream is true: each `data:` is a chunk object "
                        "(`choices` with the new text, or `usage` last when stream_options.include_usage), or an "
                        "`error` object when the stream failed after it began; the last is `[DONE]`.",
                        "anyOf": [{"type": "object"}, {"type": "string", "enum": ["[DONE]"]}],
                    }
                }
    schemas = doc.get("components", {}).get("schemas", {})
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    for body in ("ChatCompletionRequest", "CompletionRequest"):  # this server's serve.max_tokens_limit
        for field in ("max_tokens", "max_completion_tokens"):
            for option in schemas.get(body, {}).get("properties", {}).get(field, {}).get("anyOf", []):
                if option.get("type") == "integer":
                    option["maximum"] = max_tokens_limit
    if job_models:  # the models this server fine-tunes: the only `model` a job may name
        schemas.get("FineTuningJobCreate", {}).get("properties", {}).get("model", {})["enum"] = list(job_models)
    api.openapi_schema = doc
    return doc


def _build_api(ing) -> FastAPI:
    """The FastAPI app of one ingress replica (`ing`, an Ingress: the name Ingress itself is bound to its
    Serve deployment), built at replica start from its settings."""
    api = FastAPI(
        title="rayft",
        description="OpenAI-compatible endpoint for models finetuned with rayft.",
    )
    api.openapi = lambda: _openapi(api, ing.cfg.max_tokens_limit, ing.finetune.base.ids)

    @api.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @api.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):  # unknown routes, unparsable bodies
        e = ApiError(exc.status_code, str(exc.detail), code="invalid_json" if exc.status_code == 400 else None)
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 405:  # Starlette names the first matching route's methods; a path may have several
            path = request.url.path
            methods = {
                m
                for r in api.routes
                if isinstance(r, Route) and r.methods and r.path_regex.match(path)
                for m in r.methods
            }
            headers["Allow"] = ", ".join(sorted(methods))
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    @api.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError):
        e = validation_error(exc)
        return JSONResponse(e.body(), status_code=e.status)

    @api.exception_handler(storage.StorageError)
    async def _storage_error(_request: Request, exc: storage.StorageError):
        logging.getLogger("ray.serve.rayft").warning("file storage failed: %s", exc)
        e = ApiError(500, f"the file storage (serve.finetune.storage_path) failed: {exc}", code="storage_error")
        return JSONResponse(e.body(), status_code=500)

    @api.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception):
        logging.getLogger("ray.serve.rayft").exception("unexpected error")
        return JSONResponse(ApiError(500, f"internal error ({type(exc).__name__})").body(), status_code=500)

    api.add_middleware(_Guard, keys=ing.keys, limit=ing.cfg.max_body_bytes)
    generation = _errors(400, 401, 404, 413, 429, 500, 503, 504)

    @api.get("/healthz")
    async def healthz():
        return {"status": "alive"}

    @api.get("/readyz", responses=_errors(503))
    async def readyz():
        return await ing.readyz()

    @api.get("/v1/models", responses=_errors(401))
    async def models(request: Request):
        return await asyncio.to_thread(ing.models, _viewer(request))

    @api.get("/v1/models/{model_id:path}", responses=_errors(401, 404))
    async def model(model_id: str, request: Request):
        await ing._adapter_for(model_id, _viewer(request))
        return ing._model_card(model_id)

    @api.delete(
        "/v1/models/{model_id:path}",
        response_model=ModelDeleted,
        responses=_errors(401, 404, 500, say={404: "No fine-tuned model of this API key by that id."}),
    )
    def delete_model(model_id: str, request: Request):
        """Delete a fine-tuned model (its adapter and run); the job that made it stays listed."""
        if not model_id.startswith("ft:"):
            raise ApiError(
                404, f"model {model_id!r} is not a fine-tuned model of this API key", param="model",
                code="model_not_found",
            )  # fmt: skip
        deleted = ing.finetune.delete_model(_viewer(request), model_id)
        ing.forget_fine_tuned(model_id)
        return deleted

    @api.post(
        "/admin/adapters",
        responses=_errors(400, 401, 403, 404, 413, say={404: "The path holds no LoRA adapter."}),
    )
    async def add_adapter(body: AdapterRegistration):
        return ing.add_adapter(body)

    @api.post("/v1/chat/completions", responses=generation)
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        return await ing.chat_completions(body, request.state.request_id, _viewer(request))

    @api.post("/v1/completions", responses=generation)
    async def completions(body: CompletionRequest, request: Request):
        return await ing.completions(body, request.state.request_id, _viewer(request))

    _file_routes(api, ing.files)
    _job_routes(api, ing.finetune)
    _playground_routes(api, ing)
    return api


def _playground_routes(api: FastAPI, ing) -> None:
    """The playground page (rayft.serving.playground) at / and /playground, open like /healthz (it holds no
    data), and under /v1 (behind the keys) the run each served model came from: its eval report and loss curve."""
    from fastapi.responses import HTMLResponse, Response

    from rayft.serving import playground

    @api.get("/", include_in_schema=False)
    @api.get("/playground", include_in_schema=False)
    async def page():
        return HTMLResponse(playground.PAGE, headers=playground.HEADERS)

    async def run_for(model: str, viewer: str | None) -> str | None:
        source = ing.model_source(await ing._adapter_for(model, viewer))
        return await asyncio.to_thread(playground.run_of, source)

    say = {404: "No such model for this key, or no rayft run (or no such file in it) behind it."}

    @api.get("/v1/playground/runs", responses=_errors(401))
    async def runs(request: Request):
        viewer, out = _viewer(request), []
        for card in (await asyncio.to_thread(ing.models, viewer))["data"]:
            run = await run_for(card["id"], viewer)
            if run:
                out.append(await asyncio.to_thread(playground.run_card, card["id"], run))
        return {"object": "list", "data": out}

    async def the_run(model: str, request: Request) -> str:
        run = await run_for(model, _viewer(request))
        if run is None:
            raise ApiError(404, f"model {model!r} was not trained by a rayft run this endpoint can read", param="model")
        return run

    @api.get("/v1/playground/runs/report", responses=_errors(400, 401, 404, say=say))
    async def run_report(request: Request, model: str = Query(..., description="A served model id.")):
        run = await the_run(model, request)
        report = await asyncio.to_thread(playground.read_report, run)
        if report is None:
            raise ApiError(404, f"run {storage.basename(run)} has no eval report yet: rayft eval writes it")
        return report

    @api.get(
        "/v1/playground/runs/loss.png",
        responses=_errors(400, 401, 404, say=say) | {200: {"content": {"image/png": {}}}},
        response_class=Response,
    )
    async def run_loss(request: Request, model: str = Query(..., description="A served model id.")):
        run = await the_run(model, request)
        image = await asyncio.to_thread(playground.read_loss_curve, run)
        if image is None:
            raise ApiError(404, f"run {storage.basename(run)} has no loss.png")
        return Response(image, media_type="image/png")


def _viewer(request: Request) -> str | None:
    """Whose files, jobs and fine-tuned models the caller sees: its own, or EVERY_OWNER's for an admin key (None,
    no key's owner, sees nothing)."""
    return EVERY_OWNER if request.state.admin else request.state.owner


def _file_routes(api: FastAPI, files: FileStore) -> None:
    """OpenAI's files API (the first part of its fine-tuning API): each key sees only the files it uploaded; an
    admin key (serve.admin_keys_file) sees every key's. The store's blocking calls run in threads (sync routes)."""
    say = {
        400: "Invalid request: the message names the field.",
        404: "No such file for this API key.",
        413: "The file is over serve.finetune.max_file_bytes.",
        429: "The key's files would exceed serve.finetune.max_stored_bytes_per_key (code quota_exceeded).",
        500: "The file storage (serve.finetune.storage_path) failed.",
        503: "serve.finetune.storage_path is a local directory other nodes do not see (code storage_not_shared).",
    }

    @api.post(
        "/v1/files",
        response_model=FileObject,
        responses=_errors(400, 401, 413, 429, 500, 503, say=say),
        openapi_extra={"requestBody": UPLOAD_BODY},
    )
    async def create_file(request: Request):
        """Upload a file (multipart/form-data: `file` and `purpose`=fine-tune), streamed to storage."""
        return await _receive_upload(request, files, request.state.owner)

    @api.get("/v1/files", response_model=FileList, responses=_errors(400, 401, 500, say=say))
    def list_files(
        request: Request,
        purpose: str | None = Query(None, description="Only files with this purpose."),
        limit: int = Query(10000, ge=1, le=10000, description="The most files to return."),
        after: str | None = Query(None, description="A file id: return the files after it in this order."),
        order: Literal["asc", "desc"] = Query("desc", description="desc: newest first; asc: oldest first."),
    ):
        found, more = files.list(_viewer(request), purpose, after, limit, order)
        data = [f.object() for f in found]
        first, last = (data[0]["id"], data[-1]["id"]) if data else (None, None)
        return {"object": "list", "data": data, "first_id": first, "last_id": last, "has_more": more}

    @api.get("/v1/files/{file_id}", response_model=FileObject, responses=_errors(401, 404, 500, say=say))
    def retrieve_file(file_id: str, request: Request):
        return files.get(_viewer(request), file_id).object()

    binary = {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}
    content = {"description": "The file's bytes, as uploaded.", "content": binary}

    @api.get(
        "/v1/files/{file_id}/content",
        response_class=StreamingResponse,
        responses={200: content} | _errors(401, 404, 500, say=say),
    )
    def file_content(file_id: str, request: Request):
        f = files.get(_viewer(request), file_id)
        src = files.open(f)  # opened before the response starts: a failure is still a status
        headers = {"content-length": str(f.bytes)}
        return StreamingResponse(read_chunks(src), media_type="application/octet-stream", headers=headers)

    @api.delete("/v1/files/{file_id}", response_model=FileDeleted, responses=_errors(401, 404, 500, say=say))
    def delete_file(file_id: str, request: Request):
        return {"id": files.delete(_viewer(request), file_id).id, "object": "file", "deleted": True}


def _job_routes(api: FastAPI, jobs: FinetuneService) -> None:
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

    @api.post("/v1/fine_tuning/jobs", response_model=FineTuningJob, responses=_errors(400, 401, 429, 500, 503, say=say))
    def create_job(body: FineTuningJobCreate, request: Request):
        """Start a fine-tuning job: a LoRA adapter of the served model, trained on an uploaded file."""
        return jobs.create(request.state.owner, body)

    @api.get("/v1/fine_tuning/jobs", response_model=FineTuningJobList, responses=_errors(400, 401, 500, say=say))
    def list_jobs(request: Request, after: str | None = page["after"], limit: int = page["limit"]):
        return jobs.list(_viewer(request), after, limit)

    @api.get(
        "/v1/fine_tuning/jobs/{fine_tuning_job_id}",
        response_model=FineTuningJob,
        responses=_errors(401, 404, 500, say=say),
    )
    def retrieve_job(fine_tuning_job_id: str, request: Request):
        return jobs.get(_viewer(request), fine_tuning_job_id)

    @api.post(
        "/v1/fine_tuning/jobs/{fine_tuning_job_id}/cancel",
        response_model=FineTuningJob,
        responses=_errors(400, 401, 404, 500, say=say),
    )
    def cancel_job(fine_tuning_job_id: str, request: Request):
        """Cancel a job that has not ended; its Ray job is stopped."""
        return jobs.cancel(_viewer(request), fine_tuning_job_id)

    @api.get(
        "/v1/fine_tuning/jobs/{fine_tuning_job_id}/events",
        response_model=EventList,
        responses=_errors(400, 401, 404, 500, say=say),
    )
    def job_events(
        fine_tuning_job_id: str, request: Request, after: str | None = page["after"], limit: int = page["limit"]
    ):
        """The job's events, newest first: status changes, validation, and a line per logged step."""
        return jobs.events(_viewer(request), fine_tuning_job_id, after, limit)

    @api.get(
        "/v1/fine_tuning/jobs/{fine_tuning_job_id}/checkpoints",
        response_model=CheckpointList,
        responses=_errors(400, 401, 404, 500, say=say),
    )
    def job_checkpoints(
        fine_tuning_job_id: str, request: Request, after: str | None = page["after"], limit: int = page["limit"]
    ):
        """The checkpoints the job's run keeps, newest first."""
        return jobs.checkpoints(_viewer(request), fine_tuning_job_id, after, limit)


@serve.deployment(name="ingress")
@serve.ingress()
class Ingress:
    """The OpenAI API over the model deployment: one replica, no CPUs of its own (it only tokenizes)."""

    def __init__(self, spec: ServeSpec, model):
        from ray.serve import metrics
        from transformers import AutoConfig, AutoTokenizer

        self.cfg = spec.serve
        self.spec = spec
        # Keys: the spec's, plus the key variable and keys file as this replica sees them; a network bind with
        # none refuses to start (unless serve.allow_unauthenticated).
        self.keys = KeyRing(spec)
        check_bind(self.cfg, self.keys.required)
        self.model = model
        self.name = spec.model_name
        self.created = int(time.time())
        local = storage.cached(spec.model_path)  # a model in cloud storage: the node's copy
        self.tokenizer = AutoTokenizer.from_pretrained(local, revision=spec.revision)
        config = AutoConfig.from_pretrained(local, revision=spec.revision)
        self.context = int(getattr(config, "max_position_embeddings", 2048) or 2048)
        start = self.tokenizer.bos_token_id
        self.empty_prompt = [start if start is not None else (self.tokenizer.eos_token_id or 0)]
        self.adapters: dict[str, str] = {}  # name -> adapter dir; grows with /admin/adapters
        self.versions: dict[str, str] = {}  # name -> multiplexed id: name@digest of its path and files
        self.version_paths: dict[str, str] = {}  # multiplexed id -> adapter dir
        for name, path in spec.adapters.items():
            self._set_adapter(name, path)
        self.adapter_roots: list[str] = list(spec.adapter_roots)
        self.files = FileStore(self.cfg.finetune)  # touches storage only when a file route is called
        # Fine-tuned models, a registry of their own that /admin/adapters cannot reach: {fine_tuned_model: (owner,
        # its multiplexed id)}, served to their owner only. Their ids start with "ft:", which no adapter name can.
        self.ft_models: dict[str, tuple[str, str]] = {}
        ft = self.cfg.finetune
        ids = tuple(ft.models) if ft.models is not None else (self.name,)
        base = ServedBase(self.name, spec.model_path, spec.revision, ids)
        self.finetune = FinetuneService(ft, self.files, base, self._serve_fine_tuned)
        self.finetune.start()  # its thread finds the jobs in storage, then follows the live ones
        self.ready = False
        tags = ("route", "status")
        self.m_requests = metrics.Counter(
            "rayft_requests",
            description="HTTP requests by route and status.",
            tag_keys=tags,  # pyright: ignore[reportArgumentType] - Ray annotates it Tuple[str], one key
        )
        self.m_latency = metrics.Histogram(
            "rayft_request_latency_s",
            description="Request latency (s).",
            boundaries=[0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60],
            tag_keys=("route",),
        )
        self.m_ttft = metrics.Histogram(
            "rayft_time_to_first_token_s",
            description="Time to first token (s).",
            boundaries=[0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10],
        )
        self.m_tps = metrics.Histogram(
            "rayft_generated_tokens_per_s",
            description="Generated tokens/s per request.",
            boundaries=[1, 2, 5, 10, 20, 50, 100, 200, 500, 1000],
        )
        self.m_tokens = metrics.Counter("rayft_generated_tokens", description="Completion tokens generated.")

    def __del__(self):
        """Serve's replica shutdown (a redeploy, scale-down, Ctrl-C): the fine-tuning poller stops and hands its
        lease to the next replica, instead of polling beside it."""
        finetune = getattr(self, "finetune", None)
        if finetune is not None:
            finetune.stop()

    def __serve_build_asgi_app__(self):
        return _build_api(self)

    # ---------------------------------------------------------------- probes and listing

    async def readyz(self):
        if not self.ready:
            try:  # one tiny generation proves a model replica is loaded and answering
                await asyncio.wait_for(self._collect(self._request([self.tokenizer.eos_token_id or 0], 1)), 30)
                self.ready = True
            except Exception as e:  # noqa: BLE001 - any failure means "not ready"
                return JSONResponse({"status": "loading", "detail": type(e).__name__}, status_code=503)
        return {"status": "ready", "model": self.name}

    def models(self, viewer: str | None):
        """The served model, its adapters, and the fine-tuned models `viewer` owns (EVERY_OWNER: every key's)."""
        ids = [self.name] + [f"{self.name}:{a}" for a in sorted(self.adapters)]
        cards = [self._model_card(i) for i in ids]
        if self.finetune.base.ids:  # read from the jobs: a model is registered for serving at its first request
            cards += [self._model_card(m, owner) for m, owner in self.finetune.models(viewer)]
        return {"object": "list", "data": cards}

    def model_source(self, version: str | None) -> str | None:
        """Where a served model's weights come from: the model's directory (version None), else the adapter's."""
        if version is None:
            return self.spec.model_path
        return self.version_paths.get(version)

    def _model_card(self, model_id: str, owner: str | None = None) -> dict:
        owner = owner or self.ft_models.get(model_id, ("rayft",))[0]
        return {
            "id": model_id,
            "object": "model",
            "created": self.created,
            "owned_by": owner if owner == "rayft" else f"key-{owner[:12]}",
        }

    # ---------------------------------------------------------------- adapters

    def _version(self, name: str, path: str) -> str:
        """The multiplexed id of `name` served from `path` (a local directory, or a cloud one each model replica
        copies): re-registering the name with another run (or the same directory with new files) gives a new id,
        so no replica keeps serving the old weights it cached under the name."""
        stamp = [path]
        if storage.is_remote(path):
            stamp.append(storage.tree_fingerprint(path))
        else:
            for f in sorted(Path(path).glob("adapter_*")):
                st = f.stat()
                stamp.append(f"{f.name}:{st.st_size}:{st.st_mtime_ns}")
        version = f"{name}@{hashlib.sha256(chr(0).join(stamp).encode()).hexdigest()[:12]}"
        self.version_paths[version] = path
        return version

    def _set_adapter(self, name: str, path: str) -> None:
        """Serve the shared adapter `name` (listed in /v1/models for every key) from `path`."""
        self.versions[name] = self._version(name, path)
        self.adapters[name] = path

    def _serve_fine_tuned(self, model: str, owner: str, path: str) -> None:
        """A succeeded job's adapter, served as `model` to `owner` only (called from the fine-tuning thread). Its
        multiplexed id is ft:<owner>:<job id>@digest, apart from every shared adapter's: model replicas load it
        at its first request, as any adapter."""
        local = storage.cached(path)  # a run in cloud storage: this node's copy, to check it
        validate_adapter("adapter", local, None, self.spec.model_path, self.spec.revision)
        job_id = model.rsplit(":", 1)[-1]
        self.ft_models[model] = (owner, self._version(f"ft:{owner[:16]}:{job_id}", path))

    def forget_fine_tuned(self, model: str) -> None:
        """Stop serving a deleted fine-tuned model (a replica that loaded it evicts it as any adapter, by LRU)."""
        found = self.ft_models.pop(model, None)
        if found is not None:
            self.version_paths.pop(found[1], None)

    def add_adapter(self, body: AdapterRegistration):
        name, path = body.name, body.path
        try:
            checked = validate_adapter(name, path, self.adapter_roots, self.spec.model_path, self.spec.revision)
        except OutsideRoots as e:
            raise ApiError(403, str(e), param="path", code="path_not_allowed") from None
        except NoAdapter as e:
            raise ApiError(404, str(e), param="path", code="adapter_not_found") from None
        except ValueError as e:
            raise ApiError(400, str(e), param="path") from None
        self._set_adapter(name, checked)
        return {"name": name, "model": f"{self.name}:{name}", "path": checked}

    async def _adapter_for(self, model: str | None, viewer: str | None) -> str | None:
        """The multiplexed id of the adapter a request's `model` names: None for the served model itself; 404 if
        unknown. A fine-tuned model (ft:...) is found only for the key that trained it (`viewer`; EVERY_OWNER: an
        admin key)."""
        if model in (None, "", self.name):
            return None
        if model.startswith("ft:"):
            found = self.ft_models.get(model)
            if found is None:  # succeeded where this replica did not see it (another replica, before a restart)
                hit = await asyncio.to_thread(self.finetune.find_model, viewer, model)
                if hit is not None:
                    await asyncio.to_thread(self._serve_fine_tuned, model, *hit)
                    found = self.ft_models.get(model)
            if found is not None and viewer in (EVERY_OWNER, found[0]):
                return found[1]
            raise ApiError(
                404,
                f"model {model!r} does not exist: no fine-tuning job of this API key has produced it (yet)",
                param="model",
                code="model_not_found",
            )
        name = model[len(self.name) + 1 :] if model.startswith(self.name + ":") else model
        if name in self.adapters:
            return self.versions[name]
        known = ", ".join([self.name] + [f"{self.name}:{a}" for a in sorted(self.adapters)])
        raise ApiError(
            404, f"model {model!r} does not exist; this server has: {known}", param="model", code="model_not_found"
        )

    # ---------------------------------------------------------------- completions

    async def chat_completions(self, body: ChatCompletionRequest, request_id: str = "-", viewer: str | None = None):
        from rayft.training.specials import SpecialTokenInContent, encode_chat

        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
        try:
            # The renderer training uses: special-token text in content is escaped, refused or allowed as configured,
            # so the prompt is the tokens the model was trained on.
            ids = encode_chat(self.tokenizer, messages, self.cfg.special_tokens_in_content)
        except SpecialTokenInContent as e:
            raise ApiError(
                400, f"{e}; remove it from the message", param="messages", code="special_token_in_content"
            ) from None
        except Exception as e:  # noqa: BLE001 - a template that rejects this conversation
            raise ApiError(400, f"messages: the model's chat template rejected them: {e}", param="messages") from None
        return await self._complete(body, list(ids) or self.empty_prompt, True, "chat", request_id, viewer=viewer)

    async def completions(self, body: CompletionRequest, request_id: str = "-", viewer: str | None = None):
        prompt = body.prompt
        assert isinstance(prompt, str)  # CompletionRequest._one_prompt takes a list's one prompt out
        ids = self.tokenizer(prompt, add_special_tokens=True)["input_ids"] if prompt else []
        echo = prompt if body.echo else ""
        return await self._complete(body, ids or self.empty_prompt, False, "completions", request_id, echo, viewer)

    def _request(self, ids: list[int], max_tokens: int, body=None, adapter: str | None = None) -> dict:
        return {
            "prompt_ids": ids,
            "max_tokens": max_tokens,
            "temperature": body.temperature if body else 0.0,
            "top_p": body.top_p if body else 1.0,
            "stop": list(body.stop or []) if body else [],
            "seed": body.seed if body else None,
            "adapter": adapter,
        }

    def _budget(self, body, n_prompt: int) -> int:
        if n_prompt >= self.context:
            raise ApiError(
                400,
                f"the prompt is {n_prompt} tokens; this model's context is {self.context} tokens. "
                "Shorten the messages.",
                param="messages",
                code="context_length_exceeded",
            )
        room = self.context - n_prompt
        for field, asked in body.token_limits():  # both, when a client sends both
            if asked > self.cfg.max_tokens_limit:
                raise ApiError(
                    400, f"{field} is {asked}; this server allows at most {self.cfg.max_tokens_limit}", param=field
                )
            if asked > room:
                raise ApiError(
                    400,
                    f"the prompt ({n_prompt} tokens) plus {field} ({asked}) exceeds this model's "
                    f"context of {self.context} tokens; lower {field} to {room} or less",
                    param=field,
                    code="context_length_exceeded",
                )
        return min(body.wanted_tokens() or self.cfg.default_max_tokens, room)

    async def _complete(
        self, body, ids: list[int], chat: bool, route: str, request_id: str, echo: str = "", viewer: str | None = None
    ):
        """`echo`: text returned before the completion (the prompt, for `echo: true`); `viewer`: whose
        fine-tuned models the caller may use (EVERY_OWNER: every key's; None: no key's)."""
        t0 = time.perf_counter()
        status = 200
        adapter = None
        usage = {"prompt_tokens": len(ids), "completion_tokens": 0}
        log = {"route": route, "t0": t0, "usage": usage, "body": body, "request_id": request_id}
        streaming = False
        try:
            adapter = await self._adapter_for(body.model, viewer)
            log["adapter"] = adapter
            request = self._request(ids, self._budget(body, len(ids)), body, adapter)
            rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
            model_id = body.model or self.name
            deadline = asyncio.get_running_loop().time() + self.cfg.request_timeout_s
            if body.stream:
                # The first delta before the response starts: an error until then (a full queue, an unknown
                # adapter, a failed admission) is an HTTP status, not a 200 with an error event.
                deltas = self._deltas(request)
                try:
                    async with asyncio.timeout_at(deadline):
                        first = await anext(deltas, None)
                except BaseException:
                    await deltas.aclose()
                    raise
                stream = self._stream(deltas, first, deadline, rid, model_id, chat, body.include_usage(), log, echo)
                streaming = True
                return StreamingResponse(stream, media_type="text/event-stream")
            text, finish, usage, batch = await self._collect(request, deadline)
            log["usage"] = usage
            body_out = self._final_body(rid, model_id, chat, echo + text, finish, usage)
            return JSONResponse(body_out, headers={"x-rayft-batch-size": str(batch)})
        except TimeoutError:
            status = 504
            raise self._timeout() from None
        except ApiError as e:
            status = e.status
            raise
        except (asyncio.CancelledError, GeneratorExit):
            status = CANCELLED
            raise
        finally:
            if not streaming:
                self._account(status, **log)

    def _timeout(self) -> ApiError:
        return ApiError(
            504,
            f"generation took longer than {self.cfg.request_timeout_s:g} s (serve.request_timeout_s); lower "
            "max_tokens or retry",
            code="timeout",
        )

    def _account(self, status, route, t0, usage, body=None, request_id="-", adapter=None, ttft=None):
        elapsed = time.perf_counter() - t0
        self.m_requests.inc(tags={"route": route, "status": str(status)})
        self.m_latency.observe(elapsed, tags={"route": route})
        n = usage.get("completion_tokens", 0)
        if n:
            self.m_tokens.inc(n)
            self.m_tps.observe(n / max(elapsed, 1e-6))
        if ttft is not None:
            self.m_ttft.observe(ttft)
        prompt = ""
        if self.cfg.log_prompts and body is not None:
            prompt = " prompt=" + json.dumps(getattr(body, "prompt", None) or [m.text() for m in body.messages])
        outcome = "cancelled" if status == CANCELLED else ("ok" if status == 200 else "error")
        access_log.info(
            "route=%s status=%d outcome=%s latency_ms=%.0f prompt_tokens=%d completion_tokens=%d adapter=%s "
            "request_id=%s%s",
            route,
            status,
            outcome,
            elapsed * 1000,
            usage.get("prompt_tokens", 0),
            n,
            adapter or "-",
            request_id,
            prompt,
        )

    async def _deltas(self, request: dict, stream: bool = True) -> AsyncGenerator[dict, None]:
        """The model deployment's deltas for one request (one merged delta when not streaming), with its
        failures turned into API errors. Leaving early (a closed stream, a timeout, a cancelled request) cancels
        the call on the model replica, which takes the request out of its batch at the next token step."""
        from ray.serve.exceptions import BackPressureError

        mux = request["adapter"] or ""
        path = self.version_paths.get(mux) if mux else None
        response, done = None, False
        try:
            if stream:
                response = self.model.options(stream=True, multiplexed_model_id=mux).generate.remote(request, path)
                async for d in response:
                    yield d
            else:
                response = self.model.options(multiplexed_model_id=mux).complete.remote(request, path)
                yield await response
            done = True
        except BackPressureError:
            done = True
            raise ApiError(
                429,
                "the server is at capacity: every replica's queue is full (serve.max_queued_requests); retry after "
                f"{self.cfg.retry_after_s} s",
                code="rate_limit_exceeded",
                headers={"Retry-After": str(self.cfg.retry_after_s)},
            ) from None
        except ApiError:
            done = True
            raise
        except Exception as e:  # noqa: BLE001 - a replica crash or a lost actor: fail fast, never hang
            done = True
            cause = getattr(e, "cause", None)
            if isinstance(cause, ApiError):  # the request's own error, raised on the model replica
                raise ApiError(cause.status, cause.message, cause.param, cause.code, cause.headers) from None
            logging.getLogger("ray.serve.rayft").warning("generation failed: %r", e)
            raise ApiError(
                503,
                f"the model replica failed while generating ({type(e).__name__}); retry the request",
                code="replica_failed",
            ) from None
        finally:
            if response is not None and not done:
                response.cancel()

    async def _collect(self, request: dict, deadline: float | None = None):
        parts, finish, usage = [], "length", {"prompt_tokens": len(request["prompt_ids"]), "completion_tokens": 0}
        batch = 1
        deltas = self._deltas(request, stream=False)
        try:
            async with asyncio.timeout_at(deadline):
                async for d in deltas:
                    parts.append(d["text"])
                    usage["completion_tokens"] = d["completion_tokens"]
                    batch = max(batch, d["batch_size"])
                    if d["finish_reason"]:
                        finish = d["finish_reason"]
        finally:
            await deltas.aclose()
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        return "".join(parts), finish, usage, batch

    async def _stream(
        self, deltas, first, deadline, rid, model_id, chat, include_usage, log, echo=""
    ) -> AsyncIterator[str]:
        """The SSE body. An error after it began arrives as a last `error` event, then `data: [DONE]`; a client
        that leaves ends it at once (the model replica drops the request at its next step)."""
        status, ttft, t0, usage = 200, None, log["t0"], log["usage"]
        obj = "chat.completion.chunk" if chat else "text_completion"

        def event(payload: dict) -> str:
            return f"data: {json.dumps(payload)}\n\n"

        def head() -> dict:
            return {"id": rid, "object": obj, "created": int(time.time()), "model": model_id}

        def chunk(text: str | None, finish: str | None, role: bool = False) -> dict:
            if chat:
                delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
                return head() | {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            return head() | {"choices": [{"index": 0, "text": text or "", "finish_reason": finish}]}

        try:
            try:
                if chat:
                    yield event(chunk(None, None, role=True))
                if echo:
                    yield event(chunk(echo, None))
                finish = "length"
                d = first
                async with asyncio.timeout_at(deadline):
                    while d is not None:
                        usage["completion_tokens"] = d["completion_tokens"]
                        if ttft is None and d["text"]:
                            ttft = time.perf_counter() - t0
                        if d["text"]:
                            yield event(chunk(d["text"], None))
                        if d["finish_reason"]:
                            finish = d["finish_reason"]
                        d = await anext(deltas, None)
                yield event(chunk(None, finish))
                if include_usage:
                    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
                    yield event(head() | {"choices": [], "usage": usage})
            except TimeoutError:
                status = 504
                yield event(self._timeout().body())
            except ApiError as e:
                status = e.status
                yield event(e.body())
            yield "data: [DONE]\n\n"
        except (asyncio.CancelledError, GeneratorExit):  # the client left: no more events
            status = CANCELLED
            raise
        finally:
            await deltas.aclose()
            self._account(status, ttft=ttft, **log)

    @staticmethod
    def _final_body(rid, model_id, chat, text, finish, usage) -> dict:
        obj = "chat.completion" if chat else "text_completion"
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}}
        else:
            choice = {"index": 0, "text": text}
        choice |= {"finish_reason": finish, "logprobs": None}
        head = {"id": rid, "object": obj, "created": int(time.time()), "model": model_id}
        return head | {"choices": [choice], "usage": usage}
