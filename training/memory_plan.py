"""The memory plan of a training job: bytes per worker (per GPU) and per node's host RAM, before anything starts.

`rayft train JOB.yaml --dry-run` prints it; `estimate(job)` is the API (a benchmark compares it with measured peaks).
The model's parameter counts are exact: its config is built on PyTorch's meta device (no weights are read) and,
for LoRA, wrapped with the same `apply_lora` the workers use. The rest is the standard ZeRO accounting:

N = parameters (tied embeddings once; LoRA: base + adapters), T = trainable, w = workers, e = 2 (bf16/fp16) or 4 (fp32).
- weights: e*N. ZeRO-3 partitions them (frozen ones too): e*N/w, plus the weights gathered for compute, which
  DeepSpeed keeps up to stage3_max_live_parameters (1e9 unless training.ds_config sets it: for smaller models,
  all of them) plus the layer (or embedding) being gathered; for full finetunes on CPU, where rayft turns off
  prefetching and the reuse window, only the layer being gathered. offload_params keeps the partition in host RAM.
- gradients: e*T; ZeRO-2/3 partition them (e*T/w), and with offload_optimizer the partition lives in host RAM.
  ZeRO-1/2/3 add their reduce buckets (reduce_bucket_size elements, two with overlap_comm on GPU).
- optimizer: 12*T mixed precision (fp32 master weights + Adam m and v); fp32 8*T (m, v; the weights are the
  master), but 12*T with ZeRO >= 1, whose optimizer keeps its own fp32 copy of its partition even when the model is
  fp32 (measured on DeepSpeed 0.19). ZeRO >= 1 partitions them (/w); offload_optimizer moves them to host RAM
  with the fp32 gradients the CPU Adam reads and a 16-bit staging copy of the partition: (12 + 4 + e)*T/w.
  While it updates the partition, the step holds a flat fp32 copy of its gradients: 4*T/w (ZeRO-3: one sub-group
  at a time, 4*min(T/w, sub_group_size)).
- activations, per token of micro_batch_size x max_seq_len, per decoder layer (a dense Llama-style decoder with
  PyTorch SDPA, which keeps no seq x seq attention matrix; counted from what autograd saves):
    full: 8h (the two RMSNorm inputs, kept in fp32) + e*(4h + 2q + 2kv + 4i)
    LoRA: 8h + e*(2h + 2q + 2kv + 3i) for the frozen layer, plus per adapted linear its dropout's output and
          mask (e + 1 bytes per input feature on GPU, 2e on CPU), only in the layers from the lowest adapted one up
          (no gradient flows below it); h hidden, q/kv the query/key-value widths, i the MLP width.
  gradient_checkpointing keeps only each layer's input (e*h) plus one layer's activations while it is recomputed.
  Logits add 12 bytes per position per vocabulary entry (the loss's fp32 log-softmax, saved, plus its fp32
  gradients in backward) at every position: with skip_untrained_logits only trained positions get logits, but
  how many are trained depends on the data, so this is an upper bound. A packed or padded batch adds its
  b x s x s boolean attention mask. On CPU the sum is multiplied by CPU_ACTIVATION_SLACK: glibc's allocator keeps
  the forward's freed temporaries and backward's transient gradients resident (measured on SmolLM2).
- overhead: fixed per worker: GPU_OVERHEAD_BYTES on GPU (CUDA context, NCCL and cuBLAS workspaces, allocator
  slack: what torch.cuda.max_memory_allocated does not see), CPU_OVERHEAD_BYTES on CPU (the process baseline:
  what a worker holds before its model loads).
Host RAM per node: every rank loads a full copy of the checkpoint (e*N) in from_pretrained before DeepSpeed
moves it to its GPU, except with ZeRO-3, where rayft loads it partitioned (e*N/w each); the offloaded states of
the node's ranks; each GPU worker process's own baseline; on CPU workers, the per-worker totals themselves.
A plan fits when the per-worker total is at most 95% of the device's memory and the host total at most 90% of
the node's RAM.
"""

from __future__ import annotations

import functools
import os
import re
import sys
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rayft.training.config import TrainJob

