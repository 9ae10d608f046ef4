"""Engines: what turns prompts into tokens behind the HTTP API.

An engine takes a batch of `GenerationRequest`s and advances them together, one token per step, so
the Serve deployment can stream every request's text as it is produced and batch requests that
arrive together (`@serve.batch`). `TransformersEngine` runs any Hugging Face causal LM on CPU or
GPU; LoRA adapters are loaded next to the base weights and chosen per request (PEFT mixed-adapter
batches), so one replica serves the base model and several finetunes at once.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from dataclasses import dataclass, field

from rayft.training import storage

BASE = "__base__"  # PEFT's name for "no adapter" in a mixed batch


@dataclass
class GenerationRequest:
    """One request, already tokenized and validated by the ingress."""

    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    adapter: str | None = None  # registered adapter name; None = the served model itself


@dataclass
class Delta:
    """What one engine step produced for one request: new text, and the reason if it just finished."""

    text: str = ""
    finish_reason: str | None = None  # "stop" | "length"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    batch_size: int = 1

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


class _Row:
    """Decoding state of one request in a batch."""

    def __init__(self, req: GenerationRequest, tokenizer, device):
        import torch

        self.req = req
        self.tok = tokenizer
        self.ids: list[int] = []
        self.sent = ""  # text already handed out
        self.done = False
        self.generator = None
        if req.temperature > 0:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(req.seed if req.seed is not None else int(time.time_ns() % (2**63)))

    def pick(self, logits):
        """The next token from this row's logits (1-D): greedy at temperature 0, else top-p sampling."""
        import torch

        if self.generator is None:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits.float() / self.req.temperature, dim=-1)
        if self.req.top_p < 1.0:
            sorted_p, order = torch.sort(probs, descending=True)
            keep = torch.cumsum(sorted_p, dim=-1) - sorted_p < self.req.top_p  # always keeps the top token
            sorted_p = torch.where(keep, sorted_p, torch.zeros_like(sorted_p))
            choice = torch.multinomial(sorted_p / sorted_p.sum(), 1, generator=self.generator)
            return int(order[choice])
        return int(torch.multinomial(probs, 1, generator=self.generator))

    def advance(self, token: int, stop_ids: set[int]) -> Delta:
        """Take one generated token; return the text that can be released now."""
        if token in stop_ids:
            self.done = True
            return self._release(final=True, reason="stop")
        self.ids.append(token)
        if len(self.ids) >= self.req.max_tokens:
            self.done = True
            return self._release(final=True, reason="length")
        return self._release(final=False, reason=None)

    def _release(self, final: bool, reason: str | None) -> Delta:
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        for s in self.req.stop:
            cut = text.find(s, max(0, len(self.sent) - len(s) + 1))
            if cut >= 0:
                text, final, reason = text[:cut], True, "stop"
                self.done = True
        end = len(text)
        if not final:
            if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the rest
                end = len(text.rstrip("\ufffd"))
            for s in self.req.stop:  # hold back a tail that may become a stop sequence
                for k in range(min(len(s) - 1, end), 0, -1):
                    if text[:end].endswith(s[:k]):
                        end -= k
                        break
        end = max(end, len(self.sent))
        new, self.sent = text[len(self.sent) : end], text[:end]
        return Delta(new, reason if final else None, len(self.req.prompt_ids), len(self.ids))


