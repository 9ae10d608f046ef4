"""The ingress's HTTP plumbing, apart from any route: the guard every request passes first (API keys, the admin
role, the body size limit), errors in OpenAI's shape (rayft.serving.openai_api.ApiError), the OpenAPI document as
the server really answers, and the app assembled from each resource's routes.

    request ─▶ _Guard (keys, /admin role, body limit) ─▶ a resource's routes:
                  rayft.serving.routes_inference   probes, /v1/models, /v1/chat/completions, /v1/completions
                  rayft.serving.routes_files       /v1/files (uploads streamed to the store)
                  rayft.serving.routes_finetune    /v1/fine_tuning/jobs and alpha/graders, deleting fine-tuned models,
                                                   /admin/adapters
                  rayft.serving.routes_playground  the page at / and /playground, /v1/playground/runs
            ◀─ an ApiError, a bad body, an unknown route, a storage failure: an OpenAI error body

Imported by the Serve app only (it loads fastapi at import).
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Route

from rayft.serving.files import EVERY_OWNER, LOCAL_OWNER
from rayft.serving.openai_api import ApiError, ErrorResponse, validation_error
from rayft.serving.spec import KeyRing, hash_key
from rayft.training import storage

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


def viewer(request: Request) -> str | None:
    """Whose files, jobs and fine-tuned models the caller sees: its own, or EVERY_OWNER's for an admin key (None,
    no key's owner, sees nothing)."""
    return EVERY_OWNER if request.state.admin else request.state.owner


def errors(*statuses: int, say: dict[int, str] | None = None) -> dict:
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


def openapi(api: FastAPI, max_tokens_limit: int, job_models: tuple[str, ...] = ()) -> dict:
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


def build_app(keys: KeyRing, max_body_bytes: int, max_tokens_limit: int, job_models: tuple[str, ...]) -> FastAPI:
    """A FastAPI app with no routes yet: the guard (`keys`, serve.max_body_bytes), OpenAI-shaped errors and the
    OpenAPI document (serve.max_tokens_limit, the models jobs may fine-tune). Each resource's module adds its
    routes to it (on the app itself: FastAPI's included routers would hide the routes from the 405 handler)."""
    api = FastAPI(
        title="rayft",
        description="OpenAI-compatible endpoint for models finetuned with rayft.",
    )
    api.openapi = lambda: openapi(api, max_tokens_limit, job_models)

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

    api.add_middleware(_Guard, keys=keys, limit=max_body_bytes)
    return api