GIB = 2**30
# Per GPU worker, beyond its tensors: the CUDA context (~0.5 GiB), NCCL and cuBLAS workspaces, and the caching
# allocator's fragmentation. nvidia-smi sees it; torch.cuda.max_memory_allocated does not.
GPU_OVERHEAD_BYTES = int(1.5 * GIB)
# Per CPU worker, before its model loads: Python with torch, transformers, peft, DeepSpeed and Ray Train imported
# (0.49 GiB resident, measured on Linux).
CPU_OVERHEAD_BYTES = int(0.5 * GIB)
# On CPU, peak RSS of a SmolLM2 forward + backward was 1.3-1.4x the bytes autograd saves (the formula below):
# freed forward temporaries stay resident in glibc's arenas, and backward's gradients are transient extras.
CPU_ACTIVATION_SLACK = 1.35
# Host RAM of each GPU worker process itself (torch and the CUDA libraries mapped, DeepSpeed, Ray Train).
GPU_WORKER_HOST_BYTES = int(2.0 * GIB)
DEVICE_USABLE, HOST_USABLE = 0.95, 0.90
# Memory per GPU (GiB, as torch.cuda reports it) for Ray's accelerator_type names. Ray names A100 (40 or 80 GB)
# and V100 (16 or 32 GB) alike, so they count as unknown: pass gpu_memory_gib.
GPU_MEMORY_GIB = {
    "H100": 79.6,
    "H200": 139.8,
    "H20": 95.0,
    "A100-40G": 39.4,
    "A100-80G": 79.3,
    "L4": 22.0,
    "A10G": 22.0,
    "L40S": 44.4,
    "T4": 14.6,
    "P100": 15.9,
    "P4": 7.4,
}
_LAYER_INDEX = re.compile(r"\.(?:layers|h|blocks|block)\.(\d+)\.")


class PlanError(ValueError):
    """A memory plan that cannot be made from what it was given; the message says what to change."""

    error_kind = "plan"  # what `rayft` calls it ("plan error ..."); rayft.training.run_dir.user_error