class TransformersEngine:
    """A causal LM with transformers: left-padded batches, KV cache, per-request sampling and stops."""

    name = "transformers"

    def __init__(
        self, model_path: str, dtype: str = "auto", use_gpu: bool = False, threads: int = 0, revision: str | None = None
    ):
        """`revision`: the hub revision of a hub-id `model_path` (None: the hub's default)."""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from rayft.training.models import resolve_dtype

        if threads:
            torch.set_num_threads(threads)
        self.device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        model_path = storage.cached(model_path)  # a model in cloud storage: one copy per node, shared by replicas
        self.tokenizer = AutoTokenizer.from_pretrained(model_path, revision=revision)
        self.model = AutoModelForCausalLM.from_pretrained(
            model_path, dtype=getattr(torch, resolve_dtype(dtype, self.device)), revision=revision
        )
        self.model.to(self.device).eval()
        self.pad_id = self.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = self.tokenizer.eos_token_id
        stops = {self.tokenizer.eos_token_id}
        gen_eos = self.model.generation_config.eos_token_id
        stops.update(gen_eos if isinstance(gen_eos, list) else [gen_eos])
        self.stop_ids = {i for i in stops if i is not None}
        self.adapters: dict[str, str] = {}  # loaded adapter name -> path
        # Adapters load in another thread while batches decode: a lock keeps each forward step whole,
        # and an adapter in use by a running batch is unloaded only when that batch ends.
        self.lock = threading.Lock()
        self.in_use: dict[str, int] = {}
        self.unload_later: set[str] = set()

    # ------------------------------------------------------------------ adapters

    def load_adapter(self, name: str, path: str) -> None:
        """Load a LoRA adapter under `name` (the model becomes a PeftModel on the first one)."""
        from peft import PeftModel

        with self.lock:
            self.unload_later.discard(name)
            if self.adapters.get(name) == path:
                return
            if name in self.adapters:
                self.model.delete_adapter(name)
                del self.adapters[name]
            if not isinstance(self.model, PeftModel):
                self.model = PeftModel.from_pretrained(self.model, path, adapter_name=name).eval()
            else:
                self.model.load_adapter(path, adapter_name=name)
                self.model.eval()
            self.adapters[name] = path

    def unload_adapter(self, name: str) -> None:
        with self.lock:
            if self.in_use.get(name):
                self.unload_later.add(name)
            elif name in self.adapters:
                self.model.delete_adapter(name)
                del self.adapters[name]

    # ------------------------------------------------------------------ generation

    def _hold(self, names) -> None:
        """Mark adapters as used by a batch (engine lock held)."""
        for n in set(names) - {BASE}:
            self.in_use[n] = self.in_use.get(n, 0) + 1

    def _release(self, names) -> None:
        """A batch is done with these adapters; unload the evicted ones nobody uses now (lock held)."""
        for n in set(names) - {BASE}:
            if self.in_use.get(n):
                self.in_use[n] -= 1
        for n in [n for n in self.unload_later if not self.in_use.get(n)]:
            self.unload_later.discard(n)
            if n in self.adapters:
                self.model.delete_adapter(n)
                del self.adapters[n]

    def forward(self, ids, mask, past, names: list[str]):
        """One forward step: logits at the last position, the KV cache extended (engine lock held)."""
        extra = {"adapter_names": names} if self.adapters else {}
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -ids.shape[1] :]
        return self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=past,
            use_cache=True,
            logits_to_keep=1,
            **extra,
        )

    def _check_loaded(self, names) -> None:
        missing = sorted({n for n in names if n != BASE and n not in self.adapters})
        if missing:
            raise KeyError(f"adapter(s) not loaded: {', '.join(missing)}")

    def _left_padded(self, requests: list[GenerationRequest]):
        """input_ids and attention_mask of the prompts, left-padded to the longest."""
        import torch

        width = max(len(r.prompt_ids) for r in requests)
        pads = [width - len(r.prompt_ids) for r in requests]
        ids = [[self.pad_id] * p + r.prompt_ids for p, r in zip(pads, requests, strict=True)]
        mask = [[0] * p + [1] * len(r.prompt_ids) for p, r in zip(pads, requests, strict=True)]
        return torch.tensor(ids, device=self.device), torch.tensor(mask, device=self.device)

    def generate(self, requests: list[GenerationRequest]):
        """Yield, per decoding step, one Delta (or None once finished) for each request, in order."""

        rows = [_Row(r, self.tokenizer, self.device) for r in requests]
        input_ids, mask = self._left_padded(requests)
        names = [r.adapter or BASE for r in requests]
        with self.lock:
            self._check_loaded(names)
            self._hold(names)
        try:
            yield from self._decode(rows, input_ids, mask, names)
        finally:
            with self.lock:
                self._release(names)

    def _decode(self, rows: list[_Row], input_ids, mask, names: list[str]):
        import torch

        past = None
        step_ids = input_ids
        with torch.inference_mode():
            while True:
                with self.lock:  # the model may have become a PeftModel since the last step
                    out = self.forward(step_ids, mask, past, names)
                past = out.past_key_values
                logits = out.logits[:, -1, :]
                deltas: list[Delta | None] = []
                next_ids = []
                for i, row in enumerate(rows):
                    if row.done:
                        deltas.append(None)
                        next_ids.append(self.pad_id)
                        continue
                    token = row.pick(logits[i])
                    d = row.advance(token, self.stop_ids)
                    d.batch_size = len(rows)
                    deltas.append(d)
                    next_ids.append(token)
                yield deltas
                if all(r.done for r in rows):
                    return
                step_ids = torch.tensor(next_ids, device=self.device).unsqueeze(1)
                mask = torch.cat([mask, torch.ones_like(step_ids)], dim=1)


