"""The training loop: one function that every Ray Train worker runs, top to bottom.

setup (model, DeepSpeed engine, resume state) -> loop (micro-batches from the Ray Data shard,
backward, optimizer step, metrics, eval, checkpoint) -> final eval and checkpoint.
Every rank calls `ray.train.report` the same number of times; each passes its own checkpoint
files (DeepSpeed writes one file set per rank) and Ray merges them into one directory.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import tempfile
import time
import types
from typing import Any

import numpy as np
from pydantic import Field

from rayft.training.config import DataConfig, ModelConfig, Section, TrainingConfig
from rayft.training.formats import IGNORE_INDEX as IGNORE
from rayft.training.preference import build_reference, dpo_step, evaluate_pairs, reduce_sums, uses_packed_attention
from rayft.training.run_dir import METRICS_FILE, STATE_FILE

DS_TAG = "ds"


class LoopConfig(Section):
    """What a worker needs; built by the driver (training/trainer.py) from the job file."""

    model: ModelConfig
    data: DataConfig
    training: TrainingConfig
    grad_accum: int = Field(ge=1)
    total_steps: int = Field(ge=1)
    has_eval: bool
    use_gpu: bool
    run_dir: str


def train_loop(config: dict[str, Any]) -> None:
    """The Ray Train worker function (also runnable in a single process for debugging)."""
    import ray.train
    import torch
    import torch.distributed as dist

    cfg = LoopConfig.model_validate(config)
    t = cfg.training
    rank, world = ray.train.get_context().get_world_rank(), ray.train.get_context().get_world_size()
    torch.manual_seed(t.seed)
    np.random.seed(t.seed)
    device = torch.device("cuda", torch.cuda.current_device()) if cfg.use_gpu else torch.device("cpu")
    import deepspeed  # noqa: F401  (imported before the baseline below, as transformers and peft are)
    import peft  # noqa: F401
    import transformers  # noqa: F401

    host_start = host_rss()  # the worker process before any weight exists

    # ---- setup
    model = build_model(cfg)
    release_freed_memory()
    engine = build_engine(model, cfg)
    release_freed_memory()
    dpo = t.objective == "dpo"
    reference = build_reference(cfg, engine, cfg.use_gpu) if dpo else None  # what DPO's rewards compare against
    pairs_in_one_row = dpo and uses_packed_attention(engine)
    pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    # Host memory holds the training state: hand the heap's freed pages back at every optimizer step too.
    trim_heap = device.type == "cpu" or cfg.training.offload_optimizer or cfg.training.offload_params
    step, epoch, consumed = 0, 0, set()
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint_files(checkpoint, cfg.run_dir, rank, world) as ckpt_dir:
            step, epoch, consumed = load_checkpoint(engine, ckpt_dir, lora=t.method == "lora")
    log = MetricsLog(cfg.run_dir) if rank == 0 else NullLog()
    pids, nodes = gather_workers(world)  # recorded so operators (and the failure tests) can find each worker
    log.event(
        {
            "event": "start",
            "step": step,
            "total_steps": cfg.total_steps,
            "workers": world,
            "resumed": step > 0,
            "pids": pids,
            "nodes": nodes,
        }
    )
    train_shard = ray.train.get_dataset_shard("train")
    eval_shard = ray.train.get_dataset_shard("eval") if cfg.has_eval else None

    # ---- loop
    clock = StepClock(device)
    time_grad_sync(engine, clock)
    acc = StepAccumulator()
    last_eval: dict = {}
    while step < cfg.total_steps:
        steps_this_epoch = 0
        resumed_mid_epoch = bool(consumed)
        batches = micro_batches(train_shard, t.micro_batch_size, skip=consumed)
        while step < cfg.total_steps:
            t_wait = time.perf_counter()
            group = list(itertools.islice(batches, cfg.grad_accum))
            wait_s = time.perf_counter() - t_wait
            if not all_ranks_have(len(group) == cfg.grad_accum, device):
                break  # some rank cannot fill another optimizer step: the epoch ends for everyone together
            if dpo:  # the loss is per pair: summed here, divided by the step's pairs on all ranks
                assert reference is not None
                pair_sums, count = dpo_step(engine, reference, group, device, pad_id, world, cfg.grad_accum, cfg, clock)
                loss_sum = pair_sums[0]
            else:
                losses, count = train_step(engine, group, device, pad_id, world, cfg.grad_accum, clock, trim_heap)
                loss_sum = sum(losses)
            for rows, row_ids in group:
                consumed.update(row_ids)
                acc.add(rows, len(row_ids), one_row=pairs_in_one_row)
            acc.finish(loss_sum, count, wait_s, clock.take())
            step += 1
            steps_this_epoch += 1
            metrics = acc.reduce(device, world, host_start) | {
                "step": step,
                "epoch": epoch,
                "lr": engine.get_lr()[0],
                "grad_norm": _float(engine.get_global_grad_norm()),
            }
            if dpo:
                metrics |= reduce_sums(pair_sums, device)  # reward accuracy, chosen/rejected rewards, margin
            is_last = step >= cfg.total_steps
            evaluated = eval_shard is not None and t.eval_every_steps and step % t.eval_every_steps == 0
            if evaluated and not is_last:
                last_eval = run_eval(engine, reference, eval_shard, device, pad_id, cfg)
                metrics |= last_eval
            log.write(metrics)
            want_ckpt = t.checkpoint_every_steps and step % t.checkpoint_every_steps == 0 and not is_last
            if want_ckpt:
                log.sync(force=True)  # the bucket's history reaches this step before a resume can start from it
                report_with_checkpoint(engine, metrics | last_eval, step, epoch, consumed, rank, t.method == "lora")
            elif step % t.log_every_steps == 0 or (evaluated and not is_last):  # every eval reaches Train (and Tune)
                ray.train.report(metrics)
            acc = StepAccumulator()  # after eval and checkpoint, so step times are training only
        if step < cfg.total_steps:
            # A checkpoint taken in an epoch's last step resumes into an epoch with nothing left: it just ends.
            if steps_this_epoch == 0 and not resumed_mid_epoch:
                raise RuntimeError("the training data yields no optimizer step; check data.train and batch sizes")
            epoch, consumed = epoch + 1, set()
            log.event({"event": "epoch_end", "epoch": epoch, "step": step})

    # ---- final eval and checkpoint
    final = {"step": step, "epoch": epoch, "final": True}
    if eval_shard is not None and t.eval_at_end:
        final |= run_eval(engine, reference, eval_shard, device, pad_id, cfg)
        log.write(final)
    report_with_checkpoint(engine, final, step, epoch, consumed, rank, t.method == "lora")
    log.event({"event": "end", "step": step, **memory_peaks(device, host_start)})  # the final save included
    if dist.is_initialized():
        dist.barrier()


def run_eval(engine, reference, shard, device, pad_id: int, cfg: LoopConfig) -> dict:
    """The eval split's loss (SFT), or its preference loss and reward accuracy (DPO)."""
    if cfg.training.objective == "dpo":
        return evaluate_pairs(engine, reference, shard, cfg.training.micro_batch_size, device, pad_id, cfg)
    return evaluate(engine, shard, cfg.training.micro_batch_size, device, pad_id)


