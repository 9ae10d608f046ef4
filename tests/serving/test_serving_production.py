"""The endpoint under load, faults and hostile input, over real HTTP (the real Serve app, the tiny model):
clients that leave mid-stream, timeouts and cancelled calls free their batch slots at the next step; one
failing request fails alone; more adapters than slots, re-registered and swapped adapters; API keys the
replicas read themselves; 429 with Retry-After; chunked bodies over the limit; x-request-id; the OpenAPI
document against what the server answers; scale-down and redeploy under steady load.

The model's vocabulary is smaller than its tokenizer's: a prompt holding a token past it makes the model
itself raise for that request (a real failure of one admission, nothing injected)."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from helpers import completion_greedy, make_adapters, post_json, serve_deploy, tiny_llama
from helpers import sse_events as events

APP = "rayft"
KEY = "sk-from-the-keys-file"
ADMIN = "sk-prod-admin"  # serve.admin_keys_file: /admin routes take it
VOCAB = 32768  # the tokenizer has 49152 tokens
PROMPTS = ["Tell me a story", "hi", "The capital of France is", "Write a poem about the sea"]


@dataclass
class Endpoint:
    base: str
    name: str
    keys_file: Path
    root: Path
    merged: dict
    tokenizer: object
    base_model: object
    bad_prompt: str


@pytest.fixture(scope="module")
def model_dir(smol_tokenizer, tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("prod-model"), smol_tokenizer, sharp=True, vocab_size=VOCAB, context=8192)


@pytest.fixture(scope="module")
def prod(ray_local, model_dir, smol_tokenizer, serve_port, tmp_path_factory):
    from ray import serve
    from transformers import AutoModelForCausalLM

    from rayft.serving.config import ServeConfig
    from rayft.serving.spec import build_spec

    root = tmp_path_factory.mktemp("prod-adapters")
    merged = make_adapters(model_dir, root, ["a1", "a2", "a3"])
    keys_file = tmp_path_factory.mktemp("secret") / "api-keys"
    (keys_file.parent / "admin-keys").write_text(f"{ADMIN}\n")
    cfg = ServeConfig(
        max_batch_size=8,
        # 8 in the batch; room for the tests' own calls to the replica, and for requests a test just abandoned
        max_ongoing_requests=24,
        max_queued_requests=4,
        batch_wait_timeout_s=0.05,
        adapters={n: str(root / n) for n in merged},
        adapter_roots=[str(root)],
        max_adapters_per_replica=1,
        max_tokens_limit=8000,
        request_timeout_s=3,
        max_body_bytes=200_000,
        api_keys_file=str(keys_file),
        admin_keys_file=str(keys_file.parent / "admin-keys"),
    )
    # As for a config deployed elsewhere: the keys file exists only where the replicas run, so no key is in the
    # spec; the replicas must read it themselves.
    spec = build_spec(str(model_dir), cfg, elsewhere=True)
    assert spec.key_hashes == []
    keys_file.write_text(f"# rotated by the operator\n{KEY}\n")
    base = serve_deploy(spec, serve_port)
    tok = smol_tokenizer
    bad = next(
        tok.decode([i])
        for i in range(VOCAB, len(tok))
        if tok.decode([i]).startswith(" ") and tok.decode([i]).strip().isalpha()
        and tok(tok.decode([i]), add_special_tokens=False)["input_ids"] == [i]
    )  # fmt: skip
    for p in PROMPTS:
        assert max(tok(p)["input_ids"]) < VOCAB, p
    bad_prompt = "Tell me a story about" + bad
    assert max(tok(bad_prompt)["input_ids"]) >= VOCAB
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    yield Endpoint(base, spec.model_name, keys_file, root, merged, tok, model, bad_prompt)
    serve.delete(APP)


def replica_info() -> dict:
    from ray import serve

    return serve.get_deployment_handle("model", APP).info.remote().result(timeout_s=60)


def wait_until(check, timeout_s: float, what: str):
    deadline = time.time() + timeout_s
    while True:
        got = check()
        if got:
            return got
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def post(ep: Endpoint, path: str, body, key: str | None = KEY, **kw):
    return post_json(ep.base, path, body, key=key, **kw)


def open_stream(ep: Endpoint, prompt: str, max_tokens: int, model: str | None = None):
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    if model:
        body["model"] = model
    r = requests.post(
        f"{ep.base}/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, stream=True, timeout=60
    )
    assert r.status_code == 200, r.text
    return r


def test_clients_that_leave_mid_stream_free_their_slots_at_the_next_step(prod):
    before = replica_info()
    streams = [open_stream(prod, PROMPTS[i % 4], 1000) for i in range(8)]
    iters = [r.iter_lines(decode_unicode=True) for r in streams]
    for it in iters:  # each stream is producing tokens
        assert len(events([next(it), next(it), next(it)])) >= 2
    assert replica_info()["running"] == 8
    for r in streams:
        r.close()
    after = wait_until(lambda: (i := replica_info())["running"] == 0 and i, 20, "the abandoned requests to leave")
    assert after["cancelled"] - before["cancelled"] == 8
    # the step in flight when a caller left may still produce its token, then the row is dropped
    assert after["tokens_after_cancel"] - before["tokens_after_cancel"] <= 2 * 8
    assert after["finished"] == before["finished"]  # none of them ran on to max_tokens
    # a fresh request has the replica to itself again
    r = post(prod, "/v1/completions", {"prompt": "hi", "max_tokens": 8, "temperature": 0})
    assert r.status_code == 200 and r.headers["x-rayft-batch-size"] == "1"


def test_a_request_past_its_timeout_and_a_cancelled_call_stop_generating(prod):
    from ray import serve

    before = replica_info()
    # 8000 tokens take the tiny model ~11 s on 2 cores (2000 took 2.7 s, under the 3 s timeout)
    r = open_stream(prod, "Tell me a story", 8000)
    got = events(r.iter_lines(decode_unicode=True))
    assert got[-1] == "[DONE]"
    assert got[-2]["error"]["code"] == "timeout" and got[-2]["error"]["type"] == "timeout_error"
    assert any(e["choices"][0]["text"] for e in got[:-2] if "choices" in e)  # the stream had begun
    r = post(prod, "/v1/completions", {"prompt": "Tell me a story", "max_tokens": 8000, "temperature": 0})
    assert r.status_code == 504 and r.json()["error"]["code"] == "timeout", (r.elapsed, str(r.json())[-300:])
    wait_until(lambda: replica_info()["running"] == 0, 20, "the timed-out requests to leave")
    # a handle call cancelled by its caller (another deployment, a script)
    ids = prod.tokenizer("Tell me a story")["input_ids"]
    gen = (
        serve.get_deployment_handle("model", APP)
        .options(stream=True)
        .generate.remote({"prompt_ids": ids, "max_tokens": 2000, "temperature": 0.0})
    )
    assert next(gen)["completion_tokens"] >= 1
    gen.cancel()
    after = wait_until(lambda: (i := replica_info())["running"] == 0 and i, 20, "the cancelled call to leave")
    assert after["cancelled"] - before["cancelled"] == 3
    assert after["finished"] == before["finished"]


def test_a_failing_request_fails_alone_and_the_others_in_its_batch_finish(prod):
    tok, model = prod.tokenizer, prod.base_model
    streams = [open_stream(prod, p, 200) for p in PROMPTS]
    iters = [r.iter_lines(decode_unicode=True) for r in streams]
    for it in iters:
        next(it)

    def complete(prompt: str):
        return post(prod, "/v1/completions", {"prompt": prompt, "max_tokens": 12, "temperature": 0})

    # admitted together with healthy requests (one prefill), and on its own beside the running streams
    with ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(complete, [PROMPTS[1], prod.bad_prompt, PROMPTS[2], PROMPTS[3]]))
    bad = replies[1]
    assert bad.status_code == 500, bad.text
    assert bad.json()["error"]["type"] == "server_error" and "IndexError" in bad.json()["error"]["message"]
    for prompt, r in zip([PROMPTS[1], PROMPTS[2], PROMPTS[3]], [replies[0], replies[2], replies[3]], strict=True):
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == completion_greedy(model, tok, prompt, 12)
    for it in iters:
        got = events(it)
        assert got[-1] == "[DONE]" and not any("error" in e for e in got[:-1] if isinstance(e, dict))
        assert got[-2]["choices"][0]["finish_reason"] in ("length", "stop")
    assert replica_info()["running"] == 0


def test_more_adapters_than_slots_each_answer_with_its_own_weights(prod):
    tok = prod.tokenizer
    jobs = [(name, p) for p in PROMPTS[:2] for name in ("a1", "a2", "a3")]

    def ask(job):
        name, prompt = job
        body = {"model": f"{prod.name}:{name}", "prompt": prompt, "max_tokens": 10, "temperature": 0}
        return post(prod, "/v1/completions", body)

    with ThreadPoolExecutor(len(jobs)) as pool:
        replies = list(pool.map(ask, jobs))
    for (name, prompt), r in zip(jobs, replies, strict=True):
        assert r.status_code == 200, r.text  # an adapter evicted while its requests wait is never lost
        assert r.json()["choices"][0]["text"] == completion_greedy(prod.merged[name], tok, prompt, 10), name
    post(prod, "/v1/completions", {"prompt": "hi", "max_tokens": 2})  # a step deletes the evicted weights
    assert len(replica_info()["adapters"]) <= 1  # serve.max_adapters_per_replica


def test_a_re_registered_adapter_serves_its_new_weights(prod):
    tok = prod.tokenizer

    def answer():
        body = {"model": f"{prod.name}:fresh", "prompt": "hi", "max_tokens": 10, "temperature": 0}
        r = post(prod, "/v1/completions", body)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]

    for name in ("a1", "a2", "a1"):
        r = post(prod, "/admin/adapters", {"name": "fresh", "path": str(prod.root / name)}, key=ADMIN)
        assert r.status_code == 200, r.text
        assert answer() == completion_greedy(prod.merged[name], tok, "hi", 10), name
    r = post(prod, "/admin/adapters", {"name": "nothing", "path": str(prod.root)}, key=ADMIN)
    assert r.status_code == 404 and "no LoRA adapter" in r.json()["error"]["message"]


def test_an_adapter_dir_swapped_for_a_link_outside_the_roots_is_refused_at_load(prod, tmp_path):
    import shutil

    inside = prod.root / "swappable"
    shutil.copytree(prod.root / "a3", inside)
    r = post(prod, "/admin/adapters", {"name": "swappable", "path": str(inside)}, key=ADMIN)
    assert r.status_code == 200, r.text
    outside = tmp_path / "elsewhere"
    shutil.copytree(prod.root / "a2", outside)
    shutil.rmtree(inside)
    inside.symlink_to(outside)  # after registration, before any replica loaded it
    body = {"model": f"{prod.name}:swappable", "prompt": "hi", "max_tokens": 4}
    r = post(prod, "/v1/completions", body)
    assert r.status_code == 400, r.text
    assert "outside the directories adapters may come from" in r.json()["error"]["message"]


def test_replicas_read_the_keys_file_and_follow_its_rotation(prod):
    assert requests.get(f"{prod.base}/v1/models", timeout=30).status_code == 401
    assert (
        requests.get(f"{prod.base}/v1/models", headers={"Authorization": "Bearer nope"}, timeout=30).status_code == 401
    )
    ok = {"Authorization": f"Bearer {KEY}"}
    assert requests.get(f"{prod.base}/v1/models", headers=ok, timeout=30).status_code == 200
    assert post(prod, "/admin/adapters", {"name": "x", "path": str(prod.root / "a1")}, key=None).status_code == 401
    rotated = "sk-rotated"
    digest = __import__("hashlib").sha256(rotated.encode()).hexdigest()
    prod.keys_file.write_text(f"sha256:{digest}\n")  # a key may be given by its digest
    new = {"Authorization": f"Bearer {rotated}"}
    try:
        wait_until(
            lambda: requests.get(f"{prod.base}/v1/models", headers=new, timeout=30).status_code == 200,
            30,
            "the rotated key",
        )
        assert requests.get(f"{prod.base}/v1/models", headers=ok, timeout=30).status_code == 401
        prod.keys_file.write_text("")  # emptied: every request is refused, the endpoint does not open
        wait_until(
            lambda: requests.get(f"{prod.base}/v1/models", headers=new, timeout=30).status_code == 401,
            30,
            "the emptied keys file",
        )
        assert requests.get(f"{prod.base}/v1/models", timeout=30).status_code == 401
    finally:
        prod.keys_file.write_text(f"{KEY}\n")
        wait_until(
            lambda: requests.get(f"{prod.base}/v1/models", headers=ok, timeout=30).status_code == 200, 30, "the key"
        )


def test_a_full_queue_answers_429_with_retry_after_and_the_openai_client_retries(prod):
    from openai import OpenAI

    def raw(i: int):
        body = {"prompt": PROMPTS[i % 4], "max_tokens": 30, "temperature": 0, "stream": i % 2 == 0}
        return post(prod, "/v1/completions", body)

    with ThreadPoolExecutor(40) as pool:  # more than 24 running or waiting on the replica + 4 queued
        replies = list(pool.map(raw, range(40)))
    statuses = [r.status_code for r in replies]
    assert set(statuses) <= {200, 429}, statuses
    assert statuses.count(429) >= 1 and statuses.count(200) >= 8, statuses
    for r in replies:
        if r.status_code == 429:
            assert r.headers["Retry-After"] == "1"
            assert r.json()["error"]["type"] == "rate_limit_error"
    client = OpenAI(base_url=f"{prod.base}/v1", api_key=KEY, max_retries=8, timeout=60)

    def with_client(i: int):
        return client.completions.create(model=prod.name, prompt=PROMPTS[i % 4], max_tokens=20, temperature=0)

    with ThreadPoolExecutor(20) as pool:
        done = list(pool.map(with_client, range(20)))
    assert all(c.choices[0].finish_reason in ("length", "stop") for c in done)


def test_a_chunked_body_over_the_limit_gets_413(prod):
    def chunks(n: int):
        yield b'{"prompt": "'
        for _ in range(n):
            yield b"x" * 1000
        yield b'", "max_tokens": 2}'

    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    url = f"{prod.base}/v1/completions"
    r = requests.post(url, data=chunks(300), headers=headers, timeout=60)  # no Content-Length: chunked
    assert r.status_code == 413 and "limit" in r.json()["error"]["message"]
    r = requests.post(url, data=chunks(5), headers=headers, timeout=60)  # a small chunked body is fine
    assert r.status_code == 200, r.text


def test_every_response_carries_a_request_id_and_the_access_log_records_it(prod):
    import glob

    import ray

    mine = {"x-request-id": "client-id-42"}
    r = post(prod, "/v1/completions", {"prompt": "hi", "max_tokens": 2}, headers=mine)
    assert r.status_code == 200 and r.headers["x-request-id"] == "client-id-42"
    seen = set()
    for r in [
        requests.get(f"{prod.base}/v1/models", timeout=30),  # 401
        post(prod, "/v1/chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "hi"}]}),
        post(prod, "/v1/completions", "{broken", raw=True),
        requests.get(f"{prod.base}/healthz", timeout=30),
        open_stream(prod, "hi", 3),
    ]:
        assert r.headers.get("x-request-id"), (r.status_code, dict(r.headers))
        seen.add(r.headers["x-request-id"])
    assert len(seen) == 5
    logs = ray._private.worker.global_worker.node.get_logs_dir_path()

    def logged() -> list[str]:
        lines = []
        for f in glob.glob(f"{logs}/serve/replica_{APP}_ingress_*.log"):
            lines += [line for line in open(f, errors="replace") if "request_id=client-id-42" in line]
        return lines

    line = wait_until(logged, 30, "the access-log line")[-1]
    assert "route=completions status=200 outcome=ok" in line


def test_the_openapi_document_declares_what_the_server_answers(prod):
    assert requests.get(f"{prod.base}/openapi.json", timeout=30).status_code == 401  # the document takes a key too
    doc = requests.get(f"{prod.base}/openapi.json", headers={"Authorization": f"Bearer {KEY}"}, timeout=30).json()
    # (a system message of its own: the template's default one holds tokens past this model's vocabulary)
    SYSTEM = {"role": "system", "content": "hi"}  # noqa: N806
    assert "422" not in json.dumps(doc["paths"])
    name = prod.name
    tries = [
        ("get", "/v1/models", None, None),
        ("get", "/v1/models/{model_id}", f"/v1/models/{name}", None),
        ("get", "/v1/models/{model_id}", "/v1/models/nope", None),
        ("post", "/v1/chat/completions", None, ""),  # no body
        ("post", "/v1/chat/completions", None, {"messages": [SYSTEM, {"role": "tool"}], "max_tokens": 2}),
        (
            "post",
            "/v1/chat/completions",
            None,
            {"messages": [SYSTEM, {"role": "user", "content": ""}], "max_tokens": 2},
        ),
        ("post", "/v1/completions", None, {"prompt": "", "max_tokens": 2}),
        ("post", "/v1/completions", None, {"prompt": "hi", "max_tokens": 9000}),
        ("post", "/admin/adapters", None, {"name": "bad name!", "path": "/"}),
        ("get", "/readyz", None, None),
    ]
    for method, route, path, body in tries:
        url = prod.base + (path or route)
        headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
        data = None if body is None else (body if isinstance(body, str) else json.dumps(body))
        r = requests.request(method, url, data=data, headers=headers, timeout=60)
        assert r.status_code < 500, (route, body, r.text)
        declared = doc["paths"][route][method]["responses"]
        assert str(r.status_code) in declared, (route, body, r.status_code, list(declared))
        assert "x-request-id" in declared[str(r.status_code)]["headers"]
        if r.status_code >= 400:
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    # what the document allows is accepted: an empty prompt, a tool message without content
    assert post(prod, "/v1/completions", {"prompt": "", "max_tokens": 2}).status_code == 200
    post429 = doc["paths"]["/v1/completions"]["post"]["responses"]["429"]
    assert "Retry-After" in post429["headers"]
    assert "text/event-stream" in doc["paths"]["/v1/completions"]["post"]["responses"]["200"]["content"]


def test_scale_down_and_redeploy_under_steady_load_drop_nothing(ray_local, model_dir, serve_port):
    """2 -> 1 replicas, then a redeploy with a changed setting (every replica replaced), while 4 clients keep
    streaming: every request answers 200 and every stream ends with its finish_reason and [DONE]."""
    from ray import serve

    from rayft.serving.app import build_app
    from rayft.serving.config import ServeConfig
    from rayft.serving.deploy import APP_NAME
    from rayft.serving.spec import build_spec

    cfg = ServeConfig(
        autoscaling={"min_replicas": 2, "max_replicas": 2},
        cpus_per_replica=0.5,
        max_batch_size=4,
        batch_wait_timeout_s=0,
        request_timeout_s=60,
        drain_timeout_s=30,
    )
    spec = build_spec(str(model_dir), cfg).with_serve(port=serve_port)
    base = serve_deploy(spec, serve_port)

    def replicas() -> int:
        status = serve.status().applications[APP].deployments["model"]
        return sum(n for state, n in status.replica_states.items() if str(state).endswith("RUNNING"))

    outcomes: list = []
    stop = threading.Event()

    def load(i: int):
        while not stop.is_set():
            body = {"prompt": PROMPTS[i % 4], "max_tokens": 120, "temperature": 0, "stream": True}
            try:
                r = requests.post(f"{base}/v1/completions", json=body, stream=True, timeout=90)
                got = events(r.iter_lines(decode_unicode=True)) if r.status_code == 200 else []
                complete = len(got) >= 2 and got[-1] == "[DONE]" and "choices" in got[-2]
                outcomes.append((r.status_code, complete and got[-2]["choices"][0]["finish_reason"] is not None))
            except requests.RequestException as e:
                outcomes.append((type(e).__name__, False))

    threads = [threading.Thread(target=load, args=(i,), daemon=True) for i in range(4)]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: len(outcomes) >= 8, 120, "steady load")
        assert replicas() == 2
        serve.run(build_app(spec.with_serve(autoscaling={"min_replicas": 1, "max_replicas": 1})), name=APP_NAME,
                  route_prefix="/", blocking=False)  # fmt: skip
        wait_until(lambda: replicas() == 1, 120, "the scale-down")
        n = len(outcomes)
        wait_until(lambda: len(outcomes) >= n + 8, 120, "load after the scale-down")
        changed = spec.with_serve(autoscaling={"min_replicas": 1, "max_replicas": 1}, default_max_tokens=200)
        serve.run(build_app(changed), name=APP_NAME, route_prefix="/", blocking=False)  # replaces every replica
        n = len(outcomes)
        wait_until(lambda: len(outcomes) >= n + 8, 120, "load after the redeploy")
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=120)
        serve.delete(APP)
    bad = [o for o in outcomes if o != (200, True)]
    assert not bad, f"{len(bad)} of {len(outcomes)} requests failed or were cut: {bad[:5]}"