@dataclass
class MemoryPlan:
    """Estimated memory of a training job. Byte counts; `render()` is the readable table."""

    params: int  # every parameter (tied embeddings once; LoRA: base + adapters)
    trainable: int
    world: int  # scaling.num_workers
    workers_per_node: int
    precision: str  # resolved: bf16, fp16 or fp32
    per_worker: dict[str, int]  # weights, gradients, optimizer, activations, overhead: bytes on each worker's device
    host_per_node: dict[str, int]  # bytes of one node's host RAM
    device: str  # "GPU" or "CPU" (then the per-worker bytes live in host RAM too)
    capacity_per_worker: int | None = None
    host_capacity_per_node: int | None = None
    fits: bool | None = None
    advice: list[str] = field(default_factory=list)
    model: str = ""
    method: str = "full"
    zero_stage: int = 0
    micro_batch_size: int = 1
    seq_len: int = 0
    capacity_source: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def per_worker_total(self) -> int:
        return sum(self.per_worker.values())

    @property
    def host_per_node_total(self) -> int:
        return sum(self.host_per_node.values())

    @property
    def device_fits(self) -> bool | None:
        if self.capacity_per_worker is None:
            return None
        return self.per_worker_total <= DEVICE_USABLE * self.capacity_per_worker

    @property
    def host_fits(self) -> bool | None:
        if self.host_capacity_per_node is None:
            return None
        return self.host_per_node_total <= HOST_USABLE * self.host_capacity_per_node

    def verdict(self) -> str:
        unit = "per GPU" if self.device == "GPU" else "per worker"
        parts = []
        if self.capacity_per_worker is not None:
            parts.append(f"{_gib(self.per_worker_total)} of {_gib(self.capacity_per_worker)} GiB {unit}")
        if self.host_capacity_per_node is not None:
            parts.append(
                f"{_gib(self.host_per_node_total)} of {_gib(self.host_capacity_per_node)} GiB host RAM per node"
            )
        if self.fits is None:
            want = "--gpu-memory GiB, or --address of a cluster" if self.device == "GPU" else "--host-memory GiB"
            known = f" ({'; '.join(parts)})" if parts else ""
            return f"fit unknown: the {self.device} memory is not known{known}; state it with {want}"
        if self.fits:
            return "fits: " + "; ".join(parts)
        short = []
        if self.device_fits is False and self.capacity_per_worker is not None:
            short.append(
                f"{_gib(self.per_worker_total)} GiB {unit} needed, {_gib(DEVICE_USABLE * self.capacity_per_worker)} "
                f"usable of {_gib(self.capacity_per_worker)}"
            )
        if self.host_fits is False and self.host_capacity_per_node is not None:
            short.append(
                f"{_gib(self.host_per_node_total)} GiB host RAM per node needed, "
                f"{_gib(HOST_USABLE * self.host_capacity_per_node)} usable of {_gib(self.host_capacity_per_node)}"
            )
        change = f"; change: {self.advice[0]}" if self.advice else "; no setting makes it fit: use more memory"
        return "will NOT fit: " + "; ".join(short) + change

    def render(self) -> str:
        unit = "per GPU" if self.device == "GPU" else "per CPU worker"
        what = f"{self.method}, ZeRO-{self.zero_stage}, {self.precision}, "
        what += f"micro-batch {self.micro_batch_size} x {self.seq_len} tokens"
        lines = [
            f"memory plan: {self.model} ({_count(self.params)} params, {_count(self.trainable)} trainable)",
            f"  {what}, {self.world} {self.device} worker{'s' if self.world != 1 else ''} "
            f"({self.workers_per_node} per node)",
            "",
            f"  {unit:<26}{'GiB':>9}",
        ]
        for key, label in _WORKER_LABELS.items():
            lines.append(f"    {label:<24}{_gib(self.per_worker[key]):>9}")
        lines.append(f"    {'total':<24}{_gib(self.per_worker_total):>9}")
        if self.capacity_per_worker is not None:
            lines.append(f"    {'available':<24}{_gib(self.capacity_per_worker):>9}")
        lines += ["", f"  {'host RAM per node':<26}{'GiB':>9}"]
        for key, value in self.host_per_node.items():
            lines.append(f"    {_HOST_LABELS.get(key, key):<24}{_gib(value):>9}")
        lines.append(f"    {'total':<24}{_gib(self.host_per_node_total):>9}")
        if self.host_capacity_per_node is not None:
            lines.append(f"    {'available':<24}{_gib(self.host_capacity_per_node):>9}")
        if self.capacity_source:
            lines += ["", f"  memory available: {self.capacity_source}"]
        lines += [f"  note: {n}" for n in self.notes]
        lines += ["", self.verdict()]
        if self.fits is False and len(self.advice) > 1:
            lines.append("other changes, least disruptive first:")
            lines += [f"  - {a}" for a in self.advice[1:]]
        return "\n".join(lines)


_WORKER_LABELS = {
    "weights": "weights",
    "gradients": "gradients",
    "optimizer": "optimizer states",
    "step_gradients": "step's gradient copy",
    "activations": "activations",
    "overhead": "runtime overhead",
}
_HOST_LABELS = {
    "checkpoint_load": "checkpoint loading",
    "offloaded_optimizer": "offloaded optimizer",
    "offloaded_params": "offloaded weights",
    "worker_processes": "worker processes",
    "workers": "workers (CPU)",
}


def estimate(
    job: TrainJob,
    *,
    gpu_memory_gib: float | None = None,
    host_memory_gib: float | None = None,
    workers_per_node: int | None = None,
) -> MemoryPlan:
    """The memory plan of `job` (a TrainJob). The memory available comes from `gpu_memory_gib` (per GPU) and
    `host_memory_gib` (per node) when given, else from the connected Ray cluster, else from this machine (its GPU
    for GPU jobs; its RAM for CPU jobs, and for GPU jobs when it has a GPU). When the plan does not fit, `advice`
    lists the settings to change, least disruptive first, each with its saving."""
    use_gpu = job.scaling.use_gpu
    if gpu_memory_gib is not None and not use_gpu:
        raise PlanError(
            "a GPU memory was given but the job trains on CPU workers (scaling.use_gpu: false): their memory is "
            "host RAM; give the host memory instead (--host-memory GiB) or set scaling.use_gpu: true"
        )
    for name, v in (("gpu memory", gpu_memory_gib), ("host memory", host_memory_gib)):
        if v is not None and not v > 0:
            raise PlanError(f"{name} must be a positive number of GiB (got {v})")
    cap = _capacity(job, gpu_memory_gib, host_memory_gib, workers_per_node)
    plan = _plan(job, cap)
    if plan.fits is False:
        plan.advice = _advice(job, cap, plan)
    return plan