# --------------------------------------------------------------------------- setup helpers


def build_model(cfg: LoopConfig):
    """The causal LM to train: the base model, wrapped with LoRA adapters for method: lora."""
    import torch
    from transformers import AutoModelForCausalLM

    from rayft.training.cpu_ops import use_fast_dropout, use_packed_attention
    from rayft.training.ds_config import resolve_precision
    from rayft.training.models import resolve_model

    precision = resolve_precision(cfg.training, cfg.use_gpu)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    sharded_from_the_start(cfg)
    model = AutoModelForCausalLM.from_pretrained(
        resolve_model(cfg.model.name),
        dtype=dtype,
        attn_implementation="sdpa",
        trust_remote_code=cfg.model.trust_remote_code,
        revision=cfg.model.revision,
    )
    model.config.use_cache = False
    if not cfg.use_gpu:  # each packed example's own causal attention instead of sdpa's full masked square
        use_packed_attention(model)
    if cfg.training.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.training.skip_untrained_logits:
        use_trained_position_logits(model)
    if cfg.training.method == "lora":
        model = apply_lora(model, cfg.training)
        if not cfg.use_gpu:
            use_fast_dropout(model)
        if cfg.training.gradient_checkpointing:
            model.enable_input_require_grads()
    return model


_ZERO3: list = []  # the live HfDeepSpeedConfig of this worker's ZeRO-3 run (transformers holds it weakly)


