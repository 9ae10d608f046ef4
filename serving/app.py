"""The Ray Serve application: an HTTP ingress speaking the OpenAI API, and a model deployment.

    client ──HTTP──▶ Ingress (FastAPI: auth, validation, chat template, limits, SSE)
                        │  DeploymentHandle, streaming, multiplexed by adapter name
                        ▼
                     LLMServer × N (autoscaled): @serve.batch → engine.generate, one token per step

Everything the app needs is in one JSON-able `spec` (built by `serving.spec.build_spec`), so the
same app starts from `rayft serve`, from `serve deploy` of an emitted config (`app_builder`), or
from a KubeRay RayService.
"""

import asyncio
import hashlib
import hmac
import itertools
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve

from rayft.serving.config import ServeConfig
from rayft.serving.openai_api import (
    AdapterRegistration,
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    validation_error,
)

access_log = logging.getLogger("ray.serve.rayft.access")


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


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
    key_hashes = set(ing.spec.get("key_hashes", []))
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
        body = {"error": {"message": f"internal error ({type(exc).__name__})", "type": "server_error",
                          "param": None, "code": None}}  # fmt: skip
        return JSONResponse(body, status_code=500)

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


# --------------------------------------------------------------------------- model deployment


@serve.deployment(name="model")
class LLMServer:
    """Holds one engine; batches concurrent requests and streams each one's deltas."""

    def __init__(self, spec: dict):
        from ray.serve import metrics

        from rayft.serving.engine import RunningBatch, TransformersEngine

        cfg = ServeConfig(**spec["serve"])
        self.engine = TransformersEngine(
            spec["model_path"], cfg.dtype, cfg.gpus_per_replica > 0, threads=max(1, int(cfg.cpus_per_replica))
        )
        self.adapter_paths: dict[str, str] = {}
        self.max_batch = cfg.max_batch_size
        self.running = RunningBatch(self.engine)
        self.continuous = self.running.supported()  # else: static batches (run to their end together)
        self._pending: list[tuple] = []  # (key, GenerationRequest) waiting for room in the running batch
        self._where: dict[int, tuple] = {}  # key -> (group, index in group)
        self._keys = itertools.count()
        self._driver = self._wake = None
        self.generate_batch.set_max_batch_size(cfg.max_batch_size)
        self.generate_batch.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)
        engine, paths = self.engine, self.adapter_paths

        async def load_adapter(name: str):  # LRU-cached per replica by serve.multiplexed
            await asyncio.to_thread(engine.load_adapter, name, paths[name])
            return _AdapterSlot(engine, name)

        self._load_adapter = serve.multiplexed(max_num_models_per_replica=cfg.max_adapters_per_replica)(load_adapter)
        self.batch_sizes = metrics.Histogram(
            "rayft_batch_size", description="Requests generated together per batch.", boundaries=[1, 2, 4, 8, 16, 32]
        )

    async def generate(self, request: dict, adapter_path: str | None = None) -> AsyncIterator[dict]:
        from rayft.serving.engine import GenerationRequest

        req = GenerationRequest(**request)
        if req.adapter:
            self.adapter_paths[req.adapter] = adapter_path
            await self._load_adapter(req.adapter)
        async for delta in self.generate_batch(req):
            yield delta

    async def complete(self, request: dict, adapter_path: str | None = None) -> dict:
        """A whole generation as one reply (non-streaming requests: one message back, not one per token)."""
        text, last, batch = [], None, 1
        async for d in self.generate(request, adapter_path):
            text.append(d["text"])
            batch = max(batch, d["batch_size"])
            last = d
        return last | {"text": "".join(text), "batch_size": batch}

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02, max_concurrent_batches=1024)
    async def generate_batch(self, requests: list) -> AsyncIterator[list]:
        """Requests that arrived together join the replica's running batch; yields their deltas."""
        if not self.continuous:
            async for out in self._static_batch(requests):
                yield out
            return
        group = _Group([len(r.prompt_ids) for r in requests])
        for i, r in enumerate(requests):
            key = next(self._keys)
            self._where[key] = (group, i)
            self._pending.append((key, r))
        if self._driver is None or self._driver.done():
            self._wake = asyncio.Event()
            self._driver = asyncio.get_running_loop().create_task(self._drive())
        self._wake.set()
        async for out in group.ticks():
            yield out

    async def _drive(self) -> None:
        """The decode loop: admit waiting requests at each step boundary, step, hand out the deltas."""
        running = self.running
        while True:
            if not len(running) and not self._pending:
                self._wake.clear()
                await self._wake.wait()
                continue
            room = self.max_batch - len(running)
            admit, self._pending = self._pending[:room], self._pending[room:]
            try:
                events = await asyncio.to_thread(running.step, admit)
            except Exception as e:  # noqa: BLE001 - every request in the batch gets the error
                logging.getLogger("ray.serve.rayft").exception("decode step failed")
                for key in running.fail_all() + [k for k, _ in admit]:
                    group, _ = self._where.pop(key)
                    group.fail(e)
                continue
            self.batch_sizes.observe(len(running) or len(events))
            for key, delta in events:
                group, i = self._where[key]
                group.push(i, delta.as_dict())
                if delta.finish_reason:
                    del self._where[key]

    async def _static_batch(self, requests: list) -> AsyncIterator[list]:
        """For models whose KV cache cannot be merged: the batch runs to its end together."""
        self.batch_sizes.observe(len(requests))
        steps = self.engine.generate(requests)
        finished = [False] * len(requests)
        try:
            while not all(finished):
                deltas = await asyncio.to_thread(next, steps, None)
                if deltas is None:
                    return
                out = []
                for i, d in enumerate(deltas):
                    if d is None:
                        out.append(StopIteration)
                        continue
                    out.append(d.as_dict())
                    finished[i] = finished[i] or bool(d.finish_reason)
                yield out
        finally:
            steps.close()

    def info(self) -> dict:
        """This replica's process, device and loaded adapters (for operators and tests)."""
        import os

        return {"pid": os.getpid(), "device": self.engine.device, "adapters": sorted(self.engine.adapters)}

    def check_health(self):
        if self.engine.model is None:
            raise RuntimeError("model not loaded")


