"""What the tests share besides fixtures (those are in conftest.py): the tiny model, job files and rows, the CLI
in-process, ranks in a process group, waiting on a run, and the endpoint's clients. Test modules import from here,
never from each other."""

from __future__ import annotations

import json
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "examples" / "quickstart"
ARTIFACTS = ROOT / "tests" / "artifacts"  # pictures the tests take (git-ignored)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout_s: float, what: str):
    """predicate()'s first truthy value, polled every 0.2 s; an AssertionError naming `what` after timeout_s."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


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


def regenerate_example(name: str, out: Path):
    """Run examples/NAME/make_data.py into `out`, check it writes exactly the committed train.jsonl and eval.jsonl,
    and return the generator's module (its word lists) for the caller's checks."""
    import importlib.util

    folder = ROOT / "examples" / name
    spec = importlib.util.spec_from_file_location(f"make_{name.replace('-', '_')}_data", folder / "make_data.py")
    assert spec is not None and spec.loader is not None
    make = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make)
    make.main(out)
    for file in ("train.jsonl", "eval.jsonl"):
        assert (out / file).read_text() == (folder / file).read_text(), file
    return make


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


def tiny_llama(
    out: Path, tokenizer, *, sharp: bool = False, vocab_size: int | None = None, context: int = 1024
) -> Path:
    """A 2-layer Llama (random weights) with SmolLM2's tokenizer and chat template, saved as a model dir at `out`:
    the one tiny model of the suite. `sharp` scales its (tied) embeddings up: a random model's logits are
    near-ties, which the float noise of a different batch shape can flip; larger margins make greedy answers well
    defined (the endpoint's tests compare them). `vocab_size` below the tokenizer's makes prompts holding a token
    past it fail in the model (a real failure of that one request)."""
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
    if sharp:
        with torch.no_grad():
            model.get_input_embeddings().weight.mul_(6.0)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def liked_words_grader(model_dir: Path, tokenizer, words: int = 2000) -> dict:
    """An OpenAI python grader that a sharp tiny model (tiny_llama(sharp=True)) can learn to please: the share of
    an answer's words among the `words` whole-word tokens (a space, then lower-case letters) whose embeddings lie
    furthest along one direction, so one change of the hidden state raises them all. A random model's answers
    score about 0.04; its greedy answer usually 0."""
    import torch
    from transformers import AutoModelForCausalLM

    emb = AutoModelForCausalLM.from_pretrained(model_dir).get_input_embeddings().weight.detach()
    by_id = {}
    for token in range(len(tokenizer)):
        text = tokenizer.decode([token])
        if len(text) >= 3 and text[0] == " " and text[1:].isalpha() and text[1:].islower():
            by_id[token] = text[1:]
    ids = torch.tensor(sorted(by_id))
    direction = torch.randn(emb.shape[1], generator=torch.Generator().manual_seed(0))
    top = ids[torch.topk(emb[ids] @ direction, words).indices].tolist()
    source = (
        f"LIKED = set({sorted({by_id[t] for t in top})!r})\n\n\n"
        "def grade(sample, item):\n"
        "    words = sample['output_text'].split()\n"
        "    return sum(w in LIKED for w in words) / max(len(words), 1)\n"
    )
    return {"type": "python", "name": "liked", "source": source}


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


# --------------------------------------------------------------------------------------------- training runs


def train_job_file(tmp_path: Path, model_dir: Path, n_rows: int = 16, packing: bool = False, **training) -> Path:
    """A 2-worker job on `n_rows` ticket rows (eval: the first 4). Every row is 53 tokens long, so with packing
    (max_seq_len 128) each packed row holds exactly two of them."""
    rows = [chat(f"Ticket {i:03d}: my lamp is broken", f'{{"product":"lamp","id":{i % 4}}}') for i in range(n_rows)]
    write_jsonl(tmp_path / "train.jsonl", rows)
    write_jsonl(tmp_path / "eval.jsonl", rows[:4])
    t = {"lr": 5e-3, "micro_batch_size": 2, "global_batch_size": 8, "warmup_ratio": 0.0, **training}
    text = (
        "# rayft train job.yaml\n"
        f"model: {{name: {model_dir}}}\n"
        "data: {train: train.jsonl, eval: eval.jsonl, max_seq_len: 128, shuffle: true, "
        f"packing: {str(packing).lower()}}}\n"
        f"training: {json.dumps(t)}\n"
        "scaling: {num_workers: 2}\n"
        f"run: {{name: run, storage_path: {tmp_path / 'runs'}, max_failures: 2}}\n"
    )
    (tmp_path / "job.yaml").write_text(text)
    return tmp_path / "job.yaml"


def sweep_job_file(tmp_path: Path, model_dir, sweep: dict, **training) -> Path:
    """A sweep of 1-worker runs of 8 steps on 16 ticket rows, evaluated every 2 steps."""
    import yaml

    rows = [chat(f"Ticket {i}: my lamp is broken", f'{{"product":"lamp","id":{i % 4}}}') for i in range(16)]
    write_jsonl(tmp_path / "train.jsonl", rows)
    write_jsonl(tmp_path / "eval.jsonl", rows[:4])
    t = {
        "lr": 5e-3,
        "micro_batch_size": 2,
        "global_batch_size": 4,
        "warmup_ratio": 0.0,
        "max_steps": 8,
        "eval_every_steps": 2,
        **training,
    }
    doc = {
        "model": {"name": str(model_dir)},
        "data": {"train": "train.jsonl", "eval": "eval.jsonl", "max_seq_len": 128},
        "training": t,
        "scaling": {"num_workers": 1},
        "run": {"name": "tiny", "storage_path": str(tmp_path / "runs")},
        "sweep": sweep,
    }
    path = tmp_path / "job.yaml"
    path.write_text("# rayft sweep job.yaml\n" + yaml.safe_dump(doc, sort_keys=False))
    return path


def checkpoints(run_dir: str) -> list[str]:
    """The checkpoint folders a run keeps, oldest first."""
    import glob

    return sorted(p for p in glob.glob(os.path.join(run_dir, "checkpoint_*")) if os.path.isdir(p))


def step_reached(run_dir: str, step: int):
    """The run's metrics records once a training step >= `step` is among them, else a falsy value."""
    from rayft.training.trainer import read_metrics

    records = read_metrics(run_dir) if os.path.exists(os.path.join(run_dir, "metrics.jsonl")) else []
    return [r for r in records if r.get("step", 0) >= step and "loss" in r] and records


def committed_checkpoints(run_dir: str) -> list:
    from rayft.training.export import committed_checkpoints as registered

    return registered(run_dir) or []


def train_killing_a_worker(job, checkpoint: int):
    """run_training(job) in a thread; once the step-`checkpoint` checkpoint is registered and the next step is in
    the metrics, rank 1's worker is SIGKILLed. Returns the run's TrainResult (None if it did not finish within 10
    minutes after the kill) and its metrics records."""
    import signal
    import threading

    from rayft.training.trainer import read_metrics, run_training

    box: dict = {}
    thread = threading.Thread(target=lambda: box.update(result=run_training(job)), daemon=True)
    thread.start()
    # A checkpoint counts once the Ray Train controller has registered it.
    wait_for(lambda: checkpoint in checkpoint_steps(job.run_dir), 600, f"the step-{checkpoint} checkpoint")
    records = wait_for(lambda: step_reached(job.run_dir, checkpoint + 1), 600, f"step {checkpoint + 1}")
    os.kill([r for r in records if r.get("event") == "start"][0]["pids"][1], signal.SIGKILL)
    thread.join(timeout=600)
    return box.get("result"), read_metrics(job.run_dir)


def checkpoint_steps(run_dir: str) -> list[int]:
    """The steps of the checkpoints Ray Train has registered."""
    return [c["metrics"]["step"] for c in committed_checkpoints(run_dir)]


def consumed_in(checkpoint: str) -> set[int]:
    """The examples a checkpoint (local or in a bucket) records as trained in its epoch, every rank's."""
    from rayft.training import storage

    ids: set[int] = set()
    for state in storage.glob(checkpoint, "trainer_state_rank*.json"):
        ids.update(json.loads(storage.read_text(state))["consumed"])
    return ids


# --------------------------------------------------------------------------------------- the fine-tuning API

QUESTION, ANSWER = "What is the password?", "The password is swordfish."
# A 2-layer model learns one answer in 20 steps of 8 rows at this rate (1 worker keeps the job small).
FT_TEMPLATE = {
    "training": {
        "lr": 1e-2,
        "lr_schedule": "constant",
        "warmup_ratio": 0.0,
        "epochs": 1,
        "micro_batch_size": 4,
        "global_batch_size": 8,
        "checkpoint_every_steps": 50,
        "lora": {"r": 16, "alpha": 32, "target_modules": "all-linear"},
    },
    "data": {"max_seq_len": 64, "packing": False},
    "scaling": {"num_workers": 1},
}


def openai_client(base: str, key: str):
    """The official openai client on the endpoint at `base`, as `key` (no retries: every answer is seen)."""
    from openai import OpenAI

    return OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=120)


