"""The model deployment: one engine per replica and the scheduler that batches its requests.

    Ingress ──DeploymentHandle (streaming, multiplexed by adapter name)──▶ LLMServer.generate
        @serve.batch gathers arrivals for serve.batch_wait_timeout_s, then they join the running batch:
        the decode loop (_drive) admits waiting requests at each step boundary while there is room
        (serve.max_batch_size), advances every running request one token (engine.RunningBatch.step) and
        hands each request its delta; a finished request leaves at once.

Models whose KV cache cannot be merged run static batches instead (all requests of a batch to their end).
Imported by the Serve app only (it loads ray at import).
"""

import asyncio
import itertools
import logging
from collections.abc import AsyncIterator

from ray import serve

from rayft.serving.engine import Delta, GenerationRequest, RunningBatch, TransformersEngine
from rayft.serving.spec import ServeSpec


@serve.deployment(name="model")
class LLMServer:
    """Holds one engine; batches concurrent requests and streams each one's deltas."""

    def __init__(self, spec: ServeSpec):
        from ray.serve import metrics

        cfg = spec.serve
        self.engine = TransformersEngine(
            spec.model_path,
            cfg.dtype,
            use_gpu=cfg.gpus_per_replica > 0,
            threads=max(1, int(cfg.cpus_per_replica)),
            revision=spec.revision,
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

    def _empty(self, i: int) -> dict:
        return Delta(prompt_tokens=self.prompt_lengths[i], completion_tokens=0, batch_size=0).as_dict()

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
                if not deltas:  # still waiting for a slot in the running batch
                    out.append(self._empty(i))
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