# --------------------------------------------------------------------------- the model's shape


@dataclass(frozen=True)
class _Shape:
    params: int
    trainable: int
    layers: int
    hidden: int
    q_dim: int
    kv_dim: int
    intermediate: int
    vocab: int
    largest_block: int  # params gathered at once under ZeRO-3: the largest decoder layer or the embedding
    adapters: tuple[tuple[int, int, int], ...]  # LoRA: (layer index or -1, in_features, r) per adapted linear


def _model_shape(job: TrainJob) -> _Shape:
    from rayft.training.models import resolve_model

    lora = job.training.lora.model_dump_json() if job.training.method == "lora" else None
    return _shape_of(resolve_model(job.model.name), job.model.revision, job.model.trust_remote_code, lora)


@functools.lru_cache(maxsize=32)
def _shape_of(path: str, revision: str | None, trust_remote_code: bool, lora: str | None) -> _Shape:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
    with torch.device("meta"):  # shapes only: no memory, no weights read
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers = int(text.num_hidden_layers)
    hidden = int(text.hidden_size)
    heads = int(text.num_attention_heads)
    head_dim = int(getattr(text, "head_dim", None) or hidden // heads)
    kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
    intermediate = int(getattr(text, "intermediate_size", None) or 4 * hidden)
    embed = model.get_input_embeddings().weight.numel()
    blocks = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == layers]
    layer_params = sum(p.numel() for p in blocks[0][0].parameters()) if blocks else 0
    adapters: tuple = ()
    if lora is not None:
        from peft.tuners.lora import LoraLayer

        from rayft.training.config import LoraConfig, TrainingConfig
        from rayft.training.model_setup import apply_lora

        # The workers' own apply_lora, run on the meta model: PEFT creates the adapters on the base layers'
        # (meta) device, so the trainable count is exactly the real one.
        with warnings.catch_warnings():  # peft calls a transformers property deprecated in v5
            warnings.simplefilter("ignore", FutureWarning)
            model = apply_lora(model, TrainingConfig(method="lora", lora=LoraConfig.model_validate_json(lora)))
        found = []
        for name, m in model.named_modules():
            if isinstance(m, LoraLayer) and m.r:
                index = _LAYER_INDEX.search(f".{name}.")
                assert m.in_features is not None  # set from the base layer the adapter wraps
                found.append((int(index.group(1)) if index else -1, int(m.in_features), int(next(iter(m.r.values())))))
        adapters = tuple(found)
    params = sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return _Shape(
        params=params,
        trainable=trainable,
        layers=layers,
        hidden=hidden,
        q_dim=heads * head_dim,
        kv_dim=kv_heads * head_dim,
        intermediate=intermediate,
        vocab=int(text.vocab_size),
        largest_block=max(embed, layer_params),
        adapters=adapters,
    )


# --------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class _Capacity:
    device_bytes: int | None
    host_bytes: int | None
    workers_per_node: int
    source: str


