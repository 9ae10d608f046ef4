"""Serving under load: what batching buys, and what Ray Serve costs.

One run, the built-in SmolLM2-135M-Instruct on the transformers engine (CPU), every figure measured
here and now:

1. Completion tokens/s with C concurrent clients (default 8), batching on (`max_batch_size` = C)
   versus off (`max_batch_size: 1`), same prompts, same `max_tokens`, greedy. Target >= 3x.
   Also p50/p99 request latency and p50 time to first token (streamed requests). The replica gets
   every core (`--cpus`, serve.cpus_per_replica = torch threads), as the peer does.
2. Serve's own overhead: HTTP p50 of a 1-token request minus the p50 of the same 1-token
   generation called directly on the engine in this process (measured on the `max_batch_size: 1`
   deployment, so no batch wait is counted), compared with the p50 of a no-op Ray Serve deployment
   answering the same POST (it reads the JSON body), measured in the same run. Target <= 1.5x.
   Also shown, to place the time: the no-op's GET, the app's /healthz, and the same POST refused by
   the ingress before any model call.
3. The peer: the same model, prompts and streaming clients against `transformers serve
   --continuous-batching` (transformers' own server, its defaults on this CPU), at 1 and at C clients:
   rayft's tokens/s and p50 TTFT as ratios of its. Target: >= 1.2x its tokens/s at C clients, TTFT p50
   no worse. Also both in bfloat16 at C clients (info).
4. Cancellation: C streaming clients each read 3 events of a long generation and disconnect; the tokens
   the replica generated for them beyond what they had read, per request (target <= 2).
5. `--part constrained` (its own run, benchmark `serve_constrained`): what constrained decoding costs per token.
   C clients with `response_format: json_schema` (every token masked by the request's llguidance grammar) against
   the same clients free, on one deployment, free / constrained / free, greedy; the ratio of time per generated
   token, constrained over the mean of the two free runs. Target <= 1.2x.

Usage: python bench/serve_load.py [--part all|constrained] [--clients 8] [--requests 4] [--max-tokens 48] [--cpus N]
       [--quick] [--no-write] [--results PATH]   (results are appended to bench/RESULTS.md)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from data_pipeline import command, results_section, verdict, write_results  # noqa: E402

NAME = "serve_load"
PROMPTS = [
    "Hi, my Orbit Earbuds stopped charging after a week. Order A-10023. What can I do?",
    "Explain in two sentences what a support ticket is.",
    "Write a short, friendly reply to a customer whose parcel is late.",
    "List three things to check when a kettle does not switch on.",
    "What is the capital of the Netherlands?",
    "Give me a one-line summary of why backups matter.",
    "How do I reset a desk lamp to factory settings?",
    "Translate 'thank you for your patience' into French.",
]


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def deploy(spec, port: int) -> str:
    """Deploy a ServeSpec at `port`; the base URL."""
    from rayft.serving.deploy import deploy

    return deploy(spec.with_serve(port=port))


ANSWER = {
    "type": "object",
    "properties": {"answer": {"type": "string"}, "confidence": {"enum": ["low", "medium", "high"]}},
    "required": ["answer", "confidence"],
    "additionalProperties": False,
}


def load(
    base: str, clients: int, per_client: int, max_tokens: int, model: str | None = None, extra: dict | None = None
) -> dict:
    """`clients` threads, each sending `per_client` streamed chat requests back to back (`extra`: more body
    fields, e.g. a response_format)."""
    import requests

    latencies, ttfts, tokens = [], [], []
    lock = threading.Lock()

    def client(i: int) -> None:
        for k in range(per_client):
            body = {
                "messages": [{"role": "user", "content": PROMPTS[(i + k) % len(PROMPTS)]}],
                "max_tokens": max_tokens,
                "temperature": 0,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            if model:
                body["model"] = model
            body |= extra or {}
            t0 = time.perf_counter()
            first, used = None, 0
            with requests.post(f"{base}/v1/chat/completions", json=body, stream=True, timeout=600) as r:
                r.raise_for_status()
                for line in r.iter_lines(decode_unicode=True):
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if chunk.get("usage"):
                        used = chunk["usage"]["completion_tokens"]
                    elif first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                        first = time.perf_counter() - t0
            with lock:
                latencies.append(time.perf_counter() - t0)
                ttfts.append(first if first is not None else latencies[-1])
                tokens.append(used)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {
        "tokens_per_s": sum(tokens) / wall,
        "tokens": sum(tokens),
        "wall": wall,
        "p50": pct(latencies, 0.5),
        "p99": pct(latencies, 0.99),
        "ttft_p50": pct(ttfts, 0.5),
    }


def abandon(base: str, clients: int) -> dict:
    """`clients` streams of 400 tokens, each closed by its client after 3 tokens; what the replica generated for
    them beyond those (tokens in flight or computed after the client left)."""
    import requests
    from ray import serve

    def info() -> dict:
        return serve.get_deployment_handle("model", "rayft").info.remote().result(timeout_s=60)

    before = info()
    body = {"messages": [{"role": "user", "content": PROMPTS[0]}], "max_tokens": 400, "temperature": 0, "stream": True}
    opened = threading.Barrier(clients)

    def client() -> None:  # reads as the tokens come, and leaves right after its third one
        with requests.post(f"{base}/v1/chat/completions", json=body, stream=True, timeout=600) as r:
            opened.wait()
            lines = (line for line in r.iter_lines(decode_unicode=True) if line.startswith("data: "))
            for _ in range(4):  # the role chunk, then 3 with text
                next(lines)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    read = 3 * clients
    deadline = time.time() + 60
    while (after := info())["running"] and time.time() < deadline:
        time.sleep(0.05)
    generated = after["generated_for_cancelled"] - before["generated_for_cancelled"]
    return {
        "cancelled": after["cancelled"] - before["cancelled"],
        "after_leaving_per_request": max(0, generated - read) / clients,
        "after_cancel_seen": after["tokens_after_cancel"] - before["tokens_after_cancel"],
    }


def chat_ids(tok, text: str) -> list[int]:
    """The token ids of one user message in the model's chat template, ready for the assistant's answer."""
    out = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def engines_alone(model_path: str, clients: int, per_client: int, max_tokens: int, threads: int) -> dict:
    """The engines without any server, in this process: rayft's RunningBatch (as a replica drives it, on the
    engine's thread) against transformers' own continuous-batching manager (the engine of `transformers
    serve --continuous-batching`), the same closed loop of `clients` x `per_client` greedy requests: a
    client's next request is added when its last one finished. Completion tokens/s of each."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from rayft.training.generation import GenerationRequest, RunningBatch, TransformersEngine

    torch.set_num_threads(threads)
    tok = AutoTokenizer.from_pretrained(model_path)

    def ids(i: int) -> list[int]:
        return chat_ids(tok, PROMPTS[i % len(PROMPTS)])

    out = {}  # transformers' first: its thread (and its OpenMP threads) end before rayft's begin
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    gen = GenerationConfig(max_new_tokens=max_tokens, do_sample=False, eos_token_id=tok.eos_token_id,
                           pad_token_id=tok.pad_token_id)  # fmt: skip
    manager = model.init_continuous_batching(generation_config=gen)
    manager.start()
    try:
        manager.add_request(ids(0), max_new_tokens=4)
        while not ((r := manager.get_result(timeout=60)) and r.is_finished()):
            pass
        owner, sent, tokens, live, t0 = {}, dict.fromkeys(range(clients), 1), 0, clients, time.perf_counter()
        for c in range(clients):
            owner[manager.add_request(ids(c), max_new_tokens=max_tokens)] = c
        while live:
            r = manager.get_result(timeout=60)
            if r is None or not r.is_finished():
                continue
            tokens, live, c = tokens + len(r.generated_tokens), live - 1, owner[r.request_id]
            if sent[c] < per_client:
                owner[manager.add_request(ids(c + sent[c]), max_new_tokens=max_tokens)] = c
                sent[c], live = sent[c] + 1, live + 1
        out["transformers"] = tokens / (time.perf_counter() - t0)
    finally:
        manager.stop(block=True, timeout=30)
    engine = TransformersEngine(model_path, threads=threads)
    batch = RunningBatch(engine)
    engine.call(lambda: list(engine.generate([GenerationRequest(ids(0), 4, temperature=0)])))  # warm-up
    sent, tokens, t0 = dict.fromkeys(range(clients), 1), 0, time.perf_counter()
    admit = [(c, GenerationRequest(ids(c), max_tokens, temperature=0)) for c in range(clients)]
    while admit or len(batch):
        events, failures = engine.call(batch.step, admit, [])
        assert not failures, failures
        admit = []
        for c, d in events:
            if d.finish_reason:
                tokens += d.completion_tokens
                if sent[c] < per_client:
                    admit.append((c, GenerationRequest(ids(c + sent[c]), max_tokens, temperature=0)))
                    sent[c] += 1
    out["rayft"] = tokens / (time.perf_counter() - t0)
    return out