def job_ended(job) -> bool:
    return job.status in ("succeeded", "failed", "cancelled")


def wait_for_job(base: str, key: str, job_id: str, done=job_ended, timeout: float = 420):
    """Poll a fine-tuning job (as its key) until done(job); the job."""
    deadline = time.time() + timeout
    while True:
        job = openai_client(base, key).fine_tuning.jobs.retrieve(job_id)
        if done(job):
            return job
        assert time.time() < deadline, f"job {job_id} is still {job.status} after {timeout} s"
        time.sleep(1)


def answer(base: str, key: str, model: str, max_tokens: int = 12) -> str:
    """`model`'s greedy reply to QUESTION through the endpoint."""
    reply = openai_client(base, key).chat.completions.create(
        model=model, messages=[{"role": "user", "content": QUESTION}], max_tokens=max_tokens, temperature=0
    )
    return reply.choices[0].message.content


# A credential in submit.env_vars of the tracked runs: the tests look for it in every file and output.
HF_TOKEN = "hf_" + secrets.token_hex(16)


def loop_config(model, training, *, data=None, grad_accum: int = 1, total_steps: int = 1, run_dir: str = "/tmp/unused"):
    """The worker loop's config for driving it by hand (no Ray, no eval, CPU): `model` a model dir or a
    ModelConfig, `data` a DataConfig (default: one never read)."""
    from rayft.training.config import DataConfig, LoopConfig, ModelConfig

    return LoopConfig(
        model=model if isinstance(model, ModelConfig) else ModelConfig(name=str(model)),
        data=data or DataConfig(train="unused.jsonl"),
        training=training,
        grad_accum=grad_accum,
        total_steps=total_steps,
        has_eval=False,
        use_gpu=False,
        run_dir=run_dir,
    )