def _plan(job: TrainJob, cap: _Capacity) -> MemoryPlan:
    from rayft.training.ds_config import build_ds_config, resolve_precision
    from rayft.training.formats import padded_length

    t, use_gpu = job.training, job.scaling.use_gpu
    shape = _model_shape(job)
    precision = resolve_precision(t, use_gpu)
    e = 4 if precision == "fp32" else 2
    n, tr, w, z = shape.params, shape.trainable, job.scaling.num_workers, t.zero_stage
    zero = build_ds_config(t, t.micro_batch_size, job.grad_accum, use_gpu)["zero_optimization"]

    if z < 3:
        weights = e * n
    else:
        partition = 0 if t.offload_params else e * n // w
        if zero.get("stage3_prefetch_bucket_size") == 0 and zero.get("stage3_max_reuse_distance") == 0:
            live = 0  # every layer is released after use (rayft's CPU default, see ds_config)
        else:  # DeepSpeed's stage3_max_live_parameters (1e9 unless training.ds_config sets it)
            live = int(zero.get("stage3_max_live_parameters", 1e9))
        # gathering allocates fresh full-size buffers at any world size, one rank included
        gathered = e * min(n, live + shape.largest_block)
        weights = partition + gathered

    grads = e * tr if z <= 1 else (0 if t.offload_optimizer else e * tr // w)
    if z >= 1:
        bucket = int(zero.get("reduce_bucket_size", 500_000_000))
        if not use_gpu:  # on CPU, pages of torch.empty that are never written stay unresident
            bucket = min(bucket, tr)
        grads += e * bucket * (2 if zero.get("overlap_comm") and z < 3 else 1)

    optimizer_state = 12 * tr if (e == 2 or z >= 1) else 8 * tr
    if z >= 1:
        optimizer_state //= w
    step_gradients = 0
    if z >= 1 and not t.offload_optimizer:
        # The step copies the gradient partition into a flat fp32 buffer while it updates it (ZeRO-3: one
        # sub-group at a time, sub_group_size elements at most)
        step_gradients = 4 * (tr // w if z < 3 else min(tr // w, int(zero.get("sub_group_size", 1e9))))
    offloaded_optimizer = 0
    if t.offload_optimizer:
        offloaded_optimizer = (12 + 4 + e) * tr // w
        optimizer_state = 0

    seq = padded_length(job.data.max_seq_len)
    activations = _activation_bytes(shape, job, e, seq, use_gpu)
    if not use_gpu:
        activations = int(activations * CPU_ACTIVATION_SLACK)
    per_worker = {
        "weights": weights,
        "gradients": grads,
        "optimizer": optimizer_state,
        "step_gradients": step_gradients,
        "activations": activations,
        "overhead": GPU_OVERHEAD_BYTES if use_gpu else CPU_OVERHEAD_BYTES,
    }

    k = cap.workers_per_node
    host: dict[str, int] = {}
    if use_gpu:
        host["checkpoint_load"] = k * (e * n // w if z == 3 else e * n)
    if offloaded_optimizer:
        host["offloaded_optimizer"] = k * offloaded_optimizer
    if t.offload_params:
        host["offloaded_params"] = k * (e * n // w)
    if use_gpu:
        host["worker_processes"] = k * GPU_WORKER_HOST_BYTES
    else:
        host["workers"] = k * sum(per_worker.values())

    notes = []
    if t.skip_untrained_logits:
        notes.append(
            "activations count logits at every position: an upper bound, as skip_untrained_logits computes them "
            "only where labels train"
        )
    plan = MemoryPlan(
        params=n,
        trainable=tr,
        world=w,
        workers_per_node=k,
        precision=precision,
        per_worker=per_worker,
        host_per_node=host,
        device="GPU" if use_gpu else "CPU",
        capacity_per_worker=cap.device_bytes,
        host_capacity_per_node=cap.host_bytes,
        model=job.model.name,
        method=t.method if t.method == "full" else f"lora r{t.lora.r}",
        zero_stage=z,
        micro_batch_size=t.micro_batch_size,
        seq_len=seq,
        capacity_source=cap.source,
        notes=notes,
    )
    checks = [c for c in (plan.device_fits, plan.host_fits) if c is not None]
    plan.fits = all(checks) if checks else None
    return plan


def _activation_bytes(shape: _Shape, job: TrainJob, e: int, seq: int, use_gpu: bool) -> int:
    t = job.training
    b = t.micro_batch_size
    h, q, kv, i, n_layers = shape.hidden, shape.q_dim, shape.kv_dim, shape.intermediate, shape.layers
    norms = 8 * h  # the two RMSNorm inputs of a layer, upcast to fp32 and saved
    if t.method == "full":
        per_layer = [norms + e * (4 * h + 2 * q + 2 * kv + 4 * i)] * n_layers
    else:
        per_input = (e + (1 if use_gpu else e)) if t.lora.dropout > 0 else e  # dropout output and its mask
        adapters = [0] * n_layers
        for index, in_features, r in shape.adapters:
            for j in [index] if 0 <= index < n_layers else range(n_layers):
                adapters[j] += per_input * in_features + e * r
        adapted = [j for j, a in enumerate(adapters) if a]
        lowest = min(adapted) if adapted else 0
        base = norms + e * (2 * h + 2 * q + 2 * kv + 3 * i)
        per_layer = [base + adapters[j] for j in range(lowest, n_layers)]
    if t.gradient_checkpointing:  # each layer's input, plus one layer's activations while it is recomputed
        layer_bytes = n_layers * e * h + max(per_layer, default=0)
    else:
        layer_bytes = sum(per_layer)
    final_norm = 4 * h + 2 * e * h
    logits = 12 * shape.vocab  # fp32 log-softmax saved for backward, then its fp32 gradients (per position)
    mask = b * seq * seq  # one boolean b x s x s attention mask (packed or padded rows), shared by the layers
    return b * seq * (layer_bytes + final_norm + logits) + mask


# --------------------------------------------------------------------------- the memory available


def _capacity(job: TrainJob, gpu_gib: float | None, host_gib: float | None, workers_per_node: int | None) -> _Capacity:
    s = job.scaling
    use_gpu, w = s.use_gpu, s.num_workers
    device: int | None = None
    host: int | None = None
    per_node: int | None = None
    sources: list[str] = []
    ray = sys.modules.get("ray")  # only a cluster this process already joined is asked; Ray is never started here
    if ray is not None and ray.is_initialized():
        nodes = [nd for nd in ray.nodes() if nd.get("Alive")]
        if use_gpu:
            gpu_nodes = [nd for nd in nodes if nd.get("Resources", {}).get("GPU", 0) > 0]
            if gpu_nodes:
                per_node = int(max(nd["Resources"]["GPU"] for nd in gpu_nodes) // s.gpus_per_worker) or 1
                kinds = {_accelerator_type(nd["Resources"]) for nd in gpu_nodes}
                mem = [GPU_MEMORY_GIB.get(k) if k else None for k in kinds]
                if gpu_gib is None and mem and None not in mem:
                    device = int(min(m for m in mem if m is not None) * GIB)
                    sources.append(f"{'/'.join(sorted(k for k in kinds if k))} GPUs of the Ray cluster")
                elif gpu_gib is None:
                    sources.append(
                        f"the cluster's GPUs ({', '.join(sorted(k or 'untyped' for k in kinds))}) have no known memory"
                    )
                # Ray's "memory" resource: the node's RAM less its object store, what tasks and actors may use.
                host = int(min(nd["Resources"].get("memory", 0) for nd in gpu_nodes)) or None
        else:
            cpu_nodes = [nd for nd in nodes if nd.get("Resources", {}).get("CPU", 0) >= s.cpus_per_worker]
            if cpu_nodes:
                per_node = int(max(nd["Resources"]["CPU"] for nd in cpu_nodes) // s.cpus_per_worker) or 1
                host = int(min(nd["Resources"].get("memory", 0) for nd in cpu_nodes)) or None
        if host is not None and host_gib is None:
            sources.append("host RAM from the Ray cluster's nodes (less the object store)")
    else:
        local_gpu = use_gpu and _local_cuda_bytes()
        if local_gpu and gpu_gib is None:
            device = local_gpu
            sources.append("this machine's GPU")
        if not use_gpu or local_gpu:  # a GPU job planned on a machine without one runs elsewhere
            host = _local_ram_bytes()
            if host_gib is None:
                sources.append("this machine's RAM")
    if gpu_gib is not None:
        device = int(gpu_gib * GIB)
        sources.append(f"{gpu_gib:g} GiB per GPU as given")
    if host_gib is not None:
        host = int(host_gib * GIB)
        sources.append(f"{host_gib:g} GiB host RAM per node as given")

    if workers_per_node is not None:
        if workers_per_node < 1:
            raise PlanError(f"workers_per_node must be at least 1 (got {workers_per_node})")
        k = min(workers_per_node, w)
    elif per_node is not None:
        k = min(w, per_node)
    else:
        k = min(w, 8) if use_gpu else w
    if use_gpu and device is not None:
        device = int(device * min(1.0, s.gpus_per_worker))  # workers sharing a GPU share its memory
    elif not use_gpu:
        device = host // k if host is not None else None  # CPU workers' memory is the node's RAM, shared
    return _Capacity(device, host, k, "; ".join(sources))


def _accelerator_type(resources: dict) -> str | None:
    for key in resources:
        if key.startswith("accelerator_type:"):
            return key.split(":", 1)[1]
    return None


def _local_cuda_bytes() -> int | None:
    try:
        import torch

        if torch.cuda.is_available():
            return int(torch.cuda.get_device_properties(0).total_memory)
    except Exception:  # a broken CUDA install: the memory is just not known
        return None
    return None


def _local_ram_bytes() -> int | None:
    try:
        import psutil

        return int(psutil.virtual_memory().total)
    except ImportError:
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            return None


# --------------------------------------------------------------------------- advice


def _advice(job: TrainJob, cap: _Capacity, plan: MemoryPlan) -> list[str]:
    """Settings that lower what does not fit, least disruptive first, each with its saving (the estimate re-run
    with that one change). The first (least disruptive) change, or run of changes, that fits leads."""
    t, use_gpu = job.training, job.scaling.use_gpu
    w = job.scaling.num_workers
    unit = "per GPU" if use_gpu else "per worker"
    options: list[tuple[str, dict[str, object]]] = []  # (what the change does, {dotted key: value})
    if t.zero_stage < 3 and (w > 1 or use_gpu):
        options.append(
            (
                f"partitions weights, gradients and optimizer states over the {w} workers"
                if w > 1
                else "loads the checkpoint partitioned",
                {"training.zero_stage": 3},
            )
        )
    if not t.gradient_checkpointing:
        options.append(
            ("recomputes activations in backward, ~30% more compute", {"training.gradient_checkpointing": True})
        )
    if t.micro_batch_size > 1:
        sizes = [d for d in range(t.micro_batch_size - 1, 0, -1) if t.micro_batch_size % d == 0]
        value = _first_fitting(job, cap, "training.micro_batch_size", sizes)
        options.append(
            (
                "a smaller micro-batch: the same global batch in more accumulation steps",
                {"training.micro_batch_size": value},
            )
        )
    if use_gpu and not t.offload_optimizer:
        change: dict[str, object] = {"training.offload_optimizer": True}
        if t.zero_stage == 0:
            change = {"training.zero_stage": 2, **change}
        options.append(("keeps optimizer states in host RAM, slower steps", change))
    if use_gpu and not t.offload_params:
        change = {"training.offload_params": True}
        if t.zero_stage < 3:
            change = {"training.zero_stage": 3, **change}
        options.append(("keeps the weights in host RAM, much slower steps", change))
    if use_gpu and plan.precision == "fp32":
        options.append(("16-bit weights, gradients and activations", {"training.precision": "bf16"}))
    if job.data.max_seq_len > 128:
        lengths = [job.data.max_seq_len // 2**k for k in range(1, 8) if job.data.max_seq_len // 2**k >= 128]
        value = _first_fitting(job, cap, "data.max_seq_len", lengths)
        options.append(("shorter rows: longer ones are cut or dropped, per data.overlong", {"data.max_seq_len": value}))
    if t.method == "full":
        options.append(("trains adapters only: no full gradients or optimizer states", {"training.method": "lora"}))

    entries: list[tuple[str, dict[str, object], MemoryPlan]] = []
    for why, change in options:
        alt = _replan(job, cap, change)
        if alt is not None and _better(plan, alt):
            enough = ", enough alone" if alt.fits else ""
            entries.append((f"{_settings(change)} ({why}: {_saving(plan, alt, unit)}{enough})", change, alt))
    # What leads: walking the changes least disruptive first, the first that is enough alone, or the first run
    # of them that fits together (less any member it fits without).
    advice = [text for text, _, _ in entries]
    taken: list[dict[str, object]] = []
    alt = None
    for text, change, alone in entries:
        if alone.fits:
            advice.remove(text)
            advice.insert(0, text)
            break
        taken.append(change)
        alt = _replan(job, cap, _merged(taken))
        if alt is not None and alt.fits:
            for member in list(taken[:-1]):
                rest = [c for c in taken if c is not member]
                fewer = _replan(job, cap, _merged(rest))
                if fewer is not None and fewer.fits:
                    taken, alt = rest, fewer
            advice.insert(
                0,
                f"{_settings(_merged(taken))} together ({_gib(alt.per_worker_total)} GiB {unit}, "
                f"{_gib(alt.host_per_node_total)} GiB host RAM per node: fits)",
            )
            break
    else:
        if alt is not None:
            advice.append(
                f"even all of these together need {_gib(alt.per_worker_total)} GiB {unit} and "
                f"{_gib(alt.host_per_node_total)} GiB host RAM per node: use more memory or more workers"
            )
    if w > 1 or t.zero_stage >= 1:
        more: dict[str, object] = {"scaling.num_workers": 2 * w}
        alt = _replan(job, cap, more)
        if alt is not None and _better(plan, alt):
            advice.append(
                f"more workers, e.g. {_settings(more)} (ZeRO partitions over them: {_saving(plan, alt, unit)}; "
                "training.global_batch_size must stay a multiple of micro_batch_size x num_workers)"
            )
    return advice


def _merged(changes: list[dict[str, Any]]) -> dict[str, object]:
    """Several changes as one; the highest ZeRO stage any of them asks for wins."""
    out: dict[str, Any] = {}
    for change in changes:
        for key, value in change.items():
            out[key] = max(value, out.get(key, 0)) if key == "training.zero_stage" else value
    return out


def _replan(job: TrainJob, cap: _Capacity, change: dict[str, object]) -> MemoryPlan | None:
    alt = job.model_copy(deep=True)
    try:
        for key, value in change.items():
            section, name = key.rsplit(".", 1)
            obj = alt
            for part in section.split("."):
                obj = getattr(obj, part)
            setattr(obj, name, value)  # sections validate on assignment
    except ValueError:  # pydantic's ValidationError is one: the change is not a valid job
        return None
    return _plan(alt, cap)


def _first_fitting(job: TrainJob, cap: _Capacity, key: str, values: list[int]) -> int:
    """The largest of `values` (largest first) with which the plan fits, else the smallest."""
    for v in values:
        alt = _replan(job, cap, {key: v})
        if alt is not None and alt.fits:
            return v
    return values[-1]


def _better(plan: MemoryPlan, alt: MemoryPlan) -> bool:
    """alt lowers what does not fit in plan without making the other side stop fitting."""
    if alt.device_fits is False and plan.device_fits is not False:
        return False
    if alt.host_fits is False and plan.host_fits is not False:
        return False
    lower_device = plan.device_fits is False and alt.per_worker_total < plan.per_worker_total
    lower_host = plan.host_fits is False and alt.host_per_node_total < plan.host_per_node_total
    return lower_device or lower_host


def _saving(plan: MemoryPlan, alt: MemoryPlan, unit: str) -> str:
    parts = []
    if plan.device_fits is False or alt.per_worker_total < plan.per_worker_total:
        parts.append(f"{_signed_gib(alt.per_worker_total - plan.per_worker_total)} GiB {unit}")
    if plan.host_fits is False or alt.host_per_node_total != plan.host_per_node_total:
        parts.append(f"{_signed_gib(alt.host_per_node_total - plan.host_per_node_total)} GiB host RAM per node")
    return ", ".join(parts)


def _settings(change: dict[str, object]) -> str:
    return " and ".join(f"set {k}: {str(v).lower() if isinstance(v, bool) else v}" for k, v in change.items())


def _gib(n: float) -> str:
    g = n / GIB
    return f"{g:.2f}" if abs(g) < 10 else f"{g:.1f}"


def _signed_gib(n: float) -> str:
    return ("+" if n > 0 else "-") + _gib(abs(n))


def _count(n: int) -> str:
    for div, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.3g}{suffix}"
    return str(n)