def peer_server(model_path: str, port: int, log: Path, dtype: str = "float32"):
    """`transformers serve --continuous-batching` on the model, in a process of its own; returns it once
    /health answers."""
    import subprocess

    import requests

    exe = Path(sys.executable).parent / "transformers"
    cmd = [str(exe), "serve", "--continuous-batching", "--device", "cpu", "--dtype", dtype]
    cmd += ["--host", "127.0.0.1", "--port", str(port), model_path]
    proc = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"transformers serve exited ({proc.returncode}); see {log}")
        try:
            if requests.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                return proc
        except requests.RequestException:
            pass
        time.sleep(0.5)
    proc.terminate()
    raise RuntimeError(f"transformers serve did not answer /health within 300 s; see {log}")


def http_p50(url: str, body: dict | None, n: int, ok: bool = True) -> float:
    import requests

    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        r = requests.post(url, json=body, timeout=120) if body is not None else requests.get(url, timeout=120)
        if ok:
            r.raise_for_status()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[2:] if n > 4 else times)


def noop_p50(port: int, n: int, body: dict) -> tuple[float, float]:
    """p50 of a no-op Serve deployment: (GET, the POST of `body`, which it reads as JSON like any API would)."""
    from ray import serve

    @serve.deployment(ray_actor_options={"num_cpus": 0})
    class Noop:
        async def __call__(self, request):
            if request.method == "POST":
                await request.json()
            return {"ok": True}

    serve.run(Noop.bind(), name="noop", route_prefix="/noop", blocking=False)
    url = f"http://127.0.0.1:{port}/noop"
    for _ in range(100):
        try:
            http_p50(url, None, 1)
            break
        except Exception:  # noqa: BLE001 - not routed yet
            time.sleep(0.3)
    get, post = http_p50(url, None, n), http_p50(url, body, n)
    serve.delete("noop")
    return get, post