def sharded_from_the_start(cfg: LoopConfig) -> None:
    """With ZeRO-3, make from_pretrained partition each parameter across the ranks as it loads (DeepSpeed's
    zero.Init, which transformers enters while an HfDeepSpeedConfig is alive): no rank ever holds the whole
    model, in host memory or on its GPU. The config is the run's own DeepSpeed config, concrete values only."""
    if cfg.training.zero_stage != 3:
        return
    from transformers.integrations.deepspeed import HfDeepSpeedConfig

    from rayft.training.ds_config import build_ds_config

    ds_config = build_ds_config(cfg.training, cfg.training.micro_batch_size, cfg.grad_accum, cfg.use_gpu)
    _ZERO3[:] = [HfDeepSpeedConfig(ds_config)]


# Causal LMs whose forward is exactly decoder -> lm_head -> shifted cross-entropy (no logit scaling,
# soft-capping or auxiliary losses), so the loss can be computed from the decoder's hidden states.
PLAIN_LM_HEAD_TYPES = {"llama", "mistral", "qwen2", "qwen3", "phi3", "smollm3", "olmo2", "starcoder2"}


def use_trained_position_logits(model) -> bool:
    """Make the model's training forward project to the vocabulary only where the labels carry loss.

    Instruction data trains on the answers only (often a third of the tokens or less), yet a causal
    LM computes logits, a (tokens x vocabulary) matrix, at every position. For small and mid-sized
    models that projection and its backward are a large share of a step. With labels, the patched
    forward runs the decoder, gathers the hidden states at trained positions, and applies lm_head and
    cross-entropy there: the loss and gradients are the same. Without labels (generation) it is the
    model's own forward. Returns False, leaving the model alone, for architectures not known to be plain.
    """
    if getattr(model.config, "model_type", None) not in PLAIN_LM_HEAD_TYPES or model.get_output_embeddings() is None:
        return False
    model.forward = types.MethodType(_trained_positions_forward, model)
    return True


def has_trained_position_logits(model) -> bool:
    """Whether `model` (or the model inside its DeepSpeed engine and PEFT wrapper) has the trained-position
    forward, which also answers `return_token_logps=True`."""
    model = getattr(model, "module", model)
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return getattr(model.forward, "__func__", None) is _trained_positions_forward


def _trained_positions_forward(
    self, input_ids=None, attention_mask=None, position_ids=None, labels=None, return_token_logps=False, **kwargs
):
    """With labels: the mean cross-entropy over trained positions as `loss`; with return_token_logps, instead
    {"token_logps": the log-probability of each trained target token}, in row-major order of the positions."""
    import torch
    import torch.nn.functional as F
    from transformers.modeling_outputs import CausalLMOutputWithPast

    if labels is None or kwargs.get("past_key_values") is not None:
        return type(self).forward(
            self, input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, labels=labels, **kwargs
        )
    kwargs.pop("use_cache", None)
    kwargs.pop("logits_to_keep", None)
    targets = labels[:, 1:]
    trained = targets != -100
    logits = next_token_logits_at(self, trained, input_ids, attention_mask, position_ids, **kwargs)
    if return_token_logps:
        return {"token_logps": -F.cross_entropy(logits.float(), targets[trained].to(torch.long), reduction="none")}
    if not bool(trained.any()):
        return CausalLMOutputWithPast(loss=logits.sum() * 0.0)
    loss = F.cross_entropy(logits.float(), targets[trained].to(torch.long))
    return CausalLMOutputWithPast(loss=loss)


