"""The model deployment: one engine per replica and the scheduler that batches its requests.

    Ingress ──DeploymentHandle (streaming, multiplexed by adapter)──▶ LLMServer.generate ──▶ Scheduler
        the decode loop (Scheduler._drive) waits serve.batch_wait_timeout_s for arrivals when idle, then at
        every step boundary drops the requests whose callers left (a closed stream, a timeout, a cancelled
        handle call), admits waiting ones while there is room (serve.max_batch_size) and KV-cache budget
        (serve.kv_cache_gib), advances every running request one token (engine.RunningBatch.step) and hands
        each request its delta; a finished or abandoned request leaves at once.

A request that fails on its own (its adapter is gone, its prefill raises) fails alone, with its error; the
others go on. Models whose KV cache cannot be merged run static batches (admitted into an empty batch only).
Imported by the Serve app only (it loads ray at import).
"""

import asyncio
import hashlib
import itertools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import cast

from ray import serve

from rayft.serving.files import namespace_root, storage_root
from rayft.serving.openai_api import ApiError
from rayft.serving.spec import ServeSpec, validate_adapter
from rayft.training import storage
from rayft.training.generation import GenerationRequest, RequestFailed, RunningBatch, TransformersEngine

log = logging.getLogger("ray.serve.rayft")
GIB = 2**30


@serve.deployment(name="model")
class LLMServer:
    """Holds one engine; batches concurrent requests and streams each one's deltas."""

    def __init__(self, spec: ServeSpec):
        from ray.serve import metrics

        cfg = spec.serve
        self.spec = spec
        self.engine = TransformersEngine(
            spec.model_path,
            cfg.dtype,
            use_gpu=cfg.gpus_per_replica > 0,
            threads=max(1, int(cfg.cpus_per_replica)),
            revision=spec.revision,
        )
        batch = RunningBatch(self.engine)
        batch.merge = self.engine.call(batch.supported)  # else: static batches (admitted into an empty batch only)
        self.batch_sizes = metrics.Histogram(
            "rayft_batch_size", description="Requests generated together per step.", boundaries=[1, 2, 4, 8, 16, 32]
        )
        self.m_cancelled = metrics.Counter(
            "rayft_cancelled_requests", description="Requests whose callers left before they finished."
        )
        self.scheduler = Scheduler(
            batch,
            cfg.max_batch_size,
            cfg.batch_wait_timeout_s,
            int(cfg.kv_cache_gib * GIB),
            self.engine.kv_bytes_per_token(),
            self.batch_sizes,
            self.m_cancelled,
        )
        self.adapter_paths: dict[str, str | None] = {}  # multiplexed id -> the path its request named
        engine, paths = self.engine, self.adapter_paths

        async def load_adapter(mux_id: str):  # LRU-cached per replica by serve.multiplexed: checked at each load
            path = self._checked_adapter(mux_id, paths[mux_id])
            await engine.run(engine.load_adapter, engine_name(mux_id), path)
            return _AdapterSlot(engine, engine_name(mux_id))

        cached = serve.multiplexed(max_num_models_per_replica=cfg.max_adapters_per_replica)(load_adapter)
        self._load_adapter = cast(Callable[[str], Awaitable[_AdapterSlot]], cached)  # Ray's decorator is untyped

    async def generate(self, request: dict, adapter_path: str | None = None) -> AsyncIterator[dict]:
        """One request's deltas as the batch produces them. `request["adapter"]` is the adapter's multiplexed
        id (name@version, see Ingress); its weights load from `adapter_path`, checked again here."""
        req = GenerationRequest(**request)
        self.scheduler.check_fits(req)
        mux_id = req.adapter
        if mux_id:
            req.adapter = engine_name(mux_id)
            self.engine.pin(req.adapter)  # held from now on: an LRU eviction waits until this request ends
        try:
            if mux_id:
                self.adapter_paths[mux_id] = adapter_path
                await self._load_adapter(mux_id)
            async for delta in self.scheduler.submit(req):
                yield delta
        finally:
            if mux_id:
                self.engine.unpin(req.adapter)

    async def complete(self, request: dict, adapter_path: str | None = None) -> dict:
        """A whole generation as one reply (non-streaming requests: one message back, not one per token)."""
        text, last, batch = [], None, 1
        async for d in self.generate(request, adapter_path):
            text.append(d["text"])
            batch = max(batch, d["batch_size"])
            last = d
        assert last is not None  # the scheduler's last delta carries the finish reason
        return last | {"text": "".join(text), "batch_size": batch}

    def _checked_adapter(self, mux_id: str, path: str | None) -> str:
        """The adapter directory to load, re-checked on this replica at load time: a path registered at run time
        must still resolve (symlinks included) inside serve.adapter_roots and hold an adapter, so a link swapped
        in after registration cannot escape. Adapters configured at start are the operator's own."""
        name = mux_id.rsplit("@", 1)[0]
        if path is None:
            raise ApiError(404, f"adapter {name!r} has no path", param="model", code="model_not_found")
        # fine-tuning jobs' runs (rayft.serving.finetune) are the service's own, in its storage
        ft = self.spec.serve.finetune
        runs = storage.join(namespace_root(storage_root(ft.storage_path), ft.namespace), "runs")
        roots = None if self.spec.adapters.get(name) == path else [*self.spec.adapter_roots, runs]
        try:
            if storage.is_remote(path):
                if not path.startswith(runs.rstrip("/") + "/"):
                    raise ValueError(f"{path} is not a fine-tuning job's run in serve.finetune.storage_path")
                path, roots = storage.cached(path), None  # this node's copy
            # a fine-tuned model's id is ft:<owner>:<job id>: the job id is its adapter's name
            label = name.rsplit(":", 1)[-1] if name.startswith("ft:") else name
            return validate_adapter(label, path, roots, self.spec.model_path, self.spec.revision)
        except ValueError as e:
            raise ApiError(400, f"adapter {name!r} cannot be loaded: {e}", param="model") from None

    def info(self) -> dict:
        """This replica's process, device, loaded adapters and scheduler counters (for operators and tests)."""
        import os

        return {
            "pid": os.getpid(),
            "device": self.engine.device,
            "adapters": sorted(self.engine.adapters),
            "continuous": self.scheduler.batch.merge,
        } | self.scheduler.stats()

    def check_health(self):
        if self.engine.model is None:
            raise RuntimeError("model not loaded")