def direct_p50(model_path: str, ids: list[int], n: int, threads: int) -> float:
    """The same 1-token generation, called on the engine in this process (on its thread, like a replica)."""
    from rayft.training.generation import GenerationRequest, TransformersEngine

    engine = TransformersEngine(model_path, threads=threads)
    req = GenerationRequest(prompt_ids=ids, max_tokens=1, temperature=0)
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        engine.call(lambda: list(engine.generate([req])))
        times.append(time.perf_counter() - t0)
    return statistics.median(times[2:] if n > 4 else times)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", choices=["all", "constrained"], default="all", help="constrained: item 5 alone")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=4, help="requests per client")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument(
        "--cpus", type=int, default=os.cpu_count() or 1, help="rayft's serve.cpus_per_replica (default: every core)"
    )
    ap.add_argument("--quick", action="store_true", help="smoke run: 4 clients x 1 request, 16 tokens")
    ap.add_argument("--no-write", action="store_true", help="print the results only")
    ap.add_argument("--results", type=Path, default=ROOT / "bench" / "RESULTS.md", help="file to append to")
    args = ap.parse_args(argv)
    if args.quick:
        args.clients, args.requests, args.max_tokens = 4, 1, 16

    import ray
    from ray import serve
    from transformers import AutoTokenizer

    from rayft.cluster.runtime import connect
    from rayft.serving.config import ServeConfig
    from rayft.serving.spec import build_spec

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    connect(num_cpus=4)
    if args.part == "constrained":
        return constrained(args)
    load_avg = os.getloadavg()[0]
    results, notes = {}, []
    bf16 = f"batching, bfloat16, {args.clients} clients"
    for label, batch, dtype in (("batching", args.clients, "float32"), (bf16, args.clients, "bfloat16"),
                                ("no batching", 1, "float32")):  # fmt: skip
        cfg = ServeConfig(
            max_batch_size=batch,
            max_ongoing_requests=max(batch, args.clients),
            batch_wait_timeout_s=0.05,
            cpus_per_replica=args.cpus,
            dtype=dtype,
        )
        spec = build_spec("smollm2-135m-instruct", cfg)
        base = deploy(spec, args.port)
        load(base, 2, 1, 4)  # warm-up
        results[label] = load(base, args.clients, args.requests, args.max_tokens)
        print(label, {k: round(v, 3) for k, v in results[label].items()}, flush=True)
        if label == bf16:
            serve.delete("rayft")
            continue
        results[f"{label}, one burst"] = load(base, args.clients, 1, args.max_tokens)  # all clients at once
        if label == "batching":
            results["batching, 1 client"] = load(base, 1, args.requests, args.max_tokens)
            cancel = abandon(base, args.clients)
            print("cancellation", cancel, flush=True)
        if label == "no batching":  # a batch of one starts at once: no batch wait in the overhead
            tok = AutoTokenizer.from_pretrained(spec.model_path)
            msgs = [{"role": "user", "content": PROMPTS[4]}]
            ids = chat_ids(tok, PROMPTS[4])
            n = 12 if args.quick else 30
            one = {"messages": msgs, "max_tokens": 1, "temperature": 0}
            http_one = http_p50(f"{base}/v1/chat/completions", one, n)
            http_health = http_p50(f"{base}/healthz", None, n)  # the proxy -> ingress hop alone
            refused = one | {"max_tokens": 0}  # read, parsed and refused (400) by the ingress: no model call
            http_ingress = http_p50(f"{base}/v1/chat/completions", refused, n, ok=False)
            direct_beside = direct_p50(spec.model_path, ids, n, args.cpus)  # the idle app's processes run beside it
            model_path = spec.model_path
        serve.delete("rayft")
    direct_one = direct_p50(model_path, ids, 12 if args.quick else 30, args.cpus)
    noop_get, noop = noop_p50(args.port, 30 if args.quick else 100, one)
    serve.shutdown()
    ray.shutdown()
    alone = engines_alone(model_path, args.clients, args.requests, args.max_tokens, args.cpus)
    print("engines alone", alone, flush=True)
    peer_log = Path(os.environ.get("TMPDIR", "/tmp")) / "serve_load_transformers_serve.log"
    peer = peer_server(model_path, args.port + 1, peer_log)
    try:
        peer_base = f"http://127.0.0.1:{args.port + 1}"
        load(peer_base, 2, 1, 4, model=model_path)  # warm-up
        results["transformers serve, 1 client"] = load(peer_base, 1, args.requests, args.max_tokens, model_path)
        results[f"transformers serve, {args.clients} clients"] = load(
            peer_base, args.clients, args.requests, args.max_tokens, model_path
        )
    finally:
        peer.terminate()
        peer.wait(timeout=60)
    peer = peer_server(model_path, args.port + 1, peer_log, "bfloat16")
    try:
        load(peer_base, 2, 1, 4, model=model_path)  # warm-up
        results[f"transformers serve, bfloat16, {args.clients} clients"] = load(
            peer_base, args.clients, args.requests, args.max_tokens, model_path
        )
    finally:
        peer.terminate()
        peer.wait(timeout=60)

    b, nb = results["batching"], results["no batching"]
    p8, p1 = results[f"transformers serve, {args.clients} clients"], results["transformers serve, 1 client"]
    r1 = results["batching, 1 client"]
    peer_tps, peer_ttft = b["tokens_per_s"] / p8["tokens_per_s"], b["ttft_p50"] / p8["ttft_p50"]
    peer_tps1, peer_ttft1 = r1["tokens_per_s"] / p1["tokens_per_s"], r1["ttft_p50"] / p1["ttft_p50"]
    pb = results[f"transformers serve, bfloat16, {args.clients} clients"]
    peer_bf16 = results[bf16]["tokens_per_s"] / pb["tokens_per_s"]
    peer_bf16_ttft = results[bf16]["ttft_p50"] / pb["ttft_p50"]
    per_abandoned = cancel["after_leaving_per_request"]
    gain = b["tokens_per_s"] / nb["tokens_per_s"]
    burst_gain = results["batching, one burst"]["tokens_per_s"] / results["no batching, one burst"]["tokens_per_s"]
    overhead = max(0.0, http_one - direct_one)
    over_ratio = overhead / noop
    notes += [
        f"model: SmolLM2-135M-Instruct (float32 unless named), transformers engine, 1 replica x {args.cpus} CPUs "
        f"(serve.cpus_per_replica, torch threads); {args.clients} clients x "
        f"{args.requests} streamed chat requests back to back, max_tokens {args.max_tokens}, greedy; "
        f"'one burst' = the {args.clients} clients each send one request at the same moment",
        f"1-token request: HTTP p50 {http_one * 1000:.1f} ms, direct engine call p50 {direct_one * 1000:.1f} ms, "
        f"no-op Serve deployment p50 {noop * 1000:.1f} ms for the same POST (it reads the JSON body), "
        f"{noop_get * 1000:.1f} ms for a GET; the app's own GET /healthz p50 {http_health * 1000:.1f} ms (proxy -> "
        f"ingress and back), the same POST refused by the ingress (max_tokens 0, a 400 without a model call) "
        f"{http_ingress * 1000:.1f} ms; the direct engine call while the (idle) Serve app runs beside it "
        f"{direct_beside * 1000:.1f} ms (Ray's own processes on the same cores)",
        "peer: `transformers serve --continuous-batching --device cpu --dtype float32` (and `--dtype bfloat16` "
        "for the bfloat16 row; its defaults otherwise, all cores), the same model directory, prompts and clients, "
        "measured after rayft's runs with Ray stopped",
        f"engines alone (no server, this process, {args.cpus} torch threads, the same {args.clients} x "
        f"{args.requests} closed loop): rayft's RunningBatch {alone['rayft']:.1f} tokens/s, transformers' "
        f"continuous-batching manager {alone['transformers']:.1f} tokens/s",
        f"cancellation: {args.clients} clients read 3 events of a 400-token stream and disconnect: "
        f"{cancel['cancelled']} requests cancelled, {per_abandoned:.2f} tokens per request generated beyond what "
        f"its client had read, {cancel['after_cancel_seen']} tokens in steps already running when the replica "
        "learned of it",
        f"load average (1 min) at start: {load_avg:.2f}",
    ]
    head = ("setting", "completion tokens/s", "tokens", "wall s", "p50 latency s", "p99 latency s", "p50 TTFT s")
    rows = [
        (
            label,
            f"{r['tokens_per_s']:.1f}",
            str(r["tokens"]),
            f"{r['wall']:.1f}",
            f"{r['p50']:.2f}",
            f"{r['p99']:.2f}",
            f"{r['ttft_p50']:.2f}",
        )
        for label, r in results.items()
    ]
    ratios = [
        ("batching gain (tokens/s)", f"{gain:.2f}x", ">= 3x", verdict(gain >= 3)),
        ("batching gain, one burst (info)", f"{burst_gain:.2f}x", "", ""),
        ("Serve overhead vs no-op p50", f"{over_ratio:.2f}x", "<= 1.5x", verdict(over_ratio <= 1.5)),
        (f"tokens/s vs transformers serve, {args.clients} clients", f"{peer_tps:.2f}x", ">= 1.2x",
         verdict(peer_tps >= 1.2)),
        (f"TTFT p50 vs transformers serve, {args.clients} clients", f"{peer_ttft:.2f}x", "<= 1.0x",
         verdict(peer_ttft <= 1.0)),
        ("tokens/s vs transformers serve, 1 client (info)", f"{peer_tps1:.2f}x", "", ""),
        ("TTFT p50 vs transformers serve, 1 client (info)", f"{peer_ttft1:.2f}x", "", ""),
        (f"tokens/s vs transformers serve, bfloat16 both, {args.clients} clients (info)", f"{peer_bf16:.2f}x", "", ""),
        (f"TTFT p50 vs transformers serve, bfloat16 both, {args.clients} clients (info)", f"{peer_bf16_ttft:.2f}x",
         "", ""),
        ("engines alone: rayft / transformers' continuous batching (info)",
         f"{alone['rayft'] / alone['transformers']:.2f}x", "", ""),
        ("tokens generated per abandoned request", f"{per_abandoned:.2f}", "<= 2", verdict(per_abandoned <= 2)),
    ]  # fmt: skip
    now = datetime.now(UTC)
    cmd = command()
    section = results_section(NAME, now, cmd, notes, head, rows, ratios)
    print(section)
    if not args.no_write:
        date = f"{now:%Y-%m-%d}"
        summary = [
            f"| {NAME}: batching vs no batching, {args.clients} clients | {b['tokens_per_s']:,.1f} vs "
            f"{nb['tokens_per_s']:,.1f} tokens/s | {gain:.2f}x | >= 3x, {verdict(gain >= 3)} | {date} | `{cmd}` |",
            f"| {NAME}: Serve overhead vs no-op deployment | {overhead * 1000:.1f} vs {noop * 1000:.1f} ms p50 | "
            f"{over_ratio:.2f}x | <= 1.5x, {verdict(over_ratio <= 1.5)} | {date} | `{cmd}` |",
            f"| {NAME}: tokens/s vs transformers serve, {args.clients} clients | {b['tokens_per_s']:,.1f} vs "
            f"{p8['tokens_per_s']:,.1f} tokens/s | {peer_tps:.2f}x | >= 1.2x, {verdict(peer_tps >= 1.2)} | {date} | "
            f"`{cmd}` |",
            f"| {NAME}: TTFT p50 vs transformers serve, {args.clients} clients | {b['ttft_p50']:.2f} vs "
            f"{p8['ttft_p50']:.2f} s | {peer_ttft:.2f}x | <= 1.0x, {verdict(peer_ttft <= 1.0)} | {date} | `{cmd}` |",
            f"| {NAME}: tokens generated per abandoned request | {per_abandoned:.2f} | {per_abandoned:.2f} | <= 2, "
            f"{verdict(per_abandoned <= 2)} | {date} | `{cmd}` |",
        ]
        write_results(args.results, section, summary, name=NAME)
    return 0


