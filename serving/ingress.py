"""The HTTP ingress: a FastAPI app speaking the OpenAI API in front of the model deployment.

    client ──HTTP──▶ Ingress (API keys and body limit, validation, chat template, token budget, SSE, access log)
                        │  DeploymentHandle, streaming, multiplexed by adapter name
                        ▼
                     LLMServer × N (rayft.serving.model)

The app is assembled from one module per resource around the HTTP plumbing of rayft.serving.http (the guard,
OpenAI-shaped errors, the OpenAPI document): rayft.serving.routes_inference (probes, models, completions),
routes_files (/v1/files, streamed to the store in rayft.serving.files under the caller's key), routes_finetune
(fine-tuning jobs, fine-tuned models, /admin/adapters) and routes_playground. This module holds the replica itself:
its adapters and fine-tuned models, and generation through the model deployment. Imported by the Serve app only
(it loads ray and fastapi at import).
"""

import asyncio
import hashlib
import json
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve

from rayft.serving import http, routes_files, routes_finetune, routes_inference, routes_playground
from rayft.serving.files import EVERY_OWNER, FileStore
from rayft.serving.finetune import FinetuneService, ServedBase
from rayft.serving.openai_api import AdapterRegistration, ApiError, ChatCompletionRequest, CompletionRequest
from rayft.serving.spec import KeyRing, NoAdapter, OutsideRoots, ServeSpec, check_bind, validate_adapter
from rayft.training import storage

access_log = logging.getLogger("ray.serve.rayft.access")
CANCELLED = 499  # the access log's status of a request whose client left or whose call was cancelled


def _build_api(ing) -> FastAPI:
    """The FastAPI app of one ingress replica (`ing`, an Ingress: the name Ingress itself is bound to its
    Serve deployment), built at replica start from its settings: rayft.serving.http's guard and errors, then each
    resource's routes, in the order the OpenAPI document lists them."""
    cfg = ing.cfg
    api = http.build_app(ing.keys, cfg.max_body_bytes, cfg.max_tokens_limit, ing.finetune.base.ids)
    routes_inference.model_routes(api, ing)  # the probes, /v1/models
    routes_finetune.adapter_routes(api, ing)  # DELETE /v1/models/{fine-tuned model}, /admin/adapters
    routes_inference.generation_routes(api, ing)  # /v1/chat/completions, /v1/completions
    routes_files.file_routes(api, ing.files)
    routes_finetune.job_routes(api, ing.finetune)
    routes_finetune.grader_routes(api, ing.finetune)  # /v1/fine_tuning/alpha/graders/{run,validate}
    routes_playground.playground_routes(api, ing)
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
        from rayft.training.formats import Renderer
        from rayft.training.tools import tool_syntax

        # Training's chat renderer, and the syntax the template teaches calls in (rayft.training.tools)
        self.renderer = Renderer(self.tokenizer, None, specials=self.cfg.special_tokens_in_content)
        self.tool_syntax = tool_syntax(self.tokenizer)
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
        from rayft.serving import chat

        p = chat.plan(body, self.tool_syntax)
        ids = chat.prompt_ids(self.renderer, p)
        return await self._complete(body, ids or self.empty_prompt, True, "chat", request_id, viewer=viewer, plan=p)

    async def completions(self, body: CompletionRequest, request_id: str = "-", viewer: str | None = None):
        from rayft.training.specials import encode_plain

        prompt = body.prompt
        assert isinstance(prompt, str)  # CompletionRequest._one_prompt takes a list's one prompt out
        # BOS as training's prompt_completion and text rows start (specials.bos_text): one rule for both.
        ids = encode_plain(self.tokenizer, prompt) if prompt else []
        echo = prompt if body.echo else ""
        return await self._complete(body, ids or self.empty_prompt, False, "completions", request_id, echo, viewer)

    def _request(
        self, ids: list[int], max_tokens: int, body=None, adapter: str | None = None, grammar: str | None = None
    ) -> dict:
        return {
            "grammar": grammar,
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
        self,
        body,
        ids: list[int],
        chat: bool,
        route: str,
        request_id: str,
        echo: str = "",
        viewer: str | None = None,
        plan=None,
    ):
        """`echo`: text returned before the completion (the prompt, for `echo: true`); `viewer`: whose
        fine-tuned models the caller may use (EVERY_OWNER: every key's; None: no key's); `plan`: a chat request's
        tools and grammar (rayft.serving.chat)."""
        t0 = time.perf_counter()
        status = 200
        adapter = None
        usage = {"prompt_tokens": len(ids), "completion_tokens": 0}
        log = {"route": route, "t0": t0, "usage": usage, "body": body, "request_id": request_id}
        streaming = False
        try:
            adapter = await self._adapter_for(body.model, viewer)
            log["adapter"] = adapter
            grammar = plan.grammar if plan is not None else None
            request = self._request(ids, self._budget(body, len(ids)), body, adapter, grammar)
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
                stream = self._stream(
                    deltas, first, deadline, rid, model_id, chat, body.include_usage(), log, echo, plan
                )
                streaming = True
                return StreamingResponse(stream, media_type="text/event-stream")
            text, finish, usage, batch = await self._collect(request, deadline)
            log["usage"] = usage
            body_out = self._final_body(rid, model_id, chat, echo + text, finish, usage, plan)
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
        self, deltas, first, deadline, rid, model_id, chat, include_usage, log, echo="", plan=None
    ) -> AsyncIterator[str]:
        """The SSE body. An error after it began arrives as a last `error` event, then `data: [DONE]`; a client
        that leaves ends it at once (the model replica drops the request at its next step). A chat reply's text
        goes through rayft.serving.chat.ReplyStream, which sends its tool calls as `tool_calls` deltas."""
        from rayft.serving.chat import ReplyStream

        status, ttft, t0, usage = 200, None, log["t0"], log["usage"]
        obj = "chat.completion.chunk" if chat else "text_completion"

        def event(payload: dict) -> str:
            return f"data: {json.dumps(payload)}\n\n"

        def head() -> dict:
            return {"id": rid, "object": obj, "created": int(time.time()), "model": model_id}

        reader = ReplyStream(plan) if chat and plan is not None else None

        def delta_chunk(delta: dict) -> dict:
            return head() | {"choices": [{"index": 0, "delta": delta, "finish_reason": None}]}

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
                        if d["text"] and reader is not None:
                            for delta in reader.feed(d["text"]):
                                yield event(delta_chunk(delta))
                        elif d["text"]:
                            yield event(chunk(d["text"], None))
                        if d["finish_reason"]:
                            finish = d["finish_reason"]
                        d = await anext(deltas, None)
                if reader is not None:
                    last, finish = reader.close(finish)
                    for delta in last:
                        yield event(delta_chunk(delta))
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
    def _final_body(rid, model_id, chat, text, finish, usage, plan=None) -> dict:
        from rayft.serving.chat import reply

        obj = "chat.completion" if chat else "text_completion"
        if chat and plan is not None:
            message, finish = reply(plan, text, finish)
            choice = {"index": 0, "message": message}
        elif chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}}
        else:
            choice = {"index": 0, "text": text}
        choice |= {"finish_reason": finish, "logprobs": None}
        head = {"id": rid, "object": obj, "created": int(time.time()), "model": model_id}
        return head | {"choices": [choice], "usage": usage}