class _Group:
    """The requests of one @serve.batch call: buffers each one's deltas between the handler's yields,
    which must carry one entry per request (an empty delta while a request waits for a slot)."""

    def __init__(self, prompt_lengths: list[int]):
        n = len(prompt_lengths)
        self.prompt_lengths = prompt_lengths
        self.buf: list[list[dict]] = [[] for _ in range(n)]
        self.done = [False] * n
        self.event = asyncio.Event()
        self.error: BaseException | None = None

    def push(self, i: int, delta: dict) -> None:
        self.buf[i].append(delta)
        self.event.set()

    def fail(self, error: BaseException) -> None:
        self.error = error
        self.event.set()

    async def ticks(self) -> AsyncIterator[list]:
        while not all(self.done):
            await self.event.wait()
            self.event.clear()
            if self.error is not None:
                raise self.error
            out = []
            for i, deltas in enumerate(self.buf):
                if self.done[i]:
                    out.append(StopIteration)
                    continue
                self.buf[i] = []
                if not deltas:
                    out.append({"text": "", "finish_reason": None, "prompt_tokens": self.prompt_lengths[i],
                                "completion_tokens": 0, "batch_size": 0})  # fmt: skip
                    continue
                merged = dict(deltas[-1])
                merged["text"] = "".join(d["text"] for d in deltas)
                merged["batch_size"] = max(d["batch_size"] for d in deltas)
                self.done[i] = bool(merged["finish_reason"])
                out.append(merged)
            yield out


class _AdapterSlot:
    """What serve.multiplexed caches per adapter; evicting it unloads the adapter's weights."""

    def __init__(self, engine, name: str):
        self.engine, self.name = engine, name

    def __del__(self):
        try:
            self.engine.unload_adapter(self.name)
        except Exception:  # noqa: BLE001 - best effort during eviction or shutdown
            pass


# --------------------------------------------------------------------------- ingress