def next_token_logits_at(model, where, input_ids, attention_mask=None, position_ids=None, **kwargs):
    """Logits predicting token t+1 only at the positions t where `where` (batch x seq-1) is true: the
    decoder runs over every token, the vocabulary projection only where it is needed. For the model
    types in PLAIN_LM_HEAD_TYPES; used by the training forward and by reference scoring in eval."""
    hidden = model.get_decoder()(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False, **kwargs
    ).last_hidden_state
    return model.get_output_embeddings()(hidden[:, :-1][where])


def apply_lora(model, training: TrainingConfig):
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model

    lora = training.lora
    layers, targets = None, lora.target_modules
    if lora.last_layers is not None:
        n = model.config.num_hidden_layers
        if lora.last_layers > n:
            raise ValueError(f"training.lora.last_layers is {lora.last_layers} but the model has {n} layers")
        layers = list(range(n - lora.last_layers, n))
        if targets == "all-linear":  # peft takes layer indexes only with explicit module names
            head = model.get_output_embeddings()
            targets = sorted(
                {
                    name.rsplit(".", 1)[-1]
                    for name, m in model.named_modules()
                    if isinstance(m, torch.nn.Linear) and m is not head and ".layers." in f".{name}"
                }
            )
    peft_model = get_peft_model(
        model,
        LoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=targets,
            layers_to_transform=layers,
            task_type="CAUSAL_LM",
        ),
    )
    assert isinstance(peft_model, PeftModel)  # a mixed model only with mixed=True
    return peft_model


def build_engine(model, cfg: LoopConfig):
    import deepspeed
    from torch.optim.lr_scheduler import LambdaLR

    from rayft.training.ds_config import build_ds_config, lr_lambda

    t = cfg.training
    ds_config = build_ds_config(t, t.micro_batch_size, cfg.grad_accum, cfg.use_gpu)
    params = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(
        model=model,
        model_parameters=params,  # pyright: ignore[reportArgumentType] - DeepSpeed annotates it as a Module
        config=ds_config,
        # DeepSpeed's annotation wants a scheduler factory returning the deprecated _LRScheduler
        lr_scheduler=lambda opt: LambdaLR(opt, lambda s: lr_lambda(s, cfg.total_steps, t.warmup_ratio, t.lr_schedule)),  # pyright: ignore[reportArgumentType]
    )
    if t.method == "lora":
        engine.module_state_dict = types.MethodType(_trainable_module_state_dict, engine)
    return engine


def _trainable_module_state_dict(engine, destination=None, prefix="", keep_vars=False, exclude_frozen_parameters=False):
    """DeepSpeed's module_state_dict, but frozen *tied* weights (lm_head = embed_tokens) are dropped too:
    its filter walks de-duplicated parameter names, so the tied alias of the frozen embedding stayed in
    every LoRA checkpoint (the largest single tensor of a small model)."""
    sd = engine.module.state_dict(destination=destination, prefix=prefix, keep_vars=keep_vars)
    if exclude_frozen_parameters:
        for name, param in engine.module.named_parameters(remove_duplicate=False):
            if not param.requires_grad:
                sd.pop(prefix + name, None)
    return sd


# --------------------------------------------------------------------------- data helpers


def micro_batches(shard, size: int, skip: set[int]):
    """Yield (rows, row ids) micro-batches of `size` rows from a Ray Data shard, leaving out
    rows already trained this epoch (after a resume)."""
    buffer: list[dict] = []
    for block in shard.iter_batches(batch_size=size, batch_format="numpy", prefetch_batches=2):
        keys = list(block)
        for values in zip(*(block[k] for k in keys), strict=True):
            row = dict(zip(keys, values, strict=True))
            ids = _row_ids(row)
            if skip and any(i in skip for i in ids):
                continue
            row["_ids"] = ids
            buffer.append(row)
            if len(buffer) == size:
                yield buffer, [i for r in buffer for i in r["_ids"]]
                buffer = []
    if buffer:
        yield buffer, [i for r in buffer for i in r["_ids"]]


