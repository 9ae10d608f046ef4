"""The HTTP ingress: a FastAPI app speaking the OpenAI API in front of the model deployment.

    client ──HTTP──▶ Ingress (API keys and body limit, validation, chat template, token budget, SSE, access log)
                        │  DeploymentHandle, streaming, multiplexed by adapter name
                        ▼
                     LLMServer × N (rayft.serving.model)

Errors leave in OpenAI's shape (rayft.serving.openai_api.ApiError). Imported by the Serve app only (it
loads ray and fastapi at import).
"""

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve

from rayft.serving.openai_api import (
    AdapterRegistration,
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    validation_error,
)
from rayft.serving.spec import ServeSpec, hash_key, validate_adapter
from rayft.training import storage

access_log = logging.getLogger("ray.serve.rayft.access")


class _Guard:
    """API keys on /v1 and /admin routes and the body size limit, checked before any route runs.
    A plain ASGI middleware: Starlette's decorator-style middleware costs milliseconds per request."""

    def __init__(self, app, key_hashes: set[str], limit: int):
        self.app, self.key_hashes, self.limit = app, key_hashes, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        path = scope.get("path", "")
        error = None
        if self.key_hashes and (path.startswith("/v1") or path.startswith("/admin")):
            header = headers.get("authorization", "")
            token = header[7:].strip() if header.lower().startswith("bearer ") else ""
            if not token or not any(hmac.compare_digest(hash_key(token), h) for h in self.key_hashes):
                reason = "missing API key" if not token else "invalid API key"
                error = ApiError(401, f"{reason}: send 'Authorization: Bearer <key>'", code="invalid_api_key")
        size = headers.get("content-length")
        if error is None and size is not None and size.isdigit() and int(size) > self.limit:
            error = ApiError(413, f"request body is {size} bytes; the limit is {self.limit} (serve.max_body_bytes)")
        if error is None:
            return await self.app(scope, receive, send)
        return await JSONResponse(error.body(), status_code=error.status)(scope, receive, send)


def _build_api(ing: "Ingress") -> FastAPI:
    """The FastAPI app of one ingress replica, built at replica start from its settings."""
    api = FastAPI(
        title="rayft",
        description="OpenAI-compatible endpoint for models finetuned with rayft.",
    )
    key_hashes = set(ing.spec.key_hashes)
    limit = ing.cfg.max_body_bytes

    @api.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @api.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError):
        e = validation_error(exc)
        return JSONResponse(e.body(), status_code=e.status)

    @api.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception):
        logging.getLogger("ray.serve.rayft").exception("unexpected error")
        return JSONResponse(ApiError(500, f"internal error ({type(exc).__name__})").body(), status_code=500)

    api.add_middleware(_Guard, key_hashes=key_hashes, limit=limit)

    @api.get("/healthz")
    async def healthz():
        return {"status": "alive"}

    @api.get("/readyz")
    async def readyz():
        return await ing.readyz()

    @api.get("/v1/models")
    async def models():
        return ing.models()

    @api.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        ing._adapter_for(model_id)
        return ing._model_card(model_id)

    @api.post("/admin/adapters")
    async def add_adapter(body: AdapterRegistration):
        return ing.add_adapter(body)

    @api.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest):
        return await ing.chat_completions(body)

    @api.post("/v1/completions")
    async def completions(body: CompletionRequest):
        return await ing.completions(body)

    return api