@serve.deployment(name="ingress")
@serve.ingress()
class Ingress:
    def __init__(self, spec: dict, model):
        from ray.serve import metrics
        from transformers import AutoConfig, AutoTokenizer

        self.cfg = ServeConfig(**spec["serve"])
        self.spec = spec
        self.model = model
        self.name = spec["model_name"]
        self.created = int(time.time())
        self.tokenizer = AutoTokenizer.from_pretrained(spec["model_path"])
        config = AutoConfig.from_pretrained(spec["model_path"])
        self.context = int(getattr(config, "max_position_embeddings", 2048) or 2048)
        self.adapters: dict[str, str] = dict(spec.get("adapters", {}))
        self.adapter_roots: list[str] = list(spec.get("adapter_roots", []))
        self.ready = False
        tags = ("route", "status")
        self.m_requests = metrics.Counter("rayft_requests", description="HTTP requests by route and status.",
                                          tag_keys=tags)  # fmt: skip
        self.m_latency = metrics.Histogram("rayft_request_latency_s", description="Request latency (s).",
                                           boundaries=[0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60],
                                           tag_keys=("route",))  # fmt: skip
        self.m_ttft = metrics.Histogram("rayft_time_to_first_token_s", description="Time to first token (s).",
                                        boundaries=[0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10])  # fmt: skip
        self.m_tps = metrics.Histogram("rayft_generated_tokens_per_s", description="Generated tokens/s per request.",
                                       boundaries=[1, 2, 5, 10, 20, 50, 100, 200, 500, 1000])  # fmt: skip
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
        from rayft.serving.spec import validate_adapter

        name, path = body.name, body.path
        try:
            self.adapters[name] = validate_adapter(name, path, self.adapter_roots, self.spec["model_path"])
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
        raise ApiError(404, f"model {model!r} does not exist; this server has: {known}", param="model",
                       code="model_not_found")  # fmt: skip

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
            raise ApiError(400, f"the prompt is {n_prompt} tokens; this model's context is {self.context} tokens. "
                           "Shorten the messages.", param="messages", code="context_length_exceeded")  # fmt: skip
        asked = body.wanted_tokens()
        if asked is not None and asked > self.cfg.max_tokens_limit:
            raise ApiError(400, f"max_tokens is {asked}; this server allows at most {self.cfg.max_tokens_limit}",
                           param="max_tokens")  # fmt: skip
        room = self.context - n_prompt
        if asked is not None and asked > room:
            raise ApiError(400, f"the prompt ({n_prompt} tokens) plus max_tokens ({asked}) exceeds this model's "
                           f"context of {self.context} tokens; lower max_tokens to {room} or less",
                           param="max_tokens", code="context_length_exceeded")  # fmt: skip
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
            route, status, elapsed * 1000, usage.get("prompt_tokens", 0), n, adapter or "-", prompt,
        )  # fmt: skip

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
            raise ApiError(503, "the server is overloaded: too many requests are queued; retry shortly",
                           code="overloaded") from None  # fmt: skip
        except ApiError:
            raise
        except Exception as e:  # noqa: BLE001 - a replica crash or a lost actor: fail fast, never hang
            logging.getLogger("ray.serve.rayft").warning("generation failed: %r", e)
            raise ApiError(503, f"the model replica failed while generating ({type(e).__name__}); retry the request",
                           code="replica_failed") from None  # fmt: skip

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
            raise ApiError(504, f"generation took longer than {self.cfg.request_timeout_s:g} s (serve."
                           "request_timeout_s); lower max_tokens or retry", code="timeout") from None  # fmt: skip
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        return "".join(parts), finish, usage, batch

    async def _stream(self, request, rid, model_id, chat, include_usage, t0, usage, route):
        status, ttft = 200, None
        obj = "chat.completion.chunk" if chat else "text_completion"

        def event(payload: dict) -> str:
            return f"data: {json.dumps(payload)}\n\n"

        def chunk(text: str | None, finish: str | None, role: bool = False) -> dict:
            base = {"id": rid, "object": obj, "created": int(time.time()), "model": model_id}
            if chat:
                delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
                return base | {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            return base | {"choices": [{"index": 0, "text": text or "", "finish_reason": finish}]}

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
                yield event({"id": rid, "object": obj, "created": int(time.time()), "model": model_id,
                             "choices": [], "usage": usage})  # fmt: skip
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
        created = int(time.time())
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish,
                      "logprobs": None}  # fmt: skip
            return {"id": rid, "object": "chat.completion", "created": created, "model": model_id,
                    "choices": [choice], "usage": usage}  # fmt: skip
        choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
        return {"id": rid, "object": "text_completion", "created": created, "model": model_id,
                "choices": [choice], "usage": usage}  # fmt: skip