def _row_ids(row: dict) -> list[int]:
    if "row_ids" in row:
        return [int(i) for i in np.asarray(row["row_ids"]).ravel()]
    return [int(row["row_id"])]


def gather_workers(world: int) -> tuple[list[int], list[str]]:
    """Each rank's process id and Ray node id, in rank order."""
    import ray
    import torch.distributed as dist

    mine = (os.getpid(), ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local")
    everyone: list = [None] * world
    if dist.is_initialized():
        dist.all_gather_object(everyone, mine)
    else:
        everyone = [mine]
    return [pid for pid, _ in everyone], [node for _, node in everyone]


def all_ranks_have(mine: bool, device) -> bool:
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        return mine
    flag = torch.tensor([1 if mine else 0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def forward(engine, rows: list[dict], device, pad_id: int):
    """(summed cross-entropy over the micro-batch's trained tokens, their number): the model's mean loss
    times the count of shifted labels that carry loss."""
    from rayft.training.formats import collate

    batch = {k: v.to(device) for k, v in collate(rows, pad_id).items()}
    n = int((batch["labels"][:, 1:] != IGNORE).sum())
    return engine(**batch, use_cache=False).loss * n, n


def trained_tokens(rows: list[dict]) -> int:
    """Tokens of a micro-batch that carry loss (labels after the shift)."""
    return sum(int((np.asarray(r["labels"])[1:] != IGNORE).sum()) for r in rows)


def train_step(
    engine, group: list, device, pad_id: int, world: int, grad_accum: int, clock: StepClock, trim_heap: bool = False
) -> tuple[list[float], int]:
    """One optimizer step over `group`, this rank's grad_accum micro-batches of (rows, row ids).

    The step's loss is the mean over every trained token of every micro-batch on every rank: the token
    count is all-reduced before the first forward, and each micro-batch's summed loss is scaled so that
    DeepSpeed's averaging (1/grad_accum per micro-batch, 1/world over ranks) leaves sum / count. A
    micro-batch with 10 trained tokens weighs 10/2,000 of one with 2,000, not as much. Returns each
    micro-batch's summed loss and the step's trained tokens on all ranks.

    trim_heap: return the heap's free pages to the system after the step's last backward and after the
    optimizer step (release_freed_memory; ~0.1 s on a 0.5B model). The backward's gathered weights and
    transient gradients, freed by then, would otherwise stay resident under the optimizer's own allocations:
    on a 0.5B ZeRO-3 model with 2 ranks, 1.4 GiB per rank."""
    import torch
    import torch.distributed as dist

    count = torch.tensor([float(sum(trained_tokens(rows) for rows, _ in group))], dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(count)
    step_tokens = int(count.item())
    scale = world * grad_accum / max(step_tokens, 1)
    losses = []
    for i, (rows, _) in enumerate(group):
        boundary = trim_heap and i == len(group) - 1
        clock.start()
        loss_sum, _ = forward(engine, rows, device, pad_id)
        clock.lap("forward_s")
        engine.backward(loss_sum * scale)  # its gradient reduction is timed apart, as grad_sync_s (time_grad_sync)
        if boundary:
            release_freed_memory()
        clock.lap("backward_s")
        engine.step()
        if boundary:
            release_freed_memory()
        clock.lap("optimizer_s")
        losses.append(loss_sum.item())
    return losses, step_tokens


PHASES = ("forward_s", "backward_s", "grad_sync_s", "optimizer_s")


class StepClock:
    """Wall time of each phase of a micro-batch: forward, backward, the gradient reduction DeepSpeed runs at
    the end of backward, and the optimizer step. On a GPU each lap waits for the queued kernels first, so a
    phase is charged its own GPU time rather than the next phase's (a few microseconds per lap)."""

    def __init__(self, device):
        import torch

        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self.phases: dict[str, float] = dict.fromkeys(PHASES, 0.0)
        self.t = time.perf_counter()

    def start(self) -> None:
        self.sync()
        self.t = time.perf_counter()

    def lap(self, phase: str) -> None:
        self.sync()
        now = time.perf_counter()
        self.phases[phase] += now - self.t
        self.t = now

    def take(self) -> dict[str, float]:
        """This micro-batch's phases; the clock starts over."""
        out = self.phases
        self.phases = dict.fromkeys(PHASES, 0.0)
        return out


def time_grad_sync(engine, clock: StepClock) -> None:
    """Time DeepSpeed's end-of-backward gradient reduction (ZeRO's reduce-scatter, or the all-reduce
    without ZeRO) as its own phase, taken out of backward_s. Reductions that overlap the backward pass
    (overlap_comm on GPU) stay in backward_s."""
    inner = engine.allreduce_gradients

    def timed(*args, **kwargs):
        clock.lap("backward_s")
        try:
            return inner(*args, **kwargs)
        finally:
            clock.lap("grad_sync_s")

    engine.allreduce_gradients = timed


def release_freed_memory() -> None:
    """Hand the heap's free pages back to the system (glibc's malloc_trim; a no-op elsewhere). Loading a
    checkpoint and partitioning it under ZeRO free a whole model's worth of tensors, most of them below
    malloc's mmap threshold: without this they stay resident in every rank, whatever the number of ranks."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def host_rss() -> int:
    """Resident bytes of this process now (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def host_peak_rss() -> int:
    """The largest resident set this process has had, in bytes: Linux's VmHWM, which starts afresh when the
    process execs (getrusage's ru_maxrss does not: a child forked from a large process inherits its peak)."""
    import resource
    import sys

    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def memory_peaks(device, host_start: int) -> dict:
    """The largest any rank has held since the run started: GPU memory, and the host memory of the worker
    process (its peak resident set, and that peak above the process's size before the model loaded)."""
    import torch
    import torch.distributed as dist

    gpu = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    host = host_peak_rss()
    peaks = torch.tensor([gpu / 2**30, host / 2**30, (host - host_start) / 2**30], device=device)
    if dist.is_initialized():
        dist.all_reduce(peaks, op=dist.ReduceOp.MAX)
    gpu_gib, host_gib, host_above_gib = peaks.tolist()
    memory = {"host_mem_peak_gib": round(host_gib, 3), "host_mem_peak_above_start_gib": round(host_above_gib, 3)}
    if device.type == "cuda":
        memory["gpu_mem_peak_gib"] = round(gpu_gib, 2)
    return memory


class StepAccumulator:
    """One optimizer step's figures on this rank; `reduce` sums or averages them over ranks."""

    def __init__(self):
        self.tokens = self.real = self.trained = self.examples = 0.0
        self.loss_sum, self.loss_tokens, self.wait_s = 0.0, 1, 0.0
        self.phases = dict.fromkeys(PHASES, 0.0)
        self.t0 = time.perf_counter()

    def add(self, rows: list[dict], examples: int, one_row: bool = False) -> None:
        """A micro-batch's token figures. Pairs (DPO) run as a row per pair (chosen and rejected end to end),
        padded to the longest pair, or with `one_row` all in a single row (preference.pair_batch)."""
        from rayft.training.formats import padded_length

        seqs = [(r["input_ids"], r["labels"]) for r in rows]
        seqs += [(r["rejected_ids"], r["rejected_labels"]) for r in rows if "rejected_ids" in r]  # pairs: both answers
        lengths = [len(ids) for ids, _ in seqs]
        self.examples += examples
        self.real += sum(lengths)
        if len(seqs) > len(rows):  # pairs
            pairs = [a + b for a, b in zip(lengths[: len(rows)], lengths[len(rows) :], strict=True)]
            self.tokens += padded_length(sum(pairs)) if one_row else padded_length(max(pairs)) * len(pairs)
        else:
            self.tokens += padded_length(max(lengths)) * len(seqs)
        self.trained += sum(int((np.asarray(labels) != IGNORE).sum()) for _, labels in seqs)

    def finish(self, loss_sum: float, loss_tokens: int, wait_s: float, phases: dict[str, float]) -> None:
        """The step's summed loss on this rank, the trained tokens of the whole step (all ranks), the data
        wait and the phase times."""
        self.loss_sum, self.loss_tokens, self.wait_s, self.phases = loss_sum, max(loss_tokens, 1), wait_s, phases

    def reduce(self, device, world: int, host_start: int = 0) -> dict:
        """The step's figures over all ranks; host_start: this process's resident bytes before the model."""
        import torch
        import torch.distributed as dist

        step_s = time.perf_counter() - self.t0
        sums = [self.tokens, self.real, self.trained, self.examples, self.loss_sum]  # summed over ranks
        means = [self.wait_s, step_s, *self.phases.values()]  # averaged over ranks
        v = torch.tensor(sums + means, dtype=torch.float64, device=device)
        if dist.is_initialized():
            dist.all_reduce(v)
            v[len(sums) :] /= world
        tokens, real, trained, examples, loss_sum, wait_s, step_s, *phases = v.tolist()
        return memory_peaks(device, host_start) | {
            "loss": loss_sum / self.loss_tokens,  # the mean over the step's trained tokens, as eval_loss is
            "examples": int(examples),
            "tokens": int(tokens),
            "nonpad_tokens": int(real),
            "trained_tokens": int(trained),
            "tokens_per_s": tokens / step_s,
            "nonpad_tokens_per_s": real / step_s,
            "step_time_s": step_s,
            "data_wait_s": wait_s,
            **dict(zip(PHASES, phases, strict=True)),
        }


def eval_micro_batches(shard, size: int, device):
    """The eval split's micro-batches (their rows) for as long as every rank still has one, so that ranks whose
    shards differ in length stop together and their collectives stay matched."""
    batches = micro_batches(shard, size, skip=set())
    while True:
        item = next(batches, None)
        if not all_ranks_have(item is not None, device):
            return
        assert item is not None  # this rank has one, as every rank has
        yield item[0]


def evaluate(engine, shard, size: int, device, pad_id: int) -> dict:
    """Token-weighted mean loss over the whole eval split, and its perplexity."""
    import torch
    import torch.distributed as dist

    engine.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    with torch.no_grad():
        for rows in eval_micro_batches(shard, size, device):
            loss_sum, n = forward(engine, rows, device, pad_id)
            total += torch.tensor([loss_sum.item(), n], dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(total)
    engine.train()
    loss = (total[0] / total[1].clamp(min=1)).item()
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0)), "eval_tokens": int(total[1].item())}


# --------------------------------------------------------------------------- checkpoints


def report_with_checkpoint(engine, metrics: dict, step: int, epoch: int, consumed: set, rank: int, lora: bool):
    """Every rank saves its DeepSpeed shard plus its data position, then reports it."""
    import ray.train

    with tempfile.TemporaryDirectory(prefix="rayft-ckpt-") as tmp:
        # LoRA runs leave the frozen base weights out: the base is read from model.name on resume.
        engine.save_checkpoint(tmp, tag=DS_TAG, exclude_frozen_parameters=lora)
        with open(os.path.join(tmp, STATE_FILE.format(rank=rank)), "w") as f:
            json.dump({"step": step, "epoch": epoch, "consumed": sorted(consumed)}, f)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


@contextlib.contextmanager
def checkpoint_files(checkpoint, run_dir: str, rank: int, world: int):
    """This rank's local view of a checkpoint to resume from. On a local or shared filesystem, the directory
    itself. In cloud storage, a download of what this rank reads: the model states, every rank's data
    position and its own ZeRO partition, not the other ranks' (each is 1/world of the optimizer states;
    all of them are fetched only when the number of ranks changed)."""
    from rayft.training import storage

    if not storage.is_remote(run_dir):
        with checkpoint.as_directory() as local:
            yield local
        return
    uri = storage.join(run_dir, storage.basename(checkpoint.path))
    saved = storage.glob(storage.join(uri, DS_TAG), "*zero_pp_rank_*_mp_rank_*_optim_states.pt")
    skip: tuple[str, ...] = ()
    if len(saved) == world:
        skip = tuple(f"{DS_TAG}/*zero_pp_rank_{k}_mp_rank_*" for k in range(world) if k != rank)
    with storage.local_copy(uri, skip=skip) as local:
        yield local


def load_checkpoint(engine, ckpt_dir: str, lora: bool) -> tuple[int, int, set]:
    """Restore engine (weights, optimizer, scheduler) and the data position; returns (step, epoch, consumed)."""
    import glob

    engine.load_checkpoint(ckpt_dir, tag=DS_TAG, load_module_strict=not lora)
    step, epoch, consumed = 0, 0, set()
    for path in sorted(glob.glob(os.path.join(ckpt_dir, STATE_FILE.format(rank="*")))):
        with open(path) as f:
            state = json.load(f)
        step, epoch = state["step"], state["epoch"]
        consumed.update(state["consumed"])  # every rank's rows: shards may be dealt differently now
    return step, epoch, consumed


# --------------------------------------------------------------------------- metrics


class MetricsLog:
    """Rank 0's metrics: <run>/metrics.jsonl (the driver tails it for progress) and TensorBoard events.

    With the run directory in cloud storage they are written to a local directory and uploaded as they grow
    (at most every SYNC_S seconds, and at once on events such as a checkpoint or the end); a resumed rank 0
    first downloads what an earlier one wrote, so the file keeps the whole history."""

    SYNC_S = 1.0

    def __init__(self, run_dir: str):
        from rayft.training import storage

        self.run_dir, self.remote = run_dir, storage.is_remote(run_dir)
        self.local = tempfile.mkdtemp(prefix="rayft-metrics-") if self.remote else run_dir
        os.makedirs(self.local, exist_ok=True)
        self.path = os.path.join(self.local, METRICS_FILE)
        if self.remote and storage.exists(storage.join(run_dir, METRICS_FILE)):
            storage.download(storage.join(run_dir, METRICS_FILE), self.path)
        self.synced = 0.0
        try:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(os.path.join(self.local, "tensorboard"))
        except ImportError:  # pragma: no cover - tensorboardX ships with ray[tune]
            self.tb = None

    def event(self, record: dict) -> None:
        self._append(record)
        self.sync(force=True)

    def write(self, metrics: dict) -> None:
        self._append(metrics)
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and k not in ("step", "epoch"):
                    self.tb.add_scalar(("eval/" if k.startswith("eval_") else "train/") + k, v, metrics["step"])
            self.tb.flush()
        self.sync()

    def _append(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"time": time.time(), **record}) + "\n")

    def sync(self, force: bool = False) -> None:
        """Upload the metrics and TensorBoard events (cloud run directories only)."""
        if not self.remote or (not force and time.time() - self.synced < self.SYNC_S):
            return
        from rayft.training import storage

        storage.upload(self.path, storage.join(self.run_dir, METRICS_FILE))
        if os.path.isdir(os.path.join(self.local, "tensorboard")):
            storage.upload(os.path.join(self.local, "tensorboard"), storage.join(self.run_dir, "tensorboard"))
        self.synced = time.time()


class NullLog:
    def event(self, record: dict) -> None:
        pass

    def write(self, metrics: dict) -> None:
        pass

    def sync(self, force: bool = False) -> None:
        pass


def _float(x) -> float | None:
    if x is None:
        return None
    return float(x.item() if hasattr(x, "item") else x)