def engine_name(mux_id: str) -> str:
    """The engine's (PEFT's) name for an adapter version: PEFT names cannot hold '.', user names can."""
    return "rayft_" + hashlib.sha256(mux_id.encode()).hexdigest()[:16]


class _Ticket:
    """One request inside the scheduler: where its deltas go, and whether its caller left."""

    __slots__ = ("key", "req", "queue", "cancelled", "reserved", "produced")

    def __init__(self, key: int, req: GenerationRequest, reserved: int):
        self.key, self.req, self.reserved = key, req, reserved
        self.queue: asyncio.Queue = asyncio.Queue()
        self.cancelled = False
        self.produced = 0  # tokens generated for it


class Scheduler:
    """Admission and the decode loop of one replica (runs on the replica's event loop; steps on the engine's
    thread)."""

    def __init__(self, batch: RunningBatch, max_batch: int, wait_s: float, kv_budget: int, kv_per_token: int,
                 batch_sizes=None, cancelled_counter=None):  # fmt: skip
        self.batch = batch
        self.max_batch, self.wait_s = max_batch, wait_s
        self.kv_budget, self.kv_per_token = kv_budget, kv_per_token
        self.batch_sizes, self.cancelled_counter = batch_sizes, cancelled_counter
        self.pending: list[_Ticket] = []
        self.running: dict[int, _Ticket] = {}
        self.reserved = 0  # KV bytes of the running requests' prompts plus max_tokens
        self._keys = itertools.count()
        self._wake = asyncio.Event()
        self._driver: asyncio.Task | None = None
        # tokens_after_cancel: generated after the scheduler learned that the caller left (the step in flight);
        # generated_for_cancelled: every token generated for requests whose callers left, before and after
        self.counts = {
            "finished": 0,
            "failed": 0,
            "cancelled": 0,
            "tokens_after_cancel": 0,
            "generated_for_cancelled": 0,
        }

    def need(self, req: GenerationRequest) -> int:
        return (len(req.prompt_ids) + req.max_tokens) * self.kv_per_token

    def check_fits(self, req: GenerationRequest) -> None:
        """A request whose KV cache alone is above the budget can never be admitted: a clear 400 now."""
        need = self.need(req)
        if need > self.kv_budget:
            raise ApiError(
                400,
                f"this request needs {need / GIB:.2f} GiB of KV cache (prompt {len(req.prompt_ids)} + max_tokens "
                f"{req.max_tokens} tokens), above the replica's {self.kv_budget / GIB:.2f} GiB (serve.kv_cache_gib); "
                "lower max_tokens or shorten the prompt",
                param="max_tokens",
                code="context_length_exceeded",
            )

    def stats(self) -> dict:
        return {"running": len(self.running), "pending": len(self.pending), "kv_reserved_bytes": self.reserved} | (
            self.counts
        )

    async def submit(self, req: GenerationRequest) -> AsyncIterator[dict]:
        """The request's deltas; leaving early (closing this generator, or being cancelled) takes it out of
        the batch at the next step boundary."""
        t = _Ticket(next(self._keys), req, self.need(req))
        self.pending.append(t)
        if self._driver is None or self._driver.done():
            self._driver = asyncio.get_running_loop().create_task(self._drive())
        self._wake.set()
        finished = False
        try:
            while True:
                item = await t.queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                yield item
                if item["finish_reason"]:
                    finished = True
                    return
        finally:
            if not finished:
                t.cancelled = True
                self.counts["cancelled"] += 1
                if self.cancelled_counter is not None:
                    self.cancelled_counter.inc()
                self._wake.set()

    async def _drive(self) -> None:
        """The decode loop: drop the abandoned, admit the waiting, step, hand out the deltas."""
        while True:
            self.pending = [t for t in self.pending if not t.cancelled]  # left before they started
            if not self.running and not self.pending:
                self._wake.clear()
                await self._wake.wait()
                continue
            if not self.running and len(self.pending) < self.max_batch and self.wait_s > 0:
                await asyncio.sleep(self.wait_s)  # an idle replica gathers arrivals into one prefill
                self.pending = [t for t in self.pending if not t.cancelled]
            drop = [k for k, t in self.running.items() if t.cancelled]
            for k in drop:
                self.counts["generated_for_cancelled"] += self.running[k].produced
                self._leave(k)
            admit = self._admissions()
            try:
                step = self.batch.step
                events, failures = await self.batch.engine.run(step, [(t.key, t.req) for t in admit], drop)
            except Exception as e:  # noqa: BLE001 - a failed decode step involves every running request
                log.exception("decode step failed")
                error = ApiError(503, f"the model replica failed while generating ({type(e).__name__}); retry",
                                 code="replica_failed")  # fmt: skip
                for key in self.batch.fail_all() + [t.key for t in admit]:
                    self._fail(key, error)
                continue
            if self.batch_sizes is not None and (events or failures):
                self.batch_sizes.observe(len(self.batch) or len(events))
            for key, exc in failures:
                log.warning("request failed: %s", exc)
                status = exc.status if isinstance(exc, RequestFailed) else 500
                self._fail(key, ApiError(status, str(exc), code="request_failed"))
            for key, delta in events:
                t = self.running.get(key)
                if t is None:
                    continue
                t.produced += 1
                if t.cancelled:  # its caller left while this step ran; it is dropped at the next one
                    self.counts["tokens_after_cancel"] += 1
                    continue
                t.queue.put_nowait(delta.as_dict())
                if delta.finish_reason:
                    self.counts["finished"] += 1
                    self._leave(key)

    def _admissions(self) -> list[_Ticket]:
        """Waiting requests that fit now: room in the batch, and KV budget beside the running ones (the oldest
        first; one that does not fit waits, and so do the ones behind it, so large requests are not starved)."""
        room = self.batch.room(self.max_batch)
        admit = []
        while self.pending and len(admit) < room:
            t = self.pending[0]
            if self.running and self.reserved + t.reserved > self.kv_budget:
                break
            self.pending.pop(0)
            self.running[t.key] = t
            self.reserved += t.reserved
            admit.append(t)
        return admit

    def _leave(self, key: int) -> None:
        t = self.running.pop(key, None)
        if t is not None:
            self.reserved -= t.reserved

    def _fail(self, key: int, error: BaseException) -> None:
        t = self.running.get(key)
        self._leave(key)
        if t is not None:
            self.counts["failed"] += 1
            t.queue.put_nowait(error)


class _AdapterSlot:
    """What serve.multiplexed caches per adapter; evicting it unloads the adapter's weights (once no request
    that pinned them is running)."""

    def __init__(self, engine, name: str):
        self.engine, self.name = engine, name

    def __del__(self):
        try:
            self.engine.unload_adapter(self.name)
        except Exception:  # noqa: BLE001 - best effort during eviction or shutdown
            pass