def constrained(args) -> int:
    """Item 5: free / constrained / free on one deployment; writes benchmark serve_constrained."""
    from ray import serve

    from rayft.serving.config import ServeConfig
    from rayft.serving.spec import build_spec

    load_avg = os.getloadavg()[0]
    cfg = ServeConfig(
        max_batch_size=args.clients, max_ongoing_requests=args.clients, batch_wait_timeout_s=0.05,
        cpus_per_replica=args.cpus, dtype="float32",
    )  # fmt: skip
    base = deploy(build_spec("smollm2-135m-instruct", cfg), args.port)
    schema = {"response_format": {"type": "json_schema", "json_schema": {"name": "answer", "schema": ANSWER}}}
    load(base, 2, 1, 4)  # warm-up, and the engine's grammar tokenizer
    load(base, 2, 1, 4, extra=schema)
    results = {}
    for label, extra in (("free", None), ("constrained (json_schema)", schema), ("free, again", None)):
        results[label] = load(base, args.clients, args.requests, args.max_tokens, extra=extra)
        print(label, {k: round(v, 3) for k, v in results[label].items()}, flush=True)
    serve.delete("rayft")
    per_token = {k: r["wall"] / max(r["tokens"], 1) for k, r in results.items()}
    free = (per_token["free"] + per_token["free, again"]) / 2
    cost = per_token["constrained (json_schema)"] / free
    name = "serve_constrained"
    notes = [
        f"model: SmolLM2-135M-Instruct (float32), transformers engine, 1 replica x {args.cpus} CPUs; {args.clients} "
        f"clients x {args.requests} streamed chat requests back to back, max_tokens {args.max_tokens}, greedy; "
        "constrained: response_format json_schema " + json.dumps(ANSWER) + ", every token masked by the request's "
        "llguidance grammar inside the running batch",
        f"load average (1 min) at start: {load_avg:.2f}",
    ]
    head = ("setting", "completion tokens/s", "tokens", "wall s", "ms per token", "p50 TTFT s")
    rows = [
        (k, f"{r['tokens_per_s']:.1f}", str(r["tokens"]), f"{r['wall']:.1f}", f"{per_token[k] * 1000:.1f}",
         f"{r['ttft_p50']:.2f}")
        for k, r in results.items()
    ]  # fmt: skip
    ratios = [("time per token, constrained / free", f"{cost:.2f}x", "<= 1.2x", verdict(cost <= 1.2))]
    now = datetime.now(UTC)
    cmd = command()
    section = results_section(name, now, cmd, notes, head, rows, ratios)
    print(section)
    if not args.no_write:
        summary = [
            f"| {name}: time per token, constrained (json_schema) vs free, {args.clients} clients | "
            f"{per_token['constrained (json_schema)'] * 1000:.1f} vs {free * 1000:.1f} ms | {cost:.2f}x | <= 1.2x, "
            f"{verdict(cost <= 1.2)} | {now:%Y-%m-%d} | `{cmd}` |"
        ]
        write_results(args.results, section, summary, name=name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
