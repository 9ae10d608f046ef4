"""Generation: what turns prompts into tokens, for the endpoint and for reinforcement finetuning's rollouts.

An engine takes a batch of `GenerationRequest`s and advances them together, one token per step, so the Serve
deployment can stream every request's text as it is produced and let requests join and leave the running batch
(`RunningBatch`, driven by the replica's scheduler in rayft.serving.model). `TransformersEngine` runs any Hugging
Face causal LM on CPU or GPU; LoRA adapters are loaded next to the base weights and chosen per request (PEFT
mixed-adapter batches), so one replica serves the base model and several finetunes at once.

`TransformersEngine.live(model, tokenizer, device)` wraps a model that is being trained instead (a PEFT model
inside a DeepSpeed engine, its adapter the one being trained): the rollouts of rayft.training.rollout sample
from the current policy with no merge and no copy of the weights, on the caller's thread.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from dataclasses import dataclass, field

from rayft.training import storage

BASE = "__base__"  # PEFT's name for "no adapter" in a mixed batch
MIN_TEMPERATURE = 1e-4


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
    grammar: str | None = None  # an llguidance grammar every generated token must keep to (constrained decoding)


@dataclass
class Delta:
    """What one engine step produced for one request: new text, and the reason if it just finished."""

    text: str = ""
    finish_reason: str | None = None  # "stop" | "length"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    batch_size: int = 1
    token_ids: list[int] | None = None  # on a request's last Delta, every token it generated (a stop token included)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


class _Row:
    """Decoding state of one request in a batch."""

    def __init__(self, req: GenerationRequest, tokenizer, device, matcher=None):
        import torch

        self.req = req
        self.tok = tokenizer
        self.matcher = matcher  # an llguidance LLMatcher for a constrained request
        self.ids: list[int] = []
        self.sent = ""  # text already handed out
        self.done = False
        self.generator = None
        # a temperature this close to 0 is greedy decoding (dividing logits by it would overflow to inf)
        if req.temperature >= MIN_TEMPERATURE:
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
            keep = torch.cumsum(sorted_p, dim=-1) - sorted_p < self.req.top_p
            keep[0] = True  # the top token always (a top_p below float32's smallest value would keep none)
            sorted_p = torch.where(keep, sorted_p, torch.zeros_like(sorted_p))
            choice = torch.multinomial(sorted_p / sorted_p.sum(), 1, generator=self.generator)
            return int(order[choice])
        return int(torch.multinomial(probs, 1, generator=self.generator))

    def advance(self, token: int, stop_ids: set[int]) -> Delta:
        """Take one generated token; return the text that can be released now."""
        if token in stop_ids:
            self.done = True
            return self._release(final=True, reason="stop", stop_token=token)
        self.ids.append(token)
        if self.matcher is not None:
            self.matcher.consume_token(token)
            if self.matcher.is_stopped():  # the grammar is complete and admits nothing more, not even a stop token
                self.done = True
                return self._release(final=True, reason="stop")
        if len(self.ids) >= self.req.max_tokens:
            self.done = True
            return self._release(final=True, reason="length")
        return self._release(final=False, reason=None)

    def _release(self, final: bool, reason: str | None, stop_token: int | None = None) -> Delta:
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
        delta = Delta(new, reason if final else None, len(self.req.prompt_ids), len(self.ids))
        if final:
            delta.token_ids = self.ids + ([stop_token] if stop_token is not None else [])
        return delta


class TransformersEngine:
    """A causal LM with transformers: left-padded batches, KV cache, per-request sampling and stops."""

    name = "transformers"

    def __init__(
        self, model_path: str, dtype: str = "auto", use_gpu: bool = False, threads: int = 0, revision: str | None = None
    ):
        """`revision`: the hub revision of a hub-id `model_path` (None: the hub's default). The model loads on
        the engine's own thread, where all its torch work runs (see `run`)."""
        from concurrent.futures import ThreadPoolExecutor

        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rayft-engine")
        self.call(self._load, model_path, dtype, use_gpu, threads, revision)

    def _load(self, model_path: str, dtype: str, use_gpu: bool, threads: int, revision: str | None) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from rayft.training.models import resolve_dtype

        if threads:
            torch.set_num_threads(threads)
        self.device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        model_path = storage.cached(model_path)  # a model in cloud storage: one copy per node, shared by replicas
        tokenizer = AutoTokenizer.from_pretrained(model_path, revision=revision)
        model = AutoModelForCausalLM.from_pretrained(
            model_path, dtype=getattr(torch, resolve_dtype(dtype, self.device)), revision=revision
        )
        model.to(self.device).eval()  # pyright: ignore[reportArgumentType] - transformers wraps Module.to, which checkers then see unbound
        self._adopt(model, tokenizer)

    @classmethod
    def live(cls, model, tokenizer, device) -> TransformersEngine:
        """An engine over a model that is being trained (see the module's docstring): no engine thread (the
        caller's thread runs every step), steps under torch.no_grad rather than inference mode (DeepSpeed's
        hooks may gather weights during them, which must stay usable by the next backward), and the model's
        train/eval mode left to the caller."""
        engine = cls.__new__(cls)
        engine.executor = None
        engine.device = str(device)
        engine.grad_off = "no_grad"
        engine._adopt(model, tokenizer)
        return engine

    def _adopt(self, model, tokenizer) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.pad_id = self.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = self.tokenizer.eos_token_id
        stops = {self.tokenizer.eos_token_id}
        gen_config = getattr(self.model, "generation_config", None)
        gen_eos = gen_config.eos_token_id if gen_config is not None else None
        stops.update(gen_eos if isinstance(gen_eos, list) else [gen_eos])
        self.stop_ids = {i for i in stops if i is not None}
        self.adapters: dict[str, str] = {}  # loaded adapter name -> path
        self.lock = threading.Lock()  # one forward step or adapter load at a time
        self.pins = threading.Lock()  # in_use and unload_later
        self.in_use: dict[str, int] = {}  # adapter -> requests holding it
        self.unload_later: set[str] = set()  # evicted, deleted once nobody holds them

    grad_off = "inference_mode"  # how a step switches autograd off (live: no_grad)
    _ll_tokenizer = None

    def matcher(self, grammar: str):
        """An llguidance matcher of `grammar` for one request (RequestFailed 400 if it does not compile). The
        tokenizer's token table is built once per engine, on first use."""
        import llguidance
        import llguidance.hf

        if self._ll_tokenizer is None:
            vocab = getattr(getattr(self.model, "config", None), "vocab_size", None) or len(self.tokenizer)
            self._ll_tokenizer = llguidance.hf.from_tokenizer(
                self.tokenizer, n_vocab=max(vocab, len(self.tokenizer)), eos_token=sorted(self.stop_ids)
            )
        m = llguidance.LLMatcher(self._ll_tokenizer, grammar, log_level=0)
        if m.is_error():
            raise RequestFailed(f"the grammar of this request does not compile: {m.get_error()}", 400)
        return m

    def no_autograd(self):
        """The context a generation step runs in."""
        import torch

        return torch.no_grad() if self.grad_off == "no_grad" else torch.inference_mode()

    # ------------------------------------------------------------------ the engine thread
    # A replica's torch work (loading, every step, adapter loads) runs on one thread. OpenMP keeps one thread
    # team per calling thread: steps handed to whichever pool thread is free, next to a load on another one,
    # leave several teams spinning against each other on the same cores (measured on 2 cores, 2 torch
    # threads: 56 tokens/s with steps in a worker thread after loading in another, 77 on one thread).

    def call(self, fn, *args):
        """Run `fn(*args)` on the engine thread and wait for it (on the caller's thread for a live engine)."""
        if self.executor is None:
            return fn(*args)
        return self.executor.submit(fn, *args).result()

    async def run(self, fn, *args):
        """Run `fn(*args)` on the engine thread without blocking the event loop."""
        import asyncio

        assert self.executor is not None, "a live engine runs on its caller's thread"
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    # ------------------------------------------------------------------ adapters
    # Adapters load on the engine thread between steps (the engine lock keeps a step whole for callers on other
    # threads too). Pins and evictions only take the small `pins` lock (they run on the replica's event loop,
    # which must never wait for a forward step); the weights of an evicted adapter are deleted by the next step
    # or load, once no request that pinned it is left.

    def load_adapter(self, name: str, path: str) -> None:
        """Load a LoRA adapter under `name` (the model becomes a PeftModel on the first one)."""
        from peft import PeftModel

        with self.lock:
            with self.pins:
                self.unload_later.discard(name)
            self._delete_evicted()
            if self.adapters.get(name) == path:
                return
            if name in self.adapters:
                self._delete(name)
            if not isinstance(self.model, PeftModel):
                self.model = PeftModel.from_pretrained(self.model, path, adapter_name=name).eval()
            else:
                self.model.load_adapter(path, adapter_name=name)
                self.model.eval()
            self.adapters[name] = path

    def unload_adapter(self, name: str) -> None:
        """Evict an adapter: its weights go once no request holds it (see pin)."""
        with self.pins:
            self.unload_later.add(name)

    def pin(self, name: str | None) -> None:
        """A request that will use adapter `name` holds it from its arrival to its end: an eviction from the
        replica's LRU meanwhile unloads it only after the last such request is done."""
        if name and name != BASE:
            with self.pins:
                self.in_use[name] = self.in_use.get(name, 0) + 1

    def unpin(self, name: str | None) -> None:
        if name and name != BASE:
            with self.pins:
                if self.in_use.get(name, 0) > 1:
                    self.in_use[name] -= 1
                else:
                    self.in_use.pop(name, None)

    def _delete_evicted(self) -> None:
        """Delete the weights of evicted adapters nobody holds (engine lock held)."""
        with self.pins:
            gone = {n for n in self.unload_later if not self.in_use.get(n)}
            self.unload_later -= gone
        for n in gone:
            if n in self.adapters:
                self._delete(n)

    def _delete(self, name: str) -> None:
        """Delete an adapter's weights (engine lock held). PEFT keeps a deleted adapter as its active one when
        it was the last (a later load then fails with KeyError): the last one unwraps the base model, and
        otherwise a remaining adapter becomes the active one (mixed batches choose per row anyway)."""
        from peft import PeftModel

        del self.adapters[name]
        model = self.model
        assert isinstance(model, PeftModel)  # it had this adapter
        if not self.adapters:
            self.model = model.unload().eval()
            return
        model.delete_adapter(name)
        if any(a not in model.peft_config for a in model.active_adapters):
            model.set_adapter(next(iter(self.adapters)))
        model.eval()

    # ------------------------------------------------------------------ generation

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

    def kv_bytes_per_token(self) -> int:
        """KV-cache bytes one token of one request holds (keys and values of every layer)."""
        c = self.model.config.get_text_config() if hasattr(self.model.config, "get_text_config") else self.model.config
        heads = getattr(c, "num_attention_heads", 1) or 1
        kv_heads = getattr(c, "num_key_value_heads", None) or heads
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
        size = next(self.model.parameters()).element_size()
        return 2 * c.num_hidden_layers * kv_heads * head_dim * size

    def generate(self, requests: list[GenerationRequest]):
        """Yield, per decoding step, one Delta (or None once finished) for each request, in order: a static
        batch of these requests, run to its end (a request that fails raises)."""
        batch = RunningBatch(self, merge=False)
        admit, n = list(enumerate(requests)), len(requests)
        done = [False] * n
        while not all(done):
            events, failures = batch.step(admit, [])
            admit = []
            if failures:
                raise failures[0][1]
            out: list[Delta | None] = [None] * n
            for key, delta in events:
                out[key] = delta
                done[key] = done[key] or bool(delta.finish_reason)
            yield out


class RequestFailed(Exception):
    """One request could not run (e.g. its adapter is gone, its prefill ran out of memory); the others go on.
    `status`: the HTTP status its client gets (503: worth retrying)."""

    def __init__(self, message: str, status: int = 500):
        super().__init__(message)
        self.status = status


class RunningBatch:
    """The requests a replica is decoding right now, advanced together one token per `step`.

    Continuous batching (`merge=True`): each step first drops the requests whose clients left, then either
    prefills the newly admitted ones and merges their KV cache into the running one (left-padded to a
    common length) or, with nobody to admit, advances the running requests one token. A new request never
    waits for a batch to finish, nor for a decode of the others before its first token; a finished or
    abandoned one stops costing compute at once. This works for models whose cache is a plain
    DynamicCache (decoder-only models without sliding-window layers); `supported()` says so.

    Static batches (`merge=False`, every other model): requests are admitted only into an empty batch, whose
    cache is never cut; a finished or abandoned request stops producing at once and the batch ends as soon
    as every request in it finished or left.

    A request whose prefill fails fails alone (`step` returns it among the failures); the others in its
    admission go on. A failing decode step, which involves every running request, fails them all.
    """

    def __init__(self, engine: TransformersEngine, merge: bool = True):
        self.engine = engine
        self.merge = merge
        self.keys: list = []  # caller's key per row
        self.rows: list[_Row] = []
        self.names: list[str] = []
        self.next_ids: list[int] = []
        self.past = None
        self.mask = None

    def __len__(self) -> int:
        """Requests still producing tokens."""
        return sum(not r.done for r in self.rows)

    def room(self, max_batch: int) -> int:
        """How many new requests the next step may admit."""
        if self.merge:
            return max(0, max_batch - len(self.rows))
        return max_batch if not self.rows else 0

    def supported(self) -> bool:
        import torch
        from transformers.cache_utils import DynamicCache, DynamicLayer

        probe = torch.tensor([[self.engine.pad_id]], device=self.engine.device)
        with self.engine.lock, self.engine.no_autograd():
            past = self.engine.model(input_ids=probe, use_cache=True, logits_to_keep=1).past_key_values
        return type(past) is DynamicCache and all(type(layer) is DynamicLayer for layer in past.layers)

    def step(self, admit: list[tuple], drop: list) -> tuple[list[tuple], list[tuple]]:
        """Drop the rows of the keys in `drop`, then either admit `admit` [(key, GenerationRequest)] (their
        prefill gives each its first token) or, with none to admit, advance the running requests one token.
        Returns ([(key, Delta)] for every request that produced something, [(key, exception)] for admitted
        requests that failed)."""

        events: list[tuple] = []
        failures: list[tuple] = []
        with self.engine.lock, self.engine.no_autograd():
            self.engine._delete_evicted()
            if drop:
                self._drop(set(drop))
            if admit:  # a step that admits only prefills: the new requests' first tokens come out without
                events, failures = self._admit(admit)  # waiting for a decode of the others, who decode next
            elif len(self):
                events = self._decode()
        return events, failures

    def fail_all(self) -> list:
        """Forget every request (after a failed decode step); returns their keys."""
        keys = [k for k, r in zip(self.keys, self.rows, strict=True) if not r.done]
        self._clear()
        return keys

    # -------------------------------------------------------------- internals (engine lock held)

    def _clear(self) -> None:
        self.keys, self.rows, self.names, self.next_ids, self.past, self.mask = [], [], [], [], None, None

    def _pick(self, rows: list[_Row], logits, batch: int) -> tuple[list[Delta], list[int]]:
        constrained = [i for i, r in enumerate(rows) if r.matcher is not None]
        if constrained:
            logits = self._constrain(logits, [rows[i] for i in constrained], constrained)
        deltas, tokens = [], []
        for i, row in enumerate(rows):
            token = row.pick(logits[i])
            d = row.advance(token, self.engine.stop_ids)
            d.batch_size = batch
            deltas.append(d)
            tokens.append(token)
        return deltas, tokens

    def _constrain(self, logits, rows: list[_Row], at: list[int]):
        """`logits` with every token the rows' grammars forbid at -inf (only the constrained rows' lines: free and
        constrained requests share a batch). A row whose grammar admits nothing may only stop."""
        import llguidance.torch
        import torch

        vocab = logits.shape[-1]
        bitmask = llguidance.torch.allocate_token_bitmask(len(rows), vocab)
        for k, row in enumerate(rows):
            assert row.matcher is not None  # only constrained rows come here
            llguidance.torch.fill_next_token_bitmask(row.matcher, bitmask, k)
        bits = (bitmask.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1
        allowed = bits.reshape(len(rows), -1)[:, :vocab].bool().to(logits.device)
        stuck = ~allowed.any(dim=-1)
        if stuck.any():
            allowed[stuck, sorted(self.engine.stop_ids)[0]] = True
        idx = torch.tensor(at, device=logits.device)
        logits = logits.clone()
        logits[idx] = logits[idx].masked_fill(~allowed, float("-inf"))
        return logits

    def _drop(self, keys: set) -> None:
        for k, row in zip(self.keys, self.rows, strict=True):
            if k in keys:
                row.done = True
        self._compact()

    def _compact(self) -> None:
        """Rows that finished or left: cut out of the cache (merge), or the whole batch once all are done."""
        if not self.rows:
            return
        if all(r.done for r in self.rows):
            self._clear()
        elif self.merge and any(r.done for r in self.rows):
            self._select([i for i, r in enumerate(self.rows) if not r.done])

    def _decode(self) -> list[tuple]:
        import torch

        dev = self.engine.device
        ids = torch.tensor(self.next_ids, device=dev).unsqueeze(1)
        assert self.mask is not None  # rows are running
        self.mask = torch.cat([self.mask, torch.ones_like(ids)], dim=1)
        out = self.engine.forward(ids, self.mask, self.past, self.names)
        self.past = out.past_key_values
        logits = out.logits[:, -1, :]
        live = [i for i, r in enumerate(self.rows) if not r.done]
        deltas, tokens = self._pick([self.rows[i] for i in live], logits[live], len(live))
        events = [(self.keys[i], d) for i, d in zip(live, deltas, strict=True)]
        for i, t in zip(live, tokens, strict=True):
            self.next_ids[i] = t
        for i, r in enumerate(self.rows):
            if r.done:
                self.next_ids[i] = self.engine.pad_id
        self._compact()
        return events

    def _admit(self, admit: list[tuple]) -> tuple[list[tuple], list[tuple]]:
        """Prefill the admitted requests together; if that fails, find the ones that fail alone and admit the
        rest, so one bad request fails alone."""
        e = self.engine
        failures, ok = [], []
        matchers: dict[int, object] = {}  # id(request) -> its grammar's matcher
        for key, req in admit:
            name = req.adapter or BASE
            if name != BASE and name not in e.adapters:
                failures.append((key, RequestFailed("the request's adapter is not loaded on this replica; retry", 503)))
                continue
            if req.grammar is not None:
                try:
                    matchers[id(req)] = e.matcher(req.grammar)
                except Exception as exc:  # noqa: BLE001 - this request's grammar: it fails alone
                    failures.append((key, _failed(exc)))
                    continue
            ok.append((key, req))
        if not ok:
            return [], failures
        try:
            return self._prefill(ok, matchers), failures
        except Exception as e:  # noqa: BLE001 - which request caused it is found below
            if len(ok) == 1:
                return [], failures + [(ok[0][0], _failed(e))]
        healthy = []
        for key, req in ok:
            try:
                self._probe(req)
                healthy.append((key, req))
            except Exception as exc:  # noqa: BLE001 - this request fails, the others go on
                failures.append((key, _failed(exc)))
        if not healthy:
            return [], failures
        try:
            return self._prefill(healthy, matchers), failures
        except Exception as exc:  # noqa: BLE001 - each works alone but not together (e.g. out of memory)
            return [], failures + [(k, _failed(exc)) for k, _ in healthy]

    def _probe(self, req: GenerationRequest) -> None:
        import torch

        ids = torch.tensor([req.prompt_ids], device=self.engine.device)
        self.engine.forward(ids, torch.ones_like(ids), None, [req.adapter or BASE])

    def _prefill(self, admit: list[tuple], matchers: dict | None = None) -> list[tuple]:
        import torch

        e, dev = self.engine, self.engine.device
        keys = [k for k, _ in admit]
        reqs = [r for _, r in admit]
        names = [r.adapter or BASE for r in reqs]
        rows = [_Row(r, e.tokenizer, dev, (matchers or {}).get(id(r))) for r in reqs]
        width = max(len(r.prompt_ids) for r in reqs)
        ids = torch.tensor([[e.pad_id] * (width - len(r.prompt_ids)) + r.prompt_ids for r in reqs], device=dev)
        mask = torch.tensor([[0] * (width - len(r.prompt_ids)) + [1] * len(r.prompt_ids) for r in reqs], device=dev)
        out = self.engine.forward(ids, mask, None, names)
        total = len(self) + len(rows)
        deltas, tokens = self._pick(rows, out.logits[:, -1, :], total)
        events = list(zip(keys, deltas, strict=True))
        if not self.merge:  # an empty batch takes these rows, finished ones included (its cache is never cut)
            self.past, self.mask = out.past_key_values, mask
            self.keys, self.rows, self.names = keys, rows, names
            self.next_ids = [e.pad_id if r.done else t for r, t in zip(rows, tokens, strict=True)]
            self._compact()
            return events
        keep = [i for i, r in enumerate(rows) if not r.done]
        if not keep:
            return events
        idx = torch.tensor(keep, device=dev)
        new_past = out.past_key_values
        mask = mask[idx]
        for layer in new_past.layers:
            layer.keys, layer.values = layer.keys[idx], layer.values[idx]
        if not self.rows:
            self.past, self.mask = new_past, mask
            _growing(self.past)
        else:
            assert self.past is not None and self.mask is not None  # rows are running
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
            self._clear()
            return
        idx = torch.tensor(keep, device=self.engine.device)
        assert self.past is not None and self.mask is not None  # rows are running
        mask = self.mask[idx]
        first = int((mask.sum(0) > 0).nonzero()[0])  # columns that are padding for every row go
        self.mask = mask[:, first:]
        for layer in self.past.layers:
            layer.keys, layer.values = layer.keys[idx, :, first:], layer.values[idx, :, first:]
        self.keys = [self.keys[i] for i in keep]
        self.rows = [self.rows[i] for i in keep]
        self.names = [self.names[i] for i in keep]
        self.next_ids = [self.next_ids[i] for i in keep]


_GROWING = None
GROW_BY = 64  # token positions of room a KV-cache layer gains when it is full


def _growing(cache) -> None:
    """Let every layer of a DynamicCache extend into spare room instead of re-concatenating its keys and
    values at each decode step (a copy of the whole cache per token). Cutting or merging rows replaces a
    layer's tensors; the next step then copies them once into a new, larger buffer."""
    from transformers.cache_utils import DynamicLayer

    global _GROWING
    if _GROWING is None:

        class GrowingLayer(DynamicLayer):
            buffers = None  # (keys, values) with room beyond the positions in use

            def update(self, key_states, value_states, *args, **kwargs):
                if not self.is_initialized or self.keys is None or self.keys.numel() == 0:
                    return super().update(key_states, value_states, *args, **kwargs)
                n, add = self.keys.shape[-2], key_states.shape[-2]
                buf = self.buffers
                if (
                    buf is None
                    or buf[0].data_ptr() != self.keys.data_ptr()
                    or buf[0].shape[:-2] != self.keys.shape[:-2]
                    or n + add > buf[0].shape[-2]
                ):
                    buf = tuple(self._room(t, n + add + GROW_BY) for t in (self.keys, self.values))
                    self.buffers = buf
                buf[0][:, :, n : n + add] = key_states
                buf[1][:, :, n : n + add] = value_states
                self.keys, self.values = buf[0][:, :, : n + add], buf[1][:, :, : n + add]
                return self.keys, self.values

            @staticmethod
            def _room(t, length: int):
                import torch

                out = torch.empty((*t.shape[:-2], length, t.shape[-1]), dtype=t.dtype, device=t.device)
                out[:, :, : t.shape[-2]] = t
                return out

        _GROWING = GrowingLayer
    for layer in cache.layers:
        if type(layer) is DynamicLayer:
            layer.__class__ = _GROWING


def _failed(exc: BaseException) -> RequestFailed:
    """A request's own failure, in words for its client."""
    if isinstance(exc, RequestFailed):
        return exc
    if isinstance(exc, MemoryError) or "out of memory" in str(exc).lower():
        return RequestFailed(f"the replica ran out of memory for this request ({type(exc).__name__}); retry", 503)
    return RequestFailed(f"generation failed for this request ({type(exc).__name__}: {exc})")


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