class RunningBatch:
    """Continuous batching: the requests a replica is decoding right now, advanced together.

    Each `step` first advances every running request by one token, then prefills the newly admitted
    ones and merges their KV cache into the running one (left-padded to a common length), so a new
    request never waits for a batch to finish and a finished one stops costing compute at once.
    Works for models whose cache is a plain DynamicCache (decoder-only models without sliding-window
    layers); `supported()` says so.
    """

    def __init__(self, engine: TransformersEngine):
        self.engine = engine
        self.keys: list = []  # caller's key per running row
        self.rows: list[_Row] = []
        self.names: list[str] = []
        self.next_ids: list[int] = []
        self.past = None
        self.mask = None

    def __len__(self) -> int:
        return len(self.rows)

    def supported(self) -> bool:
        import torch
        from transformers.cache_utils import DynamicCache, DynamicLayer

        probe = torch.tensor([[self.engine.pad_id]], device=self.engine.device)
        with self.engine.lock, torch.inference_mode():
            past = self.engine.model(input_ids=probe, use_cache=True, logits_to_keep=1).past_key_values
        return type(past) is DynamicCache and all(type(layer) is DynamicLayer for layer in past.layers)

    def step(self, admit: list[tuple]) -> list[tuple]:
        """Advance the running requests one token and admit `admit` [(key, GenerationRequest)];
        returns [(key, Delta)] for every request that produced something."""
        import torch

        e = self.engine
        events: list[tuple] = []
        with e.lock, torch.inference_mode():
            if self.rows:
                events += self._decode()
            if admit:
                events += self._prefill(admit)
        return events

    def fail_all(self) -> list:
        """Drop every running request (after an engine error); returns their keys."""
        keys = self.keys
        for name in self.names:
            self.engine._release([name])
        self.keys, self.rows, self.names, self.next_ids, self.past, self.mask = [], [], [], [], None, None
        return keys

    # -------------------------------------------------------------- internals (engine lock held)

    def _pick(self, rows: list[_Row], logits, batch: int) -> tuple[list[Delta], list[int]]:
        deltas, tokens = [], []
        for i, row in enumerate(rows):
            token = row.pick(logits[i])
            d = row.advance(token, self.engine.stop_ids)
            d.batch_size = batch
            deltas.append(d)
            tokens.append(token)
        return deltas, tokens

    def _decode(self) -> list[tuple]:
        import torch

        dev = self.engine.device
        ids = torch.tensor(self.next_ids, device=dev).unsqueeze(1)
        self.mask = torch.cat([self.mask, torch.ones_like(ids)], dim=1)
        out = self.engine.forward(ids, self.mask, self.past, self.names)
        self.past = out.past_key_values
        deltas, tokens = self._pick(self.rows, out.logits[:, -1, :], len(self.rows))
        events = list(zip(self.keys, deltas, strict=True))
        keep = [i for i, r in enumerate(self.rows) if not r.done]
        if len(keep) < len(self.rows):
            for i, r in enumerate(self.rows):
                if r.done:
                    self.engine._release([self.names[i]])
            self._select(keep)
        self.next_ids = [tokens[i] for i in keep] if keep else []
        return events

    def _prefill(self, admit: list[tuple]) -> list[tuple]:
        import torch

        e, dev = self.engine, self.engine.device
        keys = [k for k, _ in admit]
        reqs = [r for _, r in admit]
        names = [r.adapter or BASE for r in reqs]
        missing = sorted({n for n in names if n != BASE and n not in e.adapters})
        if missing:
            raise KeyError(f"adapter(s) not loaded: {', '.join(missing)}")
        rows = [_Row(r, e.tokenizer, dev) for r in reqs]
        width = max(len(r.prompt_ids) for r in reqs)
        ids = torch.tensor([[e.pad_id] * (width - len(r.prompt_ids)) + r.prompt_ids for r in reqs], device=dev)
        mask = torch.tensor([[0] * (width - len(r.prompt_ids)) + [1] * len(r.prompt_ids) for r in reqs], device=dev)
        out = self.engine.forward(ids, mask, None, names)
        total = len(self.rows) + len(rows)
        deltas, tokens = self._pick(rows, out.logits[:, -1, :], total)
        events = list(zip(keys, deltas, strict=True))
        keep = [i for i, r in enumerate(rows) if not r.done]
        if not keep:
            return events
        idx = torch.tensor(keep, device=dev)
        new_past = out.past_key_values
        mask = mask[idx]
        for layer in new_past.layers:
            layer.keys, layer.values = layer.keys[idx], layer.values[idx]
        for i in keep:
            e._hold([names[i]])
        if not self.rows:
            self.past, self.mask = new_past, mask
        else:
            run_len, new_len = self.mask.shape[1], mask.shape[1]
            width = max(run_len, new_len)
            for old, new in zip(self.past.layers, new_past.layers, strict=True):
                old.keys = torch.cat([_left_pad(old.keys, width), _left_pad(new.keys, width)], dim=0)
                old.values = torch.cat([_left_pad(old.values, width), _left_pad(new.values, width)], dim=0)
            self.mask = torch.cat([_left_pad_mask(self.mask, width), _left_pad_mask(mask, width)], dim=0)
        self.keys += [keys[i] for i in keep]
        self.rows += [rows[i] for i in keep]
        self.names += [names[i] for i in keep]
        self.next_ids += [tokens[i] for i in keep]
        return events

    def _select(self, keep: list[int]) -> None:
        import torch

        if not keep:
            self.keys, self.rows, self.names, self.past, self.mask = [], [], [], None, None
            return
        idx = torch.tensor(keep, device=self.engine.device)
        mask = self.mask[idx]
        first = int((mask.sum(0) > 0).nonzero()[0])  # columns that are padding for every row go
        self.mask = mask[:, first:]
        for layer in self.past.layers:
            layer.keys, layer.values = layer.keys[idx, :, first:], layer.values[idx, :, first:]
        self.keys = [self.keys[i] for i in keep]
        self.rows = [self.rows[i] for i in keep]
        self.names = [self.names[i] for i in keep]


def _left_pad(t, width: int):
    import torch

    missing = width - t.shape[-2]
    if missing <= 0:
        return t
    pad = torch.zeros((*t.shape[:-2], missing, t.shape[-1]), dtype=t.dtype, device=t.device)
    return torch.cat([pad, t], dim=-2)


def _left_pad_mask(m, width: int):
    import torch

    missing = width - m.shape[1]
    if missing <= 0:
        return m
    return torch.cat([torch.zeros((m.shape[0], missing), dtype=m.dtype, device=m.device), m], dim=1)