# --------------------------------------------------------------------------- building the app


def build_app(spec: dict):
    """The Serve application for a spec (see serving.spec.build_spec)."""
    cfg = ServeConfig(**spec["serve"])
    if cfg.engine == "vllm":
        return build_vllm_app(spec, cfg)
    a = cfg.autoscaling
    model = LLMServer.options(
        autoscaling_config={
            "min_replicas": a.min_replicas,
            "initial_replicas": max(1, a.min_replicas),
            "max_replicas": a.max_replicas,
            "target_ongoing_requests": a.target_ongoing_requests,
            "upscale_delay_s": a.upscale_delay_s,
            "downscale_delay_s": a.downscale_delay_s,
            "look_back_period_s": a.look_back_period_s,
        },
        max_ongoing_requests=cfg.max_ongoing_requests,
        max_queued_requests=cfg.max_queued_requests,
        ray_actor_options={"num_cpus": cfg.cpus_per_replica, "num_gpus": cfg.gpus_per_replica},
        health_check_period_s=5,
        health_check_timeout_s=30,
    ).bind(spec)
    return Ingress.options(
        num_replicas=1, max_ongoing_requests=max(100, cfg.max_queued_requests * 2), ray_actor_options={"num_cpus": 0}
    ).bind(spec, model)


def app_builder(args: dict):
    """Entry point for `serve deploy` / RayService configs: `import_path: rayft.serving.app:app_builder`."""
    return build_app(args)


def build_vllm_app(spec: dict, cfg: ServeConfig):
    """The same model behind Ray Serve LLM's vLLM engine and OpenAI app (GPU clusters only).

    Autoscaling, `max_ongoing_requests` and LoRA adapters map onto `LLMConfig`; batching is vLLM's own
    continuous batching. API keys, the body limit and rayft's error shapes belong to the transformers
    ingress and are not applied here: put the vLLM app behind your gateway's auth."""
    try:
        from ray.serve.llm import LLMConfig, build_openai_app
    except ImportError as e:
        raise RuntimeError(
            f"serve.engine is vllm but Ray Serve LLM cannot load ({e}); install vllm on the GPU nodes "
            "(pip install 'ray[llm]') or use serve.engine: transformers"
        ) from None
    if cfg.gpus_per_replica <= 0:
        raise RuntimeError("serve.engine vllm needs GPUs: set serve.gpus_per_replica (e.g. 1)")
    a = cfg.autoscaling
    llm = {
        "model_loading_config": {"model_id": spec["model_name"], "model_source": spec["model_path"]},
        "deployment_config": {
            "autoscaling_config": {
                "min_replicas": a.min_replicas,
                "max_replicas": a.max_replicas,
                "target_ongoing_requests": a.target_ongoing_requests,
                "upscale_delay_s": a.upscale_delay_s,
                "downscale_delay_s": a.downscale_delay_s,
            },
            "max_ongoing_requests": cfg.max_ongoing_requests,
        },
        "engine_kwargs": {
            "dtype": "bfloat16" if cfg.dtype == "auto" else cfg.dtype,
            "tensor_parallel_size": max(1, int(cfg.gpus_per_replica)),
        },  # fmt: skip
    }
    if spec.get("adapters"):
        roots = {str(Path(p).parent) for p in spec["adapters"].values()}
        if len(roots) == 1:  # Ray Serve LLM loads adapters by name from one directory
            llm["lora_config"] = {"dynamic_lora_loading_path": roots.pop(),
                                  "max_num_adapters_per_replica": cfg.max_adapters_per_replica}  # fmt: skip
    return build_openai_app({"llm_configs": [LLMConfig(**llm)]})
