"""Shared fixtures: one local Ray for the whole suite, the built-in SmolLM2 tokenizer, and a
2-layer Llama built from a config (random weights) for fast model tests."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "examples" / "quickstart"

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Ray Train's controller polls its workers every 2 s: every run's start, each report and its end wait on that
# poll. The suite runs many short runs, so it polls faster (set before Ray starts: its workers inherit it).
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
# Each run would also start an actor that watches for node preemption (spot instances): a Python process more
# per run on two cores, for an event a local suite never sees.
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Cloud storage in tests is a real S3 API server on 127.0.0.1 (moto's, started by the `s3` fixture). Its address
# and test credentials are in the environment before any Ray process starts, since Ray's workers (training
# ranks, data tasks, replicas) inherit the environment of the cluster they belong to.
S3_PORT = int(os.environ.setdefault("RAYFT_TEST_S3_PORT", str(free_port())))
os.environ.setdefault("AWS_ENDPOINT_URL", f"http://127.0.0.1:{S3_PORT}")
os.environ.setdefault("AWS_ACCESS_KEY_ID", "rayft-test")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "rayft-test")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
# Models and adapters copied from the bucket go to a cache of this session's own, not the user's ~/.cache.
os.environ.setdefault("RAYFT_REMOTE_CACHE", tempfile.mkdtemp(prefix="rayft-test-remote-cache-"))


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the suite. 4 logical CPUs on a 2-core machine: 2 training workers hold
    one each and the data stages (fractional CPUs) still find room, as on a real cluster."""
    import ray

    from rayft.cluster.runtime import connect

    connect(num_cpus=4, dashboard=True)  # the dashboard's state API frees a stopped sweep trial's workers
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on 127.0.0.1:S3_PORT for the rest of the session (a separate process, ended by pid)."""
    import subprocess
    import sys
    import time
    import urllib.request

    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(S3_PORT)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 60
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{S3_PORT}/", timeout=2)
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError("moto's S3 server did not start") from None
            time.sleep(0.2)
    yield f"http://127.0.0.1:{S3_PORT}"
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture
def s3_bucket(s3_server, request):
    """A fresh bucket for one test, s3://rayft-<test name>/ (created as an operator would, with boto3)."""
    import re

    import boto3

    name = "rayft-" + re.sub(r"[^a-z0-9-]+", "-", request.node.name.lower())[:50].strip("-")
    boto3.client("s3").create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture(scope="session")
def serve_port():
    """The HTTP port of the suite's Ray Serve (Serve keeps the port it first started with)."""
    return free_port()


@pytest.fixture(scope="session")
def smol_tokenizer():
    from rayft.training.models import load_tokenizer

    return load_tokenizer("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smol_tokenizer):
    """A 2-layer Llama with SmolLM2's tokenizer and chat template, saved as a normal model dir."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(smol_tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=smol_tokenizer.bos_token_id,
        eos_token_id=smol_tokenizer.eos_token_id,
        pad_token_id=smol_tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(cfg)
    out = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(out)
    smol_tokenizer.save_pretrained(out)
    return out


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str


def rayft_cli(*args: str, env: dict[str, str] | None = None) -> CliResult:
    """`rayft ARGS` run in this process (typer's CliRunner): for what a command prints and its exit status,
    without a new interpreter per call. Commands that start or join Ray belong in a subprocess."""
    from typer.testing import CliRunner

    from rayft.cluster.cli import app

    r = CliRunner().invoke(app, list(args), env=env, catch_exceptions=False)
    return CliResult(r.exit_code, r.stdout, r.stderr)


def _rank_main(rank: int, world: int, port: int, fn, args: tuple, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank))
    os.environ.update(WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        out.put((rank, fn(rank, world, *args)))
    finally:
        dist.barrier()
        dist.destroy_process_group()


def run_ranks(fn, world: int, *args) -> list:
    """fn(rank, world, *args) in `world` fresh processes joined in a gloo process group, as Ray Train's
    workers are (real DeepSpeed, no Ray); returns each rank's result, in rank order. fn must be importable."""
    import torch.multiprocessing as mp

    out = mp.get_context("spawn").SimpleQueue()
    try:
        mp.start_processes(_rank_main, args=(world, free_port(), fn, args, out), nprocs=world, start_method="spawn")
    except mp.ProcessExitedException:
        # A rank can abort in gloo's teardown after it has returned its result; only a missing result fails.
        got = []
        while not out.empty():
            got.append(out.get())
        if len(got) < world:
            raise
        return [dict(got)[r] for r in range(world)]
    results = dict(out.get() for _ in range(world))
    return [results[r] for r in range(world)]


def write_jsonl(path: Path, rows: list) -> Path:
    """Rows may be dicts (dumped as JSON) or raw strings (written as-is, for malformed lines)."""
    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


def chat(user: str, reply: str, system: str | None = None) -> dict:
    msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
    if system:
        msgs.insert(0, {"role": "system", "content": system})
    return {"messages": msgs}


def greedy_reply(model, tokenizer, question: str, max_new_tokens: int) -> str:
    """The model's greedy answer to one user message, through its chat template."""
    import torch

    enc = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)


# ---------------------------------------------------------------------------------------------- serving helpers


def make_serve_model(out: Path, tokenizer, vocab_size: int | None = None, context: int = 1024) -> Path:
    """A 2-layer Llama for the Serve app, with SmolLM2's tokenizer and its (tied) embeddings scaled up: a random
    model's logits are near-ties, which the float noise of a different batch shape can flip; larger margins make
    greedy answers well defined. `vocab_size` below the tokenizer's makes prompts holding a token past it fail
    in the model (a real failure of that one request)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=vocab_size or len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=context,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(6.0)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def make_adapters(base_dir: Path, root: Path, names: list[str]) -> dict:
    """LoRA adapters over a model with random (non-zero) weights, saved under root/NAME; their merged models."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    merged = {}
    for i, name in enumerate(names):
        torch.manual_seed(100 + i)
        base = AutoModelForCausalLM.from_pretrained(base_dir)
        cfg = LoraConfig(r=8, lora_alpha=64, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False)
        peft_model = get_peft_model(base, cfg)
        peft_model.save_pretrained(root / name)
        merged[name] = peft_model.merge_and_unload().eval()
    return merged


def serve_deploy(spec, port: int) -> str:
    """Deploy a ServeSpec as `rayft serve` does (on the suite's Ray, at the session's HTTP port); the base URL."""
    from rayft.serving.deploy import deploy

    return deploy(spec.with_serve(port=port))


def post_json(base: str, path: str, body, key: str | None = None, raw: bool = False, headers: dict | None = None):
    import requests

    h = {"Content-Type": "application/json"} | (headers or {})
    if key:
        h["Authorization"] = f"Bearer {key}"
    data = body if raw else json.dumps(body)
    return requests.post(f"{base}{path}", data=data, headers=h, timeout=120)


def completion_greedy(model, tok, prompt: str, n: int) -> str:
    """transformers' own greedy continuation of a raw prompt (what /v1/completions at temperature 0 returns)."""
    import torch

    enc = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=n, do_sample=False)
    return tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)


def sse_events(lines) -> list:
    """The data payloads of server-sent-event lines, parsed ('[DONE]' kept as the string)."""
    out = []
    for line in lines:
        if line and line.startswith("data: "):
            data = line[len("data: ") :]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out