@serve.deployment(name="ingress")
@serve.ingress()
class Ingress:
    """The OpenAI API over the model deployment: one replica, no CPUs of its own (it only tokenizes)."""

    def __init__(self, spec: ServeSpec, model):
        from ray.serve import metrics
        from transformers import AutoConfig, AutoTokenizer

        self.cfg = spec.serve
        self.spec = spec
        self.model = model
        self.name = spec.model_name
        self.created = int(time.time())
        local = storage.cached(spec.model_path)  # a model in cloud storage: the node's copy
        self.tokenizer = AutoTokenizer.from_pretrained(local, revision=spec.revision)
        config = AutoConfig.from_pretrained(local, revision=spec.revision)
        self.context = int(getattr(config, "max_position_embeddings", 2048) or 2048)
        self.adapters: dict[str, str] = dict(spec.adapters)  # grows with /admin/adapters
        self.adapter_roots: list[str] = list(spec.adapter_roots)
        self.ready = False
        tags = ("route", "status")
        self.m_requests = metrics.Counter(
            "rayft_requests", description="HTTP requests by route and status.", tag_keys=tags
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

    def __serve_build_asgi_app__(self):
        return _build_api(self)

    # ---------------------------------------------------------------- probes and listing

    async def readyz(self):
        if not self.ready:
            try:  # one tiny generation proves a model replica is loaded and answering
                await asyncio.wait_for(self._collect(self._request([self.tokenizer.eos_token_id or 0], 1), None), 30)
                self.ready = True
            except Exception as e:  # noqa: BLE001 - any failure means "not ready"
                return JSONResponse({"status": "loading", "detail": type(e).__name__}, status_code=503)
        return {"status": "ready", "model": self.name}

    def models(self):
        ids = [self.name] + [f"{self.name}:{a}" for a in sorted(self.adapters)]
        return {"object": "list", "data": [self._model_card(i) for i in ids]}

    def _model_card(self, model_id: str) -> dict:
        return {"id": model_id, "object": "model", "created": self.created, "owned_by": "rayft"}

    # ---------------------------------------------------------------- adapters

    def add_adapter(self, body: AdapterRegistration):
        name, path = body.name, body.path
        try:
            self.adapters[name] = validate_adapter(
                name, path, self.adapter_roots, self.spec.model_path, self.spec.revision
            )
        except ValueError as e:
            raise ApiError(400, str(e), param="path") from None
        return {"name": name, "model": f"{self.name}:{name}", "path": self.adapters[name]}

    def _adapter_for(self, model: str | None) -> str | None:
        """The adapter a request's `model` names: None for the served model itself; 404 if unknown."""
        if model in (None, "", self.name):
            return None
        name = model[len(self.name) + 1 :] if model.startswith(self.name + ":") else model
        if name in self.adapters:
            return name
        known = ", ".join([self.name] + [f"{self.name}:{a}" for a in sorted(self.adapters)])
        raise ApiError(
            404, f"model {model!r} does not exist; this server has: {known}", param="model", code="model_not_found"
        )

    # ---------------------------------------------------------------- completions

    async def chat_completions(self, body: ChatCompletionRequest):
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
        try:
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        except Exception as e:  # noqa: BLE001 - a template that rejects this conversation
            raise ApiError(400, f"messages: the model's chat template rejected them: {e}", param="messages") from None
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return await self._complete(body, list(ids), chat=True, route="chat")

    async def completions(self, body: CompletionRequest):
        ids = self.tokenizer(body.prompt, add_special_tokens=True)["input_ids"]
        return await self._complete(body, ids, chat=False, route="completions")

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
        asked = body.wanted_tokens()
        if asked is not None and asked > self.cfg.max_tokens_limit:
            raise ApiError(
                400,
                f"max_tokens is {asked}; this server allows at most {self.cfg.max_tokens_limit}",
                param="max_tokens",
            )
        room = self.context - n_prompt
        if asked is not None and asked > room:
            raise ApiError(
                400,
                f"the prompt ({n_prompt} tokens) plus max_tokens ({asked}) exceeds this model's "
                f"context of {self.context} tokens; lower max_tokens to {room} or less",
                param="max_tokens",
                code="context_length_exceeded",
            )
        return min(asked or self.cfg.default_max_tokens, room)

    async def _complete(self, body, ids: list[int], chat: bool, route: str):
        t0 = time.perf_counter()
        status = 200
        adapter = None
        usage = {"prompt_tokens": len(ids), "completion_tokens": 0}
        try:
            adapter = self._adapter_for(body.model)
            request = self._request(ids, self._budget(body, len(ids)), body, adapter)
            rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
            model_id = body.model or self.name
            if body.stream:
                stream = self._stream(request, rid, model_id, chat, body.include_usage(), t0, usage, route)
                return StreamingResponse(stream, media_type="text/event-stream")
            text, finish, usage, batch = await self._collect(request, t0)
            body_out = self._final_body(rid, model_id, chat, text, finish, usage)
            return JSONResponse(body_out, headers={"x-rayft-batch-size": str(batch)})
        except ApiError as e:
            status = e.status
            raise
        finally:
            if not body.stream or status != 200:
                self._account(route, status, t0, usage, adapter, body)

    def _account(self, route, status, t0, usage, adapter, body, ttft=None):
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
        access_log.info(
            "route=%s status=%d latency_ms=%.0f prompt_tokens=%d completion_tokens=%d adapter=%s%s",
            route,
            status,
            elapsed * 1000,
            usage.get("prompt_tokens", 0),
            n,
            adapter or "-",
            prompt,
        )

    async def _deltas(self, request: dict, stream: bool = True) -> AsyncIterator[dict]:
        """The model deployment's deltas for one request (one merged delta when not streaming), with its
        failures turned into API errors."""
        from ray.serve.exceptions import BackPressureError

        adapter = request["adapter"]
        path = self.adapters.get(adapter) if adapter else None
        try:
            if stream:
                handle = self.model.options(stream=True, multiplexed_model_id=adapter or "")
                async for d in handle.generate.remote(request, path):
                    yield d
            else:
                yield await self.model.options(multiplexed_model_id=adapter or "").complete.remote(request, path)
        except BackPressureError:
            raise ApiError(
                503, "the server is overloaded: too many requests are queued; retry shortly", code="overloaded"
            ) from None
        except ApiError:
            raise
        except Exception as e:  # noqa: BLE001 - a replica crash or a lost actor: fail fast, never hang
            logging.getLogger("ray.serve.rayft").warning("generation failed: %r", e)
            raise ApiError(
                503,
                f"the model replica failed while generating ({type(e).__name__}); retry the request",
                code="replica_failed",
            ) from None

    async def _collect(self, request: dict, t0: float | None):
        parts, finish, usage = [], "length", {"prompt_tokens": len(request["prompt_ids"]), "completion_tokens": 0}
        batch = 1
        try:
            async with asyncio.timeout(self.cfg.request_timeout_s):
                async for d in self._deltas(request, stream=False):
                    parts.append(d["text"])
                    usage["completion_tokens"] = d["completion_tokens"]
                    batch = max(batch, d["batch_size"])
                    if d["finish_reason"]:
                        finish = d["finish_reason"]
        except TimeoutError:
            raise ApiError(
                504,
                f"generation took longer than {self.cfg.request_timeout_s:g} s (serve."
                "request_timeout_s); lower max_tokens or retry",
                code="timeout",
            ) from None
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        return "".join(parts), finish, usage, batch

    async def _stream(self, request, rid, model_id, chat, include_usage, t0, usage, route):
        status, ttft = 200, None
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
            if chat:
                yield event(chunk(None, None, role=True))
            finish = "length"
            async with asyncio.timeout(self.cfg.request_timeout_s):
                async for d in self._deltas(request):
                    usage["completion_tokens"] = d["completion_tokens"]
                    if ttft is None and d["text"]:
                        ttft = time.perf_counter() - t0
                    if d["text"]:
                        yield event(chunk(d["text"], None))
                    if d["finish_reason"]:
                        finish = d["finish_reason"]
            yield event(chunk(None, finish))
            if include_usage:
                usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
                yield event(head() | {"choices": [], "usage": usage})
        except TimeoutError:
            status = 504
            err = ApiError(504, f"generation took longer than {self.cfg.request_timeout_s:g} s", code="timeout")
            yield event(err.body())
        except ApiError as e:
            status = e.status
            yield event(e.body())
        finally:
            yield "data: [DONE]\n\n"
            self._account(route, status, t0, usage, request["adapter"], None, ttft)

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
